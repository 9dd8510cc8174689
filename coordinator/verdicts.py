"""How a check says no: the reason codes of every verdict, and the exception a check raises.

Reason values are wire and ledger strings (nodes and `intellect-node ledger` read them): never rename.

What this module does not know: which check raises which reason (coordinator/checks.py), or how
much a strike weighs and when a key is banned (the ledger's BanPolicy).
"""

from __future__ import annotations

from enum import StrEnum

from intellect.protocol.messages import IN_FLIGHT, STALE_POLICY


class Reason(StrEnum):
    ACCEPTED = "accepted"
    OVERSIZE = "oversize"
    BAD_ENVELOPE = "bad_envelope"
    WRONG_RUN = "wrong_run"
    REPLAY = "replay"
    IN_FLIGHT = IN_FLIGHT  # another copy of the file or batch is being validated: ask again later
    BATCH_REUSED = "batch_reused"
    COUNTER_SKIPPED = "counter_skipped"  # a batch counter past the node's highest + 1 for that policy step
    BANNED = "banned"
    BAD_SCHEMA = "bad_schema"
    STALE_POLICY = STALE_POLICY
    UNKNOWN_POLICY = "unknown_policy"
    PROMPT_MISMATCH = "prompt_mismatch"
    BAD_TARGET_LENGTH = "bad_target_length"
    REWARD_MISMATCH = "reward_mismatch"
    ADVANTAGE_MISMATCH = "advantage_mismatch"
    BAD_TERMINATION = "bad_termination"
    TOKEN_PROB_MISMATCH = "token_prob_mismatch"
    TOPLOC_FAILED = "toploc_failed"
    SAMPLING_MISMATCH = "sampling_mismatch"  # a token the seeded sampler does not draw (outside ties)
    VALIDATOR_FAILED = "validator_failed"  # the validator worker failed on the file (ours, not the node's)


# Rejections that do not prove the signer misbehaved: no strike towards a ban.
NO_STRIKE = {Reason.OVERSIZE, Reason.BAD_ENVELOPE, Reason.WRONG_RUN, Reason.REPLAY, Reason.IN_FLIGHT, Reason.BANNED,
             Reason.STALE_POLICY, Reason.VALIDATOR_FAILED}

# Answered, counted in memory, but not written to the ledger: they carry no strike and no file, and
# anyone can send them at line rate (bytes that are no envelope, a replayed envelope, a banned key), so
# a ledger row each would let one flood grow the disk and hold the record lock honest verdicts wait on.
UNRECORDED = NO_STRIKE - {Reason.STALE_POLICY, Reason.VALIDATOR_FAILED}


class Rejected(Exception):
    """`statistical`: the check is a statistical test that honest nodes fail now and then (the EOS
    probability rule), so the rejection weighs less than hard evidence."""

    def __init__(self, reason: Reason, detail: str = "", statistical: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.statistical = statistical
