"""Verifiable sampling: seeded Gumbel-max with noise a validator can recompute bit for bit.

Token t of a completion = argmax over the vocabulary of  logits / T + G(seed, t, token id),  where G
is Gumbel noise taken from a counter-based integer hash, never from a torch generator (those differ
between CPU and CUDA). The seed of completion j of a batch is derived from (run id, node key, policy
step, batch counter, j) by `completion_seed` (protocol/tasks/sampling.py, torch-free), so the node has nothing left to choose: a validator that
recomputes the logits by prefill checks every sampled token (`check_tokens`).

The noise, for key k = position_key(seed, t) (32 bits) and token id v:
    h = fmix32(token_hash[v] xor k),  token_hash[v] = fmix32(v * 0x9E3779B1 + 0x7F4A7C15)  (mod 2^32)
    G = GUMBEL_TABLE[h >> 12],        GUMBEL_TABLE[i] = -log(-log((i + 1/2) / 2^20))  (float64 -> float32)
On a CPU the integer ops run on numpy uint32 arrays (unsigned arithmetic wraps mod 2^32 by
definition; 2.6-3.3x faster than int64 tensors, bench/noise_hash.py); elsewhere on int64 tensors
holding 32-bit values (multiplications split in 16-bit halves so nothing overflows). Both are the
same function of the same integers, and the logarithms are looked up in a table, so CPU and CUDA,
any batch size and any thread count give the same bits. The noise is bounded (GUMBEL_MIN .. GUMBEL_MAX), so a token whose
scaled logit is far below the best noisy score found among a few likely tokens can never win: only
the others get hashed, which is what makes this cheaper than drawing 49k exponentials per token.
Consequence of the 20-bit noise: a token more than ~17 (in logits / T) below the best is never
sampled (its probability is below e^-17 = 4e-8).

T = 0 means greedy: no noise. Top-p is not supported (its nucleus boundary cannot be checked exactly).
This module knows tensors and integers only: no models, engines, files or verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from intellect.protocol.tasks.sampling import batch_seeds, completion_seed  # noqa: F401 (re-exported)

NOISE_BITS = 20
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _gumbel_table_np() -> np.ndarray:
    u = (np.arange(2**NOISE_BITS, dtype=np.float64) + 0.5) / 2**NOISE_BITS
    return (-np.log(-np.log(u))).astype(np.float32)


_TABLE_NP = _gumbel_table_np()
GUMBEL_MIN = float(_TABLE_NP[0])  # -2.68
GUMBEL_MAX = float(_TABLE_NP[-1])  # 14.56
# A claimed token that is not the validator's argmax but scores within this much of it (in logit
# units: the gap in logits / T times T) is a tie, not a mismatch. Measured: docs/protocol.md.
DEFAULT_TIE_TOLERANCE = 0.5
DENSE_FRACTION = 0.25  # above this share of tokens left to hash, hash them all (same result, faster)


# ---------------------------------------------------------------------------------------- noise keys


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def position_key(seed: int, position: int) -> int:
    """The 32-bit noise key of output position `position` (0 = first output token) of a seed."""
    return _splitmix64((seed & _M64) ^ _splitmix64(position)) & _M32


# ---------------------------------------------------------------------------------------- noise


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    hi = x * (c >> 16)
    hi &= 0xFFFF
    hi <<= 16
    lo = x * (c & 0xFFFF)
    lo += hi
    lo &= _M32
    return lo


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser: a bijection of 32-bit values with full avalanche. Consumes x."""
    x ^= x >> 16
    x = _mul32(x, 0x85EBCA6B)
    x ^= x >> 13
    x = _mul32(x, 0xC2B2AE35)
    x ^= x >> 16
    return x


def _fmix32_u32(x: np.ndarray) -> np.ndarray:
    """_fmix32 on a uint32 array, in place."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


def _lookup_u32(h: np.ndarray) -> torch.Tensor:
    """Noise of hashes h (uint32, consumed) as a float32 tensor."""
    h >>= np.uint32(32 - NOISE_BITS)
    return torch.from_numpy(_TABLE_NP.take(h))


def _use_u32(keys: torch.Tensor, u32: bool | None) -> bool:
    """numpy uint32 on a CPU unless told (tests run the int64 tensor path, CUDA's, on a CPU too)."""
    return keys.device.type == "cpu" if u32 is None else u32


_cache: dict[tuple, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    key = ("table", str(device))
    if key not in _cache:
        _cache[key] = torch.from_numpy(_TABLE_NP).to(device)
    return _cache[key]


def token_hashes(vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[V] int64: the per-token half of the hash, computed once per vocabulary and device."""
    key = ("tokens", vocab_size, str(device))
    if key not in _cache:
        v = torch.arange(vocab_size, dtype=torch.int64, device=device)
        _cache[key] = _fmix32((_mul32(v, 0x9E3779B1) + 0x7F4A7C15) & _M32)
    return _cache[key]


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Noise for each (key, token id) pair, elementwise (broadcasting): float32."""
    h = _fmix32(token_hashes(vocab_size, token_ids.device)[token_ids] ^ keys)
    return _table(token_ids.device)[h >> (32 - NOISE_BITS)]


def _token_hashes_u32(vocab_size: int) -> np.ndarray:
    key = ("tokens-u32", vocab_size)
    if key not in _cache:
        _cache[key] = token_hashes(vocab_size).numpy().astype(np.uint32)
    return _cache[key]


def _noise_rows(keys: torch.Tensor, vocab_size: int, u32: bool | None = None) -> torch.Tensor:
    """[B, V] noise of every token for row keys [B] (the dense path)."""
    if _use_u32(keys, u32):
        k = keys.numpy().astype(np.uint32)
        return _lookup_u32(_fmix32_u32(_token_hashes_u32(vocab_size)[None, :] ^ k[:, None]))
    h = _fmix32(token_hashes(vocab_size, keys.device)[None, :] ^ keys[:, None])
    h >>= 32 - NOISE_BITS
    return _table(keys.device).take(h)


def _noise_at(keys: torch.Tensor, flat: torch.Tensor, vocab_size: int, u32: bool | None = None) -> torch.Tensor:
    """Noise at flat indices r * V + v of a [B, V] matrix (the sparse path)."""
    if _use_u32(keys, u32):
        f, k = flat.numpy(), keys.numpy().astype(np.uint32)
        h = _token_hashes_u32(vocab_size).take(f % vocab_size) ^ k.take(f // vocab_size)
        return _lookup_u32(_fmix32_u32(h))
    h = _fmix32(token_hashes(vocab_size, keys.device).take(flat % vocab_size)
                ^ keys.index_select(0, flat // vocab_size))
    h >>= 32 - NOISE_BITS
    return _table(keys.device).take(h)


def _keys(seeds: list[int], positions: list[int], device) -> torch.Tensor:
    return torch.tensor([position_key(s, p) for s, p in zip(seeds, positions, strict=True)],
                        dtype=torch.int64, device=device)


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32, the same op on node and validator (T = 0: logits unchanged)."""
    z = logits.float()
    return z / temperature if temperature > 0 else z


PROBE = 8  # tokens of highest z whose noisy scores bound the winner's from below


def noisy_argmax(z: torch.Tensor, seeds: list[int], positions: list[int],
                 greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax_v z[r, v] + G(seeds[r], positions[r], v), that max) per row of scaled logits z [B, V].

    The noisy scores of the PROBE highest-z tokens give a lower bound s on the winner's score; a
    token with z < s - GUMBEL_MAX cannot reach it whatever its noise, so only the others are hashed
    (a few hundred of 49k at T = 0.6 on SmolLM2). The result is bit for bit the full evaluation's."""
    num, vocab = z.shape
    if greedy:
        best, tokens = z.max(-1)
        return tokens, best
    keys = _keys(seeds, positions, z.device)
    top_z, top_i = z.topk(min(PROBE, vocab), dim=-1)
    base = torch.arange(num, device=z.device)[:, None] * vocab
    probe = top_z + _noise_at(keys, (base + top_i).view(-1), vocab).view(num, -1)
    bound = probe.amax(-1, keepdim=True) - GUMBEL_MAX
    candidates = (z >= bound).view(-1)
    if int(candidates.sum()) > DENSE_FRACTION * z.numel():  # flat logits: hashing everything is cheaper
        scored = z + _noise_rows(keys, vocab)
    else:
        flat = candidates.nonzero().squeeze(1)
        scored = torch.full_like(z, -math.inf)
        scored.view(-1).index_copy_(0, flat, z.view(-1).take(flat) + _noise_at(keys, flat, vocab))
    best, tokens = scored.max(-1)
    return tokens, best


def sample(logits: torch.Tensor, temperature: float, seeds: list[int],
           positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits [B, V]: row r is output position positions[r] of seed seeds[r].
    Returns tokens [B] and their log-probs [B] under softmax(logits / T) (T = 1 when greedy)."""
    z = scale(logits, temperature)
    tokens, _ = noisy_argmax(z, seeds, positions, greedy=temperature == 0)
    logp = z.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logp


# ---------------------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class TokenCheck:
    """One completion's tokens against the validator's logits.

    exact: the claimed token is the validator's noisy argmax. tie: it is not, but its noisy score
    is within the tolerance of the argmax's (numeric noise between decode and prefill can swap
    such near-equal tokens). mismatch: anything else, which honest sampling never produces."""

    exact: int
    tie: int
    mismatch: int
    first_mismatch: int | None = None  # output position
    worst_gap: float = 0.0  # largest (best - claimed) noisy-score gap, logits units, over non-exact tokens


def check_tokens(logits: torch.Tensor, temperature: float, seed: int, claimed: list[int],
                 tolerance: float) -> TokenCheck:
    """logits [n, V]: the validator's logits that predict claimed[0..n-1]. `tolerance` is in logit
    units (the gap in logits / T is multiplied by T), so one number serves every temperature."""
    n = len(claimed)
    if logits.shape[0] != n:
        raise ValueError(f"{logits.shape[0]} logit rows for {n} tokens")
    if n == 0:
        return TokenCheck(0, 0, 0)
    z = scale(logits, temperature)
    greedy = temperature == 0
    positions = list(range(n))
    best_tok, best = noisy_argmax(z, [seed] * n, positions, greedy=greedy)
    tok = torch.tensor(claimed, dtype=torch.int64, device=z.device)
    claimed_z = z.gather(1, tok[:, None])[:, 0]
    if greedy:
        claimed_score = claimed_z
    else:
        claimed_score = claimed_z + gumbel_noise(_keys([seed] * n, positions, z.device), tok, z.shape[1])
    gap = (best - claimed_score) * (temperature if temperature > 0 else 1.0)
    exact = best_tok == tok
    tie = ~exact & (gap <= tolerance)
    bad = ~exact & ~tie
    first = int(bad.nonzero()[0, 0]) if bool(bad.any()) else None
    worst = float(gap[~exact].max()) if bool((~exact).any()) else 0.0
    return TokenCheck(int(exact.sum()), int(tie.sum()), int(bad.sum()), first, worst)
