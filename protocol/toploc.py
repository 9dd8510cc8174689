"""TOPLOC proofs: build and verify, byte-compatible with toploc 0.1.6 (spec Part A).

A proof commits to the top-k |values| of a chunk of bf16 final-norm hidden states: it is the
polynomial over GF(65497) through the points (chunk index mod m, bf16 bit pattern), serialised as
`uint16_be(m) || uint16_be(c_0..c_{k-1})` (A.5, A.6). Verification recomputes the chunk, takes its own
top-k and compares exponents exactly and mantissas with a tolerance (A.7, the C++ path: indices
reduced mod m, sign ignored, upper median, 2**64 sentinel when no exponent matches).

Pure math on torch tensors. Interpolation is Lagrange in matrix form (product tree for
M(X) = prod(X - x_j), weights 1/M'(x_j), a Hankel matrix of M for the synthetic divisions), batched
over chunks: the only Python loops are over log2(k) tree levels and the 16 bits of the inverse's
exponent. The polynomial through a point set is unique, so the bytes equal the library's Newton form.

Deliberately unknown here: models, token sequences, which rows are decode rows (see
`toploc_torch`), and what a caller does with a failed check.

Departure from the library: a chunk with fewer than `topk` elements (a 1-row tail chunk of a model
with hidden size < 128) gets a proof through all its elements, zero-padded to k coefficients, where
the library would raise inside `topk` and emit the all-zero null proof. Both sides use the same rule,
and a zero-padded polynomial evaluates identically. Real models (hidden >= 128) never hit it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from intellect.protocol.constants import TOPLOC_CHUNK_SIZE, TOPLOC_TOPK

P = 65497  # field prime (A.1), also the largest modulus tried
MAX_TOPK = 4096  # bound on untrusted k: keeps the [C, k, k] matrices small
_SENTINEL = float(2**64)  # C++ value for mean/median when no exponent matches (A.7 step 6)


class ProofRejected(ValueError):
    """A proof (or a proof blob) is malformed and was not evaluated."""


@dataclass(frozen=True)
class ChunkCheck:
    """Verification statistics of one proof (A.7); all three are errors, lower is better."""

    exp_mismatches: int
    mant_err_mean: float
    mant_err_median: float


@dataclass(frozen=True)
class Thresholds:
    """Per-chunk acceptance rule of the TOPLOC paper for bf16 (A.8): pass iff all three hold."""

    exp_mismatches: int = 38
    mant_err_mean: float = 10.0
    mant_err_median: float = 8.0

    def accepts(self, check: ChunkCheck) -> bool:
        return (
            check.exp_mismatches <= self.exp_mismatches
            and check.mant_err_mean <= self.mant_err_mean
            and check.mant_err_median <= self.mant_err_median
        )


DEFAULT_THRESHOLDS = Thresholds()


def passes(checks: list[ChunkCheck], thresholds: Thresholds = DEFAULT_THRESHOLDS) -> bool:
    """True iff every chunk passes (an empty list passes: a completion with n_out <= 1)."""
    return all(thresholds.accepts(c) for c in checks)


def proof_size(topk: int = TOPLOC_TOPK) -> int:
    return 2 + 2 * topk


def num_proofs(n_out: int, chunk_size: int = TOPLOC_CHUNK_SIZE) -> int:
    """Proofs for a completion of n_out output tokens: its n_out - 1 decode rows, chunked (A.10)."""
    if n_out < 0:
        raise ValueError(f"n_out must be >= 0, got {n_out}")
    return 0 if n_out <= 1 else math.ceil((n_out - 1) / chunk_size)


def expected_proof_bytes(n_out: int, chunk_size: int = TOPLOC_CHUNK_SIZE, topk: int = TOPLOC_TOPK) -> int:
    return num_proofs(n_out, chunk_size) * proof_size(topk)


# ---------------------------------------------------------------- GF(P) arithmetic, batched


def _polymul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., R] x [..., R] -> [..., 2R-1] coefficient convolution mod P (skew trick, no loop)."""
    r = a.shape[-1]
    outer = (a.unsqueeze(-1) * b.unsqueeze(-2)) % P  # [..., R, R]
    # Row i shifted right by i: pad to width 2R, flatten, re-cut at width 2R-1.
    skew = torch.nn.functional.pad(outer, (0, r)).flatten(-2)[..., : r * (2 * r - 1)]
    return skew.unflatten(-1, (r, 2 * r - 1)).sum(-2) % P


def _vanishing_poly(xs: torch.Tensor) -> torch.Tensor:
    """xs [C, n] -> coefficients of prod_j (X - x_j) mod P, ascending, [C, n+1]."""
    c, n = xs.shape
    width = 1 << max(0, (n - 1).bit_length())  # next power of two, padded with the poly "1"
    polys = torch.zeros(c, width, 2, dtype=torch.int64)
    polys[:, :, 0] = 1
    polys[:, :n, 0] = (-xs) % P
    polys[:, :n, 1] = 1
    while polys.shape[1] > 1:
        polys = _polymul(polys[:, 0::2], polys[:, 1::2])
    return polys[:, 0, : n + 1]


def _powers(xs: torch.Tensor, num: int) -> torch.Tensor:
    """xs [C, n] -> [C, n, num] with x^s mod P for s = 0..num-1, by doubling."""
    pw = torch.ones(*xs.shape, 1, dtype=torch.int64)
    x_len = xs % P  # x^(current width)
    while pw.shape[-1] < num:
        pw = torch.cat([pw, (pw * x_len.unsqueeze(-1)) % P], dim=-1)
        x_len = (x_len * x_len) % P
    return pw[..., :num]


def _inverse(a: torch.Tensor) -> torch.Tensor:
    """a^(P-2) mod P elementwise (Fermat), square-and-multiply over the exponent's bits."""
    result = torch.ones_like(a)
    base = a % P
    e = P - 2
    while e:
        if e & 1:
            result = (result * base) % P
        base = (base * base) % P
        e >>= 1
    return result


def _matvec(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[C, n] @ [C, n, q] -> [C, q] mod P. Sums of n < 2^16 products < P^2 fit in int64."""
    return torch.matmul(v.unsqueeze(1), m).squeeze(1) % P


def interpolate(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Coefficients (ascending) of the unique poly of degree < n through (x, y) mod P.

    xs: [C, n] int64, pairwise distinct mod P per row, in [0, P). ys: [C, n] int64. -> [C, n].
    """
    n = xs.shape[1]
    m = _vanishing_poly(xs)  # [C, n+1]
    pw = _powers(xs, n)  # [C, n, n]
    deriv = (m[:, 1:] * torch.arange(1, n + 1, dtype=torch.int64)) % P  # M'(X), [C, n]
    # Lagrange weights 1/M'(x_j) = 1/prod_{i != j}(x_j - x_i).
    weights = _inverse(torch.matmul(pw, deriv.unsqueeze(-1)).squeeze(-1) % P)  # [C, n]
    a = (ys % P) * weights % P  # [C, n]
    r = _matvec(a, pw)  # r_s = sum_j a_j x_j^s, [C, n]
    # Synthetic division M(X)/(X - x_j) has coefficient i = sum_s x_j^s M[s+i+1]: a Hankel matrix.
    idx = torch.arange(n).unsqueeze(1) + torch.arange(n).unsqueeze(0) + 1  # [n, n], values 1..2n-1
    m_pad = torch.nn.functional.pad(m, (0, n))  # [C, 2n+1], zero past degree n
    hankel = m_pad[:, idx]  # [C, n, n]
    return _matvec(r, hankel)


def evaluate(coeffs: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """coeffs [C, k] (ascending), xs [C, n] -> P(x) mod P, [C, n]."""
    pw = _powers(xs, coeffs.shape[1])  # [C, n, k]
    return torch.matmul(pw, coeffs.unsqueeze(-1)).squeeze(-1) % P


def injective_moduli(xs: torch.Tensor) -> torch.Tensor:
    """xs [C, n] -> [C]: the largest m <= P with {x mod m} pairwise distinct (A.5 step 1)."""
    out = torch.full((xs.shape[0],), P, dtype=torch.int64)
    for row in _colliding_rows(xs, out):
        out[row] = _search_modulus(xs[row])
    return out


def _colliding_rows(xs: torch.Tensor, moduli: torch.Tensor) -> list[int]:
    reduced = (xs % moduli.unsqueeze(1)).sort(dim=1).values
    dup = (reduced[:, 1:] == reduced[:, :-1]).any(dim=1)
    return dup.nonzero().flatten().tolist()


def _search_modulus(x: torch.Tensor, block: int = 256) -> int:
    """Rare path (two indices equal mod P): test candidate moduli `block` at a time."""
    for top in range(P - 1, 0, -block):
        cand = torch.arange(top, max(top - block, 0), -1, dtype=torch.int64)  # descending
        reduced = (x.unsqueeze(0) % cand.unsqueeze(1)).sort(dim=1).values
        ok = (reduced[:, 1:] != reduced[:, :-1]).all(dim=1)
        if ok.any():
            return int(cand[ok.nonzero()[0, 0]])
    raise ValueError("no injective modulus: duplicate indices")  # distinct x always fit mod max+1


# ---------------------------------------------------------------- proofs from points / chunks


def _serialize(moduli: torch.Tensor, coeffs: torch.Tensor) -> list[bytes]:
    words = torch.cat([moduli.unsqueeze(1), coeffs], dim=1).numpy().astype(">u2")
    return [row.tobytes() for row in words]


def _proofs_from_points(xs: torch.Tensor, ys: torch.Tensor, topk: int) -> list[bytes]:
    """Batched A.5 + A.6: xs raw indices [C, n], ys bf16 bit patterns [C, n] -> C proofs."""
    moduli = injective_moduli(xs)
    coeffs = interpolate(xs % moduli.unsqueeze(1), ys)
    coeffs = torch.nn.functional.pad(coeffs, (0, topk - coeffs.shape[1]))  # short chunks only
    return _serialize(moduli, coeffs)


def proof_from_points(xs: list[int], ys: list[int]) -> bytes:
    """The library's `ProofPoly.from_points(x, y).to_bytes()`: 2 + 2*len(xs) bytes."""
    if len(xs) != len(ys) or not xs or len(set(xs)) != len(xs) or min(xs) < 0:
        raise ValueError("need equally many distinct non-negative x values and y values")
    x = torch.tensor([xs], dtype=torch.int64)
    y = torch.tensor([ys], dtype=torch.int64)
    return _proofs_from_points(x, y, len(xs))[0]


def _bits(values: torch.Tensor) -> torch.Tensor:
    """bf16 values -> their 16-bit patterns as int64 in [0, 65535]."""
    return values.view(torch.int16).to(torch.int64) & 0xFFFF


def _require_bf16(t: torch.Tensor) -> None:
    if t.dtype != torch.bfloat16:
        raise ValueError(f"TOPLOC hashes bf16 hidden states, got {t.dtype}; convert first")


def _topk(flat: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat [C, N] bf16 -> (indices [C, k'], values [C, k']) of the largest |v|, k' = min(k, N)."""
    idx = flat.abs().topk(min(topk, flat.shape[1]), dim=1).indices
    # top-k runs where the states live (GPU in an engine); the field math is small, on the CPU
    return idx.cpu(), flat.gather(1, idx).cpu()


def _group_by_length(chunks: list[torch.Tensor]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, ch in enumerate(chunks):
        groups.setdefault(ch.numel(), []).append(i)
    return groups


def build_chunk_proofs(chunks: list[torch.Tensor], topk: int = TOPLOC_TOPK) -> list[bytes]:
    """One proof per chunk; each chunk is flattened row-major (A.3 step 3). Batched per length."""
    _check_topk(topk)
    out: list[bytes] = [b""] * len(chunks)
    for numel, members in _group_by_length(chunks).items():
        if numel == 0:
            raise ValueError("empty chunk")
        flat = torch.stack([chunks[i].reshape(-1) for i in members])
        _require_bf16(flat)
        idx, vals = _topk(flat, topk)
        for i, proof in zip(members, _proofs_from_points(idx, _bits(vals), topk)):
            out[i] = proof
    return out


def decode_chunks(hidden: torch.Tensor, chunk_size: int = TOPLOC_CHUNK_SIZE) -> list[torch.Tensor]:
    """hidden [rows, H] -> row blocks of chunk_size, the last one shorter (A.3, skip_prefill)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [rows, hidden_size], got shape {tuple(hidden.shape)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return list(hidden.split(chunk_size, dim=0))


def library_chunks(
    activations: list[torch.Tensor], decode_batching_size: int, skip_prefill: bool
) -> list[torch.Tensor]:
    """The library's `batch_activations`: optional prefill block, then groups of D items."""
    start = 0 if skip_prefill else 1
    head = [] if skip_prefill else [activations[0].reshape(-1)]
    return head + [
        torch.cat([a.reshape(-1) for a in activations[i : i + decode_batching_size]])
        for i in range(start, len(activations), decode_batching_size)
    ]


def build_proofs(hidden: torch.Tensor, chunk_size: int = TOPLOC_CHUNK_SIZE, topk: int = TOPLOC_TOPK) -> list[bytes]:
    """hidden [rows, H] bf16 decode rows -> ceil(rows/chunk_size) proofs of 2 + 2*topk bytes.

    Equals toploc 0.1.6 `build_proofs_bytes(hidden, chunk_size, topk, skip_prefill=True)`.
    """
    return build_chunk_proofs(decode_chunks(hidden, chunk_size), topk)


def build_proofs_library(
    activations: list[torch.Tensor] | torch.Tensor,
    decode_batching_size: int,
    topk: int,
    skip_prefill: bool = False,
) -> list[bytes]:
    """toploc 0.1.6 `build_proofs_bytes` including its prefill block (vector A.9 d)."""
    return build_chunk_proofs(library_chunks(list(activations), decode_batching_size, skip_prefill), topk)


# ---------------------------------------------------------------- parsing untrusted proofs


def _check_topk(topk: int) -> None:
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be in [1, {MAX_TOPK}], got {topk}")


def split_proofs(proofs: bytes | list[bytes], topk: int = TOPLOC_TOPK) -> list[bytes]:
    """A concatenated proofs cell (A.3 step 4) or a list -> list of proofs; lengths checked."""
    size = proof_size(topk)
    if isinstance(proofs, (bytes, bytearray, memoryview)):
        blob = bytes(proofs)
        if len(blob) % size:
            raise ProofRejected(f"proof blob of {len(blob)} bytes is not a multiple of {size}")
        return [blob[i : i + size] for i in range(0, len(blob), size)]
    for i, p in enumerate(proofs):
        if not isinstance(p, (bytes, bytearray)) or len(p) != size:
            raise ProofRejected(f"proof {i} must be {size} bytes")
    return [bytes(p) for p in proofs]


def parse_proofs(proofs: list[bytes], topk: int = TOPLOC_TOPK) -> tuple[torch.Tensor, torch.Tensor]:
    """Proofs of 2 + 2*topk bytes -> (moduli [C], coeffs [C, topk]), rejecting bad moduli/coeffs."""
    size = proof_size(topk)
    if any(len(p) != size for p in proofs):
        raise ProofRejected(f"every proof must be {size} bytes")
    if not proofs:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, topk, dtype=torch.int64)
    words = np.frombuffer(b"".join(proofs), dtype=">u2").astype(np.int64).reshape(len(proofs), 1 + topk)
    moduli, coeffs = torch.from_numpy(words[:, 0].copy()), torch.from_numpy(words[:, 1:].copy())
    bad = ((moduli == 0) | (moduli > P)).nonzero().flatten().tolist()
    if bad:
        raise ProofRejected(f"proof {bad[0]} has modulus {int(moduli[bad[0]])}, outside [1, {P}]")
    if (coeffs >= P).any():
        raise ProofRejected(f"a proof coefficient is >= {P}, outside the field")
    return moduli, coeffs


# ---------------------------------------------------------------- verification


def _fp_stats(claimed: torch.Tensor, actual: torch.Tensor) -> list[ChunkCheck]:
    """claimed/actual bf16 bit patterns [C, n] -> A.7 steps 4-6 per row (sign ignored)."""
    exp_c, exp_a = (claimed & 0x7F80) >> 7, (actual & 0x7F80) >> 7
    err = ((claimed & 0x7F) - (actual & 0x7F)).abs()
    match = exp_c == exp_a
    results = []
    for row_err, row_match in zip(err, match):
        errs = row_err[row_match].sort().values
        mismatches = int((~row_match).sum())
        if errs.numel() == 0:
            results.append(ChunkCheck(mismatches, _SENTINEL, _SENTINEL))
        else:
            mean = float(errs.sum()) / errs.numel()
            results.append(ChunkCheck(mismatches, mean, float(errs[errs.numel() // 2])))
    return results


def verify_chunk_proofs(
    chunks: list[torch.Tensor], proofs: bytes | list[bytes], topk: int = TOPLOC_TOPK
) -> list[ChunkCheck]:
    """A.7 for arbitrary chunks (each flattened): one ChunkCheck per proof, in order."""
    _check_topk(topk)
    plist = split_proofs(proofs, topk)
    if len(plist) != len(chunks):
        raise ProofRejected(f"{len(plist)} proofs for {len(chunks)} chunks")
    moduli, coeffs = parse_proofs(plist, topk)
    out: list[ChunkCheck] = [ChunkCheck(0, 0.0, 0.0)] * len(chunks)
    for members in _group_by_length(chunks).values():
        flat = torch.stack([chunks[i].reshape(-1) for i in members])
        _require_bf16(flat)
        idx, vals = _topk(flat, topk)
        sel = torch.tensor(members)
        claimed = evaluate(coeffs[sel], idx % moduli[sel].unsqueeze(1))
        for i, check in zip(members, _fp_stats(claimed, _bits(vals))):
            out[i] = check
    return out


def verify_proofs(
    hidden: torch.Tensor, proofs: bytes | list[bytes], chunk_size: int = TOPLOC_CHUNK_SIZE, topk: int = TOPLOC_TOPK
) -> list[ChunkCheck]:
    """Recomputed decode rows [rows, H] bf16 vs their proofs (a list or the concatenated cell)."""
    return verify_chunk_proofs(decode_chunks(hidden, chunk_size), proofs, topk)
