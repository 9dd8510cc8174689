"""Benchmark: OpenMP's wait policy when several torch processes share the cores.

Each worker process runs the same CPU work as a SmolLM2-135M prefill (30 layers of 576-wide
attention projections and 1536-wide MLP matmuls, float32, 2 threads) `--reps` times. Three runs,
side by side on one machine:
  solo         one worker, OMP_WAIT_POLICY unset (libgomp spins before sleeping)
  spinning     `--workers` at once, OMP_WAIT_POLICY unset: what a demo's coordinator and nodes did
  passive      `--workers` at once, OMP_WAIT_POLICY=PASSIVE: what `coordinator` and `demo` set (node/cli.py)
Prints one JSON line: wall seconds of each run (the slowest worker), `spinning_over_passive` (the
cost of spinning beside other busy processes) and `passive_solo_cost` (passive alone / spinning
alone, the price paid when nothing else runs).

Usage: python bench/omp_wait.py [--workers 2] [--reps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORK = """
import time, torch
torch.set_num_threads(2)
x = torch.randn(45, 576)
qkv, o = torch.randn(576, 960), torch.randn(576, 576)
up, down = torch.randn(576, 3072), torch.randn(1536, 576)
for _ in range({reps}):
    h = x
    for _ in range(30):
        h = h + (h @ qkv)[:, :576] @ o
        g = h @ up
        h = h + (torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:]) @ down
        h = h / h.norm(dim=-1, keepdim=True)
"""


def run(workers: int, policy: str | None, reps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WORK.format(reps=reps)], env=env) for _ in range(workers)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit("a worker failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    solo_spin, solo_passive = run(1, None, args.reps), run(1, "PASSIVE", args.reps)
    spinning, passive = run(args.workers, None, args.reps), run(args.workers, "PASSIVE", args.reps)
    print(json.dumps({
        "bench": "omp_wait", "workers": args.workers, "cores": os.cpu_count(), "reps": args.reps,
        "solo_spinning_s": round(solo_spin, 2), "solo_passive_s": round(solo_passive, 2),
        "spinning_s": round(spinning, 2), "passive_s": round(passive, 2),
        "spinning_over_passive": round(spinning / passive, 2),
        "passive_solo_cost": round(solo_passive / solo_spin, 2),
    }))


if __name__ == "__main__":
    main()
