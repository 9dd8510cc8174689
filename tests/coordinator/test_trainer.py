"""GRPOTrainer on a tiny random Llama: filtering, learning, accumulation, schedule, checkpoints, resume."""

import os

import pytest
import torch

from intellect.coordinator.trainer.checkpoint import (
    POLICY_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
    complete_checkpoints,
    load_latest,
    resumable_checkpoints,
)
from intellect.coordinator.trainer.config import TrainerConfig
from intellect.coordinator.trainer.loss import token_logprobs
from intellect.coordinator.trainer.packing import pad_each, segment_mask
from intellect.coordinator.trainer.trainer import GRPOTrainer


def tiny_llama(seed: int = 0):
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
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def samples(num: int = 12, seed: int = 0, advantage: float | None = None):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(
            1, 1000, (int(torch.randint(low, high, (1,), generator=g)),), generator=g
        ).tolist()

    out = []
    for _ in range(num):
        adv = advantage if advantage is not None else float(torch.randn(1, generator=g))
        out.append((ids(2, 8), ids(2, 16), adv, float(torch.rand(1, generator=g))))
    return out


def config(**overrides) -> TrainerConfig:
    base = {
        "lr": 3e-3,
        "warmup_steps": 0,
        "grad_clip": 1.0,
        "seq_len": 64,
        "optimizer_steps_per_policy_step": 2,
        "device": "cpu",
    }
    return TrainerConfig(**(base | overrides))


def completion_logprob(model, batch) -> float:
    """Mean log-prob of the completion tokens at tau = 0.6."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=segment_mask(batch.sample_ids),
        ).logits
    logprobs, _ = token_logprobs(logits, batch.input_ids, 0.6)
    return float(logprobs[batch.loss_mask].mean())


def test_training_raises_likelihood_of_positive_samples():
    model = tiny_llama()
    data = samples(advantage=1.0)
    batch = pad_each([(s[0], s[1], s[2]) for s in data], pad_token_id=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = GRPOTrainer(model, config())
    start = completion_logprob(model, batch)
    losses = [trainer.train_step(data)["loss"] for _ in range(4)]
    assert completion_logprob(model, batch) > start + 0.5
    assert losses[-1] < losses[0]  # the loss of each step is taken against that step's pi_old
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert trainer.optimizer_step == 8 and trainer.policy_step == 4


def test_metrics_and_online_filter():
    data = samples(8) + [([5, 6], [7, 8], 0.0, 1.0)] * 3
    trainer = GRPOTrainer(tiny_llama(), config())
    metrics = trainer.train_step(data)
    assert metrics["num_samples"] == 8 and metrics["num_dropped"] == 3
    assert metrics["mean_reward"] == pytest.approx(sum(s[3] for s in data) / len(data))
    assert metrics["mean_length"] == pytest.approx(sum(len(s[1]) for s in data) / len(data))
    assert 0 < metrics["packing_efficiency"] <= 1 and metrics["tokens_per_s"] > 0
    assert metrics["num_optimizer_steps"] == 2 and metrics["grad_norm"] > 0
    # the first optimizer step starts at pi_old exactly, so nothing can be clipped overall yet
    assert 0 <= metrics["clip_ratio"] < 1 and 0 < metrics["entropy"] < 7.0  # log(1000) = 6.9 at tau=1


def test_all_zero_advantages_take_no_step():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GRPOTrainer(model, config())
    metrics = trainer.train_step([([1, 2], [3, 4], 0.0)] * 4)
    assert metrics["num_samples"] == 0 and metrics["num_dropped"] == 4
    assert trainer.optimizer_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_micro_batching_does_not_change_the_update():
    data = samples(10, seed=3)
    initial = [p.detach().clone() for p in tiny_llama().parameters()]
    updates, metrics = [], []
    for rows in (1, 8):
        model = tiny_llama()
        trainer = GRPOTrainer(
            model, config(seq_len=32, micro_batch_rows=rows, optimizer_steps_per_policy_step=1)
        )
        metrics.append(trainer.train_step(data))
        updates.append(torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(model.parameters(), initial)]))
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5)
    assert metrics[0]["grad_norm"] == pytest.approx(metrics[1]["grad_norm"], rel=1e-5)
    # Adam's first step is ~lr * sign(g): float noise can flip a few near-zero gradients, so compare
    # the whole update rather than every element
    assert (updates[0] - updates[1]).norm() < 1e-2 * updates[0].norm()


def test_last_n_layers_trains_only_those():
    model = tiny_llama()
    embed = model.get_decoder().embed_tokens.weight.detach().clone()
    first = model.get_decoder().layers[0].mlp.up_proj.weight.detach().clone()
    last = model.get_decoder().layers[1].mlp.up_proj.weight.detach().clone()
    GRPOTrainer(model, config(trainable="last_n_layers:1")).train_step(samples())
    assert torch.equal(embed, model.get_decoder().embed_tokens.weight)
    assert torch.equal(first, model.get_decoder().layers[0].mlp.up_proj.weight)
    assert not torch.equal(last, model.get_decoder().layers[1].mlp.up_proj.weight)
    with pytest.raises(ValueError):
        TrainerConfig(trainable="last_n_layers:0")


def test_linear_warmup_then_constant():
    trainer = GRPOTrainer(tiny_llama(), config(lr=1.0, warmup_steps=4))
    lrs = []
    for _ in range(6):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_decay_after_warmup_then_held():
    trainer = GRPOTrainer(tiny_llama(), config(lr=1.0, warmup_steps=2, decay_steps=4, lr_end_fraction=0.2))
    lrs = []
    for _ in range(8):
        lrs.append(round(trainer.optimizer.param_groups[0]["lr"], 6))
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs == [0.5, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2]


def test_checkpoint_round_trip_and_policy_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    trainer = GRPOTrainer(model, config())
    trainer.train_step(samples())
    path = trainer.save(tmp_path)
    assert path.name == "step_00000001"
    policy = AutoModelForCausalLM.from_pretrained(path / "policy")
    assert policy.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(ids).logits
        got = policy(ids).logits.float()
    assert torch.allclose(got, expected, atol=0.05)
    assert torch.equal(policy.lm_head.weight, policy.get_decoder().embed_tokens.weight)  # re-tied

    restored = tiny_llama(seed=1)
    loaded = load_latest(tmp_path, restored)
    assert loaded.step == 1 and loaded.extra == {"optimizer_step": 2}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))


def test_half_written_checkpoint_is_ignored_and_only_k_kept(tmp_path):
    trainer = GRPOTrainer(tiny_llama(), config(optimizer_steps_per_policy_step=1))
    for _ in range(3):
        trainer.train_step(samples(4))
        trainer.save(tmp_path, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # only the newest keeps the training state; the older one is a policy the validator may still need
    assert [p.name for p in resumable_checkpoints(tmp_path)] == ["step_00000003"]
    assert sorted(os.listdir(tmp_path / "step_00000002")) == [POLICY_DIR]
    assert {POLICY_DIR, STATE_FILE, WEIGHTS_FILE} <= set(os.listdir(tmp_path / "step_00000003"))
    # a crash mid-save leaves a temp folder, and a step folder without its state file is not complete
    half = tmp_path / ".tmp-step_00000004-abc"
    half.mkdir()
    (half / "weights.safetensors").write_bytes(b"partial")
    (tmp_path / "step_00000009").mkdir()
    assert load_latest(tmp_path, tiny_llama()).step == 3
    trainer.train_step(samples(4))
    trainer.save(tmp_path, keep=2)
    assert not half.exists()
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004", "step_00000009"]


def test_resume_gives_identical_next_step(tmp_path):
    data_1, data_2 = samples(8, seed=1), samples(8, seed=2)
    first = GRPOTrainer(tiny_llama(), config())
    first.train_step(data_1)
    first.save(tmp_path)
    expected_metrics = first.train_step(data_2)
    expected_rand = torch.rand(3)

    second = GRPOTrainer(tiny_llama(seed=7), config())
    assert second.resume(tmp_path)
    assert torch.equal(torch.rand(3), expected_rand)  # torch RNG restored to the saved point...
    assert second.resume(tmp_path)  # ...and again, so the step below starts from the same state
    metrics = second.train_step(data_2)
    for key in ("loss", "grad_norm", "entropy", "clip_ratio"):
        assert metrics[key] == expected_metrics[key], key
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters()))
    assert second.optimizer_step == first.optimizer_step and second.policy_step == 2


def test_kl_needs_a_reference_model():
    from intellect.coordinator.trainer.config import LossConfig

    cfg = config(loss=LossConfig(kl_coef=0.01), optimizer_steps_per_policy_step=1)
    with pytest.raises(ValueError):
        GRPOTrainer(tiny_llama(), cfg)
    metrics = GRPOTrainer(tiny_llama(), cfg, ref_model=tiny_llama()).train_step(samples(6))
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # same init, measured before the update


def test_padding_collate_matches_packing():
    from intellect.coordinator.trainer.config import LossConfig

    data = samples(10, seed=4)
    metrics = []
    for collate, rows in (("packing", 1), ("padding", 3)):
        cfg = config(collate=collate, micro_batch_rows=rows, loss=LossConfig(aggregation="sequence_mean"))
        metrics.append(GRPOTrainer(tiny_llama(), cfg).train_step(data))
    for key in ("loss", "grad_norm", "entropy"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-4), key


@pytest.mark.gpu
def test_gpu_bf16_step_matches_layouts():
    # On CUDA the forward runs under bf16 autocast and sdpa gets the bool block mask.
    from intellect.coordinator.trainer.config import LossConfig

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    data = samples(16, seed=5)
    metrics = []
    for collate, rows in (("packing", 1), ("padding", 4)):
        cfg = config(collate=collate, micro_batch_rows=rows, device="cuda",
                     loss=LossConfig(aggregation="token_mean"))
        model = tiny_llama()  # the trainer moves it to the GPU (fp32 master weights)
        metrics.append(GRPOTrainer(model, cfg).train_step(data))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.float32
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], abs=2e-2)
    assert metrics[0]["entropy"] == pytest.approx(metrics[1]["entropy"], rel=1e-2)


def _sampled(model, temperature: float, num: int = 6, policy_step: int = 0):
    """Completions the way a node makes them (the reference sampler), with their claimed log-probs."""
    from intellect.protocol.toploc_torch import generate_with_proofs

    prompts = [[1 + i, 20 + i, 40 + i] for i in range(num)]
    completions = generate_with_proofs(model, prompts, max_new_tokens=10, temperature=temperature, seed=1,
                                       eos_token_id=-1)
    return [(p, c.output_ids, 1.0 if i % 2 else -1.0, 0.5, c.logprobs, policy_step)
            for i, (p, c) in enumerate(zip(prompts, completions))]


def test_behaviour_logprobs_from_sampling_match_the_trainer_at_the_same_temperature():
    # The node's log-probs are log_softmax(logits / T) at the run's temperature, the trainer's
    # logits / tau with tau = T: sampled by this very policy, mu = pi_old and nothing clips.
    model = tiny_llama()
    data = _sampled(model, temperature=0.6)
    metrics = GRPOTrainer(model, config(optimizer_steps_per_policy_step=1)).train_step(data)
    assert metrics["behaviour_fraction"] == 1.0
    assert metrics["mismatch_kl"] < 1e-6 and metrics["clip_ratio"] == 0.0
    # sampled at another temperature, mu is not the trainer's distribution: the mismatch shows
    other = GRPOTrainer(tiny_llama(), config(optimizer_steps_per_policy_step=1)).train_step(
        _sampled(tiny_llama(), temperature=1.0))
    assert other["mismatch_kl"] > 1e-3


def test_stale_rollouts_are_corrected_against_their_behaviour_policy():
    # Rollouts sampled by an older policy (another init): with the ratio against mu, the trust
    # region acts on the very first optimizer step; recomputing pi_old (the old code) made rho = 1
    # there, so with one optimizer step per policy step nothing could ever clip.
    stale = _sampled(tiny_llama(seed=5), temperature=0.6, policy_step=0)
    corrected = GRPOTrainer(tiny_llama(), config(optimizer_steps_per_policy_step=1))
    corrected.policy_step = 2
    metrics = corrected.train_step(stale)
    assert metrics["mismatch_kl"] > 0.01 and metrics["clip_ratio"] > 0.05
    assert metrics["staleness_lag_2"] == len(stale)
    from intellect.coordinator.trainer.config import LossConfig

    uncorrected = GRPOTrainer(tiny_llama(), config(optimizer_steps_per_policy_step=1,
                                                   loss=LossConfig(ratio_against="step_start")))
    assert uncorrected.train_step(stale)["clip_ratio"] == 0.0
    # a random tiny model spreads p ~ 1e-3 over its vocabulary: probabilities move by ~1e-4 only
    masked = GRPOTrainer(tiny_llama(), config(optimizer_steps_per_policy_step=1,
                                              loss=LossConfig(type="token_mask", mask_high=1e-4, mask_low=1e-4)))
    mask_metrics = masked.train_step(stale)
    assert mask_metrics["masked_ratio"] > 0 and mask_metrics["clip_ratio"] == 0.0
    # decoupled: no clipping on the first optimizer step (rho against pi_old is 1), but the weights
    # pi_old / mu of another init's samples are far from 1, and the cap acts on some of them
    decoupled = GRPOTrainer(tiny_llama(), config(optimizer_steps_per_policy_step=1,
                                                 loss=LossConfig(ratio_against="decoupled", behaviour_weight_cap=1.5)))
    decoupled_metrics = decoupled.train_step(stale)
    assert decoupled_metrics["clip_ratio"] == 0.0 and 0 < decoupled_metrics["truncated_ratio"] < 1
    assert uncorrected.train_step(stale)["truncated_ratio"] == 0.0


def test_staleness_histogram_counts_rows_per_lag():
    from intellect.coordinator.trainer.trainer import staleness_histogram

    rows = [([1], [2], 1.0, 0.0, None, 3), ([1], [2], 0.0, 0.0, None, 5), ([1], [2], 1.0, 0.0, None, 3), ([1], [2], 1.0)]
    assert staleness_histogram(rows, policy_step=5) == {"staleness_lag_0": 1.0, "staleness_lag_2": 2.0}


def test_device_setting():
    from intellect.coordinator.trainer.trainer import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
