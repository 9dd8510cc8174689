"""Do nodes idle while their batches are validated or a new policy downloads? The demo (a coordinator
and 2 node processes on 127.0.0.1, every check on) run once per arm in one go:
- sync: nodes that fetch a new policy when they need it and wait for each verdict before generating the
  next batch (`pipeline_depth` 0, `prefetch_policy` off: the old way);
- pipelined_no_prefetch: batches submitted while the next is generated (`--depth`, the node's default 1);
- pipelined: the node's defaults, new policies also fetched in the background while generating;
- pipelined_worker: the same with a validator worker process (`intake.workers` 1): the submit call
  answers `received` and the nodes ask for their verdicts.

Per arm, from the nodes' status.json: the generation duty cycle (seconds inside the engine's generate
over the span from the first batch's start to the last one's end, averaged over the nodes), the shares
of that span the loop waited for a policy and for verdicts (`policy_wait_share`, `verdict_wait_share`),
and from the
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


def arm(depth: int, model: str, steps: int, state_dir: Path, workers: int = 0, prefetch: bool = True) -> dict:
    started = time.perf_counter()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "INTELLECT_NODE_PIPELINE_DEPTH": str(depth),
                        "INTELLECT_NODE_PREFETCH_POLICY": str(int(prefetch)),
                        "INTELLECT_COORD_INTAKE__WORKERS": str(workers)}
    done = subprocess.run([sys.executable, "-m", "intellect.node.cli", "demo", "--headless", "--model", model,
                           "--steps", str(steps), "--state-dir", str(state_dir)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the demo failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    duty, generated, policy_wait, verdict_wait = [], 0.0, [], []
    for status_file in sorted(state_dir.glob("node*/status.json")):
        s = json.loads(status_file.read_text())
        span = (s["last_generated_at"] or 0) - (s["first_generate_at"] or 0)
        if span > 0:
            duty.append(s["generate_s"] / span)
            policy_wait.append(s["policy_wait_s"] / span)
            verdict_wait.append(s["verdict_wait_s"] / span)
            generated += s["generate_s"]
    lines = [json.loads(x) for x in (state_dir / "coordinator" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m.get("kind") != "eval"]
    expired = sum(int(json.loads(f.read_text()).get("expired", 0)) for f in state_dir.glob("node*/status.json"))
    reasons: dict[str, int] = {}
    for log in state_dir.glob("node*/verdicts.jsonl"):
        for v in map(json.loads, log.read_text().splitlines()):
            reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
    return {"duty_cycle": round(sum(duty) / max(len(duty), 1), 3),
            "policy_wait_share": round(sum(policy_wait) / max(len(duty), 1), 3),
            "verdict_wait_share": round(sum(verdict_wait) / max(len(duty), 1), 3), "node_generate_s": round(generated, 1),
            "steps": len(train), "accepted": train[-1]["accepted"] if train else 0,
            "rejected": train[-1]["rejected"] if train else 0, "expired": expired,
            "verdicts": reasons, "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--depth", type=int, default=NodeConfig.model_fields["pipeline_depth"].default)
    args = p.parse_args()
    arms = {"sync": {"depth": 0, "prefetch": False},  # the old loop: fetch, generate, wait for the verdict
            "pipelined_no_prefetch": {"depth": args.depth, "prefetch": False},
            "pipelined": {"depth": args.depth},  # the node's defaults
            "pipelined_worker": {"depth": args.depth, "workers": 1}}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for name, settings in arms.items():
            results[name] = arm(model=args.model, steps=args.steps, state_dir=Path(tmp) / name, **settings)
            print(json.dumps({"arm": name, **results[name]}), file=sys.stderr, flush=True)
    sync, piped = results["sync"], results["pipelined"]
    print(json.dumps({"bench": "pipeline", "model": args.model, "steps": args.steps, "depth": args.depth,
                      **{f"duty_cycle_{name}": r["duty_cycle"] for name, r in results.items()},
                      "duty_ratio": round(piped["duty_cycle"] / max(sync["duty_cycle"], 1e-9), 2),
                      "wall_s_sync": sync["wall_s"], "wall_s_pipelined": piped["wall_s"],
                      "wall_ratio": round(piped["wall_s"] / max(sync["wall_s"], 1e-9), 2), **results}))


if __name__ == "__main__":
    main()
