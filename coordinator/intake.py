"""The validation pipeline: every submission is checked in a fixed order and ends in a recorded
verdict. Only files that pass every check feed the trainer.

Order (cheap before expensive, authentication before anything that trusts the content):
  size -> envelope (signature, run, kind) -> replay -> ban -> schema and bounds -> policy step within
  the async level -> prompts recomputed from the node's seed -> length targets -> rewards and
  advantages recomputed -> termination -> [one bf16 prefill of the policy that generated the batch]
  EOS probability -> token probabilities -> TOPLOC proofs.

Failures that do not prove who sent them (bad signature, replays of someone else's bytes) are
recorded without a strike against the claimed key, so nobody can get another node banned.

What this module does not know: the network (it takes bytes, returns a verdict), the trainer, or
where policies come from (`policy_for(step)` is given).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from intellect.coordinator.ledger import DuplicateSubmission, Ledger, Submission
from intellect.coordinator.ledger import Verdict as LedgerVerdict
from intellect.protocol.files import atomic_write, fsync_dir
from intellect.protocol.messages import Verdict, decode_submission
from intellect.protocol.model import eos_token_ids
from intellect.protocol.rollouts import RolloutBatch, RolloutFormatError, read_rollouts
from intellect.protocol.tasks import (
    Task,
    TaskConfig,
    completion_reward,
    group_advantages,
    node_seed_int,
    prompt_token_ids,
    sample_batch,
)
from intellect.protocol.wire import Envelope, MessageKind, ReplayGuard, WireRejected, open_envelope

logger = logging.getLogger(__name__)

UNKNOWN_SENDER = "unknown"
PAUSE_AT_ENV = "INTELLECT_COORD_PAUSE_AT"
PAUSE_FILE_ENV = "INTELLECT_COORD_PAUSE_FILE"


def pause_point(name: str) -> None:
    """Crash-test hook, a no-op unless the environment variable INTELLECT_COORD_PAUSE_AT names this
    point (comma-separated list). Then the thread that reaches it writes the name to the file
    $INTELLECT_COORD_PAUSE_FILE and stops there for good, so that a test can SIGKILL the process at
    exactly this moment (tests/coordinator/test_crash.py). Points: intake.validating, intake.stored,
    intake.recorded (intake), train.trained, train.saved (service)."""
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted or name not in wanted.split(","):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        tmp = f"{marker}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, marker)
    logger.warning("paused at %s (%s): waiting to be killed", name, PAUSE_AT_ENV)
    threading.Event().wait()


class Reason(StrEnum):
    ACCEPTED = "accepted"
    OVERSIZE = "oversize"
    BAD_ENVELOPE = "bad_envelope"
    WRONG_RUN = "wrong_run"
    REPLAY = "replay"
    BATCH_REUSED = "batch_reused"
    BANNED = "banned"
    BAD_SCHEMA = "bad_schema"
    STALE_POLICY = "stale_policy"
    UNKNOWN_POLICY = "unknown_policy"
    PROMPT_MISMATCH = "prompt_mismatch"
    BAD_TARGET_LENGTH = "bad_target_length"
    REWARD_MISMATCH = "reward_mismatch"
    ADVANTAGE_MISMATCH = "advantage_mismatch"
    BAD_TERMINATION = "bad_termination"
    TOKEN_PROB_MISMATCH = "token_prob_mismatch"
    TOPLOC_FAILED = "toploc_failed"


# Rejections that do not prove the signer misbehaved: recorded, but no strike towards a ban.
NO_STRIKE = {Reason.OVERSIZE, Reason.BAD_ENVELOPE, Reason.WRONG_RUN, Reason.REPLAY, Reason.BANNED,
             Reason.STALE_POLICY}


class Rejected(Exception):
    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class IntakeConfig(BaseModel):
    """Validation settings of a run. Defaults check everything on every completion (small runs)."""

    model_config = ConfigDict(extra="forbid")

    max_submission_bytes: int = Field(64 * 2**20, ge=1024, description="Largest submission accepted, bytes.")
    toploc_fraction: float = Field(1.0, ge=0.0, le=1.0,
                                   description="Share of completions re-run by prefill (TOPLOC, token and EOS checks).")
    toploc_max_exp_mismatches: int = Field(38, ge=0, le=128, description="TOPLOC threshold (spec A.8).")
    toploc_max_mant_err_mean: float = Field(10.0, ge=0, description="TOPLOC threshold (spec A.8).")
    toploc_max_mant_err_median: float = Field(8.0, ge=0, description="TOPLOC threshold (spec A.8).")
    eos_min_prob: float = Field(0.1, ge=0.0, le=1.0,
                                description="INTELLECT-2's termination rule: EOS should come where the policy gives it "
                                            "more than this...")
    eos_low_fraction: float = Field(0.25, ge=0.0, le=1.0,
                                    description="...but honest sampling sometimes picks a less likely EOS, so a batch "
                                                "fails only when more than this share of its EOS endings are below "
                                                "eos_min_prob (a node cutting answers short fails most of them)...")
    eos_floor_prob: float = Field(0.0, ge=0.0, le=1.0,
                                  description="...or when any EOS ending is below this floor (0: off).")
    max_logprob_abs_err: float = Field(0.25, gt=0,
                                       description="Largest mean |claimed - recomputed| sampled-token log-prob.")
    max_surprise_z: float = Field(6.0, gt=0,
                                  description="Token-sampling check: z-score of the sampled tokens' surprise "
                                              "against the policy's entropy; tokens from another model score high.")
    reward_tolerance: float = Field(1e-5, gt=0, description="Allowed |claimed - recomputed| reward.")
    advantage_tolerance: float = Field(1e-3, gt=0, description="Allowed |claimed - recomputed| advantage.")
    prefill_batch_size: int = Field(8, ge=1, le=256, description="Completions per verification forward.")


@dataclass(frozen=True)
class RunRules:
    """What every submission of this run must have been made with."""

    run_id: str
    task: Task
    task_config: TaskConfig
    prompts_per_batch: int
    completions_per_prompt: int
    max_new_tokens: int
    temperature: float
    async_level: int


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    sender: bytes | None
    batch: RolloutBatch | None = None
    stored_path: Path | None = None


class Intake:
    """Turns submission bytes into verdicts; accepted files land in `accepted/` and the ledger."""

    def __init__(self, config: IntakeConfig, rules: RunRules, ledger: Ledger, state_dir: Path, tokenizer,
                 policy_for: Callable[[int], object], steps: Callable[[], tuple[int, int]]) -> None:
        """`policy_for(step)` gives the bf16 model of a published policy step; `steps()` gives
        (train step now being collected, latest published policy step)."""
        self.config = config
        self.rules = rules
        self.ledger = ledger
        self.tokenizer = tokenizer
        self.policy_for = policy_for
        self.steps = steps
        self.replays = ReplayGuard()
        self.inbox = Path(state_dir) / "inbox"
        self.accepted_dir = Path(state_dir) / "accepted"
        self.rejected_dir = Path(state_dir) / "rejected"
        for d in (self.inbox, self.accepted_dir, self.rejected_dir):
            d.mkdir(parents=True, exist_ok=True)
        # held while a verdict is recorded; the trainer holds it to switch the train step collected
        self.record_lock = threading.RLock()  # _accept may call _reject while holding it
        self.eos_ids = set(eos_token_ids(tokenizer))

    # ------------------------------------------------------------------ entry point

    def submit(self, data: bytes, on_accept: Callable[[int], None] | None = None) -> Outcome:
        """Validate one submission and record its verdict. Never raises for bad input."""
        sender: bytes | None = None
        file_sha: str | None = None
        file_path: Path | None = None
        batch = None
        try:
            envelope = self._authenticate(data)
            sender = envelope.sender
            header, rollout_file = self._decode(envelope)
            file_sha = header.file_sha256  # from here on the verdict names the file
            self._check_duplicate(header.file_sha256)
            file_path = self._store(self.inbox, header.file_sha256, rollout_file)
            pause_point("intake.validating")
            batch = self._parse(envelope, header, rollout_file)
            self._check_content(envelope, batch)
            self._check_with_model(batch, header.file_sha256)
        except Rejected as r:
            return self._reject(r, sender, file_path, file_sha)
        return self._accept(sender, header, batch, file_path, on_accept)

    # ------------------------------------------------------------------ checks, in order

    def _authenticate(self, data: bytes) -> Envelope:
        if len(data) > self.config.max_submission_bytes:
            raise Rejected(Reason.OVERSIZE, f"{len(data)} bytes, limit {self.config.max_submission_bytes}")
        try:
            envelope = open_envelope(data, run_id=None, kinds={MessageKind.SUBMISSION},
                                     max_bytes=self.config.max_submission_bytes)
        except WireRejected as e:
            raise Rejected(Reason.BAD_ENVELOPE, str(e)) from None
        if envelope.run_id != self.rules.run_id:
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
            header, rollout_file = decode_submission(envelope.body, self.config.max_submission_bytes)
        except WireRejected as e:
            raise Rejected(Reason.BAD_SCHEMA, str(e)) from None
        return header, rollout_file

    def _check_duplicate(self, file_sha256: str) -> None:
        if self.ledger.is_duplicate(file_sha256):
            raise Rejected(Reason.REPLAY, f"file {file_sha256[:12]} was already submitted")

    def _parse(self, envelope: Envelope, header, rollout_file: bytes) -> RolloutBatch:
        rules = self.rules
        try:
            batch = read_rollouts(rollout_file, max_bytes=self.config.max_submission_bytes)
        except RolloutFormatError as e:
            raise Rejected(Reason.BAD_SCHEMA, str(e)) from None
        meta = batch.meta
        expected = {
            "run_id": (meta.run_id, rules.run_id),
            "node_public_key": (meta.node_public_key, envelope.sender.hex()),
            "policy_step": (meta.policy_step, header.policy_step),
            "batch_counter": (meta.batch_counter, header.batch_counter),
            "task": (meta.task, rules.task_config.name),
            "temperature": (meta.sampling.temperature, rules.temperature),
            "max_tokens": (meta.sampling.max_tokens, rules.max_new_tokens),
            "n": (meta.sampling.n, rules.completions_per_prompt),
            "rows": (len(batch.rows), rules.prompts_per_batch * rules.completions_per_prompt),
            "num_completions": (header.num_completions, len(batch.rows)),
            "num_tokens": (header.num_tokens, batch.num_output_tokens),
        }
        for name, (got, want) in expected.items():
            if got != want:
                raise Rejected(Reason.BAD_SCHEMA, f"{name} is {got!r}, expected {want!r}")
        if self.ledger.batch_seen(_batch_key(envelope.sender, meta.policy_step, meta.batch_counter)):
            # answering one seed's prompts twice would let a node submit only its luckiest samples
            raise Rejected(Reason.BATCH_REUSED, f"batch {meta.batch_counter} of policy step {meta.policy_step} "
                                                "was already accepted")
        return batch

    def _check_content(self, envelope: Envelope, batch: RolloutBatch) -> None:
        self._check_policy_step(batch.meta.policy_step)
        groups = self._check_prompts(envelope.sender, batch)
        self._check_rewards(batch, groups)
        for i, row in enumerate(batch.rows):
            self._check_termination_tokens(i, row)

    def _check_policy_step(self, policy_step: int) -> None:
        train_step, latest = self.steps()
        if policy_step > latest:
            raise Rejected(Reason.UNKNOWN_POLICY, f"policy step {policy_step} was never published (latest {latest})")
        if policy_step < train_step - self.rules.async_level:
            raise Rejected(Reason.STALE_POLICY, f"policy step {policy_step} is older than train step {train_step} "
                                                f"- async level {self.rules.async_level}")

    def _check_prompts(self, sender: bytes, batch: RolloutBatch) -> list[list[int]]:
        rules, meta = self.rules, batch.meta
        sampled = sample_batch(rules.task, node_seed_int(sender), meta.policy_step, meta.batch_counter,
                               rules.prompts_per_batch, rules.task_config.length_targets)
        n = rules.completions_per_prompt
        allowed_targets = set(rules.task_config.length_targets) or {0}
        groups = []
        for p, want in enumerate(sampled):
            rows = list(range(p * n, (p + 1) * n))
            problem = rules.task.problem(want.problem_index)
            tokens = prompt_token_ids(self.tokenizer, problem, want.target_length, rules.task_config.thinking)
            for i in rows:
                row = batch.rows[i]
                if row.problem_index != want.problem_index:
                    raise Rejected(Reason.PROMPT_MISMATCH, f"row {i}: problem {row.problem_index}, the seed gives "
                                                           f"{want.problem_index}")
                if row.target_length not in allowed_targets or row.target_length != want.target_length:
                    raise Rejected(Reason.BAD_TARGET_LENGTH, f"row {i}: target {row.target_length}, the seed gives "
                                                             f"{want.target_length}")
                if row.input_tokens != tokens:
                    raise Rejected(Reason.PROMPT_MISMATCH, f"row {i}: prompt tokens differ from the rendered prompt")
            groups.append(rows)
        return groups

    def _check_rewards(self, batch: RolloutBatch, groups: list[list[int]]) -> None:
        rules, tol = self.rules, self.config.reward_tolerance
        rewards = np.zeros((len(groups), rules.completions_per_prompt), dtype=np.float32)
        for g, rows in enumerate(groups):
            for j, i in enumerate(rows):
                row = batch.rows[i]
                text = self.tokenizer.decode(row.output_tokens, skip_special_tokens=True)
                problem = rules.task.problem(row.problem_index)
                reward, task_reward, penalty = completion_reward(rules.task, rules.task_config, problem, text,
                                                                 row.target_length, len(row.output_tokens))
                claimed = (row.reward, row.task_reward, row.length_penalty)
                if any(abs(a - b) > tol for a, b in zip(claimed, (reward, task_reward, penalty), strict=True)):
                    raise Rejected(Reason.REWARD_MISMATCH, f"row {i}: claimed reward {claimed}, recomputed "
                                                           f"{(reward, task_reward, penalty)}")
                rewards[g, j] = reward
        advantages = group_advantages(rewards)
        for g, rows in enumerate(groups):
            for j, i in enumerate(rows):
                if abs(batch.rows[i].advantage - advantages[g, j]) > self.config.advantage_tolerance:
                    raise Rejected(Reason.ADVANTAGE_MISMATCH, f"row {i}: claimed advantage "
                                                              f"{batch.rows[i].advantage:.6f}, recomputed "
                                                              f"{advantages[g, j]:.6f}")

    def _check_termination_tokens(self, i: int, row) -> None:
        tokens = row.output_tokens
        early_eos = [k for k, t in enumerate(tokens[:-1]) if t in self.eos_ids]
        if early_eos:
            raise Rejected(Reason.BAD_TERMINATION, f"row {i}: EOS at position {early_eos[0]} before the end")
        if row.finish_reason == "stop" and tokens[-1] not in self.eos_ids:
            raise Rejected(Reason.BAD_TERMINATION, f"row {i}: finish 'stop' without EOS")
        if row.finish_reason == "length" and len(tokens) != self.rules.max_new_tokens:
            raise Rejected(Reason.BAD_TERMINATION, f"row {i}: finish 'length' after {len(tokens)} tokens, "
                                                   f"the limit is {self.rules.max_new_tokens}")

    def _check_with_model(self, batch: RolloutBatch, file_sha256: str) -> None:
        """One bf16 prefill per completion (a sampled share of them) serves three checks."""
        from intellect.protocol.toploc import Thresholds
        from intellect.protocol.toploc_torch import verify_completions

        chosen = self._sample_rows(len(batch.rows), file_sha256)
        if not chosen:
            return
        rows = [batch.rows[i] for i in chosen]
        thresholds = Thresholds(self.config.toploc_max_exp_mismatches, self.config.toploc_max_mant_err_mean,
                                self.config.toploc_max_mant_err_median)
        try:
            policy = self.policy_for(batch.meta.policy_step)
        except (OSError, ValueError) as e:  # pruned since the step check: as good as stale
            raise Rejected(Reason.STALE_POLICY, f"policy step {batch.meta.policy_step} is no longer held: {e}") from None
        checks = verify_completions(policy, [r.input_tokens for r in rows],
                                    [r.output_tokens for r in rows], [r.proof for r in rows],
                                    thresholds=thresholds, batch_size=self.config.prefill_batch_size,
                                    temperature=self.rules.temperature, eos_token_id=sorted(self.eos_ids))
        for i, check in zip(chosen, checks, strict=True):
            if check.rejection is not None:  # malformed proofs or tokens: never evaluated
                raise Rejected(Reason.TOPLOC_FAILED, f"row {i}: {check.rejection}")
        self._check_eos_endings(chosen, rows, checks)
        for i, row, check in zip(chosen, rows, checks, strict=True):
            self._check_claimed_logprobs(i, row, check)
        self._check_surprise(checks)
        for i, check in zip(chosen, checks, strict=True):
            if not check.accepted:
                raise Rejected(Reason.TOPLOC_FAILED, f"row {i}: {check.rejection or _worst_chunk(check.chunks)}")

    def _check_eos_endings(self, chosen: list[int], rows, checks) -> None:
        cfg = self.config
        endings = [(i, check.eos_prob) for i, row, check in zip(chosen, rows, checks, strict=True)
                   if row.finish_reason == "stop"]
        for i, p in endings:
            if p < cfg.eos_floor_prob:
                raise Rejected(Reason.BAD_TERMINATION, f"row {i}: ends on EOS with probability {p:.2g}, below the "
                                                       f"floor {cfg.eos_floor_prob}")
        low = [i for i, p in endings if p <= cfg.eos_min_prob]
        if len(low) > 2 + cfg.eos_low_fraction * len(endings):  # two unlikely endings per batch are free
            raise Rejected(Reason.BAD_TERMINATION, f"{len(low)} of {len(endings)} EOS endings have probability <= "
                                                   f"{cfg.eos_min_prob} (rows {low[:8]}); allowed "
                                                   f"{cfg.eos_low_fraction:.0%}")

    def _check_claimed_logprobs(self, i: int, row, check) -> None:
        recomputed = np.asarray(check.token_logprobs, dtype=np.float64)
        claimed = np.asarray(row.output_logprobs, dtype=np.float64)
        err = float(np.abs(recomputed - claimed).mean())
        if err > self.config.max_logprob_abs_err:
            raise Rejected(Reason.TOKEN_PROB_MISMATCH, f"row {i}: claimed log-probs differ from the policy's by "
                                                       f"{err:.3f} on average")

    def _check_surprise(self, checks) -> None:
        """Honest sampling makes the sampled tokens' total surprise (-log p) match the policy's total
        entropy, within sqrt(sum of variances); tokens chosen by another model (then proved by prefill)
        are more surprising. Judged over the whole batch: one short completion is too few tokens for
        the normal approximation, and a cheater's excess grows with every token while noise grows
        with the square root."""
        surprise = -sum(float(np.sum(c.token_logprobs)) for c in checks)
        entropy = sum(float(np.sum(c.entropies)) for c in checks)
        variance = sum(float(np.sum(c.surprise_vars)) for c in checks)
        z = (surprise - entropy) / np.sqrt(max(variance, 1e-6))
        if z > self.config.max_surprise_z:
            raise Rejected(Reason.TOKEN_PROB_MISMATCH, f"sampled tokens are unlikely under the policy (surprise "
                                                       f"{surprise:.1f} vs entropy {entropy:.1f}: z = {z:.1f} > "
                                                       f"{self.config.max_surprise_z})")

    def _sample_rows(self, num_rows: int, file_sha256: str) -> list[int]:
        k = int(np.ceil(self.config.toploc_fraction * num_rows))
        if k >= num_rows:
            return list(range(num_rows))
        # seeded by the file hash: the node cannot know which rows are checked before it commits
        rng = np.random.default_rng(int(file_sha256[:16], 16))
        return sorted(rng.choice(num_rows, size=k, replace=False).tolist())

    # ------------------------------------------------------------------ verdicts

    def _store(self, folder: Path, sha256: str, data: bytes) -> Path:
        path = folder / f"{sha256}.parquet"
        atomic_write(path, [data])
        return path

    def _accept(self, sender: bytes, header, batch: RolloutBatch, inbox_path: Path,
                on_accept: Callable[[int], None] | None) -> Outcome:
        final = self.accepted_dir / inbox_path.name
        with self.record_lock:
            train_step, _ = self.steps()
            try:
                # re-check under the lock: the train step may have moved while the model ran
                self._check_policy_step(batch.meta.policy_step)
            except Rejected as r:
                return self._reject(r, sender, inbox_path)
            os.replace(inbox_path, final)
            fsync_dir(self.accepted_dir)
            pause_point("intake.stored")
            submission = Submission(header.file_sha256, sender.hex(), batch.meta.policy_step, train_step,
                                    len(batch.rows), batch.num_output_tokens, str(final),
                                    _batch_key(sender, batch.meta.policy_step, batch.meta.batch_counter))
            try:
                self.ledger.record_submission(submission, LedgerVerdict(True, Reason.ACCEPTED))
            except DuplicateSubmission as e:
                return self._reject(Rejected(Reason.REPLAY, str(e)), sender, None, header.file_sha256)
            if on_accept is not None:
                on_accept(train_step)
        pause_point("intake.recorded")
        verdict = Verdict(file_sha256=header.file_sha256, accepted=True, reason=Reason.ACCEPTED.value,
                          train_step=train_step, credit_tokens=batch.num_output_tokens)
        return Outcome(verdict, sender, batch, final)

    def _reject(self, r: Rejected, sender: bytes | None, file_path: Path | None,
                file_sha: str | None = None) -> Outcome:
        file_sha = file_path.stem if file_path is not None else file_sha or "0" * 64
        node = sender.hex() if sender is not None else UNKNOWN_SENDER
        with self.record_lock:
            if file_path is not None and file_path.exists():
                os.replace(file_path, self.rejected_dir / file_path.name)  # kept for audit, never trained on
            self.ledger.record_rejection(node, r.reason.value, r.detail,
                                         strike=sender is not None and r.reason not in NO_STRIKE)
        verdict = Verdict(file_sha256=file_sha, accepted=False, reason=r.reason.value, detail=r.detail[:1024])
        return Outcome(verdict, sender)

    def recover_inbox(self) -> int:
        """After a crash: files in the inbox never got a verdict, and a file moved to accepted/ whose
        verdict never reached the ledger was not accepted either; their nodes were not acknowledged
        and will resubmit, so drop them. Returns how many were dropped."""
        dropped = 0
        for p in list(self.inbox.glob("*.parquet")) + list(self.inbox.glob("*.part")):
            p.unlink(missing_ok=True)
            dropped += 1
        for p in self.accepted_dir.glob("*.parquet"):
            if not self.ledger.is_duplicate(p.stem):
                p.unlink(missing_ok=True)
                dropped += 1
        return dropped


def _worst_chunk(chunks) -> str:
    worst = max(range(len(chunks)), key=lambda k: (chunks[k].exp_mismatches, chunks[k].mant_err_mean))
    c = chunks[worst]
    return (f"TOPLOC chunk {worst} fails: {c.exp_mismatches} exponent mismatches, mantissa error mean "
            f"{c.mant_err_mean:.1f} / median {c.mant_err_median:.0f}")


def _batch_key(sender: bytes, policy_step: int, batch_counter: int) -> str:
    return f"{sender.hex()}:{policy_step}:{batch_counter}"
