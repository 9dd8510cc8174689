"""Validation throughput of the coordinator's intake, in completions per second (target >= 200/s
without TOPLOC on the tiny model), and with TOPLOC (one bf16 prefill per completion).

A real coordinator (no swarm: nothing is trained or published) and a real node: the node's `Worker`
generates honest batches with the torch engine on the policy the coordinator saved, and signs them
as `Worker.submit` does. Each pass hands every signed batch to a fresh `Intake` (fresh ledger and
replay guard, same state dir layout) and times `Intake.submit` end to end: signature, parquet,
prompts, rewards, termination, [prefill checks], fsynced file moves and the ledger transaction.
Every batch must be accepted. Per-check costs come from timing the pipeline's stages.

Prints progress to stderr and one JSON line as the LAST stdout line:
  intake_per_s, intake_toploc_per_s, completions, batches, per_check_ms (per completion, by stage,
  for each pass), plus the settings.

  python bench/intake.py [--batches 32] [--prompts 4] [--n 4] [--max-tokens 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

STAGES = ["_authenticate", "_decode", "_store", "_accept"]  # Intake's own steps; then each of its checks


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_coordinator(state_dir: Path, model: Path, args):
    from intellect.coordinator.config import CoordinatorConfig
    from intellect.coordinator.service import Coordinator

    config = CoordinatorConfig(
        state_dir=state_dir, run_name="bench", model=str(model), threads=args.threads,
        rollouts={"prompts_per_batch": args.prompts, "completions_per_prompt": args.n,
                  "max_new_tokens": args.max_tokens, "temperature": 1.0},
        task={"name": "arithmetic", "max_operand": 20, "operators": "+", "length_targets": [16, 24]},
        trainer={"temperature": 1.0}, swarm={"host": "127.0.0.1"},
        intake={"eos_min_prob": 1e-6, "eos_floor_prob": 1e-6})  # the tiny random model: P(EOS) ~ 2e-5 everywhere
    return Coordinator(config)


def signed_batches(coordinator, args) -> list[bytes]:
    """`args.batches` honest submissions of one node, made by `Worker` and signed as it submits."""
    from intellect.node.config import NodeConfig
    from intellect.node.engine import TorchEngineConfig, setup_engine
    from intellect.node.status import NodeStatus
    from intellect.node.worker import Worker
    from intellect.protocol.identity import Identity
    from intellect.protocol.messages import SubmissionHeader, encode_submission
    from intellect.protocol.rollouts import read_rollouts
    from intellect.protocol.swarm import SwarmConfig, setup_swarm
    from intellect.protocol.wire import MessageKind, seal

    identity = Identity.from_seed(b"bench-node")
    config = NodeConfig(state_dir=coordinator.state_dir.parent / "node", run_id=coordinator.run_id,
                        coordinator_key=coordinator.identity.public_key_hex, swarm=SwarmConfig(host="127.0.0.1"),
                        engine=TorchEngineConfig(threads=args.threads))
    config.state_dir.mkdir(parents=True, exist_ok=True)
    swarm = setup_swarm(config.swarm, identity, coordinator.run_id, coordinator.identity.public_key)
    worker = Worker(config, identity, swarm, None, NodeStatus())
    try:
        worker.engine = setup_engine(config.engine, coordinator.policy_dir(0))
        worker.tokenizer, worker.loaded_step = worker.engine.tokenizer, 0
        info = coordinator.run_info()
        out = []
        for i in range(args.batches):
            path = worker.write(worker.generate(info, 0))
            data = path.read_bytes()
            batch = read_rollouts(data)
            header = SubmissionHeader(policy_step=0, batch_counter=batch.meta.batch_counter,
                                      num_completions=len(batch.rows), num_tokens=batch.num_output_tokens,
                                      file_sha256=hashlib.sha256(data).hexdigest(), file_size=len(data))
            out.append(seal(identity, MessageKind.SUBMISSION, coordinator.run_id, encode_submission(header, data)))
            if (i + 1) % 8 == 0:
                log(f"  generated {i + 1}/{args.batches} batches")
        return out
    finally:
        worker.close()
        swarm.close()


def timed_pass(coordinator, envelopes: list[bytes], toploc_fraction: float, workdir: Path) -> tuple[float, dict]:
    """Seconds to validate every envelope with a fresh Intake, and seconds spent per stage."""
    from intellect.coordinator.intake import Intake
    from intellect.coordinator.ledger import Ledger

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    spent: dict[str, float] = defaultdict(float)
    config = coordinator.config.intake.model_copy(update={"toploc_fraction": toploc_fraction})
    with Ledger(workdir / "ledger.sqlite", coordinator.ledger.ban_policy) as ledger:
        intake = Intake(config, coordinator.intake.ctx.run, ledger, workdir, coordinator.tokenizer, coordinator.eos_ids,
                        policy_for=coordinator.policy_for, steps=lambda: (0, 0))
        def timed(fn, name):
            def run(*a, **kw):
                start = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[name] += time.perf_counter() - start
            return run

        for name in STAGES:  # an instance attribute shadows the method
            setattr(intake, name, timed(getattr(intake, name), name))
        # the first model check (proofs readable) pays for the one prefill all model checks share
        intake.checks = [timed(check, check.__name__) for check in intake.checks]
        coordinator.policy_for(0)  # load the policy outside the timing (it is cached while the run goes)
        start = time.perf_counter()
        for data in envelopes:
            outcome = intake.submit(data)
            assert outcome.verdict.accepted, outcome.verdict
        return time.perf_counter() - start, dict(spent)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=2, help="passes per setting; the fastest counts")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from intellect.protocol.model import tiny_model_dir

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    try:
        model = tiny_model_dir(Path(os.environ.get("INTELLECT_MODEL_CACHE", root / "models")))
        coordinator = make_coordinator(root / "coordinator", model, args)
        log(f"generating {args.batches} batches of {args.prompts} x {args.n} completions ...")
        envelopes = signed_batches(coordinator, args)
        completions = args.batches * args.prompts * args.n
        result: dict = {"completions": completions, "batches": args.batches}
        for key, fraction in (("intake_per_s", 0.0), ("intake_toploc_per_s", 1.0)):
            best, stages = float("inf"), {}
            for _ in range(args.reps):
                seconds, spent = timed_pass(coordinator, envelopes, fraction, root / "pass")
                if seconds < best:
                    best, stages = seconds, spent
            result[key] = round(completions / best, 1)
            result[f"per_check_ms{'_toploc' if fraction else ''}"] = {
                k.lstrip("_"): round(1000 * v / completions, 3) for k, v in stages.items()}
            log(f"toploc_fraction={fraction}: {result[key]} completions/s")
        coordinator.ledger.close()
        result |= {"prompts_per_batch": args.prompts, "n": args.n, "max_new_tokens": args.max_tokens,
                   "threads": args.threads, "model": "tiny"}
        print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
