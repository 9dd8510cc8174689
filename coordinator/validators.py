"""Validator workers: the model checks of a submission in processes of their own, apart from the trainer.

With `intake.workers` > 0 the submit call only authenticates, bounds and stores the file durably, runs
the cheap checks that need the ledger (`RECEIPT_CHECKS`) and answers "received"; the file's path goes to
a pool of worker processes that run the rest (`WORKER_CHECKS`: prompts, rewards, termination and one
prefill for every model check) and hand back a `Finding`. The intake's collector thread records each
finding in the ledger as the inline path would. A worker holds the last async_level + 1 policies.

A job is plain (a file path, who signed it, the header) and a finding is plain (a reason or None, what
validation computed, as bytes): a later wave can run workers on other machines over the swarm.

A worker that dies (killed, out of memory) is replaced, and the job it held is queued again, once; a
file that kills a second worker gets the no-strike verdict `validator_failed` (it may be our bug). When
no worker can start (it says why, or three die while loading), the pool says so once and judges every job
in the coordinator's process instead (`fallback`): slower, never stuck.

What this module does not know: the ledger, verdicts on the wire, signatures (all the intake's).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from intellect.coordinator.checks import (
    Candidate,
    CheckContext,
    check_batch_counter,
    check_batch_unseen,
    check_claimed_logprobs,
    check_eos_probability,
    check_policy_step,
    check_prompts,
    check_proofs_readable,
    check_rewards,
    check_sampling,
    check_schema,
    check_termination,
    check_toploc,
    read_batch,
    run_checks,
    sampling_summary,
    validated,
)
from intellect.coordinator.validated import to_bytes as validated_bytes
from intellect.coordinator.verdicts import Rejected

logger = logging.getLogger(__name__)

# at receipt, in the intake's process: cheap, and they consult the ledger
RECEIPT_CHECKS = [check_schema, check_batch_unseen, check_batch_counter, check_policy_step]
# in a worker: the file, the run's rules and the policy are all they need
WORKER_CHECKS = [check_prompts, check_rewards, check_termination, check_proofs_readable, check_eos_probability,
                 check_claimed_logprobs, check_toploc, check_sampling]

MAX_TRIES = 2  # a job whose worker died is queued again once
MAX_START_FAILURES = 3  # workers in a row dying before they loaded: the pool gives up (`broken`)


def resolve_workers(setting: int | str) -> int:
    """`intake.workers`: a number, or "auto" (1 where a GPU is present, else 0)."""
    if setting != "auto":
        return int(setting)
    import torch

    return int(torch.cuda.is_available())


@dataclass(frozen=True)
class Job:
    file_sha256: str
    path: str  # the stored rollout file
    sender: bytes
    header_json: str  # the SubmissionHeader, as the node signed it


@dataclass(frozen=True)
class Finding:
    file_sha256: str
    reason: str | None  # None: every worker check passed
    detail: str = ""
    statistical: bool = False
    validated: bytes | None = None  # coordinator/validated.py's sidecar, for an accepted file
    summary: str = ""  # exact / tie / mismatch counts of the re-drawn tokens


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process builds its checks from (pickled into it)."""

    config: object  # the CoordinatorConfig
    run_id: str
    base_dir: Path  # the run's model folder: tokenizer and architecture
    checkpoints: Path  # policies at checkpoints/step_<n>/policy
    eos_ids: frozenset[int]
    row_secret: bytes


def judge(ctx: CheckContext, job: Job) -> Finding:
    """Run the worker checks on one stored file: the whole of a worker's work, also callable inline."""
    from intellect.protocol.messages import SubmissionHeader

    header = SubmissionHeader.model_validate_json(job.header_json)
    try:
        sub = Candidate(job.sender, header, read_batch(Path(job.path).read_bytes(), ctx.config, ctx))
        run_checks(ctx, sub, WORKER_CHECKS)
    except Rejected as r:
        return Finding(job.file_sha256, r.reason.value, r.detail, r.statistical)
    computed = validated(ctx, sub)
    return Finding(job.file_sha256, None, validated=None if computed is None else validated_bytes(computed),
                   summary=sampling_summary(sub.prefill(ctx)))


def _no_ledger(*_):
    raise AssertionError("a worker check consulted the ledger")  # RECEIPT_CHECKS only, in the intake


def worker_context(spec: WorkerSpec) -> CheckContext:
    """The checks' context in a worker: the run's rules and its own cache of policies."""
    import torch

    from intellect.coordinator.policies import PolicyCache
    from intellect.coordinator.rules import run_rules

    config = spec.config
    torch.set_num_threads(config.threads or 1)
    device = config.intake.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = _tokenizer(spec.base_dir)
    policy_for = PolicyCache(spec.checkpoints, config.async_level + 1, device=device)
    return CheckContext(run=run_rules(config, spec.run_id), config=config.intake, tokenizer=tokenizer,
                        eos_ids=spec.eos_ids, policy_for=policy_for, steps=_no_ledger, batch_holder=_no_ledger,
                        highest_counter=_no_ledger, row_secret=spec.row_secret)


def _tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)


def _worker_main(spec: WorkerSpec, conn) -> None:
    """A worker process: answer each job that comes down its pipe with a finding, until a None comes.
    It leaves when its parent is gone (a SIGKILLed coordinator must not leave validators behind)."""
    import os

    parent = os.getppid()
    try:
        ctx = worker_context(spec)
    except Exception as e:  # noqa: BLE001 -- no policy, device or memory: said once, the pool stops starting workers
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:
                return
            continue
        job = conn.recv()
        if job is None:
            return
        try:
            finding = judge(ctx, job)
        except Exception as e:  # a bug or a broken disk: said, and the file gets no strike
            logging.getLogger(__name__).exception("validator worker: unexpected failure on %s", job.file_sha256)
            finding = Finding(job.file_sha256, "validator_failed", f"{type(e).__name__}: {e}")
        conn.send(("finding", finding))


@dataclass
class _Worker:
    process: object
    conn: object  # our end of its pipe: one per worker, so a killed worker holds no lock another needs
    ready: bool = False
    job: Job | None = None  # the job it holds


class ValidatorPool:
    """`workers` processes judging stored files, one job each at a time; `on_finding(finding)` is called
    in the pool's collector thread, one finding at a time."""

    def __init__(self, spec: WorkerSpec, workers: int, on_finding: Callable[[Finding], None],
                 fallback: Callable[[Job], Finding]) -> None:
        """`fallback(job)` judges a job in this process once no worker can start (`broken`)."""
        self._mp = mp.get_context("spawn")  # torch and threads do not survive fork
        self._spec, self._on_finding, self._fallback = spec, on_finding, fallback
        self.broken = ""  # why no worker can run, once that is known; jobs are then judged by `fallback`
        self._start_failures = 0
        self._workers: list[_Worker] = []
        self._waiting: deque[Job] = deque()
        self._tries: dict[str, int] = {}
        self._lock = threading.Lock()  # guards the above and every send down a pipe
        self._stop = threading.Event()
        self.ready = threading.Event()  # set when the first worker has loaded
        for _ in range(workers):
            self._spawn()
        self._collector = threading.Thread(target=self._collect, name="validator-collector", daemon=True)
        self._collector.start()

    def _spawn(self) -> None:
        ours, theirs = self._mp.Pipe()
        p = self._mp.Process(target=_worker_main, args=(self._spec, theirs), name="intellect-validator", daemon=True)
        p.start()
        theirs.close()
        self._workers.append(_Worker(p, ours))

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers]

    @property
    def num_ready(self) -> int:
        """Workers that have loaded and take jobs."""
        with self._lock:
            return sum(w.ready for w in self._workers)

    def holding(self) -> dict[int, str]:
        """pid -> the file hash of the job it holds."""
        with self._lock:
            return {w.process.pid: w.job.file_sha256 for w in self._workers if w.job is not None}

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self.broken:
                self._tries[job.file_sha256] = self._tries.get(job.file_sha256, 0) + 1
                self._waiting.append(job)
                self._dispatch()
                return
        self._deliver(self._fallback(job))

    def _give_up(self, why: str) -> None:
        """No worker can start: say so once, and judge what waits (and all that comes) in this process."""
        with self._lock:
            if self.broken:
                return
            self.broken = why
            orphans, self._waiting = list(self._waiting), deque()
        logger.error("validator workers cannot start (%s): validating in the coordinator's process instead", why)
        for job in orphans:
            self._deliver(self._fallback(job))

    def _dispatch(self) -> None:
        for w in self._workers:
            if not self._waiting:
                return
            if w.ready and w.job is None and w.process.is_alive():
                w.job = self._waiting.popleft()
                try:
                    w.conn.send(w.job)
                except (OSError, ValueError):  # it died just now: _collect finds it and queues the job again
                    pass

    def _collect(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                conns = {w.conn: w for w in self._workers}
            for conn in wait(list(conns), timeout=0.5):
                w = conns[conn]
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    continue  # the worker is gone: _replace_dead below
                if kind == "ready":
                    with self._lock:
                        w.ready = True
                        self._start_failures = 0
                        self._dispatch()
                    self.ready.set()
                elif kind == "failed":
                    with self._lock:
                        self._workers.remove(w)
                        alive = any(x.ready for x in self._workers)
                    w.process.join(5.0)
                    w.conn.close()
                    if not alive:
                        self._give_up(payload)
                elif kind == "finding":
                    with self._lock:
                        w.job = None
                        self._tries.pop(payload.file_sha256, None)
                        self._dispatch()
                    self._deliver(payload)
            self._replace_dead()

    def _deliver(self, finding: Finding) -> None:
        try:
            self._on_finding(finding)
        except Exception:  # the collector outlives one failed record; the file stays in the inbox
            logger.exception("recording the finding on %s failed", finding.file_sha256[:12])

    def _replace_dead(self) -> None:
        failed, give_up = [], ""
        with self._lock:
            for w in [w for w in self._workers if not w.process.is_alive()]:
                if self._stop.is_set():
                    return
                self._workers.remove(w)
                w.conn.close()
                logger.warning("validator worker %s exited (code %s); starting another", w.process.pid,
                               w.process.exitcode)
                if not w.ready:
                    self._start_failures += 1
                if self._start_failures >= MAX_START_FAILURES and not any(x.ready for x in self._workers):
                    give_up = f"{self._start_failures} workers died while loading (exit code {w.process.exitcode})"
                    continue
                self._spawn()
                if w.job is None:
                    continue
                if self._tries.get(w.job.file_sha256, 0) < MAX_TRIES:
                    self._tries[w.job.file_sha256] += 1
                    self._waiting.appendleft(w.job)
                else:
                    self._tries.pop(w.job.file_sha256, None)
                    failed.append(Finding(w.job.file_sha256, "validator_failed", "the validator died twice on "
                                          f"this file (exit code {w.process.exitcode})"))
            self._dispatch()
        for finding in failed:
            self._deliver(finding)
        if give_up:
            self._give_up(give_up)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            workers = list(self._workers)
            for w in workers:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + timeout
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1.0)
        self._collector.join(timeout=2.0)
