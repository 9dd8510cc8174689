"""The coordinator's intake: turns submission bytes into a recorded verdict. Only files that pass
every check feed the trainer.

Order: size -> envelope (signature, run, kind) -> replay -> ban -> submission header and file hash ->
duplicate file -> stored in inbox/ -> rollout file decoded -> `checks.CHECKS` in their order ->
accepted (what validation computed beside the file, coordinator/validated.py; file to accepted/, ledger
row, credit) or rejected (file to rejected/, ledger row, strike).

Failures that do not prove who sent them (bad signature, replays of someone else's bytes) carry no
strike against the claimed key, so nobody can get another node banned. Those anyone can send at line
rate (`verdicts.UNRECORDED`: no envelope, a replay, a banned key) are answered and counted in memory but
not written to the ledger: a flood of them costs no disk and no wait on the record lock.

What this module does not know: the network (it takes bytes, returns a verdict), the trainer, what
the checks look at (coordinator/checks.py), or where policies come from (`policy_for(step)` is given).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
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
from intellect.coordinator.verdicts import NO_STRIKE, UNRECORDED, Reason, Rejected
from intellect.protocol.files import atomic_write, fsync_dir
from intellect.protocol.messages import Verdict, decode_submission
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

    @property
    def config(self) -> IntakeConfig:
        return self.ctx.config

    # ------------------------------------------------------------------ entry point

    def submit(self, data: bytes, on_accept: Callable[[int], None] | None = None) -> Outcome:
        """Validate one submission and record its verdict. Never raises for bad input."""
        sender: bytes | None = None
        file_sha: str | None = None
        try:
            envelope = self._authenticate(data)
            sender = envelope.sender
            header, rollout_file = self._decode(envelope)
            file_sha = header.file_sha256  # from here on the verdict names the file
            with self._claimed(file_sha, batch_key(sender, header.policy_step, header.batch_counter)):
                return self._judge(sender, header, rollout_file, on_accept)
        except Rejected as r:  # before the claim: no file of this submission was stored
            return self._reject(r, sender, None, file_sha)

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
        with self._in_flight_lock:
            if self._in_flight.intersection(keys):
                raise Rejected(Reason.IN_FLIGHT, "another copy of this file or batch is being validated; "
                                                 "ask again later for its verdict")
            self._in_flight.update(keys)
        try:
            yield
        finally:
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

    def _accept(self, sub: Candidate, inbox_path: Path, on_accept: Callable[[int], None] | None) -> Outcome:
        final = self.accepted_dir / inbox_path.name
        batch = sub.batch
        computed = validated(self.ctx, sub)
        if computed is not None:  # beside the file before its ledger row, so an accepted file always has it
            atomic_write(validated_path(inbox_path), [validated_bytes(computed)])
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
        summary = sampling_summary(sub.prefill(self.ctx))
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

    def counts_by_reason(self) -> dict[str, int]:
        """Verdicts by reason: the ledger's, and the unrecorded ones of this process."""
        counts = Counter(self.ledger.counts_by_reason())
        with self._unrecorded_lock:
            counts.update(self.unrecorded)
        return dict(sorted(counts.items()))

    def recover_inbox(self) -> int:
        """After a crash: an inbox file whose accepted row is in the ledger was accepted (killed
        between the ledger commit and the move): it moves to accepted/. Any other inbox file never
        got a verdict; its node was not answered and will resubmit, so it is dropped. Returns how
        many were dropped."""
        dropped = 0
        for p in list(self.inbox.glob("*.parquet")) + list(self.inbox.glob("*.part")):
            if p.suffix == ".parquet" and self.ledger.is_accepted(p.stem):
                if validated_path(p).exists():
                    os.replace(validated_path(p), validated_path(self.accepted_dir / p.name))
                os.replace(p, self.accepted_dir / p.name)
                continue
            p.unlink(missing_ok=True)
            dropped += 1
        for p in self.inbox.glob("*" + VALIDATED_SUFFIX):  # sidecars of files that got no verdict
            p.unlink(missing_ok=True)
        fsync_dir(self.accepted_dir)
        return dropped


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
