"""The coordinator's intake: turns submission bytes into a recorded verdict. Only files that pass
every check feed the trainer.

Order: size -> envelope (signature, run, kind) -> replay -> ban -> submission header and file hash ->
duplicate file -> stored in inbox/ -> rollout file decoded -> `checks.CHECKS` in their order ->
accepted (what validation computed beside the file, coordinator/validated.py; file to accepted/, ledger
row, credit) or rejected (file to rejected/, ledger row, strike).

With validator workers (`intake.workers` > 0, coordinator/validators.py) the submit call stops after
"stored in inbox/" and the checks that consult the ledger (`RECEIPT_CHECKS`), writes a receipt beside the
file and answers `received`; a worker runs the rest and the collector thread records its finding as
above (`commit`). Nodes ask for the verdict by file hash (`verdict_for`). A receipt survives a restart:
its file is queued again.

Failures that do not prove who sent them (bad signature, replays of someone else's bytes) carry no
strike against the claimed key, so nobody can get another node banned. Those anyone can send at line
rate (`verdicts.UNRECORDED`: no envelope, a replay, a banned key) are answered and counted in memory but
not written to the ledger: a flood of them costs no disk and no wait on the record lock.

What this module does not know: the network (it takes bytes, returns a verdict), the trainer, what
the checks look at (coordinator/checks.py), or where policies come from (`policy_for(step)` is given).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from intellect.coordinator.checks import (
    CHECKS,
    Candidate,
    CheckContext,
    batch_key,
    check_policy_step,
    counter_in_order,
    read_batch,
    run_checks,
    sampling_summary,
    validated,
)
from intellect.coordinator.faults import pause_point
from intellect.coordinator.ledger import DuplicateSubmission, Evidence, Ledger, Submission
from intellect.coordinator.ledger import Verdict as LedgerVerdict
from intellect.coordinator.rules import IntakeConfig, RunRules
from intellect.coordinator.validated import SUFFIX as VALIDATED_SUFFIX
from intellect.coordinator.validated import to_bytes as validated_bytes
from intellect.coordinator.validated import validated_path
from intellect.coordinator.validators import RECEIPT_CHECKS, Finding, Job, ValidatorPool, WorkerSpec, judge
from intellect.coordinator.verdicts import NO_STRIKE, UNRECORDED, Reason, Rejected
from intellect.protocol.files import atomic_write, fsync_dir
from intellect.protocol.messages import RECEIVED, UNKNOWN_FILE, SubmissionHeader, Verdict, decode_submission
from intellect.protocol.rollouts import RolloutBatch
from intellect.protocol.wire import Envelope, MessageKind, ReplayGuard, WireRejected, open_envelope

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    sender: bytes | None
    batch: RolloutBatch | None = None
    stored_path: Path | None = None


class Intake:
    """Turns submission bytes into verdicts; accepted files land in `accepted/` and the ledger."""

    def __init__(self, config: IntakeConfig, rules: RunRules, ledger: Ledger, state_dir: Path, tokenizer,
                 eos_ids: frozenset[int], policy_for: Callable[[int], object],
                 steps: Callable[[], tuple[int, int]]) -> None:
        """`eos_ids`: the run's EOS set (`eos_token_ids(tokenizer, policy folder)`, announced in
        RunInfo); `policy_for(step)` gives the model of a published policy step (in `compute_dtype`); `steps()`
        gives (train step now being collected, latest published policy step)."""
        self.ledger = ledger
        self.ctx = CheckContext(run=rules, config=config, tokenizer=tokenizer, eos_ids=frozenset(eos_ids),
                                policy_for=policy_for, steps=steps, batch_holder=ledger.batch_holder,
                                highest_counter=ledger.highest_batch_counter,
                                row_secret=row_secret(Path(state_dir)))
        self.checks = list(CHECKS)  # the same list verify runs (bench/intake.py times each one)
        self.replays = ReplayGuard()
        self.inbox = Path(state_dir) / "inbox"
        self.accepted_dir = Path(state_dir) / "accepted"
        self.rejected_dir = Path(state_dir) / "rejected"
        for d in (self.inbox, self.accepted_dir, self.rejected_dir):
            d.mkdir(parents=True, exist_ok=True)
        # held while a verdict is recorded; the trainer holds it to switch the train step collected
        self.record_lock = threading.RLock()  # _accept may call _reject while holding it
        self._in_flight: set[str] = set()  # file hashes and batch keys being judged now
        self._in_flight_lock = threading.Lock()
        self.unrecorded: Counter = Counter()  # verdicts by reason of UNRECORDED, since this process started
        self._unrecorded_lock = threading.Lock()
        # validator workers (start_workers): files received and not yet judged, and the last verdicts given
        self.pool: ValidatorPool | None = None
        self.on_accept: Callable[[int], None] | None = None
        self._pending: dict[str, tuple[tuple[str, ...], Candidate, Path]] = {}
        self._verdicts: OrderedDict[str, Verdict] = OrderedDict()
        self._verdicts_lock = threading.Lock()

    @property
    def config(self) -> IntakeConfig:
        return self.ctx.config

    # ------------------------------------------------------------------ entry point

    def submit(self, data: bytes, on_accept: Callable[[int], None] | None = None) -> Outcome:
        """Validate one submission and record its verdict. Never raises for bad input."""
        opened = self._open(data)
        if isinstance(opened, Outcome):
            return opened
        sender, header, rollout_file = opened
        try:
            with self._claimed(header.file_sha256, batch_key(sender, header.policy_step, header.batch_counter)):
                outcome = self._judge(sender, header, rollout_file, on_accept)
        except Rejected as r:  # the claim failed: no file of this submission was stored
            return self._reject(r, sender, None, header.file_sha256)
        self._remember(outcome.verdict)
        return outcome

    def _open(self, data: bytes):
        """(sender, header, rollout file) of an authentic, well-formed submission, or its rejection's Outcome."""
        sender: bytes | None = None
        try:
            envelope = self._authenticate(data)
            sender = envelope.sender
            return (sender, *self._decode(envelope))
        except Rejected as r:  # nothing stored, and the verdict cannot name a file yet
            return self._reject(r, sender, None, None)

    def _judge(self, sender: bytes, header, rollout_file: bytes, on_accept) -> Outcome:
        """Store, check and record one submission whose file hash and batch key this thread holds."""
        file_path: Path | None = None
        try:
            self._check_duplicate(header.file_sha256)
            file_path = self._store(self.inbox, header.file_sha256, rollout_file)
            pause_point("intake.validating")
            sub = Candidate(sender, header, read_batch(rollout_file, self.config, self.ctx))
            try:
                run_checks(self.ctx, sub, self.checks)
            finally:
                self._note_counter(sub)
        except Rejected as r:
            return self._reject(r, sender, file_path, header.file_sha256)
        return self._accept(sub, file_path, on_accept)

    def _note_counter(self, sub: Candidate) -> None:
        """Every batch counter used in order counts as used, accepted or not (a refused skip-ahead
        does not move the mark, or it would open the counters it skipped)."""
        meta = sub.batch.meta
        if (meta.node_public_key == sub.sender.hex() and meta.policy_step == sub.header.policy_step
                and meta.batch_counter == sub.header.batch_counter and counter_in_order(self.ctx, sub)):
            self.ledger.note_batch_counter(sub.sender.hex(), meta.policy_step, meta.batch_counter)

    @contextmanager
    def _claimed(self, *keys: str):
        """Hold a file hash and a batch key while one copy is judged: a resend that arrives meanwhile
        (a node whose first call timed out, or the same batch signed anew) is answered `in_flight`
        instead of racing the first copy for the inbox path and the ledger row."""
        self._claim(keys)
        try:
            yield
        finally:
            self._release(keys)

    def _claim(self, keys) -> None:
        with self._in_flight_lock:
            if self._in_flight.intersection(keys):
                raise Rejected(Reason.IN_FLIGHT, "another copy of this file or batch is being validated; "
                                                 "ask again later for its verdict")
            self._in_flight.update(keys)

    def _release(self, keys) -> None:
        with self._in_flight_lock:
            self._in_flight.difference_update(keys)

    # ------------------------------------------------------------------ before any check: who sent what

    def _authenticate(self, data: bytes) -> Envelope:
        limit = self.config.max_submission_bytes
        if len(data) > limit:
            raise Rejected(Reason.OVERSIZE, f"{len(data)} bytes, limit {limit}")
        try:
            envelope = open_envelope(data, run_id=None, kinds={MessageKind.SUBMISSION}, max_bytes=limit)
        except WireRejected as e:
            raise Rejected(Reason.BAD_ENVELOPE, str(e)) from None
        if envelope.run_id != self.ctx.run.run_id:
            raise Rejected(Reason.WRONG_RUN, f"submission is for run {envelope.run_id!r}")
        try:
            self.replays.check_and_record(envelope)
        except WireRejected as e:
            raise Rejected(Reason.REPLAY, str(e)) from None
        if self.ledger.is_banned(envelope.sender.hex()):
            raise Rejected(Reason.BANNED, self.ledger.ban_reason(envelope.sender.hex()) or "")
        return envelope

    def _decode(self, envelope: Envelope):
        try:
            return decode_submission(envelope.body, self.config.max_submission_bytes)
        except WireRejected as e:
            raise Rejected(Reason.BAD_SCHEMA, str(e)) from None

    def _check_duplicate(self, file_sha256: str) -> None:
        if self.ledger.is_duplicate(file_sha256):
            raise Rejected(Reason.REPLAY, f"file {file_sha256[:12]} was already submitted")

    # ------------------------------------------------------------------ verdicts

    def _store(self, folder: Path, sha256: str, data: bytes) -> Path:
        path = folder / f"{sha256}.parquet"
        atomic_write(path, [data])
        return path

    def _accept(self, sub: Candidate, inbox_path: Path, on_accept: Callable[[int], None] | None,
                finding: Finding | None = None) -> Outcome:
        """Record an accepted file: what validation computed is this process's checks' (inline) or a
        worker's `finding`."""
        final = self.accepted_dir / inbox_path.name
        batch = sub.batch
        if finding is None:
            computed = validated(self.ctx, sub)
            computed = None if computed is None else validated_bytes(computed)
            summary = sampling_summary(sub.prefill(self.ctx))
        else:
            computed, summary = finding.validated, finding.summary
        if computed is not None:  # beside the file before its ledger row, so an accepted file always has it
            atomic_write(validated_path(inbox_path), [computed])
        with self.record_lock:
            collect_step, _ = self.ctx.steps()
            try:
                # re-check under the lock: the collected step may have moved while the model ran
                check_policy_step(self.ctx, sub)
            except Rejected as r:
                return self._reject(r, sub.sender, inbox_path)
            submission = Submission(sub.file_sha256, sub.sender.hex(), batch.meta.policy_step, collect_step,
                                    len(batch.rows), batch.num_output_tokens, str(final), sub.batch_key)
            try:
                self.ledger.record_submission(submission, LedgerVerdict(True, Reason.ACCEPTED))
            except DuplicateSubmission as e:  # the in-flight claims make this unreachable; kept as a guard
                return self._reject(Rejected(Reason.REPLAY, str(e)), sub.sender, inbox_path)
            # the ledger row first, then the file: accepted/ never holds a file the ledger did not
            # accept; a crash in between leaves it in the inbox, and recover_inbox moves it
            pause_point("intake.stored")
            if computed is not None:
                os.replace(validated_path(inbox_path), validated_path(final))
            os.replace(inbox_path, final)
            fsync_dir(self.accepted_dir)
            if on_accept is not None:
                on_accept(collect_step)
        pause_point("intake.recorded")
        logger.info("accepted %s from %s: %s", sub.file_sha256[:12], sub.sender.hex()[:12], summary)
        verdict = Verdict(file_sha256=sub.file_sha256, accepted=True, reason=Reason.ACCEPTED.value,
                          detail=summary, train_step=collect_step, credit_tokens=batch.num_output_tokens)
        return Outcome(verdict, sub.sender, batch, final)

    def _reject(self, r: Rejected, sender: bytes | None, file_path: Path | None,
                file_sha: str | None = None) -> Outcome:
        file_sha = file_path.stem if file_path is not None else file_sha or "0" * 64
        if r.reason in UNRECORDED and file_path is None:  # every reason found before the sender is known
            with self._unrecorded_lock:
                self.unrecorded[r.reason.value] += 1
        else:
            with self.record_lock:
                if file_path is not None and file_path.exists():
                    os.replace(file_path, self.rejected_dir / file_path.name)  # kept for audit, never trained on
                    if file_path.parent == self.inbox:  # a late rejection in _accept leaves a sidecar
                        validated_path(file_path).unlink(missing_ok=True)
                self.ledger.record_rejection(sender.hex(), r.reason.value, r.detail, evidence=_evidence(r))
        verdict = Verdict(file_sha256=file_sha, accepted=False, reason=r.reason.value, detail=r.detail[:1024])
        return Outcome(verdict, sender)

    # ------------------------------------------------------------------ validator workers

    def start_workers(self, spec: WorkerSpec, workers: int, on_accept: Callable[[int], None] | None) -> None:
        """Judge from now on in `workers` processes (`receive` instead of `submit`); the files received
        before a restart are queued again."""
        self.on_accept = on_accept
        self.pool = ValidatorPool(spec, workers, self.commit, fallback=lambda job: judge(self.ctx, job))
        for receipt in sorted(self.inbox.glob("*" + RECEIPT_SUFFIX), key=lambda p: p.stat().st_mtime):
            self._requeue(receipt)

    def receive(self, data: bytes) -> Outcome:
        """Authenticate, bound and store one submission, run the receipt checks, and queue it for a worker.
        The verdict is `received` (or a rejection found so far). Never raises for bad input."""
        opened = self._open(data)
        if isinstance(opened, Outcome):
            return opened
        sender, header, rollout_file = opened
        file_sha = header.file_sha256
        with self._in_flight_lock:
            if file_sha in self._pending:  # a resend of a file being judged: the same answer
                return Outcome(_received(file_sha), sender)
        keys = (file_sha, batch_key(sender, header.policy_step, header.batch_counter))
        try:
            self._claim(keys)
        except Rejected as r:  # no file of this submission was stored
            return self._reject(r, sender, None, file_sha)
        file_path: Path | None = None
        try:
            self._check_duplicate(file_sha)
            file_path = self._store(self.inbox, file_sha, rollout_file)
            sub = Candidate(sender, header, read_batch(rollout_file, self.config, self.ctx))
            try:
                run_checks(self.ctx, sub, RECEIPT_CHECKS)
            finally:
                self._note_counter(sub)
            # the receipt makes the file survive a restart: written before the node hears `received`
            atomic_write(receipt_path(file_path), [json.dumps({"sender": sender.hex(),
                                                               "header": header.model_dump_json()}).encode()])
        except Rejected as r:
            self._release(keys)
            return self._reject(r, sender, file_path, file_sha)
        except BaseException:
            self._release(keys)
            raise
        self._queue(keys, sub, file_path)
        return Outcome(_received(file_sha), sender)

    def _queue(self, keys: tuple[str, ...], sub: Candidate, file_path: Path) -> None:
        with self._in_flight_lock:
            self._pending[sub.file_sha256] = (keys, sub, file_path)
        self.pool.submit(Job(sub.file_sha256, str(file_path), sub.sender, sub.header.model_dump_json()))

    def _requeue(self, receipt: Path) -> None:
        """A file received before a restart: queued again as it was (its receipt checks passed then)."""
        file_path = receipt.with_suffix(".parquet")
        try:
            meta = json.loads(receipt.read_text())
            sender, header = bytes.fromhex(meta["sender"]), SubmissionHeader.model_validate_json(meta["header"])
            sub = Candidate(sender, header, read_batch(file_path.read_bytes(), self.config, self.ctx))
            keys = (header.file_sha256, batch_key(sender, header.policy_step, header.batch_counter))
            self._claim(keys)
        except (OSError, ValueError, KeyError, Rejected) as e:
            logger.warning("dropping the received file %s: %s", file_path.name, e)
            receipt.unlink(missing_ok=True)
            file_path.unlink(missing_ok=True)
            return
        self._queue(keys, sub, file_path)

    def commit(self, finding: Finding) -> Verdict | None:
        """Record a worker's finding on a received file; the verdict is kept for `verdict_for`. Called from
        the pool's one collector thread. The file stays pending until its verdict is remembered, so a
        node asking meanwhile hears `received`, never `unknown_file`."""
        with self._in_flight_lock:
            entry = self._pending.get(finding.file_sha256)
        if entry is None:
            logger.warning("a finding on %s, which is not waiting for one", finding.file_sha256[:12])
            return None
        keys, sub, file_path = entry
        try:
            if finding.reason is None:
                outcome = self._accept(sub, file_path, self.on_accept, finding)
            else:
                r = Rejected(Reason(finding.reason), finding.detail, finding.statistical)
                outcome = self._reject(r, sub.sender, file_path)
            receipt_path(file_path).unlink(missing_ok=True)
            self._remember(outcome.verdict)
        finally:
            with self._in_flight_lock:
                self._pending.pop(finding.file_sha256, None)
            self._release(keys)
        return outcome.verdict

    def verdict_for(self, file_sha256: str) -> Verdict:
        """The verdict on a submitted file: `received` while a worker judges it, the verdict once given
        (the last few thousand; an accepted file's from the ledger after that), else `unknown_file`."""
        with self._in_flight_lock:
            if file_sha256 in self._pending:
                return _received(file_sha256)
        with self._verdicts_lock:
            if file_sha256 in self._verdicts:
                return self._verdicts[file_sha256]
        row = self.ledger.accepted_submission(file_sha256)
        if row is not None:
            return Verdict(file_sha256=file_sha256, accepted=True, reason=Reason.ACCEPTED.value,
                           detail="recorded earlier", train_step=row.train_step, credit_tokens=row.num_tokens)
        return Verdict(file_sha256=file_sha256, accepted=False, reason=UNKNOWN_FILE,
                       detail="no submission of this file is held: submit it again")

    def _remember(self, verdict: Verdict) -> None:
        with self._verdicts_lock:
            self._verdicts[verdict.file_sha256] = verdict
            while len(self._verdicts) > KEEP_VERDICTS:
                self._verdicts.popitem(last=False)

    @property
    def queued(self) -> int:
        """Files received and not judged yet."""
        with self._in_flight_lock:
            return len(self._pending)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def counts_by_reason(self) -> dict[str, int]:
        """Verdicts by reason: the ledger's, and the unrecorded ones of this process."""
        counts = Counter(self.ledger.counts_by_reason())
        with self._unrecorded_lock:
            counts.update(self.unrecorded)
        return dict(sorted(counts.items()))

    def recover_inbox(self, keep_received: bool = False) -> int:
        """After a crash: an inbox file whose accepted row is in the ledger was accepted (killed
        between the ledger commit and the move): it moves to accepted/. A file with a receipt was
        answered `received`: with `keep_received` it stays for `start_workers` to queue again. Any other
        inbox file never got a verdict; its node was not answered and will resubmit (or ask, and hear
        `unknown_file`), so it is dropped. Returns how many were dropped."""
        dropped = 0
        for p in list(self.inbox.glob("*.parquet")) + list(self.inbox.glob("*.part")):
            if p.suffix == ".parquet" and self.ledger.is_accepted(p.stem):
                if validated_path(p).exists():
                    os.replace(validated_path(p), validated_path(self.accepted_dir / p.name))
                os.replace(p, self.accepted_dir / p.name)
                receipt_path(p).unlink(missing_ok=True)
                continue
            if p.suffix == ".parquet" and keep_received and receipt_path(p).exists():
                continue
            p.unlink(missing_ok=True)
            dropped += 1
        for p in self.inbox.glob("*" + RECEIPT_SUFFIX):  # receipts whose file got its verdict, or is dropped
            if not p.with_suffix(".parquet").exists():
                p.unlink(missing_ok=True)
        for p in self.inbox.glob("*" + VALIDATED_SUFFIX):  # sidecars of files that got no verdict
            p.unlink(missing_ok=True)
        fsync_dir(self.accepted_dir)
        return dropped


RECEIPT_SUFFIX = ".receipt"  # beside a received file in inbox/: JSON of its sender and header
KEEP_VERDICTS = 4096  # verdicts kept in memory for nodes asking by file hash


def receipt_path(file_path: Path) -> Path:
    return Path(file_path).with_suffix(RECEIPT_SUFFIX)


def _received(file_sha256: str) -> Verdict:
    return Verdict(file_sha256=file_sha256, accepted=False, reason=RECEIVED,
                   detail="stored; a validator is judging it: ask for the verdict by file hash")


def row_secret(state_dir: Path) -> bytes:
    """The coordinator's key for choosing which rows to re-run (toploc_fraction < 1): 32 random
    bytes in STATE/row_secret, made on first use. Nodes never see it."""
    path = state_dir / "row_secret"
    if not path.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, [os.urandom(32)])
        os.chmod(path, 0o600)
    secret = path.read_bytes()
    if len(secret) != 32:
        raise ValueError(f"{path} holds {len(secret)} bytes, expected 32: delete it to make a new one")
    return secret


def _evidence(r: Rejected) -> Evidence:
    if r.reason in NO_STRIKE:
        return Evidence.NONE  # the failure is not misbehaviour
    return Evidence.STATISTICAL if r.statistical else Evidence.HARD
