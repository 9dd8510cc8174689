"""Validation throughput of the coordinator's intake, in completions per second (target >= 200/s
without TOPLOC on the tiny model), and with TOPLOC (one bf16 prefill per completion).

A real coordinator (no swarm: nothing is trained or published) and a real node: the node's `Worker`
generates honest batches with the torch engine on the policy the coordinator saved, and signs them
as `Worker.submit` does. Each pass hands every signed batch to a fresh `Intake` (fresh ledger and
replay guard, same state dir layout) and times `Intake.submit` end to end: signature, parquet,
prompts, rewards, termination, [prefill checks], fsynced file moves and the ledger transaction.
Every batch must be accepted. Per-check costs come from timing the pipeline's stages.

Then the hostile figures, on the same Intake: two decompression bombs (1024 rows x 65,536 zero tokens,
and 32 "stop" rows of 20,000 tokens), each judged once: seconds to its verdict beside one honest batch's,
and the peak memory it added (VmHWM reset first); and a flood: the honest batches judged again while 2
threads (one caller's in-flight limit) submit garbage as fast as they are answered (random bytes, junk signed by a key that is soon
banned), honest per-batch p95 beside the same pass without the flood. In one process, so the figure
is the intake's own cost (the swarm's per-caller limit and the attacker's CPU are not in it).

Then the same batches through validator worker processes (`intake.workers` 1 and 2): completions per
second from the first submission to the last verdict, beside the inline figure with TOPLOC.

Prints progress to stderr and one JSON line as the LAST stdout line:
  intake_per_s, intake_toploc_per_s, intake_per_s_1, intake_per_s_2, receive_ms_1/2 (the submit call), completions, batches, per_check_ms (per completion, by stage,
  for each pass), bombs {name: seconds, x_honest_batch, peak_mb, reason}, flood {honest_p95_ms,
  quiet_p95_ms, ratio, garbage_per_s}, plus the settings.

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
    from intellect.protocol.rollouts import read_rollouts
    from intellect.protocol.swarm import SwarmConfig, setup_swarm

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
            out.append(signed_file(coordinator, identity, data, batch.meta.batch_counter, len(batch.rows),
                                   batch.num_output_tokens))
            if (i + 1) % 8 == 0:
                log(f"  generated {i + 1}/{args.batches} batches")
        return out
    finally:
        worker.close()
        swarm.close()


def timed_pass(coordinator, envelopes: list[bytes], toploc_fraction: float, workdir: Path) -> tuple[float, dict]:
    """Seconds to validate every envelope with a fresh Intake, and seconds spent per stage."""
    spent: dict[str, float] = defaultdict(float)
    intake = fresh_intake(coordinator, workdir, toploc_fraction)
    with intake.ledger:
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


def fresh_intake(coordinator, workdir: Path, toploc_fraction: float = 1.0):
    from intellect.coordinator.intake import Intake
    from intellect.coordinator.ledger import Ledger

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = coordinator.config.intake.model_copy(update={"toploc_fraction": toploc_fraction})
    ledger = Ledger(workdir / "ledger.sqlite", coordinator.ledger.ban_policy)
    return Intake(config, coordinator.intake.ctx.run, ledger, workdir, coordinator.tokenizer, coordinator.eos_ids,
                  policy_for=coordinator.policy_for, steps=lambda: (0, 0))


def worker_figures(coordinator, envelopes: list[bytes], completions: int, workdir: Path) -> dict:
    """Completions per second from the first submission to the last verdict through validator worker
    processes (intake.workers 1 and 2; loaded before the clock starts; each loads the policy on its
    first job, which the clock includes). The submit call answers `received` and returns."""
    from intellect.coordinator.validators import WorkerSpec
    from intellect.protocol.messages import RECEIVED

    out = {}
    for n in (1, 2):
        intake = fresh_intake(coordinator, workdir / f"workers{n}")
        spec = WorkerSpec(coordinator.config, coordinator.run_id, coordinator.base_dir, coordinator.checkpoints,
                          frozenset(coordinator.eos_ids), intake.ctx.row_secret)
        intake.start_workers(spec, n, on_accept=None)
        shas = [intake_sha(e) for e in envelopes]
        try:
            while intake.pool.num_ready < n:
                time.sleep(0.05)
            start = time.perf_counter()
            received = []
            for data in envelopes:
                t = time.perf_counter()
                verdict = intake.receive(data).verdict
                received.append(time.perf_counter() - t)
                assert verdict.reason == RECEIVED, verdict
            while any(intake.verdict_for(s).reason == RECEIVED for s in shas):
                time.sleep(0.01)
            seconds = time.perf_counter() - start
            assert all(intake.verdict_for(s).accepted for s in shas)
            out[f"intake_per_s_{n}"] = round(completions / seconds, 1)
            out[f"receive_ms_{n}"] = round(1000 * sorted(received)[len(received) // 2], 2)  # the submit call
            log(f"{n} validator worker(s): {out[f'intake_per_s_{n}']} completions/s")
        finally:
            intake.close()
            intake.ledger.close()
    return out


def intake_sha(envelope: bytes) -> str:
    from intellect.protocol.messages import decode_submission
    from intellect.protocol.wire import open_envelope

    return decode_submission(open_envelope(envelope, run_id=None).body)[0].file_sha256


def vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def signed_file(coordinator, identity, data: bytes, counter: int, num_completions: int = 16,
                num_tokens: int = 16) -> bytes:
    """A rollout file of policy 0 signed as `Worker.submit` signs it."""
    from intellect.protocol.messages import SubmissionHeader, encode_submission
    from intellect.protocol.wire import MessageKind, seal

    header = SubmissionHeader(policy_step=0, batch_counter=counter, num_completions=num_completions,
                              num_tokens=num_tokens,
                              file_sha256=hashlib.sha256(data).hexdigest(), file_size=len(data))
    return seal(identity, MessageKind.SUBMISSION, coordinator.run_id, encode_submission(header, data))


def bomb_figures(coordinator, honest: bytes, workdir: Path) -> dict:
    """Each bomb's seconds to its verdict (and as a multiple of one honest batch's) and added peak memory."""
    from intellect.protocol.identity import Identity

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.protocol.test_rollouts import _table_bytes, _zero_token_rows

    intake = fresh_intake(coordinator, workdir / "bombs")
    coordinator.policy_for(0)  # loaded outside the timing
    start = time.perf_counter()
    assert intake.submit(honest).verdict.accepted
    honest_s = time.perf_counter() - start
    out = {}
    for i, (name, rows, tokens, finish) in enumerate([("1024x65536_length", 1024, 65_536, "length"),
                                                      ("32x20000_stop", 32, 20_000, "stop")]):
        data = signed_file(coordinator, Identity.generate(), _table_bytes(_zero_token_rows(rows, tokens, finish)), i + 1)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = vm_kb("VmRSS")
        start = time.perf_counter()
        verdict = intake.submit(data).verdict
        seconds = time.perf_counter() - start
        out[name] = {"wire_bytes": len(data), "seconds": round(seconds, 4), "x_honest_batch": round(seconds / honest_s, 3),
                     "peak_mb": round((vm_kb("VmHWM") - before) / 1024, 1), "reason": verdict.reason}
    intake.ledger.close()
    return out


def flood_figures(coordinator, envelopes: list[bytes], workdir: Path) -> dict:
    """Honest per-batch p95 with one key's garbage submitters running, as many as the swarm lets one
    caller have in flight, beside the same pass without."""
    import threading

    from intellect.protocol.identity import Identity
    from intellect.protocol.swarm.framing import MAX_IN_FLIGHT_PER_PEER as threads
    from intellect.protocol.wire import MessageKind, seal

    def honest_pass(intake) -> list[float]:
        times = []
        for data in envelopes:
            start = time.perf_counter()
            assert intake.submit(data).verdict.accepted
            times.append(time.perf_counter() - start)
        return times

    def p95(times: list[float]) -> float:
        return sorted(times)[min(len(times) - 1, int(0.95 * len(times)))]

    coordinator.policy_for(0)
    quiet = honest_pass(fresh_intake(coordinator, workdir / "quiet"))
    intake = fresh_intake(coordinator, workdir / "flood")
    stop, sent = threading.Event(), [0] * threads
    attacker = Identity.from_seed(b"bench-flooder")

    def flood(k: int) -> None:
        while not stop.is_set():
            i = sent[k]
            junk = os.urandom(64 + i % 2000)
            data = junk if i % 2 == 0 else seal(attacker, MessageKind.SUBMISSION, coordinator.run_id, junk)
            intake.submit(data)
            sent[k] += 1

    workers = [threading.Thread(target=flood, args=(k,), daemon=True) for k in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    flooded = honest_pass(intake)
    stop.set()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    intake.ledger.close()
    return {"honest_p95_ms": round(1000 * p95(flooded), 2), "quiet_p95_ms": round(1000 * p95(quiet), 2),
            "ratio": round(p95(flooded) / p95(quiet), 2), "garbage_per_s": round(sum(sent) / seconds, 1),
            "threads": threads}


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
        log("validator workers ...")
        result |= worker_figures(coordinator, envelopes, completions, root / "workers")
        log("bombs ...")
        result["bombs"] = bomb_figures(coordinator, envelopes[0], root / "hostile")
        log("flood ...")
        result["flood"] = flood_figures(coordinator, envelopes, root / "hostile")
        coordinator.ledger.close()
        result |= {"prompts_per_batch": args.prompts, "n": args.n, "max_new_tokens": args.max_tokens,
                   "threads": args.threads, "model": "tiny"}
        print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
