"""FFD packing (spec B.11) and the block-diagonal mask: packed rows train exactly like unpacked ones,
with the behaviour log-probs mu carried to their tokens and the chunked log-probs equal to dense ones."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intellect.coordinator.trainer._compat import attention_mask_for
from intellect.coordinator.trainer.config import LossConfig, TrainerConfig
from intellect.coordinator.trainer.loss import aggregation_weights, policy_loss, token_logprobs
from intellect.coordinator.trainer.packing import (
    PackedBatch,
    TrainSample,
    first_fit_decreasing,
    pack,
    pad_each,
    segment_mask,
)


def tiny_llama(attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).float()


def random_samples(num: int, seed: int = 0) -> list[TrainSample]:
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(
            1, 1000, (int(torch.randint(low, high, (1,), generator=g)),), generator=g
        ).tolist()

    return [TrainSample(ids(2, 8), ids(1, 20), float(torch.randn(1, generator=g))) for _ in range(num)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=60), st.integers(20, 120))
def test_ffd_properties(lengths, capacity):
    bins = first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    loads = [sum(min(lengths[i], capacity) for i in b) for b in bins]
    assert all(load <= capacity for load in loads)
    for b in bins:  # decreasing order inside every bin
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # first fit: a later bin's content never fits into an earlier bin, so any two loads exceed capacity
    for i in range(len(loads)):
        for j in range(i + 1, len(loads)):
            assert loads[i] + loads[j] > capacity


def test_pack_layout():
    samples = random_samples(9)
    batch = pack(samples, seq_len=32, pad_token_id=0)
    assert batch.input_ids.shape[1] == 32
    for index, sample in enumerate(samples):
        where = batch.sample_ids == index
        row = int(where.any(1).nonzero()[0])
        assert batch.input_ids[row][where[row]].tolist() == [*sample.input_tokens, *sample.output_tokens]
        assert batch.position_ids[row][where[row]].tolist() == list(range(len(sample[0]) + len(sample[1])))
        assert batch.loss_mask[row][where[row]].tolist() == [False] * len(sample[0]) + [True] * len(sample[1])
        assert torch.all(batch.advantages[row][where[row]] == torch.tensor(sample.advantage))
    pad = batch.sample_ids < 0
    assert not batch.loss_mask[pad].any() and batch.advantages[pad].eq(0).all()
    assert batch.input_ids[pad].eq(0).all()
    real = sum(len(s[0]) + len(s[1]) for s in samples)
    assert batch.efficiency == pytest.approx(real / batch.input_ids.numel())
    assert batch.efficiency > pad_each(samples, pad_token_id=0).efficiency


def test_pad_tail_positions_restart_and_long_sample_truncated():
    batch = pack([TrainSample([1, 2], [3, 4, 5, 6, 7, 8, 9, 10], 1.0), TrainSample([5], [6], 1.0)], 6, 0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [5, 6, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3]]


def test_samples_need_a_prompt_token():
    with pytest.raises(ValueError):
        pack([TrainSample([], [1, 2], 1.0)], 8, 0)


def test_segment_mask_is_block_diagonal_causal():
    allowed = segment_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0, 0] = expected[1, 0] = expected[1, 1] = True
    for q in range(2, 5):
        expected[q, 2 : q + 1] = True
    expected[5, 5] = True
    assert torch.equal(allowed, expected)


def _loss_and_grads(model, batch: PackedBatch, allowed: torch.Tensor, aggregation: str):
    model.zero_grad()
    mask = attention_mask_for(model, allowed, torch.float32)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).logits
    logprobs, entropy = token_logprobs(logits, batch.input_ids, 0.6)
    weights = aggregation_weights(batch.loss_mask, batch.sample_ids, aggregation, batch.input_ids.shape[1])
    cfg = LossConfig()
    # fixed old log-probs near log(1/vocab), shifted by A so that some ratios leave the clip range
    old = torch.full_like(logprobs, -6.9) - 0.3 * batch.advantages
    out = policy_loss(logprobs, entropy, old, batch.advantages, weights, cfg)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # completion tokens only: a packed sample's first (prompt) token is predicted across the boundary
    ids = [int(i) for i in batch.sample_ids.unique() if i >= 0]
    per_sample = {i: logprobs[(batch.sample_ids == i) & batch.loss_mask].detach() for i in ids}
    return out.loss.detach(), grads, per_sample


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_packed_and_unpacked_give_same_loss_and_grads(attn, aggregation):
    model = tiny_llama(attn)
    samples = random_samples(10, seed=1)
    packed = pack(samples, seq_len=48, pad_token_id=0)
    unpacked = pad_each(samples, pad_token_id=0)
    assert packed.num_rows < unpacked.num_rows
    loss_p, grads_p, lp_p = _loss_and_grads(model, packed, segment_mask(packed.sample_ids), aggregation)
    loss_u, grads_u, lp_u = _loss_and_grads(model, unpacked, segment_mask(unpacked.sample_ids), aggregation)
    assert torch.allclose(loss_p, loss_u, atol=1e-6)
    for i in lp_u:
        assert torch.allclose(lp_p[i], lp_u[i], atol=1e-5)
    for name in grads_u:
        assert torch.allclose(grads_p[name], grads_u[name], atol=1e-6, rtol=1e-4), name


def test_plain_causal_mask_leaks_across_packed_samples():
    # Restarted position ids alone do not isolate samples when a dense mask is given: the block
    # mask is what makes the packed loss right.
    model = tiny_llama("sdpa")
    samples = random_samples(10, seed=1)
    packed = pack(samples, seq_len=48, pad_token_id=0)
    seq_len = packed.input_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(packed.num_rows, 1, -1, -1)
    loss_leaky, _, _ = _loss_and_grads(model, packed, causal, "token_mean")
    loss_block, _, _ = _loss_and_grads(model, packed, segment_mask(packed.sample_ids), "token_mean")
    assert not torch.allclose(loss_leaky, loss_block, atol=1e-4)


def test_behaviour_logprobs_land_on_completion_tokens():
    samples = [TrainSample([1, 2], [3, 4, 5], 1.0, None, [-0.1, -0.2, -0.3]), TrainSample([6], [7], 1.0),
               TrainSample([8, 9], [10, 11, 12, 13, 14], 1.0, None, [-1.0, -2.0, -3.0, -4.0, -5.0])]
    batch = pack(samples, seq_len=6, pad_token_id=0)
    mu = batch.behaviour_logprobs
    for index, sample in enumerate(samples):
        where = (batch.sample_ids == index) & batch.loss_mask
        got = mu[where].tolist()
        if sample.behaviour_logprobs is None:
            assert torch.isnan(mu[where]).all()  # unknown: the loss falls back to pi_old
        else:  # sample 2 (7 tokens) is cut to the row's 6: its first four log-probs stay
            assert got == pytest.approx(list(sample.behaviour_logprobs)[: len(got)])
    assert torch.isnan(mu[~batch.loss_mask]).all()
    with pytest.raises(ValueError):
        pack([TrainSample([1], [2, 3], 1.0, None, [-0.5])], 8, 0)


def _step_loss_and_grads(model, batch: PackedBatch, logprobs_mode: str, loss_type: str):
    from intellect.coordinator.trainer.trainer import batch_logprobs

    model.zero_grad()
    config = TrainerConfig(device="cpu", logprobs=logprobs_mode, chunk_tokens=7,
                           loss=LossConfig(type=loss_type, aggregation="token_mean"))
    logprobs, entropy = batch_logprobs(model, batch, config, torch.device("cpu"))
    weights = aggregation_weights(batch.loss_mask, batch.sample_ids, "token_mean", batch.input_ids.shape[1])
    out = policy_loss(logprobs, entropy, logprobs.detach(), batch.advantages, weights, config.loss,
                      behaviour_logprobs=batch.behaviour_logprobs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _with_behaviour(samples: list[TrainSample], seed: int) -> list[TrainSample]:
    g = torch.Generator().manual_seed(seed)  # a stale mu: far enough from pi_theta that clips and masks act
    return [s._replace(behaviour_logprobs=(-torch.rand(len(s.output_tokens), generator=g) * 9).tolist())
            for s in samples]


@pytest.mark.parametrize("loss_type", ["grpo_two_sided", "token_mask"])
def test_off_policy_loss_packed_equals_unpacked_and_chunked_equals_dense(loss_type):
    model = tiny_llama("sdpa")
    samples = _with_behaviour(random_samples(10, seed=2), seed=2)
    packed, unpacked = pack(samples, seq_len=48, pad_token_id=0), pad_each(samples, pad_token_id=0)
    results = {(layout, mode): _step_loss_and_grads(model, batch, mode, loss_type)
               for layout, batch in (("packed", packed), ("unpacked", unpacked)) for mode in ("chunked", "dense")}
    reference_out, reference_grads = results["unpacked", "dense"]
    acted = reference_out.num_clipped if loss_type == "grpo_two_sided" else reference_out.num_masked
    assert 0 < acted.item() < reference_out.num_tokens.item()  # the trust region did act on some tokens
    assert reference_out.num_behaviour.item() == reference_out.num_tokens.item()
    for key, (out, grads) in results.items():
        assert torch.allclose(out.loss, reference_out.loss, atol=1e-5), key
        assert torch.allclose(out.mismatch_kl_sum, reference_out.mismatch_kl_sum, rtol=1e-4), key
        for name in reference_grads:
            assert torch.allclose(grads[name], reference_grads[name], atol=1e-5, rtol=1e-4), (key, name)
