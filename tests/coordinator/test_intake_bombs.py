"""Decompression bombs against the coordinator's intake: a real `Intake` (real ledger, the tiny model's
tokenizer, the run's rules) judges signed submissions whose rollout files decode to far more than the
run allows. Each is refused as bad_schema before its values become Python objects: quickly, and with
little memory, measured in a fresh interpreter (ru_maxrss is a high-water mark: the test process's own
peak would hide the growth)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pyarrow.parquet as pq

from tests.protocol.test_rollouts import _table_bytes, _zero_token_rows

_JUDGE = """
import json, resource, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from intellect.coordinator.intake import Intake
from intellect.coordinator.ledger import Ledger
from intellect.coordinator.rules import IntakeConfig, RunRules
from intellect.protocol.identity import Identity
from intellect.protocol.messages import SubmissionHeader, encode_submission
from intellect.protocol.rollouts import content_hash
from intellect.protocol.tasks import TaskConfig, setup_task
from intellect.protocol.wire import MessageKind, seal

model, state, bomb, shape = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]).read_bytes(), json.loads(sys.argv[4])
task_config = TaskConfig()
rules = RunRules(run_id="bombs", task=setup_task(task_config), task_config=task_config, temperature=1.0,
                 async_level=1, **shape)
intake = Intake(IntakeConfig(), rules, Ledger(state / "ledger.sqlite"), state, AutoTokenizer.from_pretrained(model),
                policy_for=lambda step: None, steps=lambda: (0, 0), eos_ids=frozenset({0}))
node = Identity.generate()
header = SubmissionHeader(policy_step=0, batch_counter=1, num_completions=16, num_tokens=16,
                          file_sha256=content_hash(bomb), file_size=len(bomb))
data = seal(node, MessageKind.SUBMISSION, "bombs", encode_submission(header, bomb))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
verdict = intake.submit(data).verdict
seconds = time.perf_counter() - started
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"reason": verdict.reason, "detail": verdict.detail, "seconds": seconds, "rss_growth_mb": grown_mb}))
"""


def _judge(tmp_path, model, bomb: bytes, **shape) -> dict:
    path = tmp_path / "bomb.parquet"
    path.write_bytes(bomb)
    (tmp_path / "state").mkdir()
    done = subprocess.run([sys.executable, "-c", _JUDGE, str(model), str(tmp_path / "state"), str(path),
                           json.dumps(shape)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{len(bomb)} bytes: {result}")  # the measured figures (pytest -s)
    return result


def test_intake_refuses_a_parquet_bomb(tmp_path, tiny_model_path):
    """16 rows (the run's shape) of 65,536 zero tokens each: 1 M values per list column from a few KB.
    Before the fix the whole file was decoded and converted to Python lists before any bound."""
    bomb = _table_bytes(_zero_token_rows(16, 65_536, "length"))
    assert len(bomb) < 16 * 1024 and pq.ParquetFile(io.BytesIO(bomb)).metadata.num_rows == 16
    result = _judge(tmp_path, tiny_model_path, bomb, prompts_per_batch=4, completions_per_prompt=4,
                    max_new_tokens=24)
    assert result["reason"] == "bad_schema"
    assert "output_tokens: 1048576 values in 16 rows, more than the 384 allowed" in result["detail"]
    assert result["seconds"] < 5.0  # milliseconds measured; generous for a shared CPU
    assert result["rss_growth_mb"] < 100


def test_intake_holds_stop_rows_to_max_new_tokens(tmp_path, tiny_model_path):
    """32 'stop' rows of 20,000 tokens in a run of 24 new tokens: only 'length' rows were held to
    max_new_tokens (and only after the whole file was converted)."""
    bomb = _table_bytes(_zero_token_rows(32, 20_000, "stop"))
    result = _judge(tmp_path, tiny_model_path, bomb, prompts_per_batch=8, completions_per_prompt=4,
                    max_new_tokens=24)
    assert result["reason"] == "bad_schema"
    assert "output_tokens: 640000 values in 32 rows, more than the 768 allowed" in result["detail"]
    assert result["seconds"] < 5.0
    assert result["rss_growth_mb"] < 100
