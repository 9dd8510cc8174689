"""Do nodes idle while their batches are validated? The demo (a coordinator and 2 node processes on
127.0.0.1, every check on) run twice in one go: nodes that wait for each verdict before generating the
next batch (`pipeline_depth` 0, the old way) against pipelined nodes (`--depth`, the node's default 1).

A third arm adds a validator worker process (`intake.workers` 1): the submit call answers `received` and
the nodes ask for their verdicts.

Per arm, from the nodes' status.json: the generation duty cycle (seconds inside the engine's generate
over the span from the first batch's start to the last one's end, averaged over the nodes), and from the
coordinator's metrics: wall time of the training steps and batches accepted and expired. On this 2-core
machine nodes, validator and trainer share the CPU, so pipelining cannot give a node more CPU than the
coordinator leaves it; on a volunteer's GPU the node's generation does not compete with validation.

Intake throughput with 1 and 2 validator workers: bench/intake.py (intake_per_s_1, intake_per_s_2).

  python bench/pipeline.py [--model tiny|smollm2] [--steps 6] [--depth 1]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from intellect.node.config import NodeConfig


def arm(depth: int, model: str, steps: int, state_dir: Path, workers: int = 0) -> dict:
    started = time.perf_counter()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "INTELLECT_NODE_PIPELINE_DEPTH": str(depth),
                        "INTELLECT_COORD_INTAKE__WORKERS": str(workers)}
    done = subprocess.run([sys.executable, "-m", "intellect.node.cli", "demo", "--headless", "--model", model,
                           "--steps", str(steps), "--state-dir", str(state_dir)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the demo failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    duty, generated = [], 0.0
    for status_file in sorted(state_dir.glob("node*/status.json")):
        s = json.loads(status_file.read_text())
        span = (s["last_generated_at"] or 0) - (s["first_generate_at"] or 0)
        if span > 0:
            duty.append(s["generate_s"] / span)
            generated += s["generate_s"]
    lines = [json.loads(x) for x in (state_dir / "coordinator" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m.get("kind") != "eval"]
    expired = sum(int(json.loads(f.read_text()).get("expired", 0)) for f in state_dir.glob("node*/status.json"))
    reasons: dict[str, int] = {}
    for log in state_dir.glob("node*/verdicts.jsonl"):
        for v in map(json.loads, log.read_text().splitlines()):
            reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
    return {"duty_cycle": round(sum(duty) / max(len(duty), 1), 3), "node_generate_s": round(generated, 1),
            "steps": len(train), "accepted": train[-1]["accepted"] if train else 0,
            "rejected": train[-1]["rejected"] if train else 0, "expired": expired,
            "verdicts": reasons, "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--depth", type=int, default=NodeConfig.model_fields["pipeline_depth"].default)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        sync = arm(0, args.model, args.steps, Path(tmp) / "sync")
        print(json.dumps({"arm": "sync", **sync}), file=sys.stderr, flush=True)
        piped = arm(args.depth, args.model, args.steps, Path(tmp) / "pipelined")
        print(json.dumps({"arm": "pipelined", **piped}), file=sys.stderr, flush=True)
        workers = arm(args.depth, args.model, args.steps, Path(tmp) / "workers", workers=1)
        print(json.dumps({"arm": "pipelined+worker", **workers}), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "pipeline", "model": args.model, "steps": args.steps, "depth": args.depth,
                      "duty_cycle_sync": sync["duty_cycle"], "duty_cycle_pipelined": piped["duty_cycle"],
                      "duty_cycle_pipelined_worker": workers["duty_cycle"],
                      "duty_ratio": round(piped["duty_cycle"] / max(sync["duty_cycle"], 1e-9), 2),
                      "wall_s_sync": sync["wall_s"], "wall_s_pipelined": piped["wall_s"],
                      "wall_ratio": round(piped["wall_s"] / max(sync["wall_s"], 1e-9), 2),
                      "sync": sync, "pipelined": piped, "pipelined_worker": workers}))


if __name__ == "__main__":
    main()
