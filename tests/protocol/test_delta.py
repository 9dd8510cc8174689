"""Shard deltas (protocol/delta.py): exact round trips on bf16 weight bytes, and untrusted delta bytes
refused before or during decoding, never decoded past the shard's size."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intellect.protocol.delta import CODEC_XOR_ZSTD, DeltaRejected, apply_delta, encode_delta


def bf16_bytes(values: np.ndarray) -> bytes:
    """float32 -> bf16 (round to nearest even), as torch stores it."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


@pytest.fixture(scope="module")
def step_pair():
    """Two bf16 'policy steps': every weight moved by ~1e-6 in fp32; few bf16 words change."""
    rng = np.random.default_rng(0)
    master = rng.normal(0, 0.02, 500_000).astype(np.float32)
    moved = master + rng.choice([-1e-6, 1e-6], master.size).astype(np.float32)
    return bf16_bytes(master), bf16_bytes(moved)


def test_round_trip_is_exact_and_small(step_pair):
    base, target = step_pair
    changed = np.count_nonzero(np.frombuffer(base, "<u2") != np.frombuffer(target, "<u2"))
    assert 0 < changed < len(base) // 2  # a real update: some words moved, most did not
    delta = encode_delta(base, target)
    assert apply_delta(CODEC_XOR_ZSTD, base, delta, len(target)) == target
    assert len(delta) < len(target) / 10


def test_identical_and_wholly_different_shards_round_trip():
    base = bytes(range(256)) * 64
    assert apply_delta(CODEC_XOR_ZSTD, base, encode_delta(base, base), len(base)) == base
    other = np.random.default_rng(1).bytes(len(base))
    assert apply_delta(CODEC_XOR_ZSTD, base, encode_delta(base, other), len(base)) == other


def test_size_mismatches_and_unknown_codec_are_refused(step_pair):
    base, target = step_pair
    delta = encode_delta(base, target)
    with pytest.raises(DeltaRejected, match="codec"):
        apply_delta("bsdiff", base, delta, len(target))
    with pytest.raises(DeltaRejected, match="base shard has"):
        apply_delta(CODEC_XOR_ZSTD, base[:-2], delta, len(target))
    with pytest.raises(ValueError):
        encode_delta(base, target[:-2])


def test_a_frame_declaring_more_than_the_shard_is_refused_before_decoding():
    """A zstd bomb: 256 MB of zeros in a few KB. Refused from its header, nothing is decompressed."""
    size = 1 << 20
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(256 << 20))
    assert len(bomb) < 64 << 10
    with pytest.raises(DeltaRejected, match="declares 268435456 bytes"):
        apply_delta(CODEC_XOR_ZSTD, bytes(size), bomb, size)


def test_a_frame_without_its_size_is_refused():
    size = 4096
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(size))
    with pytest.raises(DeltaRejected, match="declares"):
        apply_delta(CODEC_XOR_ZSTD, bytes(size), frame, size)


def test_a_frame_whose_header_lies_about_its_size_is_refused():
    """Header says `size`, the blocks hold more: libzstd stops at the declared size and says so."""
    size = 3000
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=False).compress(bytes(size + 500)))
    fhd = frame[4]
    assert fhd >> 6 == 1 and fhd & 0x20  # 2-byte content size field right after FHD (single segment)
    frame[5:7] = struct.pack("<H", size - 256)
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == size
    with pytest.raises(DeltaRejected, match="does not decompress"):
        apply_delta(CODEC_XOR_ZSTD, bytes(size), bytes(frame), size)


def test_truncated_padded_and_garbage_deltas_are_refused(step_pair):
    base, target = step_pair
    delta = encode_delta(base, target)
    for bad in (delta[:-1], delta[: len(delta) // 2], delta + b"\0", delta + delta, b"", b"\x28\xb5\x2f", b"x" * 100):
        with pytest.raises(DeltaRejected):
            apply_delta(CODEC_XOR_ZSTD, base, bad, len(target))


def test_huge_window_is_refused():
    """A hand-made frame (one raw block) that asks for a 128 MB window: valid zstd, refused by us."""
    size = 1 << 16
    header = b"\x28\xb5\x2f\xfd" + bytes([0x80, 17 << 3]) + struct.pack("<I", size)  # 4-byte size, 2**27 window
    frame = header + ((size << 3) | 1).to_bytes(3, "little") + bytes(size)  # last block, raw
    assert zstandard.get_frame_parameters(frame).window_size == 1 << 27
    assert zstandard.ZstdDecompressor().decompress(frame) == bytes(size)  # zstd's own limit lets it through
    with pytest.raises(DeltaRejected, match="window"):
        apply_delta(CODEC_XOR_ZSTD, bytes(size), frame, size)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_deltas_decode_exactly_or_are_refused(data, step_pair):
    base, target = step_pair[0][:20_000], step_pair[1][:20_000]
    delta = bytearray(encode_delta(base, target))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(delta) - 1))
        delta[pos] = data.draw(st.integers(0, 255))
    try:
        out = apply_delta(CODEC_XOR_ZSTD, base, bytes(delta), len(target))
    except DeltaRejected:
        return
    assert len(out) == len(target)  # decoded: the caller's hash check decides; never a crash or overrun
