"""Rollout batch files: one parquet file per node batch, one row per completion (spec B.7).

Columns are INTELLECT-2's (input_logprobs dropped, as in its release) plus `problem_index` and
`finish_reason`, which the coordinator needs to recompute prompts and check termination.
File-level metadata (key `intellect.rollouts`, JSON) names the node, run, policy step, batch
counter, task and sampling parameters. Files arrive from untrusted peers: `read_rollouts` bounds
the size, checks the exact schema and every value, and raises only `RolloutFormatError`. This
module does not know how rewards or proofs are computed or checked; only their shapes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from intellect.protocol.constants import MAX_SUBMISSION_BYTES
from intellect.protocol.parquet_footer import Footer, FooterError, read_footer

FORMAT_VERSION = 1
META_KEY = b"intellect.rollouts"
FINISH_REASONS = ("stop", "length")
MAX_FILE_BYTES = MAX_SUBMISSION_BYTES
MAX_ROWS = 4096
MAX_SEQ_TOKENS = 65_536
MAX_TOTAL_TOKENS = 1 << 22  # per list column and file, unless the caller knows its run's bound
MAX_PROOF_BYTES = 1024 * 1024
MAX_META_BYTES = 4096
FLOAT32_MAX = 3.4028234663852886e38


def _list_of(value_type: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("element", value_type))  # parquet's own name for list items


SCHEMA = pa.schema(
    [
        ("problem_index", pa.int32()),
        ("input_tokens", _list_of(pa.int32())),
        ("output_tokens", _list_of(pa.int32())),
        ("output_logprobs", _list_of(pa.float32())),
        ("advantages", pa.float32()),
        ("rewards", pa.float32()),
        ("task_rewards", pa.float32()),
        ("length_penalties", pa.float32()),
        ("proofs", pa.binary()),
        ("step", pa.int32()),
        ("target_lengths", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)


class RolloutFormatError(ValueError):
    """A rollout file or batch is malformed: wrong bytes, schema, types, bounds or metadata."""


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    temperature: float = Field(ge=0.0, le=10.0, allow_inf_nan=False)
    max_tokens: int = Field(ge=1, le=MAX_SEQ_TOKENS)
    n: int = Field(ge=1, le=1024)


class RolloutMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    version: int = Field(FORMAT_VERSION, ge=FORMAT_VERSION, le=FORMAT_VERSION)
    node_public_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    run_id: str = Field(min_length=1, max_length=128)
    policy_step: int = Field(ge=0, lt=2**31)
    batch_counter: int = Field(ge=1, lt=2**31)
    task: str = Field(min_length=1, max_length=512)
    sampling: SamplingParams


@dataclass(frozen=True)
class RolloutRow:
    """One completion. `step` is the policy version that generated it."""

    problem_index: int
    input_tokens: list[int]
    output_tokens: list[int]
    output_logprobs: list[float]
    advantage: float
    reward: float
    task_reward: float
    length_penalty: float
    proof: bytes
    step: int
    target_length: int
    finish_reason: str


@dataclass(frozen=True)
class RolloutBatch:
    meta: RolloutMeta
    rows: list[RolloutRow] = field(default_factory=list)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(r.output_tokens) for r in self.rows)


_ROW_TO_COLUMN = {
    "problem_index": "problem_index",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "output_logprobs": "output_logprobs",
    "advantage": "advantages",
    "reward": "rewards",
    "task_reward": "task_rewards",
    "length_penalty": "length_penalties",
    "proof": "proofs",
    "step": "step",
    "target_length": "target_lengths",
    "finish_reason": "finish_reason",
}


def content_hash(data: bytes) -> str:
    """sha256 hex of a file's bytes: the submission's identity (replays share it)."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(64 * 1024):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- writing


def _to_table(batch: RolloutBatch) -> pa.Table:
    _check_rows(batch.meta, batch.rows)
    columns = {col: [getattr(r, attr) for r in batch.rows] for attr, col in _ROW_TO_COLUMN.items()}
    meta = {META_KEY: batch.meta.model_dump_json().encode()}
    return pa.Table.from_pydict(columns, schema=SCHEMA.with_metadata(meta))


def rollouts_to_bytes(batch: RolloutBatch) -> bytes:
    sink = io.BytesIO()
    pq.write_table(_to_table(batch), sink, compression="zstd")
    return sink.getvalue()


def write_rollouts(path: str | Path, batch: RolloutBatch) -> str:
    """Write atomically (tmp + fsync + rename, then fsync the directory); returns the content hash."""
    path = Path(path)
    data = rollouts_to_bytes(batch)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return content_hash(data)


# ---------------------------------------------------------------- reading

# pyarrow reports malformed input through several exception types; all mean "bad file" here.
_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError, OverflowError)


def read_rollouts(
    source: str | Path | bytes,
    max_bytes: int = MAX_FILE_BYTES,
    max_rows: int = MAX_ROWS,
    *,
    max_prompt_tokens: int = MAX_SEQ_TOKENS,
    max_output_tokens: int = MAX_SEQ_TOKENS,
    max_total_tokens: int = MAX_TOTAL_TOKENS,
    max_uncompressed_bytes: int | None = None,
) -> RolloutBatch:
    """Parse and strictly validate a rollout file (path or bytes); raises RolloutFormatError.

    The cost is bounded before it is paid: the footer's row count, value counts and uncompressed
    sizes are checked before anything is decompressed, the decoded list lengths (Arrow compute,
    no Python objects) before any value becomes a Python object. Each row holds at most
    `max_prompt_tokens` prompt and `max_output_tokens` output tokens, whatever its finish reason;
    the file at most `max_total_tokens` of each. `max_uncompressed_bytes` defaults to what that
    many tokens (with their proofs) can honestly take."""
    data = _read_bounded(source, max_bytes)
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        md = pf.metadata
        if md.num_rows > max_rows:
            raise RolloutFormatError(f"{md.num_rows} rows, more than the {max_rows} allowed")
        schema = pf.schema_arrow
        _check_schema(schema)
        meta = _parse_meta(schema.metadata)
        limits = {"input_tokens": min(md.num_rows * max_prompt_tokens, max_total_tokens),
                  "output_tokens": min(md.num_rows * max_output_tokens, max_total_tokens)}
        limits["output_logprobs"] = limits["output_tokens"]
        if max_uncompressed_bytes is None:
            max_uncompressed_bytes = _honest_uncompressed_bytes(md.num_rows, limits)
        if _check_footer(data, limits, max_uncompressed_bytes).num_rows != md.num_rows:
            raise RolloutFormatError("the file's row counts disagree")
        # column by column, each list column bounded as soon as it is decoded
        columns = {}
        for name in SCHEMA.names:
            column = pf.read(columns=[name]).column(0)
            if len(column) != md.num_rows:
                raise RolloutFormatError("table contents disagree with the file's metadata")
            if name in limits:
                per_row = max_prompt_tokens if name == "input_tokens" else max_output_tokens
                _check_list_lengths(name, column, per_row, limits[name])
            columns[name] = column
        table = pa.table(columns, schema=SCHEMA)
        # inside the try: converting values can still fail (e.g. invalid UTF-8 in a string column)
        return RolloutBatch(meta=meta, rows=_rows_of(table, meta))
    except RolloutFormatError:
        raise
    except _ARROW_ERRORS as e:
        raise RolloutFormatError(f"not a readable rollout parquet file: {type(e).__name__}: {e}") from e


# Upper bounds of an honest file's decoded bytes: a token costs 4 bytes in each list column plus
# levels, its logprob 4 and its share of the TOPLOC proofs (2 + 2*128 bytes per 32 tokens) about 8;
# every row adds its scalars, one proof chunk and the parquet page overheads.
_BYTES_PER_TOKEN = 32
_BYTES_PER_ROW = 1024
_BYTES_PER_FILE = 1 << 20


def _honest_uncompressed_bytes(num_rows: int, limits: dict[str, int]) -> int:
    tokens = limits["input_tokens"] + limits["output_tokens"]
    return _BYTES_PER_TOKEN * tokens + _BYTES_PER_ROW * num_rows + _BYTES_PER_FILE


def _check_footer(data: bytes, limits: dict[str, int], max_uncompressed_bytes: int) -> Footer:
    """Refuse a file whose footer announces more than the bounds, before decompressing anything.
    A footer that understates is caught by the decoded lengths (`_check_list_lengths`)."""
    try:
        footer = read_footer(data)
    except FooterError as e:
        raise RolloutFormatError(f"not a readable rollout parquet file: {e}") from None
    if footer.uncompressed_bytes > max_uncompressed_bytes:
        raise RolloutFormatError(f"{footer.uncompressed_bytes} bytes uncompressed, more than the "
                                 f"{max_uncompressed_bytes} allowed for {footer.num_rows} rows")
    for name, limit in limits.items():
        if (count := footer.values_of(name)) > limit:
            raise RolloutFormatError(f"{name}: {count} values in {footer.num_rows} rows, more than the "
                                     f"{limit} allowed")
    return footer


def _check_list_lengths(name: str, column: pa.ChunkedArray, per_row: int, total: int) -> None:
    lengths = pc.list_value_length(column)
    longest = pc.max(lengths).as_py() or 0
    if longest > per_row:
        raise RolloutFormatError(f"{name}: a row holds {longest} tokens, more than the {per_row} allowed")
    count = pc.sum(lengths).as_py() or 0
    if count > total:
        raise RolloutFormatError(f"{name}: {count} tokens in all, more than the {total} allowed")


def _read_bounded(source: str | Path | bytes, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise RolloutFormatError(f"cannot read rollout file {source}: {e}") from e
    if len(data) > max_bytes:
        raise RolloutFormatError(f"rollout file larger than {max_bytes} bytes")
    return data


def _check_schema(schema: pa.Schema) -> None:
    got = [(f.name, str(f.type)) for f in schema]
    want = [(f.name, str(f.type)) for f in SCHEMA]
    if got != want:
        raise RolloutFormatError(f"schema mismatch: expected columns {want}, got {got}")


def _parse_meta(metadata: dict[bytes, bytes] | None) -> RolloutMeta:
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        raise RolloutFormatError(f"missing file metadata {META_KEY.decode()!r}")
    if len(raw) > MAX_META_BYTES:
        raise RolloutFormatError(f"file metadata larger than {MAX_META_BYTES} bytes")
    try:
        return RolloutMeta.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RolloutFormatError(f"bad file metadata: {e}") from e


def _rows_of(table: pa.Table, meta: RolloutMeta) -> list[RolloutRow]:
    for name in table.column_names:
        col = table.column(name)
        if col.null_count or (pa.types.is_list(col.type) and pc.list_flatten(col).null_count):
            raise RolloutFormatError(f"column {name!r} holds nulls")
    columns = table.to_pydict()
    rows = [
        RolloutRow(**{attr: columns[col][i] for attr, col in _ROW_TO_COLUMN.items()})
        for i in range(table.num_rows)
    ]
    _check_rows(meta, rows)
    return rows


def _check_rows(meta: RolloutMeta, rows: list[RolloutRow]) -> None:
    """Value bounds shared by writer and reader, so a node cannot write what a coordinator rejects."""
    for i, r in enumerate(rows):
        where = f"row {i}"
        if not 0 <= r.problem_index < 2**31:
            raise RolloutFormatError(f"{where}: problem_index {r.problem_index} out of range")
        for name, toks in (("input_tokens", r.input_tokens), ("output_tokens", r.output_tokens)):
            if not 1 <= len(toks) <= MAX_SEQ_TOKENS:
                raise RolloutFormatError(f"{where}: {name} must hold 1..{MAX_SEQ_TOKENS} tokens")
            if min(toks) < 0 or max(toks) >= 2**31:
                raise RolloutFormatError(f"{where}: {name} holds an id outside [0, 2^31)")
        if len(r.output_logprobs) != len(r.output_tokens):
            raise RolloutFormatError(
                f"{where}: {len(r.output_logprobs)} logprobs for {len(r.output_tokens)} tokens"
            )
        if not all(-FLOAT32_MAX <= x <= 0.0 for x in r.output_logprobs):  # NaN fails too
            raise RolloutFormatError(f"{where}: output_logprobs must be finite and <= 0")
        for name in ("advantage", "reward", "task_reward", "length_penalty"):
            if not abs(getattr(r, name)) <= FLOAT32_MAX:
                raise RolloutFormatError(f"{where}: {name} is not a finite float32")
        if not isinstance(r.proof, bytes) or len(r.proof) > MAX_PROOF_BYTES:
            raise RolloutFormatError(f"{where}: proof must be bytes of at most {MAX_PROOF_BYTES}")
        if r.step != meta.policy_step:
            raise RolloutFormatError(
                f"{where}: step {r.step} differs from the file's policy step {meta.policy_step}"
            )
        if not 0 <= r.target_length <= 1_000_000:
            raise RolloutFormatError(f"{where}: target_length {r.target_length} out of range")
        if r.finish_reason not in FINISH_REASONS:
            raise RolloutFormatError(f"{where}: finish_reason must be one of {FINISH_REASONS}")
