"""TOPLOC math: the byte-exact vectors of spec A.9, verification statistics, malformed proofs."""

import base64
import hashlib

import pytest
import torch

from intellect.protocol import toploc
from intellect.protocol.toploc import (
    ChunkCheck,
    ProofRejected,
    Thresholds,
    build_proofs,
    build_proofs_library,
    library_chunks,
    passes,
    proof_from_points,
    verify_chunk_proofs,
    verify_proofs,
)


def _bf16(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).to(torch.uint16).view(torch.bfloat16)


def test_vector_a_three_points():
    proof = proof_from_points([1, 2, 3], [4, 5, 6])
    assert proof.hex() == "ffd9000300010000"
    assert base64.b64encode(proof).decode() == "/9kAAwABAAA="


def test_vector_b_newton_steps():
    proof = proof_from_points([100, 55, 2], [1, 0, 1])
    assert proof.hex() == "ffd96e7f28dfcfca"
    coeffs = torch.tensor([[28287, 10463, 53194]])
    assert toploc.evaluate(coeffs, torch.tensor([[100, 55, 2]])).tolist() == [[1, 0, 1]]


def test_vector_c_modulus_fallback():
    proof = proof_from_points([0, 65497, 5], [0x3F80, 0xBF80, 0x4000])
    assert proof.hex() == "ffd83f80d325acb4"
    coeffs = torch.tensor([[16256, 54053, 44212]])
    assert toploc.evaluate(coeffs, torch.tensor([[1]])).item() == 0xBF80  # 65497 mod 65496
    assert toploc.injective_moduli(torch.tensor([[0, 65497, 5]])).tolist() == [65496]


def _vector_a_activations() -> list[torch.Tensor]:
    g = torch.arange(240)
    bits = 0x3F80 + ((97 * g + 31) % 240)
    bits = torch.where((5 * g + 3) % 7 < 3, bits | 0x8000, bits)
    t = _bf16(bits)
    return [t[:80].view(5, 16)] + [t[80 + 16 * r : 96 + 16 * r] for r in range(10)]


def test_vector_d_library_call_with_prefill():
    acts = _vector_a_activations()
    proofs = build_proofs_library(acts, decode_batching_size=3, topk=4, skip_prefill=False)
    assert [p.hex() for p in proofs] == [
        "ffd91f0ac21639be66c2",
        "ffd9c72c69c871a0a1b2",
        "ffd9bc0bcd48a8d55e27",
        "ffd97002c5ff3c68a1b2",
        "ffd905c80ce6592fd961",
    ]
    assert base64.b64encode(proofs[0]).decode() == "/9kfCsIWOb5mwg=="
    same = verify_chunk_proofs(library_chunks(acts, 3, skip_prefill=False), proofs, topk=4)
    assert same == [ChunkCheck(0, 0.0, 0.0)] * 5
    scaled = [a * 1.01 for a in acts]  # torch bf16 multiply, as in the spec
    drift = verify_chunk_proofs(library_chunks(scaled, 3, skip_prefill=False), proofs, topk=4)
    assert drift == [ChunkCheck(0, 2.0, 2.0)] * 5


def _vector_b_bits() -> tuple[torch.Tensor, torch.Tensor]:
    n, k = 163840, 2654435761
    g = torch.arange(n, dtype=torch.int64)
    bits = 0x3C00 | ((g * k >> 7) & 0x7F) | (((g * k >> 20) & 1) << 15)
    i = torch.arange(160)
    pos = (1000003 * i + 17) % n
    bits[pos] = (0x4100 + 3 * i) | torch.where(i % 2 == 1, 0x8000, 0)
    return bits, pos


VECTOR_B_BASE64 = (
    "/9mYiCjGszdah3JIHyAxN60KGyTTDfo7K6lDmDWs5bLZ1ilQsckCf9zh6js6skcvzbTCwghWqWXmIvjK8NKk1IM7Bk/nSnPC"
    "gnppgm5nTGXb4zW/Yk2b4ENMYtG/6vI6x+VmZJ60vbUztkE8MMCHnzTVgkbUjfX/HAMQw9yap3U2kpKf2qxvHps6FJn1Sveb"
    "+/fpXfxx1ogQ5qDdMn7lDn0yPJq0fyoFDG6MoALw6ExsTroyv4VcKMQu2Afm3CdVBbr/NvsU2ylnuzlpSM+bTCReuMsyJ7qk"
    "gaDjQ3gZZhB5oBf+/Z2XUPZtRvtMGNwqsgnTpP3DwwFwyMitgqNZs1Fx"
)


def test_vector_e_intellect2_geometry():
    bits, pos = _vector_b_bits()
    hidden = _bf16(bits).view(32, 5120)
    proofs = build_proofs(hidden, chunk_size=32, topk=128)
    assert len(proofs) == 1 and len(proofs[0]) == 258
    assert hashlib.sha256(proofs[0]).hexdigest() == (
        "0f21fb237f094e4f9afd52cb131d2eae84da2a765f6c0d52ccb5b48a79c67f34"
    )
    assert base64.b64encode(proofs[0]).decode() == VECTOR_B_BASE64
    assert verify_proofs(hidden, proofs) == [ChunkCheck(0, 0.0, 0.0)]
    bumped = bits.clone()
    bumped[pos[::2]] += 1  # +1 on the bit pattern of every even-i spike
    # upper median of 64 zeros and 64 ones is 1 (the Python path would say 0.5)
    assert verify_proofs(_bf16(bumped).view(32, 5120), proofs) == [ChunkCheck(0, 0.5, 1.0)]
    assert verify_proofs(hidden * 4, b"".join(proofs)) == [ChunkCheck(128, 2.0**64, 2.0**64)]


def test_interpolation_matches_points_for_random_batches():
    gen = torch.Generator().manual_seed(0)
    xs = torch.stack([torch.randperm(65497, generator=gen)[:128] for _ in range(5)])
    ys = torch.randint(0, 65497, (5, 128), generator=gen)
    coeffs = toploc.interpolate(xs, ys)
    assert torch.equal(toploc.evaluate(coeffs, xs), ys)


def test_many_chunks_short_tail_and_concatenated_blob():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(70, 64, generator=gen).to(torch.bfloat16)  # chunks of 32, 32, 6 rows
    proofs = build_proofs(hidden)
    assert len(proofs) == 3 and all(len(p) == 258 for p in proofs)
    assert proofs[:2] == build_proofs(hidden[:64])  # chunks are independent (streaming-safe)
    assert verify_proofs(hidden, b"".join(proofs)) == [ChunkCheck(0, 0.0, 0.0)] * 3
    # a 1-row tail of hidden 64 has fewer than topk elements: all 64 are committed (documented)
    tail = build_proofs(hidden[:33])[1]
    assert verify_proofs(hidden[32:33], [tail]) == [ChunkCheck(0, 0.0, 0.0)]
    assert verify_proofs(hidden[32:33] * 2, [tail])[0].exp_mismatches == 64


def test_thresholds_boundaries():
    thr = Thresholds()
    assert passes([ChunkCheck(38, 10.0, 8.0)], thr)
    assert not passes([ChunkCheck(39, 0.0, 0.0)], thr)
    assert not passes([ChunkCheck(0, 10.5, 0.0)], thr)
    assert not passes([ChunkCheck(0, 0.0, 9.0)], thr)
    assert not passes([ChunkCheck(0, 0.0, 0.0), ChunkCheck(128, 2.0**64, 2.0**64)], thr)
    assert passes([], thr)


def test_num_proofs_and_sizes():
    assert [toploc.num_proofs(n) for n in (0, 1, 2, 33, 34, 10000)] == [0, 0, 1, 1, 2, 313]
    assert toploc.expected_proof_bytes(10000) == 80754
    with pytest.raises(ValueError):
        toploc.num_proofs(-1)


def _honest() -> tuple[torch.Tensor, bytes]:
    hidden = torch.randn(40, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    return hidden, b"".join(build_proofs(hidden))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "multiple of 258"),
        (lambda b: b + b[:258], "3 proofs for 2 chunks"),
        (lambda b: b"\x00\x00" + b[2:], "modulus 0"),
        (lambda b: b"\xff\xda" + b[2:], "modulus 65498"),
        (lambda b: b[:2] + b"\xff\xff" + b[4:], "coefficient"),
    ],
)
def test_malformed_proofs_are_rejected_not_evaluated(mutate, message):
    hidden, blob = _honest()
    with pytest.raises(ProofRejected, match=message):
        verify_proofs(hidden, mutate(blob))


def test_wrong_proof_count_and_list_entry_length_rejected():
    hidden, blob = _honest()
    with pytest.raises(ProofRejected, match="1 proofs for 2 chunks"):
        verify_proofs(hidden, blob[:258])
    with pytest.raises(ProofRejected, match="proof 1 must be 258 bytes"):
        verify_proofs(hidden, [blob[:258], blob[258:-2]])


def test_inputs_must_be_bf16_2d():
    with pytest.raises(ValueError, match="bf16"):
        build_proofs(torch.randn(4, 64))
    with pytest.raises(ValueError, match="rows, hidden_size"):
        build_proofs(torch.randn(64).to(torch.bfloat16))
