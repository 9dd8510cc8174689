"""Benchmark: does the swarm learn as well per sample as one centralised process?

The demo's recipe (node/demo.py: SmolLM2-135M, "a + b" on 40 training sums, 2 batches x 4 prompts x 8
completions per step, temperature 0.7, lr 1e-4 on the last 8 layers) trained for `--steps` steps, the
same number of samples either way:
- central: one process generates with the node's own Worker and torch engine (its prompts, sampler and
  rewards), and takes the coordinator's GRPO step at once on those rows (async level 0): no swarm, no
  validation, no staleness;
- swarm: the demo (coordinator + 2 node processes, async level 2, every check on); `--async-levels 0,1,2
  --ratios behaviour,step_start` adds arms `swarm_a<level>_<ratio>_*` (step_start: the ratio against
  pi_old recomputed at the step's start, i.e. no off-policy correction).
Both score the first and the last policy on the same 100 held-out sums (greedy and mean@4, T=0.7, fixed
seeds: coordinator/heldout.py). `*_heldout_gain` is the mean@4 gain; `swarm_over_central` their ratio
(target >= 0.9); `*_reward_curve` the mean training reward of each step.

One run is one draw: RL on 64 samples a step is noisy, so compare several lines before concluding.
`--arms central` runs one arm (a quick look at the central curve). The last line printed is one JSON object.

  python bench/learning.py [--steps 20] [--model smollm2] [--arms central,swarm] [--async-levels 0,1,2]
                           [--ratios behaviour,step_start]
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


def central(steps: int, model: str, state_dir: Path) -> dict:
    """The demo's recipe in one process, on-policy: the node's own `Worker.generate` (prompts, seeded
    sampling, rewards, advantages) on the policy just trained, then the coordinator's GRPO step on those
    rows; no swarm, no validation."""
    from types import SimpleNamespace

    import torch

    from intellect.coordinator.heldout import HeldoutEval
    from intellect.coordinator.service import base_model_dir, train_sample
    from intellect.coordinator.trainer.trainer import GRPOTrainer
    from intellect.node.config import NodeConfig
    from intellect.node.demo import demo_config
    from intellect.node.engine import TorchEngineConfig
    from intellect.node.engine.torch_engine import TorchEngine
    from intellect.node.status import NodeStatus
    from intellect.node.worker import Worker
    from intellect.protocol.identity import Identity
    from intellect.protocol.messages import RunInfo
    from intellect.protocol.model import eos_token_ids, load_model, model_config_hash

    config = demo_config(state_dir, model, steps)
    torch.set_num_threads(config.threads or 2)
    base = base_model_dir(config.model, state_dir / "models")
    policy, tokenizer = load_model(base, dtype=torch.float32)
    eos = eos_token_ids(tokenizer, base)
    trainer = GRPOTrainer(policy, config.trainer.model_copy(update={"pad_token_id": tokenizer.pad_token_id or 0}))
    heldout = HeldoutEval(config, tokenizer, eos)
    node = Identity.from_seed(b"bench-learning-central")
    r = config.rollouts
    info = RunInfo(run_id="central", run_name="central", coordinator_peer_id=node.peer_id, task=config.task,
                   collect_step=0, latest_policy_step=0, async_level=0, prompts_per_batch=r.prompts_per_batch,
                   completions_per_prompt=r.completions_per_prompt, max_new_tokens=r.max_new_tokens,
                   temperature=r.temperature, model_config_hash=model_config_hash(base), eos_token_ids=sorted(eos))
    (state_dir / "node").mkdir(parents=True)
    worker = Worker(NodeConfig(state_dir=state_dir / "node", run_id="central", coordinator_key=node.public_key_hex),
                    node, SimpleNamespace(run_id="central"), fetcher=None, status=NodeStatus())  # no swarm
    worker.engine, worker.tokenizer = TorchEngine(TorchEngineConfig(threads=config.threads), base), tokenizer
    worker.engine.eos_ids = eos

    def evaluate(step: int) -> dict:
        policy.eval()
        result = heldout.evaluate(policy, step)
        policy.train()
        return {"greedy": result.heldout_greedy, "mean_at_k": result.heldout_mean_at_k}

    started = time.perf_counter()
    before, curve = evaluate(0), []
    for step in range(steps):
        rows = []
        for _ in range(config.batches_per_step):
            batch = worker.generate(info, step)
            worker.write(batch)  # commits the batch counter: the next batch draws new prompts and seeds
            rows += batch.rows
        trainer.train_step([train_sample(row) for row in rows])
        trainer.policy_step = step + 1
        with torch.no_grad():  # the engine samples from the policy just trained (its own dtype)
            trained = policy.state_dict()
            for name, p in worker.engine.model.state_dict().items():
                p.copy_(trained[name])
        curve.append(round(sum(row.reward for row in rows) / len(rows), 4))
        print(f"central step {step}: reward {curve[-1]:.3f} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)
    after = evaluate(steps)
    return {"before": before, "after": after, "curve": curve, "seconds": time.perf_counter() - started}


def swarm(steps: int, model: str, state_dir: Path, async_level: int, ratio: str) -> dict:
    """The demo with the given async level and importance ratio, in its own process (its coordinator runs
    in that process, as `intellect-node demo` runs it); the curve and the scores come from its metrics."""
    started = time.perf_counter()
    spec = {"steps": steps, "model": model, "state_dir": str(state_dir),
            "overrides": {"async_level": async_level, "trainer.loss.ratio_against": ratio}}
    done = subprocess.run([sys.executable, __file__, "--swarm-arm", json.dumps(spec)], capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"},
                          stdin=subprocess.DEVNULL, check=False)
    metrics = state_dir / "coordinator" / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    evals = sorted((m for m in lines if m.get("kind") == "eval"), key=lambda m: m["policy_step"])
    if done.returncode != 0 or len(evals) < 2 or evals[-1]["policy_step"] != steps:
        raise SystemExit(f"the demo failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    score = [{"greedy": m["heldout_greedy"], "mean_at_k": m["heldout_mean_at_k"]} for m in (evals[0], evals[-1])]
    return {"before": score[0], "after": score[1], "seconds": time.perf_counter() - started,
            "curve": [round(m["reward"], 4) for m in lines if m.get("kind") != "eval"]}


def swarm_arm(spec: dict) -> int:
    """`--swarm-arm SPEC`: one swarm arm, in this process."""
    from rich.console import Console

    from intellect.node.demo import run_demo

    return run_demo(spec["steps"], 2, spec["model"], headless=True, state_dir=Path(spec["state_dir"]),
                    console=Console(stderr=True), overrides=spec["overrides"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--arms", default="central,swarm")
    p.add_argument("--async-levels", default="2", help="swarm arms: async levels, e.g. 0,1,2")
    p.add_argument("--ratios", default="behaviour", help="swarm arms: trainer.loss.ratio_against values, "
                                                         "e.g. behaviour,step_start (uncorrected)")
    p.add_argument("--swarm-arm", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.swarm_arm:
        raise SystemExit(swarm_arm(json.loads(args.swarm_arm)))
    arms = args.arms.split(",")
    if not set(arms) <= {"central", "swarm"}:
        raise SystemExit("--arms is central, swarm or central,swarm")
    from intellect.node.demo import HELDOUT_PROBLEMS

    out: dict = {"bench": "learning", "model": args.model, "steps": args.steps, "samples_per_step": 64,
                 "heldout_problems": HELDOUT_PROBLEMS}
    runs = [("central", None)] if "central" in arms else []
    if "swarm" in arms:
        runs += [(f"swarm_a{level}_{ratio}", (int(level), ratio))
                 for level in args.async_levels.split(",") for ratio in args.ratios.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        for name, swarm_args in runs:
            if swarm_args is None:
                r = central(args.steps, args.model, Path(tmp) / name)
            else:
                r = swarm(args.steps, args.model, Path(tmp) / name, *swarm_args)
            name = "swarm" if name == "swarm_a2_behaviour" else name  # the demo as shipped
            print(json.dumps({"arm": name, "before": r["before"], "after": r["after"], "seconds": r["seconds"]}),
                  file=sys.stderr, flush=True)  # progress: each arm as it ends
            out |= {f"{name}_heldout_before": round(r["before"]["mean_at_k"], 4),
                    f"{name}_heldout_after": round(r["after"]["mean_at_k"], 4),
                    f"{name}_heldout_gain": round(r["after"]["mean_at_k"] - r["before"]["mean_at_k"], 4),
                    f"{name}_greedy_gain": round(r["after"]["greedy"] - r["before"]["greedy"], 4),
                    f"{name}_reward_curve": r["curve"], f"{name}_s": round(r["seconds"], 1)}
    if "swarm_heldout_gain" in out and out.get("central_heldout_gain", 0) > 0:
        out["swarm_over_central"] = round(out["swarm_heldout_gain"] / out["central_heldout_gain"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
