"""The node's work loop never dies of one failure, and says so; what no retry can fix ends it with a
reason (for `join` to exit non-zero).

A real `Worker` on a real swarm (hivemind on 127.0.0.1, no coordinator in it: every submission fails
after the short submit timeout), the tiny model's torch engine, and a real signed RunInfo in the DHT.
Faults come from real objects: the math task's data file deleted (and restored), the outbox replaced by
a plain file (what a full or broken disk looks like to `atomic_write`; root ignores read-only modes),
and the swarm's `read` made to raise, once, what hivemind and the vLLM version gate raise."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from intellect.node.config import NodeConfig
from intellect.node.engine import TorchEngineConfig, setup_engine
from intellect.node.status import NodeStatus
from intellect.node.worker import Worker
from intellect.protocol.identity import Identity
from intellect.protocol.messages import SUBMIT_RPC, RunInfo, encode_body
from intellect.protocol.swarm import setup_swarm
from intellect.protocol.swarm.config import SwarmConfig
from intellect.protocol.swarm.keys import run_info_key
from intellect.protocol.tasks import TaskConfig
from intellect.protocol.wire import MessageKind, run_id_for, seal

pytestmark = pytest.mark.slow  # one swarm and one engine shared by the module (~20 s)

COORDINATOR = Identity.from_seed(b"loops-coordinator")
RUN_ID = run_id_for(COORDINATOR.public_key, "loops")


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("loop")
    data = tmp / "math.jsonl"
    data.write_text(json.dumps({"prompt": "Half of one?", "answer": "1/2"}) + "\n")
    # the coordinator's peer only announces the run (it answers no submission)
    announcer = setup_swarm(SwarmConfig(host="127.0.0.1"), COORDINATOR, RUN_ID, COORDINATOR.public_key)
    swarm = None
    try:
        config = NodeConfig(state_dir=tmp / "node", run_id=RUN_ID, coordinator_key=COORDINATOR.public_key_hex,
                            engine=TorchEngineConfig(threads=1, max_batch_size=4),
                            swarm=SwarmConfig(host="127.0.0.1", bootstrap=announcer.visible_addrs()[:2]),
                            submit_timeout_s=2.0, restart_backoff_s=0.2)
        config.state_dir.mkdir()
        identity = Identity.from_seed(b"loops-node")
        swarm = setup_swarm(config.swarm, identity, RUN_ID, COORDINATOR.public_key)
        info = RunInfo(run_id=RUN_ID, run_name="loops", coordinator_peer_id=COORDINATOR.peer_id,
                       task=TaskConfig(name=f"jsonl:{data}"), collect_step=0, latest_policy_step=0, async_level=8,
                       prompts_per_batch=1, completions_per_prompt=2, max_new_tokens=4, temperature=1.0,
                       model_config_hash="0" * 64, eos_token_ids=[2])
        envelope = seal(COORDINATOR, MessageKind.RUN_INFO, RUN_ID, encode_body(info))
        assert announcer.publish(run_info_key(), envelope, ttl_s=600.0)
        engine = setup_engine(config.engine, tiny_model_path)
        yield config, identity, swarm, engine, data, announcer
    finally:
        if swarm is not None:
            swarm.close()
        announcer.close()


def _worker(node) -> Worker:
    config, identity, swarm, engine = node[:4]
    worker = Worker(config, identity, swarm, fetcher=None, status=NodeStatus())
    worker.engine, worker.tokenizer, worker.loaded_step = engine, engine.tokenizer, 0  # policy 0 is loaded
    for old in worker.outbox.glob("*.parquet"):  # batches of an earlier test: never sent (no coordinator)
        old.unlink()
    return worker


def _start(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def _wait_for(what, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _stop(worker: Worker, thread: threading.Thread) -> None:
    worker.stop.set()
    thread.join(30)
    assert not thread.is_alive()


def _once(worker: Worker, exc: BaseException) -> None:
    """The swarm's `read` raises `exc` once, then reads the DHT again."""
    real = worker.swarm.read

    def read(key):
        worker.swarm.read = real
        raise exc

    worker.swarm.read = read


def test_dht_timeout_is_shown_and_the_loop_goes_on(node):
    """Before: a TimeoutError from the DHT (not a WorkError) ended the loop; the process lived on."""
    worker = _worker(node)
    _once(worker, TimeoutError("DHT get timed out"))
    thread = _start(worker)
    try:
        _wait_for(lambda: "DHT get timed out" in worker.status.error)
        assert worker.status.restarts == 1 and thread.is_alive()
        # the next turns read the run info, generate and fail to submit (no coordinator): the loop went on
        _wait_for(lambda: "did not answer" in worker.status.error)
        assert thread.is_alive() and not worker.fatal
    finally:
        _stop(worker, thread)
    assert worker.status.state == "stopped"


def test_disk_failure_is_shown_and_the_loop_goes_on(node):
    """The outbox cannot be written (an OSError, as from a full disk): shown, retried, then it writes."""
    worker = _worker(node)
    shutil.rmtree(worker.outbox)
    worker.outbox.write_text("not a folder")
    thread = _start(worker)
    try:
        _wait_for(lambda: "full or read-only" in worker.status.error)
        assert thread.is_alive()
        worker.outbox.unlink()
        worker.outbox.mkdir()
        _wait_for(lambda: "did not answer" in worker.status.error)  # written, then the send failed
        assert list(worker.outbox.glob("*.parquet")) and thread.is_alive()
    finally:
        _stop(worker, thread)


def test_task_file_gone_after_start_is_retried(node):
    worker = _worker(node)
    data = node[4]
    info = worker.follow_policy()
    worker.generate(info, 0)  # the task loaded once: a missing file from now on is a hiccup
    saved = data.read_bytes()
    data.unlink()
    thread = _start(worker)
    try:
        _wait_for(lambda: "task data cannot be read" in worker.status.error)
        assert thread.is_alive() and not worker.fatal
        data.write_bytes(saved)
        _wait_for(lambda: "did not answer" in worker.status.error)
        assert thread.is_alive()
    finally:
        data.write_bytes(saved)
        _stop(worker, thread)


def test_task_file_missing_at_start_ends_the_loop_with_the_reason(node):
    worker = _worker(node)
    data = node[4]
    saved = data.read_bytes()
    data.unlink()
    try:
        thread = _start(worker)
        thread.join(60)
        assert not thread.is_alive()
    finally:
        data.write_bytes(saved)
    assert "task data cannot be read" in worker.fatal and str(data) in worker.fatal
    assert worker.status.state == "failed" and worker.status.error == worker.fatal


def test_missing_module_ends_the_loop_with_the_reason(node):
    """An ImportError (the vLLM version gate raises one) cannot be retried away: the loop ends and says why.
    Before, it ended silently: `join` kept running, or exited 0."""
    worker = _worker(node)
    _once(worker, ImportError("vllm 0.8.5 is required, found 0.6.0"))
    thread = _start(worker)
    thread.join(60)
    assert not thread.is_alive()
    assert worker.fatal == "a module the node needs is missing: vllm 0.8.5 is required, found 0.6.0"
    assert worker.status.state == "failed" and worker.status.restarts == 0


def test_generation_goes_on_while_a_verdict_is_awaited_and_stays_bounded(node):
    """Before: the loop sent each batch and waited for its verdict before generating the next (a node's
    GPU idled through every validation). Now a submitter thread waits for the verdict (here: a coordinator
    that holds every submission for 30 s) while the loop generates, up to `pipeline_depth` batches
    waiting beside the one being sent, then waits itself."""
    config, identity, swarm, engine, _, announcer = node
    answer = threading.Event()

    def slow_coordinator(peer, request):
        answer.wait(30.0)
        raise RuntimeError("this peer gives no verdicts")

    announcer.register_request_handler(SUBMIT_RPC, slow_coordinator, max_request_bytes=1 << 24)
    worker = _worker((config.model_copy(update={"submit_timeout_s": 30.0, "pipeline_depth": 2}),
                      identity, swarm, engine))
    thread = _start(worker)
    try:
        _wait_for(lambda: len(list(worker.outbox.glob("*.parquet"))) == 3, timeout_s=25.0)
        time.sleep(1.0)  # bounded: no fourth batch while the first still has no verdict
        names = sorted(p.name for p in worker.outbox.glob("*.parquet"))
        assert len(names) == 3 and worker.status.state == "submitting" and worker.status.submitted == 0
        counters = [int(n.split("-")[1]) for n in names]  # policy 0's, carried on from earlier tests
        assert counters == list(range(counters[0], counters[0] + 3))
    finally:
        answer.set()
        _stop(worker, thread)


def test_depth_zero_submits_before_generating_the_next(node):
    config, identity, swarm, engine = node[:4]
    worker = _worker((config.model_copy(update={"pipeline_depth": 0}), identity, swarm, engine))
    thread = _start(worker)
    try:
        _wait_for(lambda: "did not answer" in worker.status.error)
        time.sleep(2.5)  # the resend of the same file fails again; nothing new is generated meanwhile
        assert len(list(worker.outbox.glob("*.parquet"))) == 1
    finally:
        _stop(worker, thread)
