"""The coordinator's policy loop never dies of one failure, and says so; what no retry can fix ends the
run with a reason and a non-zero exit.

A real coordinator (tiny model, its swarm on 127.0.0.1, real ledger, trainer and publisher). Faults
come through real objects' methods, since a full disk or a DHT timeout cannot be produced safely on
demand: the swarm's `publish` raises TimeoutError (as hivemind's store does), the trainer's `save`
raises ENOSPC, the trainer raises ImportError; a task data file is missing at start."""

from __future__ import annotations

import errno
import io
import json
import logging
import signal
import threading
import time

import pytest
from rich.console import Console

from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.service import FatalError
from intellect.protocol.swarm.keys import run_info_key
from tests.coordinator.batches import accept_a_batch

pytestmark = pytest.mark.slow  # a coordinator with its swarm (~30 s on a busy CPU), shared by the module

PROMPTS, N = 2, 2


def settings(state_dir, model, **over) -> dict:
    return {
        "state_dir": state_dir, "run_name": "loops", "model": str(model), "async_level": 1, "batches_per_step": 1,
        "threads": 1, "shard_size": 16_000_000,
        "rollouts": {"prompts_per_batch": PROMPTS, "completions_per_prompt": N, "max_new_tokens": 8},
        "trainer": {"lr": 1e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "seq_len": 64},
        "swarm": {"host": "127.0.0.1", "port": 0, "record_ttl_s": 5.0},  # an announce every 1.25 s
    } | over


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory, tiny_model_path):
    from intellect.coordinator.runner import start_coordinator

    c = start_coordinator(CoordinatorConfig(**settings(tmp_path_factory.mktemp("loops") / "c", tiny_model_path)))
    try:
        yield c
    finally:
        c.close()


def _accept_a_batch(c, policy_step: int) -> None:
    """An accepted batch for the train step being collected, as the intake records one."""
    accept_a_batch(c, policy_step, c.collect_step, PROMPTS, N, [1, 2, 3], [4, 5, 6], temperature=1.0)


def _wait_for(what, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_dht_timeout_on_announce_is_shown_and_the_loop_goes_on(coordinator):
    """Before: a TimeoutError from the DHT in announce() ended the loop; the headless process waited forever."""
    from intellect.coordinator.dashboard import metrics_registry, render

    c = coordinator
    real, refused = c.swarm.publish, []

    def publish(key, envelope, ttl_s):
        if key == run_info_key() and len(refused) < 2:
            refused.append(key)
            raise TimeoutError("DHT store timed out")
        return real(key, envelope, ttl_s)

    c.swarm.publish = publish
    thread = threading.Thread(target=c.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: c.loop_errors >= 1)
        assert c.last_error == "TimeoutError: DHT store timed out"
        screen = Console(file=io.StringIO(), width=200)
        screen.print(render(c, {}))
        assert "DHT store timed out (retrying; 1 failed turns)" in screen.file.getvalue()
        _wait_for(lambda: len(refused) == 2 and c.last_error == "")  # the third announce went through
        assert thread.is_alive() and c.loop_errors == 2
        assert metrics_registry(c).get_sample_value("intellect_loop_errors_total") == 2
    finally:
        c.stop.set()
        thread.join(30)
        del c.swarm.publish
        c.stop.clear()
    assert not thread.is_alive()


def test_disk_full_at_checkpoint_is_retried_and_the_step_recorded_once(coordinator, caplog):
    c = coordinator
    _accept_a_batch(c, policy_step=0)
    real, full = c.trainer.save, []

    def save(*args, **kwargs):
        if not full:
            full.append(True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    c.trainer.save = save
    errors_before = c.loop_errors
    c.config = c.config.model_copy(update={"max_steps": 1})
    thread = threading.Thread(target=c.run, daemon=True)
    try:
        with caplog.at_level(logging.ERROR, logger="intellect.coordinator.service"):
            thread.start()
            thread.join(240)
        assert not thread.is_alive()  # max_steps reached: the step was redone after the failure
    finally:
        c.stop.set()
        thread.join(30)
        del c.trainer.save
        c.stop.clear()
    assert full and c.latest_policy_step == 1 and c.loop_errors == errors_before + 1
    assert "No space left on device" in caplog.text
    lines = [json.loads(x) for x in (c.state_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0]  # the failed try's line was dropped; the redo wrote it once
    assert (c.checkpoints / "step_00000001").is_dir()


def test_missing_module_ends_the_loop_with_fatal_error(coordinator):
    c = coordinator
    _accept_a_batch(c, policy_step=1)

    def train_step(samples):
        raise ImportError("No module named 'flash_attn'")

    c.trainer.train_step = train_step
    c.config = c.config.model_copy(update={"max_steps": 2})
    try:
        with pytest.raises(FatalError, match="a module the coordinator needs is missing: No module named 'flash_attn'"):
            c.run()
    finally:
        del c.trainer.train_step


def _no_hang(seconds: int):
    """Fail instead of hanging: the old runner waited forever once its loop thread had died."""
    def alarm(*_):
        raise TimeoutError(f"run_coordinator still running after {seconds} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)


def test_headless_coordinator_exits_non_zero_when_its_loop_cannot_go_on(tmp_path, tiny_model_path, monkeypatch):
    from intellect.coordinator import runner

    started = []

    def start_then_break(config):
        c = real_start(config)
        started.append(c)

        def announce():
            raise ImportError("No module named 'hivemind'")

        c.announce = announce  # the loop's first announce, after the start-up one
        return c

    real_start = runner.start_coordinator
    monkeypatch.setattr(runner, "start_coordinator", start_then_break)
    out = io.StringIO()
    _no_hang(300)
    try:
        with pytest.raises(SystemExit) as exit_info:
            runner.run_coordinator(CoordinatorConfig(**settings(tmp_path / "c", tiny_model_path)), headless=True,
                                   console=Console(file=out, width=200))
    finally:
        signal.alarm(0)
    assert exit_info.value.code == 1
    assert "a module the coordinator needs is missing: No module named 'hivemind'" in out.getvalue()


def test_coordinator_with_missing_task_data_exits_non_zero(tmp_path, tiny_model_path):
    from intellect.coordinator import runner

    missing = tmp_path / "gone.jsonl"
    out = io.StringIO()
    config = CoordinatorConfig(**settings(tmp_path / "c", tiny_model_path, task={"name": f"jsonl:{missing}"}))
    with pytest.raises(SystemExit) as exit_info:
        runner.run_coordinator(config, headless=True, console=Console(file=out, width=200))
    assert exit_info.value.code == 1
    assert "the coordinator cannot start" in out.getvalue() and str(missing) in out.getvalue()
