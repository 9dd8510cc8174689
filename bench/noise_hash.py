"""Benchmark: the seeded sampler's noise hash on a CPU, numpy uint32 against int64 tensors.

The sampler's noise (protocol/sampling.py) is an integer hash of (position key, token id). On a CPU it
runs on numpy uint32 arrays (unsigned wraparound is defined); CUDA runs it on int64 tensors with the
multiplications split in 16-bit halves. Both paths are timed here on the same keys, side by side and
alternated, on the two shapes the sampler uses:
  dense   every token of `--rows` rows of a `--vocab` vocabulary (flat logits: a random model, or a
          high temperature), what `noisy_argmax` does when most tokens could still win
  sparse  `--sparse` flat indices (the few hundred candidates of a trained model's peaked logits)
Every timing is the best of `--reps`; the two paths must give equal bits (checked once per shape).
Prints one JSON line: seconds per call of each path and shape, and `dense_speedup` / `sparse_speedup`
(int64 tensors / numpy uint32).

Usage: python bench/noise_hash.py [--rows 16] [--vocab 49152] [--sparse 512] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from intellect.protocol import sampling as S


def best_of(reps: int, fn) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--sparse", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    keys = torch.tensor([S.position_key(1000 + r, r) for r in range(args.rows)])
    flat = torch.randint(0, args.rows * args.vocab, (args.sparse,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(S._noise_rows(keys, args.vocab, u32=True), S._noise_rows(keys, args.vocab, u32=False))
    assert torch.equal(S._noise_at(keys, flat, args.vocab, u32=True), S._noise_at(keys, flat, args.vocab, u32=False))
    times = {}
    for _ in range(2):  # alternate the paths so a noisy moment hits both
        for u32, name in ((True, "u32"), (False, "int64")):
            dense = best_of(args.reps, lambda u32=u32: S._noise_rows(keys, args.vocab, u32=u32))
            sparse = best_of(args.reps, lambda u32=u32: S._noise_at(keys, flat, args.vocab, u32=u32))
            times[f"dense_{name}_s"] = min(dense, times.get(f"dense_{name}_s", float("inf")))
            times[f"sparse_{name}_s"] = min(sparse, times.get(f"sparse_{name}_s", float("inf")))
    print(json.dumps({
        "bench": "noise_hash", "rows": args.rows, "vocab": args.vocab, "sparse": args.sparse, "reps": args.reps,
        **{k: round(v, 6) for k, v in times.items()},
        "dense_speedup": round(times["dense_int64_s"] / times["dense_u32_s"], 2),
        "sparse_speedup": round(times["sparse_int64_s"] / times["sparse_u32_s"], 2),
    }))


if __name__ == "__main__":
    main()
