"""The checks every submission must pass, as one ordered list: `CHECKS`.

A check is a function `check(ctx, sub) -> None` that raises `Rejected` with a reason (marked
`statistical` when honest nodes fail it now and then: it weighs less towards a ban): `ctx` is what
the run judges by (shared by every submission), `sub` the one submission under validation (who
signed it, its header, its decoded batch, and the model pass, computed once when a check first asks
for it). Checks do not store, record or count anything (what they recompute stays on the candidate),
so the coordinator's intake and `intellect-node verify` run the very same list. Adding a check is adding a function to `CHECKS`.

Order: cheap before expensive, and a check may rely on the ones before it having passed (the rows
are the announced shape once `check_schema` passed):
  schema and bounds -> batch not answered before -> batch counter in order -> policy step within the
  async level -> prompts recomputed from the node's seed -> rewards and advantages recomputed ->
  termination tokens -> [one prefill of the policy that generated the batch] proofs readable ->
  EOS probability -> token probabilities -> TOPLOC proofs -> every sampled token re-drawn by the
  seeded sampler (protocol/sampling.py).

What this module does not know: signatures, replays and bans (the intake does those before any check
runs, on the envelope), storage, the ledger's writes, or where policies come from (`policy_for`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from intellect.coordinator.rules import IntakeConfig, RunRules
from intellect.coordinator.validated import Validated
from intellect.coordinator.verdicts import Reason, Rejected
from intellect.protocol.messages import SubmissionHeader
from intellect.protocol.rollouts import (
    MAX_SEQ_TOKENS,
    RolloutBatch,
    RolloutFormatError,
    RolloutRow,
    read_rollouts,
)
from intellect.protocol.tasks import (
    completion_reward,
    group_advantages,
    node_seed_int,
    prompt_token_ids,
    sample_batch,
)
from intellect.protocol.tasks.sampling import completion_seed


@dataclass(frozen=True)
class CheckContext:
    """What a check may consult. `policy_for(step)` gives the model of a published policy step (in `compute_dtype`);
    `steps()` gives (train step now being collected, latest published policy step);
    `batch_holder(batch_key)` gives the content hash of the file already recorded for that
    node:policy_step:batch_counter, or None; `highest_counter(node hex, policy step)` the highest
    batch counter recorded for it (0: none); `row_secret` keys the choice of rows to re-run when
    toploc_fraction < 1 (a secret of the coordinator's state dir)."""

    run: RunRules
    config: IntakeConfig
    tokenizer: Any  # a transformers tokenizer of the run's model
    eos_ids: frozenset[int]
    policy_for: Callable[[int], object]
    steps: Callable[[], tuple[int, int]]
    batch_holder: Callable[[str], str | None]
    highest_counter: Callable[[str, int], int] = lambda node, step: 0
    row_secret: bytes = b""


@dataclass(frozen=True)
class Prefill:
    """The model pass: which completions were re-run (`rows`, indices into the batch) and what the
    policy says about each (`results`, one `CompletionCheck` per chosen row)."""

    rows: list[int]
    results: list

    def evaluated(self):
        """(row index, CompletionCheck) of the completions whose proofs and tokens could be read."""
        return [(i, c) for i, c in zip(self.rows, self.results, strict=True) if c.rejection is None]


@dataclass
class Candidate:
    """One submission under validation."""

    sender: bytes  # the signing key (raw 32 bytes)
    header: SubmissionHeader
    batch: RolloutBatch
    _prefill: Prefill | None = field(default=None, repr=False)
    # what check_rewards recomputed, one value per row: what the trainer uses instead of the claims
    rewards: list[float] | None = field(default=None, repr=False)
    advantages: list[float] | None = field(default=None, repr=False)

    @property
    def file_sha256(self) -> str:
        return self.header.file_sha256

    @property
    def batch_key(self) -> str:
        return batch_key(self.sender, self.batch.meta.policy_step, self.batch.meta.batch_counter)

    def prefill(self, ctx: CheckContext) -> Prefill:
        """One prefill per completion (a sampled share of them) serves every model check."""
        if self._prefill is None:
            self._prefill = _run_prefill(ctx, self)
        return self._prefill


Check = Callable[[CheckContext, Candidate], None]


def batch_key(sender: bytes, policy_step: int, batch_counter: int) -> str:
    return f"{sender.hex()}:{policy_step}:{batch_counter}"


def read_batch(rollout_file: bytes, config: IntakeConfig, ctx: CheckContext | None = None) -> RolloutBatch:
    """Decode the rollout file of a submission, or reject it as bad schema. With the run's `ctx`
    the decoding is bounded by the run's shape before any value is converted: its rows, prompts
    within the model's context, every completion (whatever its finish reason) within max_new_tokens."""
    limits = {}
    if ctx is not None:
        context = getattr(ctx.tokenizer, "model_max_length", None)
        limits = {"max_rows": ctx.run.prompts_per_batch * ctx.run.completions_per_prompt,
                  "max_prompt_tokens": context if isinstance(context, int) and 0 < context < MAX_SEQ_TOKENS
                  else MAX_SEQ_TOKENS,
                  "max_output_tokens": ctx.run.max_new_tokens}
    try:
        return read_rollouts(rollout_file, max_bytes=config.max_submission_bytes, **limits)
    except RolloutFormatError as e:
        raise Rejected(Reason.BAD_SCHEMA, str(e)) from None


# ---------------------------------------------------------------------- the checks, in order

def check_schema(ctx: CheckContext, sub: Candidate) -> None:
    """The file was made for this run, by its signer, with the announced settings and shape."""
    rules, meta, header, batch = ctx.run, sub.batch.meta, sub.header, sub.batch
    expected = {
        "run_id": (meta.run_id, rules.run_id),
        "node_public_key": (meta.node_public_key, sub.sender.hex()),
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


def check_batch_unseen(ctx: CheckContext, sub: Candidate) -> None:
    """Answering one seed's prompts twice would let a node submit only its luckiest samples."""
    holder = ctx.batch_holder(sub.batch_key)
    if holder is not None and holder != sub.file_sha256:
        meta = sub.batch.meta
        raise Rejected(Reason.BATCH_REUSED, f"batch {meta.batch_counter} of policy step {meta.policy_step} "
                                            "was already submitted")


def counter_in_order(ctx: CheckContext, sub: Candidate) -> bool:
    """Counters of a (node, policy step) run 1, 2, ...: at most one past the highest recorded."""
    meta = sub.batch.meta
    return meta.batch_counter <= ctx.highest_counter(sub.sender.hex(), meta.policy_step) + 1


def check_batch_counter(ctx: CheckContext, sub: Candidate) -> None:
    """A node that could skip counters could search them for prompts it likes (the prompts of a
    counter are known before generating): counters must come in order."""
    if not counter_in_order(ctx, sub):
        meta = sub.batch.meta
        highest = ctx.highest_counter(sub.sender.hex(), meta.policy_step)
        raise Rejected(Reason.COUNTER_SKIPPED, f"batch counter {meta.batch_counter} of policy step "
                                               f"{meta.policy_step} skips ahead: the highest seen is {highest}, "
                                               f"so the next is {highest + 1}")


def check_policy_step(ctx: CheckContext, sub: Candidate) -> None:
    policy_step = sub.batch.meta.policy_step
    collect_step, latest = ctx.steps()
    if policy_step > latest:
        raise Rejected(Reason.UNKNOWN_POLICY, f"policy step {policy_step} was never published (latest {latest})")
    if policy_step < collect_step - ctx.run.async_level:
        raise Rejected(Reason.STALE_POLICY, f"policy step {policy_step} is older than the collected step "
                                            f"{collect_step} - async level {ctx.run.async_level}")


def check_prompts(ctx: CheckContext, sub: Candidate) -> None:
    """Each group answers the prompt the node's seed gives, rendered exactly, with its length target."""
    rules, meta = ctx.run, sub.batch.meta
    sampled = sample_batch(rules.task, node_seed_int(sub.sender), meta.policy_step, meta.batch_counter,
                           rules.prompts_per_batch, rules.task_config.length_targets)
    allowed_targets = set(rules.task_config.length_targets) or {0}
    for rows, want in zip(_groups(rules), sampled, strict=True):
        problem = rules.task.problem(want.problem_index)
        tokens = prompt_token_ids(ctx.tokenizer, problem, want.target_length, rules.task_config.thinking)
        for i in rows:
            row = sub.batch.rows[i]
            if row.problem_index != want.problem_index:
                raise Rejected(Reason.PROMPT_MISMATCH, f"row {i}: problem {row.problem_index}, the seed gives "
                                                       f"{want.problem_index}")
            if row.target_length not in allowed_targets or row.target_length != want.target_length:
                raise Rejected(Reason.BAD_TARGET_LENGTH, f"row {i}: target {row.target_length}, the seed gives "
                                                         f"{want.target_length}")
            if row.input_tokens != tokens:
                raise Rejected(Reason.PROMPT_MISMATCH, f"row {i}: prompt tokens differ from the rendered prompt")


def check_rewards(ctx: CheckContext, sub: Candidate) -> None:
    """Rewards recomputed from the completions' text, advantages from the rewards of each group."""
    rules, tol = ctx.run, ctx.config.reward_tolerance
    groups = _groups(rules)
    rewards = np.zeros((len(groups), rules.completions_per_prompt), dtype=np.float32)
    for g, rows in enumerate(groups):
        for j, i in enumerate(rows):
            row = sub.batch.rows[i]
            text = ctx.tokenizer.decode(row.output_tokens, skip_special_tokens=True)
            problem = rules.task.problem(row.problem_index)
            reward, task_reward, penalty = completion_reward(rules.task, rules.task_config, problem, text,
                                                             row.target_length, len(row.output_tokens))
            claimed = (row.reward, row.task_reward, row.length_penalty)
            if any(abs(a - b) > tol for a, b in zip(claimed, (reward, task_reward, penalty), strict=True)):
                raise Rejected(Reason.REWARD_MISMATCH, f"row {i}: claimed reward {claimed}, recomputed "
                                                       f"{(reward, task_reward, penalty)}")
            rewards[g, j] = reward
    advantages = group_advantages(rewards)
    sub.rewards, sub.advantages = rewards.reshape(-1).tolist(), advantages.reshape(-1).tolist()
    for g, rows in enumerate(groups):
        for j, i in enumerate(rows):
            if abs(sub.batch.rows[i].advantage - advantages[g, j]) > ctx.config.advantage_tolerance:
                raise Rejected(Reason.ADVANTAGE_MISMATCH, f"row {i}: claimed advantage "
                                                          f"{sub.batch.rows[i].advantage:.6f}, recomputed "
                                                          f"{advantages[g, j]:.6f}")


def check_termination(ctx: CheckContext, sub: Candidate) -> None:
    """EOS only at the end, "stop" only on EOS, "length" only at max_new_tokens."""
    for i, row in enumerate(sub.batch.rows):
        tokens = row.output_tokens
        early_eos = [k for k, t in enumerate(tokens[:-1]) if t in ctx.eos_ids]
        if early_eos:
            raise Rejected(Reason.BAD_TERMINATION, f"row {i}: EOS at position {early_eos[0]} before the end")
        if row.finish_reason == "stop" and tokens[-1] not in ctx.eos_ids:
            raise Rejected(Reason.BAD_TERMINATION, f"row {i}: finish 'stop' without EOS")
        if row.finish_reason == "length" and len(tokens) != ctx.run.max_new_tokens:
            raise Rejected(Reason.BAD_TERMINATION, f"row {i}: finish 'length' after {len(tokens)} tokens, "
                                                   f"the limit is {ctx.run.max_new_tokens}")


def check_proofs_readable(ctx: CheckContext, sub: Candidate) -> None:
    """Malformed proofs or tokens are refused before the prefill evaluates them."""
    pre = sub.prefill(ctx)
    for i, result in zip(pre.rows, pre.results, strict=True):
        if result.rejection is not None:
            raise Rejected(Reason.TOPLOC_FAILED, f"row {i}: {result.rejection}")


def check_eos_probability(ctx: CheckContext, sub: Candidate) -> None:
    """INTELLECT-2's termination rule: a completion ends on EOS where the policy makes EOS likely;
    a node cutting answers short (saving compute) ends where it is not. Honest sampling picks an
    unlikely EOS now and then, so the rule is judged over the batch."""
    cfg = ctx.config
    endings = [(i, result.eos_prob) for i, result in sub.prefill(ctx).evaluated()
               if sub.batch.rows[i].finish_reason == "stop"]
    for i, p in endings:
        if p < cfg.eos_floor_prob:
            raise Rejected(Reason.BAD_TERMINATION, f"row {i}: ends on EOS with probability {p:.2g}, below the "
                                                   f"floor {cfg.eos_floor_prob}", statistical=True)
    low = [i for i, p in endings if p <= cfg.eos_min_prob]
    if len(low) > 2 + cfg.eos_low_fraction * len(endings):  # two unlikely endings per batch are free
        raise Rejected(Reason.BAD_TERMINATION, f"{len(low)} of {len(endings)} EOS endings have probability <= "
                                               f"{cfg.eos_min_prob} (rows {low[:8]}); allowed "
                                               f"{cfg.eos_low_fraction:.0%}", statistical=True)


def check_claimed_logprobs(ctx: CheckContext, sub: Candidate) -> None:
    """The log-probs the node claims (the trainer's importance ratios use them) are the policy's."""
    for i, result in sub.prefill(ctx).evaluated():
        row: RolloutRow = sub.batch.rows[i]
        recomputed = np.asarray(result.token_logprobs, dtype=np.float64)
        claimed = np.asarray(row.output_logprobs, dtype=np.float64)
        err = float(np.abs(recomputed - claimed).mean())
        if err > ctx.config.max_logprob_abs_err:
            raise Rejected(Reason.TOKEN_PROB_MISMATCH, f"row {i}: claimed log-probs differ from the policy's by "
                                                       f"{err:.3f} on average")


def check_toploc(ctx: CheckContext, sub: Candidate) -> None:
    """The proofs match the policy's hidden states: the tokens came from this policy."""
    for i, result in sub.prefill(ctx).evaluated():
        if not result.accepted:
            why = _worst_chunk(result.chunks) if result.chunks else "the proofs do not match"
            raise Rejected(Reason.TOPLOC_FAILED, f"row {i}: {why}")


def check_sampling(ctx: CheckContext, sub: Candidate) -> None:
    """Every token is the seeded sampler's pick at the run's temperature under the policy's logits
    (seed derived from run, node, policy step, batch counter and row): edited tokens, colder or
    greedy sampling, best-of-k and another model's tokens all leave tokens it does not draw. Near
    ties of the noisy scores may flip between decode and prefill numerics and are not counted."""
    for i, result in sub.prefill(ctx).evaluated():
        tokens = result.tokens
        if tokens is not None and tokens.mismatch:
            raise Rejected(Reason.SAMPLING_MISMATCH,
                           f"row {i}: {tokens.mismatch} of {len(sub.batch.rows[i].output_tokens)} tokens are not "
                           f"the seeded sample (first at position {tokens.first_mismatch}, score gap "
                           f"{tokens.worst_gap:.2f} > tie tolerance {ctx.config.tie_tolerance})")


def validated(ctx: CheckContext, sub: Candidate) -> Validated | None:
    """What validation computed for a submission that passed every check: recomputed rewards and
    advantages, and the prefill's log-probs of each re-run row (None for rows it did not re-run).
    None when the checks run did not include check_rewards."""
    if sub.advantages is None or sub.rewards is None:
        return None
    logprobs: list[list[float] | None] = [None] * len(sub.batch.rows)
    for i, result in sub.prefill(ctx).evaluated():
        logprobs[i] = [float(x) for x in result.token_logprobs]
    return Validated(sub.advantages, sub.rewards, logprobs)


def sampling_summary(prefill: Prefill) -> str:
    """Per batch: how many re-drawn tokens matched exactly, were ties, or mismatched."""
    counts = [c.tokens for _, c in prefill.evaluated() if c.tokens is not None]
    exact, tie, bad = (sum(getattr(c, k) for c in counts) for k in ("exact", "tie", "mismatch"))
    return f"tokens re-drawn: {exact} exact, {tie} tie, {bad} mismatch"


CHECKS: list[Check] = [
    check_schema,
    check_batch_unseen,
    check_batch_counter,
    check_policy_step,
    check_prompts,
    check_rewards,
    check_termination,
    check_proofs_readable,
    check_eos_probability,
    check_claimed_logprobs,
    check_toploc,
    check_sampling,
]


def run_checks(ctx: CheckContext, sub: Candidate, checks: list[Check] = CHECKS) -> None:
    """Every check in order; the first that fails raises its Rejected."""
    for check in checks:
        check(ctx, sub)


# ---------------------------------------------------------------------- helpers

def _groups(rules: RunRules) -> list[range]:
    """Row indices of each prompt's group of completions (the schema check fixed the row count)."""
    n = rules.completions_per_prompt
    return [range(p * n, (p + 1) * n) for p in range(rules.prompts_per_batch)]


def _run_prefill(ctx: CheckContext, sub: Candidate) -> Prefill:
    from intellect.protocol.toploc import Thresholds
    from intellect.protocol.toploc_torch import verify_completions

    chosen = _sample_rows(len(sub.batch.rows), sub.file_sha256, ctx.config.toploc_fraction, ctx.row_secret)
    if not chosen:
        return Prefill([], [])
    try:
        policy = ctx.policy_for(sub.batch.meta.policy_step)
    except (OSError, ValueError) as e:  # pruned since the step check: as good as stale
        raise Rejected(Reason.STALE_POLICY, f"policy step {sub.batch.meta.policy_step} is no longer held: "
                                            f"{e}") from None
    cfg = ctx.config
    rows = [sub.batch.rows[i] for i in chosen]
    results = verify_completions(policy, [r.input_tokens for r in rows], [r.output_tokens for r in rows],
                                 [r.proof for r in rows],
                                 thresholds=Thresholds(cfg.toploc_max_exp_mismatches, cfg.toploc_max_mant_err_mean,
                                                       cfg.toploc_max_mant_err_median),
                                 batch_size=cfg.prefill_batch_size, temperature=ctx.run.temperature,
                                 eos_token_id=sorted(ctx.eos_ids), tie_tolerance=cfg.tie_tolerance,
                                 seeds=[completion_seed(ctx.run.run_id, sub.sender, sub.batch.meta.policy_step,
                                                        sub.batch.meta.batch_counter, i) for i in chosen])
    return Prefill(chosen, list(results))


def _sample_rows(num_rows: int, file_sha256: str, fraction: float, secret: bytes) -> list[int]:
    k = int(np.ceil(fraction * num_rows))
    if k >= num_rows:
        return list(range(num_rows))
    # HMAC of the file hash under the coordinator's secret: the node controls the file hash, so
    # without the secret it could grind files until its bad rows fall outside the checked share
    digest = hmac.new(secret, bytes.fromhex(file_sha256), hashlib.sha256).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
    return sorted(rng.choice(num_rows, size=k, replace=False).tolist())


def _worst_chunk(chunks) -> str:
    worst = max(range(len(chunks)), key=lambda k: (chunks[k].exp_mismatches, chunks[k].mant_err_mean))
    c = chunks[worst]
    return (f"TOPLOC chunk {worst} fails: {c.exp_mismatches} exponent mismatches, mantissa error mean "
            f"{c.mant_err_mean:.1f} / median {c.mant_err_median:.0f}")
