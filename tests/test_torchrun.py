"""`intellect-node coordinator` under torchrun: two gloo processes on the CPU train the run's policy as
FSDP2 shards (rank 0 runs the coordinator, rank 1 follows its steps, checkpoints and resume), with two
`intellect-node join` nodes on 127.0.0.1 and the tiny model. The run finishes its steps and leaves a
whole checkpoint gathered from both ranks; started again under torchrun it resumes from it."""

from __future__ import annotations

import json

import pytest

from intellect.coordinator.trainer.checkpoint import read_latest
from tests.cli_harness import INTELLECT_NODE
from tests.coordinator.procs import NODE_ENV, Procs, node_cmd, wait_while_alive, write_toml

pytestmark = pytest.mark.slow


def torchrun(*args: str) -> list[str]:
    return [str(INTELLECT_NODE.with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
            "-m", "intellect.node.cli", *args]


def run_to(procs: Procs, tmp, config, steps: int, name: str) -> None:
    state = tmp / "coordinator"
    (state / "run.toml").unlink(missing_ok=True)
    procs.start(name, torchrun("coordinator", "--config", str(config), "--headless"),
                env={"INTELLECT_COORD_MAX_STEPS": str(steps)})
    wait_while_alive(procs, (state / "run.toml").exists, 180, "the coordinator's run file", name)
    for i in range(2):
        procs.start(f"{name}-node{i}", node_cmd(state / "run.toml", tmp / f"node{i}"), env=NODE_ENV)
    assert procs.wait_exit(name, 300) == 0, procs.tails(name)
    for i in range(2):
        procs.kill(f"{name}-node{i}")


def test_coordinator_under_torchrun_trains_checkpoints_and_resumes(tmp_path, tiny_model_path):
    state = tmp_path / "coordinator"
    config = write_toml(tmp_path / "coordinator.toml", {
        "state_dir": state, "run_name": "fsdp", "model": str(tiny_model_path), "async_level": 1,
        "batches_per_step": 1, "threads": 1, "shard_size": 16_000_000,
        "rollouts": {"prompts_per_batch": 2, "completions_per_prompt": 4, "max_new_tokens": 16, "temperature": 1.0},
        "task": {"name": "arithmetic", "max_operand": 20, "operators": "+"},
        "trainer": {"lr": 2e-5, "warmup_steps": 0, "temperature": 1.0, "seq_len": 512},
        "swarm": {"host": "127.0.0.1", "port": 0, "record_ttl_s": 60.0},
        "intake": {"eos_min_prob": 1e-6, "eos_floor_prob": 1e-6, "workers": 0},
    })
    procs = Procs(tmp_path)
    try:
        run_to(procs, tmp_path, config, 2, "first")
        assert "rank 1 of 2: training" in (state / "log.txt").read_text()  # the follower trained its shards
        found = read_latest(state / "checkpoints")
        assert found is not None and found[0].name == "step_00000002"
        assert found[2]["optimizer_by_name"] and found[2]["optimizer"]["state"]  # gathered from both ranks
        run_to(procs, tmp_path, config, 3, "again")
        assert "resumed at policy step 2" in (state / "log.txt").read_text()
    finally:
        procs.close()
    metrics = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("kind") != "eval"] == [0, 1, 2]
