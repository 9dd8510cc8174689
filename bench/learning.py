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
- central_lag<L>_<ratio> (`--lags 1,2 --ratios behaviour,step_start`): the central arm with rows made by
  the policy L steps older, the staleness async level L allows at most, without the swarm's timing: the
  arms of one `--seed` draw the same prompts and sampling seeds, so with and without the off-policy
  correction differ only by the loss.
Both score the first and the last policy on the same 64 held-out sums (greedy and mean@4, T=0.7, fixed
seeds: coordinator/heldout.py). `*_heldout_gain` is the mean@4 gain; `swarm_over_central` their ratio
(target >= 0.9); `*_reward_curve` the mean training reward of each step.

One run is one draw: RL on 64 samples a step is noisy, so compare several lines before concluding.
`--arms central` runs one arm (a quick look at the central curve). The last line printed is one JSON object.

  python bench/learning.py [--steps 20] [--model smollm2] [--arms central,swarm] [--async-levels 0,1,2]
                           [--ratios behaviour,step_start] [--lags 1,2] [--seed 0]
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


def central(steps: int, model: str, state_dir: Path, lag: int = 0, ratio: str = "behaviour", seed: int = 0,
            loss_type: str | None = None) -> dict:
    """The demo's recipe in one process: the node's own `Worker.generate` (prompts, seeded sampling,
    rewards, advantages), then the coordinator's GRPO step on those rows; no swarm, no validation.
    `lag` 0 samples from the policy just trained (on-policy); `lag` L from the policy L steps older
    (policy max(0, s - L) makes step s's rows), the staleness async level L allows at most, without the
    swarm's timing noise: the arms of one seed draw the same prompts and sampling seeds, so the lagged
    arms with and without the off-policy correction (`ratio`) start from the same rows."""
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

    overrides = {"trainer.loss.ratio_against": ratio} | ({"trainer.loss.type": loss_type} if loss_type else {})
    config = demo_config(state_dir, model, steps, overrides=overrides)
    torch.set_num_threads(config.threads or 2)
    base = base_model_dir(config.model, state_dir / "models")
    policy, tokenizer = load_model(base, dtype=torch.float32)
    eos = eos_token_ids(tokenizer, base)
    trainer = GRPOTrainer(policy, config.trainer.model_copy(update={"pad_token_id": tokenizer.pad_token_id or 0}))
    heldout = HeldoutEval(config, tokenizer, eos)
    node = Identity.from_seed(f"bench-learning-central-{seed}".encode() if seed else b"bench-learning-central")
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

    def trained_weights() -> dict:
        return {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}

    history = [trained_weights()]
    for step in range(steps):
        rows, made_by = [], max(0, step - lag)
        for _ in range(config.batches_per_step):
            batch = worker.generate(info, made_by)
            worker.write(batch)  # commits the batch counter: the next batch draws new prompts and seeds
            rows += batch.rows
        metrics = trainer.train_step([train_sample(row) for row in rows])
        trainer.policy_step = step + 1
        history.append(trained_weights())
        history = history[-(lag + 1):]  # policies step+1-lag .. step+1
        with torch.no_grad():  # the engine samples from policy max(0, step + 1 - lag) (in its own dtype)
            engine_params = dict(worker.engine.model.named_parameters())
            for name, value in history[0].items():
                engine_params[name].copy_(value)
        curve.append(round(sum(row.reward for row in rows) / len(rows), 4))
        print(f"central step {step} (rows by policy {made_by}): reward {curve[-1]:.3f}, clipped "
              f"{metrics.get('clip_ratio', 0):.3f}, mismatch KL {metrics.get('mismatch_kl', 0):.4f} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
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
    p.add_argument("--lags", default="", help="central arms whose rows are made by the policy L steps older, "
                                             "one per --ratios value: e.g. 2 (arms central_lag2_<ratio>)")
    p.add_argument("--seed", type=int, default=0, help="central arms: a draw (prompts and sampling seeds)")
    p.add_argument("--loss-type", help="central lag arms: trainer.loss.type (default: the demo's)")
    p.add_argument("--swarm-arm", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.swarm_arm:
        raise SystemExit(swarm_arm(json.loads(args.swarm_arm)))
    arms = [arm for arm in args.arms.split(",") if arm]
    if not set(arms) <= {"central", "swarm"} or not (arms or args.lags):
        raise SystemExit("--arms is central, swarm or central,swarm (or empty, with --lags)")
    from intellect.node.demo import HELDOUT_PROBLEMS

    out: dict = {"bench": "learning", "model": args.model, "steps": args.steps, "samples_per_step": 64,
                 "seed": args.seed, "heldout_problems": HELDOUT_PROBLEMS}
    runs = [("central", None)] if "central" in arms else []
    loss = f"_{args.loss_type}" if args.loss_type else ""
    runs += [(f"central_lag{lag}_{ratio}{loss}", {"lag": int(lag), "ratio": ratio})
             for lag in filter(None, args.lags.split(",")) for ratio in args.ratios.split(",")]
    if "swarm" in arms:
        runs += [(f"swarm_a{level}_{ratio}", (int(level), ratio))
                 for level in args.async_levels.split(",") for ratio in args.ratios.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        for name, swarm_args in runs:
            if swarm_args is None:
                r = central(args.steps, args.model, Path(tmp) / name, seed=args.seed)
            elif name.startswith("central_lag"):
                r = central(args.steps, args.model, Path(tmp) / name, seed=args.seed, loss_type=args.loss_type,
                            **swarm_args)
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
