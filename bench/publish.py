"""Benchmark: policy-step wall time with publishing inline vs in the background (`publish_in_background`).

Two real coordinators, one after the other, each in its own state folder with its own swarm on
127.0.0.1 (no nodes): the baseline publishes inline, the other in its publishing thread. Each trains
`--steps` policy steps (after one warm-up step that is not counted) on the same accepted batches: random
token ids written to accepted/ and the ledger as the intake records them, the same for both. A policy
step's wall time is `Coordinator.train_once` from start to return: train + checkpoint + (inline)
shard, sign, store the manifest and announce, or (background) the wait for the previous step to be
out before checkpointing. After the last step the background run's drain (its last publish) is
timed apart (`background_drain_s`): it overlaps the next step in a run that goes on.

Also reported per step (means): `train_s` (trainer.train_step), `save_s` (the checkpoint) and
`publish_s` (Publisher.publish + announce, wherever it ran). `publish_background_speedup` = inline
step time / background step time.

Both arms above write the whole training state every step (`full_state_every = 1`). A third coordinator
publishes in the background and writes the policy alone at every timed step (`full_state_every` larger
than the run): `save_s_policy_only` against `save_s_background`, `policy_only_speedup` = background step
time / its step time, `saved_mb_full` and `saved_mb_policy_only` the bytes one checkpoint writes.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

NODE = "cd" * 32  # a fake node's key: its batches go straight to the ledger, as the intake records them


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def queue_batch(c, counter: int, args) -> None:
    """One accepted batch of the policy the next step trains, queued for that step."""
    from intellect.coordinator.ledger import Submission, Verdict
    from intellect.protocol.rollouts import (
        RolloutBatch,
        RolloutMeta,
        RolloutRow,
        SamplingParams,
        content_hash,
        rollouts_to_bytes,
    )

    rng = random.Random(counter)
    n = c.config.rollouts.completions_per_prompt
    meta = RolloutMeta(node_public_key=NODE, run_id=c.run_id, policy_step=c.latest_policy_step,
                       batch_counter=counter + 1, task="arithmetic",
                       sampling=SamplingParams(temperature=1.0, max_tokens=args.output_len, n=n))
    rows = []
    for i in range(c.config.rollouts.prompts_per_batch * n):
        output = [rng.randrange(100, 40_000) for _ in range(args.output_len)]
        rows.append(RolloutRow(problem_index=i // n, input_tokens=[rng.randrange(100, 40_000) for _ in range(32)],
                               output_tokens=output, output_logprobs=[-1.0] * len(output),
                               advantage=rng.gauss(0.0, 1.0), reward=float(i % 2), task_reward=float(i % 2),
                               length_penalty=0.0, proof=b"", step=c.latest_policy_step, target_length=0,
                               finish_reason="length"))
    data = rollouts_to_bytes(RolloutBatch(meta=meta, rows=rows))
    path = c.state_dir / "accepted" / f"{content_hash(data)}.parquet"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    c.ledger.record_submission(Submission(content_hash(data), NODE, c.latest_policy_step, c.collect_step, len(rows),
                                          len(rows) * args.output_len, str(path),
                                          f"{NODE}:{c.latest_policy_step}:{counter}"), Verdict(True, "accepted"))


def timed(spent: list[float], fn):
    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent.append(time.perf_counter() - start)
    return wrapper


def run_mode(background: bool, folder: Path, args, full_state_every: int = 1) -> dict:
    from intellect.coordinator.config import CoordinatorConfig
    from intellect.coordinator.runner import start_coordinator

    config = CoordinatorConfig(
        state_dir=folder, run_name="bench-publish", model=args.model, async_level=1, batches_per_step=1,
        threads=args.threads, shard_size=args.shard_size, publish_in_background=background,
        full_state_every=full_state_every,
        rollouts={"prompts_per_batch": 4, "completions_per_prompt": 4, "max_new_tokens": args.output_len},
        trainer={"lr": 1e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "seq_len": 1024,
                 "trainable": args.trainable},
        swarm={"host": "127.0.0.1", "port": 0, "record_ttl_s": 600.0})
    c = start_coordinator(config)
    try:
        queue_batch(c, 0, args)
        c.train_once()  # warm-up: first-call allocations
        assert c.publishing.wait_idle(timeout=600)
        train, save, publish, steps = [], [], [], []
        c.trainer.train_step = timed(train, c.trainer.train_step)
        c.trainer.save = timed(save, c.trainer.save)
        c.publisher.publish = timed(publish, c.publisher.publish)
        announce = []
        c.announce = timed(announce, c.announce)
        for i in range(1, args.steps + 1):
            queue_batch(c, i, args)
            start = time.perf_counter()
            c.train_once()
            steps.append(time.perf_counter() - start)
            log(f"  {'background' if background else 'inline'} step {i}: {steps[-1]:.2f} s")
        start = time.perf_counter()
        assert c.publishing.wait_idle(timeout=600)
        drain = time.perf_counter() - start
        assert c.published_step == c.latest_policy_step == args.steps + 1
        return {"step_s": statistics.mean(steps), "step_s_all": [round(s, 3) for s in steps],
                "train_s": statistics.mean(train), "save_s": statistics.mean(save),
                "publish_s": statistics.mean(p + a for p, a in zip(publish, announce, strict=True)), "drain_s": drain,
                "checkpoint_mb": sum(p.stat().st_size for p in c.policy_dir(c.latest_policy_step).iterdir()) / 1e6,
                "saved_mb": sum(p.stat().st_size for p in c.policy_dir(c.latest_policy_step).parent.rglob("*")
                                if p.is_file()) / 1e6}
    finally:
        c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help='"tiny" (the tests\' random 2-layer Llama), "smollm2" or a '
                                                        "checkpoint folder")
    parser.add_argument("--steps", type=int, default=6, help="timed policy steps per mode (after one warm-up)")
    parser.add_argument("--output-len", type=int, default=64, help="completion tokens per row (16 rows a batch)")
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--shard-size", type=int, default=50_000_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        log("inline publishing (baseline)")
        inline = run_mode(False, Path(tmp) / "inline", args)
        log("background publishing")
        background = run_mode(True, Path(tmp) / "background", args)
        log("background publishing, the policy alone at every timed step")
        policy_only = run_mode(True, Path(tmp) / "policy_only", args, full_state_every=args.steps + 10)
    result = {
        "bench": "publish",
        "model": args.model,
        "checkpoint_mb": round(inline["checkpoint_mb"], 1),
        "steps": args.steps,
        "threads": args.threads,
        "trainable": args.trainable,
        "step_s_inline": round(inline["step_s"], 3),
        "step_s_background": round(background["step_s"], 3),
        "publish_background_speedup": round(inline["step_s"] / background["step_s"], 3),
        "train_s_inline": round(inline["train_s"], 3),
        "train_s_background": round(background["train_s"], 3),
        "save_s_inline": round(inline["save_s"], 3),
        "save_s_background": round(background["save_s"], 3),
        "publish_s_inline": round(inline["publish_s"], 3),
        "publish_s_background": round(background["publish_s"], 3),
        "background_drain_s": round(background["drain_s"], 3),
        "step_s_policy_only": round(policy_only["step_s"], 3),
        "policy_only_speedup": round(background["step_s"] / policy_only["step_s"], 3),
        "save_s_policy_only": round(policy_only["save_s"], 3),
        "saved_mb_full": round(background["saved_mb"], 1),
        "saved_mb_policy_only": round(policy_only["saved_mb"], 1),
        "step_s_all_inline": inline["step_s_all"],
        "step_s_all_background": background["step_s_all"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
