"""What validation computed for an accepted rollout file, kept beside it for the trainer.

The node's file carries its own advantages and per-token log-probs. Validation recomputes both (the
advantages from rewards it re-scored, the log-probs in the prefill that checks the proofs) and only
asks that the claims lie within tolerances (an advantage within 1e-3, log-probs within a mean error),
so a node could still tilt its claims inside them. The trainer must never need them: it reads this
file instead. `accepted/<sha256>.parquet` (the node's bytes, unchanged: they are content-addressed)
has `accepted/<sha256>.validated` (parquet) beside it, one row per completion:

  advantage           float32, the group advantage of the recomputed rewards
  reward              float32, the recomputed reward
  behaviour_logprobs  list<float32> or null: log mu of each output token at the run's temperature,
                      from the validator's prefill of the policy that sampled it; null for rows the
                      prefill did not re-run (toploc_fraction < 1): the trainer then takes the ratio
                      against the policy at the step's start for them

What this module does not know: how the numbers were computed (coordinator/checks.py), or the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUFFIX = ".validated"  # a parquet file; not named *.parquet, which means a node's rollout file here
SCHEMA = pa.schema([("advantage", pa.float32()), ("reward", pa.float32()),
                    ("behaviour_logprobs", pa.list_(pa.float32()))])


@dataclass(frozen=True)
class Validated:
    """Per completion of one accepted file, in the file's row order."""

    advantages: list[float]
    rewards: list[float]
    behaviour_logprobs: list[list[float] | None]


def validated_path(rollout_path: Path) -> Path:
    """The sidecar of `.../<sha256>.parquet`."""
    path = Path(rollout_path)
    return path.with_name(path.stem + SUFFIX)


def to_bytes(v: Validated) -> bytes:
    table = pa.table({"advantage": v.advantages, "reward": v.rewards,
                      "behaviour_logprobs": v.behaviour_logprobs}, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_validated(rollout_path: Path, num_rows: int) -> Validated | None:
    """The sidecar of an accepted file, or None where there is none (accepted by an older version) or it
    does not match the file's row count (then it is not this file's, and nothing of it is used)."""
    path = validated_path(rollout_path)
    if not path.is_file():
        return None
    table = pq.read_table(path)
    if table.schema != SCHEMA or table.num_rows != num_rows:
        return None
    columns = table.to_pydict()
    return Validated(columns["advantage"], columns["reward"], columns["behaviour_logprobs"])
