"""Benchmark: does the swarm learn as well per sample as one centralised process?

The demo's recipe (node/demo.py: SmolLM2-135M, "a + b" on 40 training sums, 2 batches x 4 prompts x 8
completions per step, temperature 0.7, lr 1e-4 on the last 8 layers) trained for `--steps` steps, the
same number of samples either way:
- central: one process generates with the torch engine (the node's sampler, no proofs), scores, and
  takes the GRPO step at once on those samples (async level 0): no swarm, no validation, no staleness;
- swarm: `intellect-node demo --headless` (coordinator + 2 node processes, async level 2, every check on).
Both score the first and the last policy on the same 100 held-out sums (greedy and mean@4, T=0.7, fixed
seeds: coordinator/heldout.py). `*_heldout_gain` is the mean@4 gain; `swarm_over_central` their ratio
(target >= 0.9); `*_reward_curve` the mean training reward of each step.

One run is one draw: RL on 64 samples a step is noisy, so compare several lines before concluding.
`--arms central` runs one arm (a quick look at the central curve). The last line printed is one JSON object.

  python bench/learning.py [--steps 20] [--model smollm2] [--arms central,swarm]
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
    """The demo's recipe in one process, on-policy: generate, score, train, repeat."""
    import numpy as np
    import torch

    from intellect.coordinator.heldout import HeldoutEval
    from intellect.coordinator.service import base_model_dir
    from intellect.coordinator.trainer.trainer import GRPOTrainer
    from intellect.node.demo import demo_config
    from intellect.node.engine import SamplingParams, TorchEngineConfig
    from intellect.node.engine.torch_engine import TorchEngine
    from intellect.protocol.identity import Identity
    from intellect.protocol.model import eos_token_ids, load_model
    from intellect.protocol.sampling import batch_seeds
    from intellect.protocol.tasks import (
        completion_reward,
        group_advantages,
        node_seed_int,
        prompt_token_ids,
        sample_batch,
        setup_task,
    )

    config = demo_config(state_dir, model, steps)
    torch.set_num_threads(config.threads or 2)
    base = base_model_dir(config.model, state_dir / "models")
    policy, tokenizer = load_model(base, dtype=torch.float32)
    eos = eos_token_ids(tokenizer, base)
    trainer = GRPOTrainer(policy, config.trainer.model_copy(update={"pad_token_id": tokenizer.pad_token_id or 0}))
    engine = TorchEngine(TorchEngineConfig(threads=config.threads), base)
    engine.eos_ids = eos
    heldout = HeldoutEval(config, tokenizer, eos)
    task, node = setup_task(config.task), Identity.from_seed(b"bench-learning-central")
    r = config.rollouts
    params = SamplingParams(temperature=r.temperature, max_tokens=r.max_new_tokens, proofs=False)

    def evaluate(step: int) -> dict:
        policy.eval()
        result = heldout.evaluate(policy, step)
        policy.train()
        return {"greedy": result.heldout_greedy, "mean_at_k": result.heldout_mean_at_k}

    started = time.perf_counter()
    before, curve = evaluate(0), []
    for step in range(steps):
        samples, rewards = [], []
        for counter in range(1, config.batches_per_step + 1):
            sampled = sample_batch(task, node_seed_int(node.public_key), step, counter, r.prompts_per_batch)
            prompts = [prompt_token_ids(tokenizer, task.problem(s.problem_index), 0, config.task.thinking)
                       for s in sampled]
            n = r.completions_per_prompt
            completions = engine.generate([p for p in prompts for _ in range(n)], params,
                                          batch_seeds("central", node.public_key, step, counter, len(prompts) * n))
            scores = [completion_reward(task, config.task, task.problem(sampled[i // n].problem_index),
                                        tokenizer.decode(c.output_tokens, skip_special_tokens=True), 0,
                                        len(c.output_tokens))[0] for i, c in enumerate(completions)]
            advantages = group_advantages(np.array(scores, dtype=np.float32).reshape(len(prompts), n)).reshape(-1)
            samples += [(prompts[i // n], c.output_tokens, float(advantages[i]), scores[i], c.output_logprobs, step)
                        for i, c in enumerate(completions)]
            rewards += scores
        trainer.train_step(samples)
        trainer.policy_step = step + 1
        with torch.no_grad():  # the engine samples from the policy just trained (its own dtype)
            for name, p in engine.model.state_dict().items():
                p.copy_(policy.state_dict()[name])
        curve.append(round(sum(rewards) / len(rewards), 4))
        print(f"central step {step}: reward {curve[-1]:.3f} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)
    after = evaluate(steps)
    return {"before": before, "after": after, "curve": curve, "seconds": time.perf_counter() - started}


def swarm(steps: int, model: str, state_dir: Path) -> dict:
    """The demo itself: its per-step lines and summary carry the curve and the held-out scores."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "intellect.node.cli", "demo", "--headless", "--steps", str(steps),
                           "--model", model, "--state-dir", str(state_dir)], capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL, check=False)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines or "heldout_greedy_after" not in lines[-1]:
        raise SystemExit(f"the demo failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    summary = lines[-1]
    k = next(key for key in summary if key.startswith("heldout_mean_at_")).split("_")[3]
    return {"before": {"greedy": summary["heldout_greedy_before"], "mean_at_k": summary[f"heldout_mean_at_{k}_before"]},
            "after": {"greedy": summary["heldout_greedy_after"], "mean_at_k": summary[f"heldout_mean_at_{k}_after"]},
            "curve": [round(m["reward"], 4) for m in lines[:-1]], "seconds": time.perf_counter() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--arms", default="central,swarm")
    args = p.parse_args()
    arms = args.arms.split(",")
    if not set(arms) <= {"central", "swarm"}:
        raise SystemExit("--arms is central, swarm or central,swarm")
    from intellect.node.demo import HELDOUT_PROBLEMS

    out: dict = {"bench": "learning", "model": args.model, "steps": args.steps, "samples_per_step": 64,
                 "heldout_problems": HELDOUT_PROBLEMS}
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        for arm in arms:
            r = (central if arm == "central" else swarm)(args.steps, args.model, Path(tmp) / arm)
            out |= {f"{arm}_heldout_before": round(r["before"]["mean_at_k"], 4),
                    f"{arm}_heldout_after": round(r["after"]["mean_at_k"], 4),
                    f"{arm}_heldout_gain": round(r["after"]["mean_at_k"] - r["before"]["mean_at_k"], 4),
                    f"{arm}_greedy_gain": round(r["after"]["greedy"] - r["before"]["greedy"], 4),
                    f"{arm}_reward_curve": r["curve"], f"{arm}_s": round(r["seconds"], 1)}
    if {"central", "swarm"} <= set(arms) and out["central_heldout_gain"] > 0:
        out["swarm_over_central"] = round(out["swarm_heldout_gain"] / out["central_heldout_gain"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
