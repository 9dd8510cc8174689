"""TOPLOC on real torch models: honest completions pass a batched bf16 prefill verifier, and the
tampering TOPLOC can see is caught.

What the tiny random Llama (2 layers, hidden 64) can and cannot show, measured: a different init
and swapped proofs fail every chunk; a 1% weight perturbation, fp32/fp16 generation and a single
edited output token stay under the 38/10/8 thresholds there (its states are dominated by the current
token's embedding). Those attacks are tested on SmolLM2 (slow) and measured in bench/toploc.py."""

import copy

import pytest
import torch

from intellect.protocol import toploc
from intellect.protocol.model import load_model, tiny_model_dir
from intellect.protocol.toploc_torch import (
    ProofRecorder,
    generate_with_proofs,
    prefill_final_norm,
    verify_completions,
)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 20, (n,), generator=gen).tolist()
    return [torch.randint(0, 49152, (k,), generator=gen).tolist() for k in lengths]


def _with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def honest(tiny_model):
    """8 completions of 40 tokens (39 rows: a full chunk and a 7-row tail), sampled one at a time
    on one thread."""
    model, _ = tiny_model
    prompts = _prompts(8)
    comps = _with_threads(
        1,
        lambda: [
            generate_with_proofs(model, [p], 40, temperature=1.0, seed=i)[0] for i, p in enumerate(prompts)
        ],
    )
    return prompts, comps


def test_honest_completions_pass_batched_verifier(tiny_model, honest):
    model, _ = tiny_model
    prompts, comps = honest
    assert all(len(c.output_ids) == 40 and len(c.proofs) == 2 * 258 for c in comps)
    checks = _with_threads(
        2,
        lambda: verify_completions(
            model, prompts, [c.output_ids for c in comps], [c.proofs for c in comps], batch_size=8
        ),
    )
    assert all(c.accepted and len(c.chunks) == 2 and c.rejection is None for c in checks)
    for comp, check in zip(comps, checks):
        # the sampler's log-probs and the verifier's agree up to bf16 noise
        assert max(abs(a - b) for a, b in zip(comp.logprobs, check.token_logprobs)) < 0.05
        assert 0.0 <= check.eos_prob <= 1.0


def test_prefill_rows_are_the_committed_rows(tiny_model, honest):
    model, _ = tiny_model
    prompts, comps = honest
    rows = prefill_final_norm(model, prompts[0], comps[0].output_ids)
    assert rows.shape == (39, 64) and rows.dtype == torch.bfloat16
    assert toploc.passes(toploc.verify_proofs(rows, comps[0].proofs))
    # one row too many (the prime-rl test's off-by-one) no longer lines up with the proof count
    with pytest.raises(toploc.ProofRejected):
        toploc.verify_proofs(torch.cat([rows, rows[:1]]), comps[0].proofs[:258])


def test_batched_sampling_with_different_stop_lengths(tiny_model):
    model, _ = tiny_model
    prompts = _prompts(4, seed=3)
    first = generate_with_proofs(model, prompts, 45, seed=5, eos_token_id=-1)
    # make sequence 0's 12th token the EOS: the same seed replays the same samples up to there
    eos = first[0].output_ids[11]
    comps = generate_with_proofs(model, prompts, 45, seed=5, eos_token_id=eos)
    lengths = [len(c.output_ids) for c in comps]
    assert lengths[0] <= 12 and comps[0].stop == "eos" and max(lengths) == 45
    for c in comps:
        assert len(c.proofs) == toploc.expected_proof_bytes(len(c.output_ids))
    checks = verify_completions(
        model, prompts, [c.output_ids for c in comps], [c.proofs for c in comps], eos_token_id=eos
    )
    assert all(c.accepted for c in checks)


def test_recorder_streams_full_chunks_and_counts_rows():
    gen = torch.Generator().manual_seed(0)
    rec = ProofRecorder(batch_size=2, hidden_size=64)
    states = torch.randn(40, 2, 64, generator=gen).to(torch.bfloat16)
    for t in range(40):
        rec.add_step(states[t], torch.tensor([True, t < 10]))  # sequence 1 stops after 10 rows
        if t == 31:
            assert len(rec._proofs[0]) == 1  # built as soon as the chunk filled
    assert rec.rows == [40, 10]
    proofs = rec.proofs()
    assert proofs[0] == b"".join(toploc.build_proofs(states[:, 0]))
    assert proofs[1] == b"".join(toploc.build_proofs(states[:10, 1]))
    with pytest.raises(RuntimeError):
        rec.add_step(states[0])


def test_other_init_and_swapped_proofs_fail_every_time(tiny_model, tiny_model_path, honest):
    model, _ = tiny_model
    prompts, comps = honest
    other, _ = load_model(tiny_model_dir(tiny_model_path.parent, seed=1))
    forged = [generate_with_proofs(other, [p], 40, seed=i)[0] for i, p in enumerate(prompts)]
    checks = verify_completions(model, prompts, [c.output_ids for c in forged], [c.proofs for c in forged])
    assert not any(c.accepted for c in checks)
    swapped = [c.proofs for c in comps[1:] + comps[:1]]
    checks = verify_completions(model, prompts, [c.output_ids for c in comps], swapped)
    assert not any(c.accepted for c in checks)


def test_untrusted_input_is_refused_unevaluated(tiny_model, honest):
    model, _ = tiny_model
    prompts, comps = honest
    out, proofs = comps[0].output_ids, comps[0].proofs
    cases = [
        (prompts[0], out, proofs[:-258], "258 proof bytes, expected 516"),
        (prompts[0], out, b"\x00\x00" + proofs[2:], "modulus 0"),
        (prompts[0], out[:-1] + [49152], proofs, "token id outside"),
        ([], out, proofs, "empty prompt"),
        (prompts[0], [7], b"\x00" * 258, "258 proof bytes, expected 0"),
    ]
    checks = verify_completions(model, *map(list, zip(*[c[:3] for c in cases])))
    for check, case in zip(checks, cases):
        assert not check.accepted and case[3] in check.rejection
    one = verify_completions(model, [prompts[0]], [[7]], [b""])[0]
    assert one.accepted and one.chunks == [] and len(one.token_logprobs) == 1


def test_perturbed_weights_shift_statistics_on_tiny_model(tiny_model, honest):
    """The detection floor, pinned: 1% multiplicative weight noise raises the mantissa error
    several-fold on the tiny model, but stays inside the thresholds there."""
    model, _ = tiny_model
    prompts, comps = honest
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + 0.01 * torch.randn(p.shape, generator=gen).to(p.dtype))
    forged = [generate_with_proofs(noisy, [p], 40, seed=i)[0] for i, p in enumerate(prompts[:4])]
    bad = verify_completions(model, prompts[:4], [c.output_ids for c in forged], [c.proofs for c in forged])
    good = verify_completions(
        model, prompts[:4], [c.output_ids for c in comps[:4]], [c.proofs for c in comps[:4]]
    )
    mean_bad = sum(c.chunks[0].mant_err_mean for c in bad) / 4
    mean_good = sum(c.chunks[0].mant_err_mean for c in good) / 4
    assert mean_bad > 4 * mean_good


@pytest.mark.slow
def test_smollm2_honest_pass_and_swapped_proofs_fail(smollm2):
    model, tok = smollm2
    chats = [[{"role": "user", "content": q}] for q in ("Name a colour.", "What is 2 + 2?")]
    prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True)["input_ids"]) for c in chats]
    comps = _with_threads(
        1,
        lambda: [
            generate_with_proofs(model, [p], 34, temperature=0.7, seed=i)[0] for i, p in enumerate(prompts)
        ],
    )
    outputs = [c.output_ids for c in comps]
    checks = verify_completions(
        model, prompts, outputs, [c.proofs for c in comps], temperature=0.7, batch_size=2
    )
    assert all(c.accepted for c in checks), [c.chunks for c in checks]
    for comp, check in zip(comps, checks):
        if comp.stop == "eos":  # the termination check's input: an honest EOS is likely
            assert check.eos_prob > 0.1
    swapped = verify_completions(model, prompts, outputs, [comps[1].proofs, comps[0].proofs], batch_size=2)
    assert not any(c.accepted for c in swapped)  # chunk statistics or proof byte count give it away
