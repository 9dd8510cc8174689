"""Shard deltas: a checkpoint shard of policy step s written against the shard at the same place of
step s - 1, so a node that holds s - 1 downloads a few percent of the checkpoint instead of all of it.

Codec "xor-zstd" (the one the protocol speaks; bench/delta.py measured it against sparse indices +
values): delta = zstd(target XOR base), one zstd frame whose header states the content size and
carries a checksum. Base and target have the same size. bf16 weights that an optimizer step did not
move XOR to zero bytes, and zstd turns the long zero runs into almost nothing.

A delta is untrusted input: `apply_delta` reads the frame header first and refuses a frame whose
declared size is not exactly the shard's size (from the signed manifest) or whose window is larger
than `MAX_WINDOW_BYTES`, before it decompresses anything; trailing bytes and truncated frames are
refused too. Every failure raises `DeltaRejected`.

What this module does not know: manifests, hashes or peers. The caller checks the rebuilt shard's
sha256 against the signed manifest before using it.
"""

from __future__ import annotations

import numpy as np
import zstandard

from intellect.protocol.wire import WireRejected

CODEC_XOR_ZSTD = "xor-zstd"
ZSTD_LEVEL = 3  # bench/delta.py: higher levels shrink deltas by a few percent at several times the time
MAX_WINDOW_BYTES = 1 << 24  # level 3 writes at most 2**21; the zstd default limit would be 2**27


class DeltaRejected(WireRejected):
    """Delta bytes that cannot be decoded into a shard of the promised size."""


def encode_delta(base: bytes, target: bytes) -> bytes:
    """The xor-zstd delta that turns `base` into `target` (same length)."""
    if len(base) != len(target):
        raise ValueError(f"a delta needs a base of the target's size ({len(base)} != {len(target)})")
    xor = np.bitwise_xor(np.frombuffer(base, dtype=np.uint8), np.frombuffer(target, dtype=np.uint8))
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    return compressor.compress(xor.data)


def apply_delta(codec: str, base: bytes, delta: bytes, size: int) -> bytes:
    """Rebuild the target shard of `size` bytes from `base` and an untrusted `delta`."""
    if codec != CODEC_XOR_ZSTD:
        raise DeltaRejected(f"unknown delta codec {codec!r}")
    if len(base) != size:
        raise DeltaRejected(f"base shard has {len(base)} bytes, the target {size}")
    xor = _decompress_exact(delta, size)
    out = np.frombuffer(xor, dtype=np.uint8).copy()
    np.bitwise_xor(out, np.frombuffer(base, dtype=np.uint8), out=out)
    return out.tobytes()


def _decompress_exact(delta: bytes, size: int) -> bytes:
    try:
        frame = zstandard.get_frame_parameters(delta)
    except zstandard.ZstdError as e:
        raise DeltaRejected(f"delta is not a zstd frame: {e}") from None
    if frame.content_size != size:  # also refuses frames that do not state their size
        raise DeltaRejected(f"delta frame declares {frame.content_size} bytes, the shard has {size}")
    if frame.window_size > MAX_WINDOW_BYTES:
        raise DeltaRejected(f"delta frame asks for a {frame.window_size}-byte window (limit {MAX_WINDOW_BYTES})")
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    try:
        out = decompressor.decompress(delta, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise DeltaRejected(f"delta does not decompress: {e}") from None
    if len(out) != size:
        raise DeltaRejected(f"delta decompressed to {len(out)} bytes, the shard has {size}")
    return out
