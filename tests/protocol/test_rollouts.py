"""Rollout files: round trip, atomic write, strict validation, fuzzing of untrusted bytes."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intellect.protocol.rollouts import (
    META_KEY,
    SCHEMA,
    RolloutBatch,
    RolloutFormatError,
    RolloutMeta,
    RolloutRow,
    SamplingParams,
    content_hash,
    file_sha256,
    read_rollouts,
    rollouts_to_bytes,
    write_rollouts,
)


def make_meta(**over) -> RolloutMeta:
    fields = {
        "node_public_key": "ab" * 32,
        "run_id": "run-test",
        "policy_step": 3,
        "batch_counter": 1,
        "task": "arithmetic",
        "sampling": SamplingParams(temperature=0.6, max_tokens=64, n=2),
    }
    return RolloutMeta(**(fields | over))


def make_row(i: int = 0, **over) -> RolloutRow:
    fields = {
        "problem_index": 7 + i,
        "input_tokens": [1, 2, 3],
        "output_tokens": [4, 5, 6, 7],
        "output_logprobs": [-0.5, -0.25, 0.0, -3.0],
        "advantage": 0.7071,
        "reward": 0.64,
        "task_reward": 1.0,
        "length_penalty": 0.36,
        "proof": bytes(range(256)) + b"\x00\x01",
        "step": 3,
        "target_length": 100,
        "finish_reason": "stop" if i % 2 == 0 else "length",
    }
    return RolloutRow(**(fields | over))


def make_batch(num_rows: int = 4) -> RolloutBatch:
    return RolloutBatch(meta=make_meta(), rows=[make_row(i) for i in range(num_rows)])


VALID = rollouts_to_bytes(make_batch())


def test_round_trip_bytes_and_file(tmp_path):
    batch = make_batch()
    got = read_rollouts(rollouts_to_bytes(batch))
    assert got.meta == batch.meta
    assert [r.output_tokens for r in got.rows] == [r.output_tokens for r in batch.rows]
    assert got.rows[0].proof == batch.rows[0].proof
    assert got.rows[1].finish_reason == "length"
    assert got.rows[0].reward == pytest.approx(0.64, abs=1e-6)  # float32 on disk
    assert got.num_output_tokens == 16

    path = tmp_path / "step_3" / "a.parquet"
    path.parent.mkdir()
    digest = write_rollouts(path, batch)
    assert digest == file_sha256(path) == content_hash(path.read_bytes())
    assert read_rollouts(path).meta.node_public_key == "ab" * 32
    assert [p.name for p in path.parent.iterdir()] == ["a.parquet"]  # no temp file left behind


def test_writer_refuses_what_reader_would_reject(tmp_path):
    bad = RolloutBatch(meta=make_meta(), rows=[make_row(output_logprobs=[-1.0])])
    with pytest.raises(RolloutFormatError, match="logprobs"):
        write_rollouts(tmp_path / "x.parquet", bad)
    assert not list(tmp_path.iterdir())
    with pytest.raises(RolloutFormatError, match="step"):
        rollouts_to_bytes(RolloutBatch(meta=make_meta(), rows=[make_row(step=2)]))


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _valid_columns() -> dict:
    return pq.read_table(io.BytesIO(VALID)).to_pydict()


def _meta_bytes(**over) -> dict:
    meta = json.loads(make_meta().model_dump_json()) | over
    return {META_KEY: json.dumps(meta).encode()}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c, s: (c | {"step": [3, 3, 3, 4]}, s), "step"),
        (lambda c, s: (c | {"rewards": [float("nan")] * 4}, s), "finite"),
        (lambda c, s: (c | {"advantages": [float("inf")] * 4}, s), "finite"),
        (lambda c, s: (c | {"finish_reason": ["stop", "eos", "stop", "stop"]}, s), "finish_reason"),
        (lambda c, s: (c | {"output_tokens": [[1]] * 4}, s), "logprobs"),
        (lambda c, s: (c | {"input_tokens": [[]] * 4}, s), "input_tokens"),
        (lambda c, s: (c | {"input_tokens": [[-1]] * 4}, s), "input_tokens"),
        (lambda c, s: (c | {"output_logprobs": [[0.5, 0.0, 0.0, 0.0]] * 4}, s), "logprobs"),
        (lambda c, s: (c | {"problem_index": [None, 1, 2, 3]}, s), "null"),
        (lambda c, s: (c | {"input_tokens": [[1, None]] * 4}, s), "null"),
    ],
)
def test_bad_values_rejected(mutate, message):
    columns, schema = mutate(_valid_columns(), SCHEMA.with_metadata(_meta_bytes()))
    data = _table_bytes(pa.Table.from_pydict(columns, schema=schema))
    with pytest.raises(RolloutFormatError, match=message):
        read_rollouts(data)


@pytest.mark.parametrize(
    "schema, message",
    [
        (SCHEMA.set(4, pa.field("advantages", pa.float64())), "schema"),
        (SCHEMA.set(4, pa.field("advantage", pa.float32())), "schema"),
        (SCHEMA.append(pa.field("extra", pa.int32())), "schema"),
        (SCHEMA.remove(11), "schema"),
    ],
)
def test_wrong_schema_rejected(schema, message):
    columns = _valid_columns()
    columns["extra"] = [0] * 4
    columns = {f.name: columns.get(f.name, columns.get("advantages")) for f in schema}
    table = pa.Table.from_pydict(columns, schema=schema.with_metadata(_meta_bytes()))
    with pytest.raises(RolloutFormatError, match=message):
        read_rollouts(_table_bytes(table))


@pytest.mark.parametrize(
    "metadata, message",
    [
        (None, "missing"),
        ({META_KEY: b"not json"}, "metadata"),
        ({META_KEY: b"\xff\xfe"}, "metadata"),
        (_meta_bytes(node_public_key="zz"), "node_public_key"),
        (_meta_bytes(policy_step="3"), "policy_step"),
        (_meta_bytes(surprise=1), "surprise"),
        (_meta_bytes(batch_counter=0), "batch_counter"),
        (_meta_bytes(version=2), "version"),
        ({META_KEY: b"{" + b" " * 5000 + b"}"}, "larger"),
    ],
)
def test_bad_metadata_rejected(metadata, message):
    table = pa.Table.from_pydict(_valid_columns(), schema=SCHEMA.with_metadata(metadata))
    with pytest.raises(RolloutFormatError, match=message):
        read_rollouts(_table_bytes(table))


def test_size_and_row_bounds(tmp_path):
    with pytest.raises(RolloutFormatError, match="larger"):
        read_rollouts(VALID, max_bytes=len(VALID) - 1)
    with pytest.raises(RolloutFormatError, match="rows"):
        read_rollouts(VALID, max_rows=3)
    with pytest.raises(RolloutFormatError, match="cannot read"):
        read_rollouts(tmp_path / "missing.parquet")
    for junk in (b"", b"PAR1", b"PAR1" + b"\x00" * 100 + b"PAR1"):
        with pytest.raises(RolloutFormatError):
            read_rollouts(junk)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    with pytest.raises(RolloutFormatError):
        read_rollouts(data)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_mutated_valid_file(edits):
    data = bytearray(VALID)
    for pos, byte in edits:
        data[pos] = byte
    try:
        batch = read_rollouts(bytes(data))
    except RolloutFormatError:
        return
    # a mutation the reader accepts (e.g. in unused bytes) must give a batch that round-trips
    assert read_rollouts(rollouts_to_bytes(batch)).meta == batch.meta


def test_every_single_byte_corruption_is_handled():
    """Deterministic sweep beside the random fuzzing: each byte of a valid file set to 0x80
    (invalid UTF-8 start byte, high bit set in lengths and ids) in turn."""
    rejected = 0
    for pos in range(len(VALID)):
        data = bytearray(VALID)
        data[pos] = 0x80 if data[pos] != 0x80 else 0x00
        try:
            read_rollouts(bytes(data))
        except RolloutFormatError:
            rejected += 1
    assert rejected > 0  # and nothing but RolloutFormatError escaped
