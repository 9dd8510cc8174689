"""The seeded sampler (protocol/sampling.py): derived seeds, noise that is the same bits whatever the
batch, the thread count or the subset of tokens evaluated, a reference implementation in plain
Python integers, the sampling distribution, and the exact / tie / mismatch check."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from intellect.protocol import sampling as S

V = 49152


def ref_fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def ref_noise(seed: int, position: int, token: int) -> float:
    """The noise of docs/protocol.md, with Python integers and math.log."""
    key = S.position_key(seed, position)
    h = ref_fmix32(ref_fmix32((token * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF) ^ key)
    u = ((h >> 12) + 0.5) / 2**20
    return float(np.float32(-math.log(-math.log(u))))


def test_noise_matches_the_reference_implementation():
    rng = np.random.default_rng(0)
    for seed, pos, tok in zip(rng.integers(0, 2**63, 50), rng.integers(0, 4096, 50), rng.integers(0, V, 50)):
        key = torch.tensor([S.position_key(int(seed), int(pos))])
        got = float(S.gumbel_noise(key, torch.tensor([int(tok)]), V)[0])
        assert got == ref_noise(int(seed), int(pos), int(tok))


def test_cpu_and_tensor_integer_paths_give_the_same_noise():
    """A CPU hashes with numpy uint32, CUDA with int64 tensors: both paths, run here, agree bit for bit."""
    keys = torch.tensor([S.position_key(s, p) for s, p in [(1, 0), (2**63 - 1, 7), (12345, 4095)]])
    dense = S._noise_rows(keys, V, u32=True)
    assert torch.equal(dense, S._noise_rows(keys, V, u32=False))
    flat = torch.randint(0, 3 * V, (5000,), generator=torch.Generator().manual_seed(0))
    sparse = S._noise_at(keys, flat, V, u32=True)
    assert torch.equal(sparse, S._noise_at(keys, flat, V, u32=False))
    assert torch.equal(sparse, dense.view(-1)[flat])


def test_gumbel_table_is_pinned():
    """The table is computed in float64 and rounded: a platform whose log differs would change these
    bytes, and its nodes would disagree with validators. Pinned so CI notices."""
    digest = hashlib.sha256(S._TABLE_NP.tobytes()).hexdigest()
    assert digest == TABLE_SHA256
    assert S.GUMBEL_MIN == pytest.approx(-2.6780, abs=1e-3) and S.GUMBEL_MAX == pytest.approx(14.5561, abs=1e-3)


TABLE_SHA256 = "ab4b44ea39487f92dd87dc4e8e880b35d04d115fee8555a9aac5d8d55073498e"


def test_seeds_derive_from_run_node_step_counter_and_index():
    key = bytes(range(32))
    base = S.completion_seed("run-a", key, 3, 1, 0)
    assert base == S.completion_seed("run-a", key, 3, 1, 0) and 0 <= base < 2**63
    others = {S.completion_seed("run-b", key, 3, 1, 0), S.completion_seed("run-a", bytes(32), 3, 1, 0),
              S.completion_seed("run-a", key, 4, 1, 0), S.completion_seed("run-a", key, 3, 2, 0),
              S.completion_seed("run-a", key, 3, 1, 1)}
    assert base not in others and len(others) == 5
    assert S.batch_seeds("run-a", key, 3, 1, 4)[0] == base
    with pytest.raises(ValueError):
        S.completion_seed("run-a", key, 3, 0, 0)  # counters start at 1


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * 4


def test_tokens_do_not_depend_on_the_batch():
    """Row r's token depends on its logits, seed and position only: alone, in a batch of 8 or of 32,
    in any order."""
    logits = _logits(32)
    seeds = [1000 + i for i in range(32)]
    positions = [i % 5 for i in range(32)]
    full, _ = S.sample(logits, 0.7, seeds, positions)
    alone = torch.cat([S.sample(logits[i:i + 1], 0.7, seeds[i:i + 1], positions[i:i + 1])[0] for i in range(32)])
    eights = torch.cat([S.sample(logits[i:i + 8], 0.7, seeds[i:i + 8], positions[i:i + 8])[0]
                        for i in range(0, 32, 8)])
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    shuffled, _ = S.sample(logits[perm], 0.7, [seeds[i] for i in perm], [positions[i] for i in perm])
    assert torch.equal(full, alone) and torch.equal(full, eights) and torch.equal(full[perm], shuffled)


@pytest.mark.parametrize("temperature", [4.0, 0.1])  # spread-out logits (dense path), peaked (sparse)
def test_pruned_evaluation_equals_the_full_one(temperature):
    """Hashing only the tokens that can still win gives the argmax of the full noisy scores."""
    logits = _logits(16, seed=3)
    seeds, positions = list(range(16)), [7] * 16
    z = S.scale(logits, temperature)
    keys = torch.tensor([S.position_key(s, p) for s, p in zip(seeds, positions)])[:, None]
    full = z + S.gumbel_noise(keys, torch.arange(V)[None, :].expand(16, V), V)
    assert torch.equal(S.noisy_argmax(z, seeds, positions)[0], full.argmax(-1))


_THREADS_SCRIPT = """
import sys, torch
from intellect.protocol import sampling as S
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
logits = torch.randn(32, 49152, generator=g) * 4
keys = torch.tensor([S.position_key(s, 3) for s in range(32)])[:, None]
noise = S.gumbel_noise(keys, torch.arange(49152)[None, :].expand(32, 49152), 49152)
tok, lp = S.sample(logits, 0.6, list(range(32)), [3] * 32)
import hashlib
print(hashlib.sha256(noise.numpy().tobytes()).hexdigest(), tok.tolist())
"""


@pytest.mark.slow  # two fresh interpreters importing torch
def test_noise_is_the_same_bits_with_1_and_2_threads():
    outs = [subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(n)], capture_output=True, text=True,
                           check=True).stdout for n in (1, 2)]
    assert outs[0] == outs[1] and outs[0].strip()


def test_samples_follow_softmax():
    """Over many positions, token frequencies match softmax(logits / T) (chi-square, 6 tokens)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, n = 0.8, 30000
    z = logits.repeat(n, 1)
    tokens, logp = S.sample(z, temperature, [42] * n, list(range(n)))
    counts = np.bincount(tokens.numpy(), minlength=6)
    p = torch.softmax(logits[0] / temperature, -1).numpy()
    chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
    assert chi2 < 25.0, (counts, n * p)  # 5 degrees of freedom: p(chi2 > 25) < 2e-4
    assert torch.allclose(logp, torch.log_softmax(z / temperature, -1).gather(1, tokens[:, None])[:, 0])


def test_greedy_is_the_argmax():
    logits = _logits(4)
    tokens, logp = S.sample(logits, 0.0, [1, 2, 3, 4], [0] * 4)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logp, logits.log_softmax(-1).amax(-1))


def test_check_counts_exact_ties_and_mismatches():
    n = 64
    logits = _logits(n, seed=5)
    seed, temperature = 77, 0.6
    honest, _ = S.sample(logits, temperature, [seed] * n, list(range(n)))
    ok = S.check_tokens(logits, temperature, seed, honest.tolist(), tolerance=0.25)
    assert (ok.exact, ok.tie, ok.mismatch, ok.first_mismatch) == (n, 0, 0, None)
    # the validator's logits differ a little: a token whose runner-up is within the tolerance may flip
    noisy = logits + 0.01 * torch.randn(n, V, generator=torch.Generator().manual_seed(9))
    near = S.check_tokens(noisy, temperature, seed, honest.tolist(), tolerance=0.25)
    assert near.mismatch == 0 and near.exact + near.tie == n
    # another token at position 10: its noisy score is far below the winner's
    edited = honest.tolist()
    edited[10] = int(logits[10].argmin())
    bad = S.check_tokens(logits, temperature, seed, edited, tolerance=0.25)
    assert (bad.exact, bad.mismatch, bad.first_mismatch) == (n - 1, 1, 10)
    # the same tokens under another seed: many mismatches
    other = S.check_tokens(logits, temperature, seed + 1, honest.tolist(), tolerance=0.25)
    assert other.mismatch >= 8
