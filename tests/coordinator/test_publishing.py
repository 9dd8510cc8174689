"""Publishing a new policy runs off the training loop's critical path (coordinator/publish.PublishQueue):
train_once returns while the policy is still going out, steps go out in order and one at a time, a
RunInfo names a step only once its manifest is stored, a failed publish is logged and tried again,
and close() ends the publishing thread even while it waits to retry.

A real coordinator (tiny model, its swarm on 127.0.0.1, real ledger, trainer and publisher). A slow
publish comes through the real Publisher's `publish`, held at a gate the test opens; what the coordinator
stores in the DHT is recorded through its real swarm's `publish`."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.publish import PublishQueue
from intellect.protocol.messages import RunInfo, decode_body
from intellect.protocol.swarm.keys import manifest_key, run_info_key
from intellect.protocol.wire import MessageKind, open_envelope
from tests.coordinator.batches import accept_a_batch

pytestmark = pytest.mark.slow  # a coordinator with its swarm (~30 s on a busy CPU), shared by the module

PROMPTS, N = 2, 2


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory, tiny_model_path):
    from intellect.coordinator.runner import start_coordinator

    config = CoordinatorConfig(
        state_dir=tmp_path_factory.mktemp("publishing") / "c", run_name="publishing", model=str(tiny_model_path),
        async_level=1, batches_per_step=1, threads=1, shard_size=16_000_000,
        rollouts={"prompts_per_batch": PROMPTS, "completions_per_prompt": N, "max_new_tokens": 8},
        trainer={"lr": 1e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "seq_len": 64},
        swarm={"host": "127.0.0.1", "port": 0, "record_ttl_s": 60.0})
    assert config.publish_in_background  # the default
    c = start_coordinator(config)
    try:
        yield c
    finally:
        c.close()


class Watch:
    """The coordinator's publisher held at a gate (open unless closed by the test), and what its swarm
    stores, in order: ("manifest", step) and ("run_info", latest_policy_step)."""

    def __init__(self, c) -> None:
        self.c = c
        self.gate = threading.Event()
        self.gate.set()
        self.stored: list[tuple[str, int]] = []
        self.started: list[int] = []  # steps handed to the publisher, in order
        self.in_flight = 0
        self.most_in_flight = 0
        self.manifests = {}
        self.fail_manifest_of: set[int] = set()  # the store of these steps' manifests times out, once
        real_publish, real_store = c.publisher.publish, c.swarm.publish

        def publish(checkpoint, step, **kwargs):
            self.started.append(step)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                assert self.gate.wait(120), "the test never opened the gate"
                self.manifests[step] = real_publish(checkpoint, step, **kwargs)
                return self.manifests[step]
            finally:
                self.in_flight -= 1

        def store(key, envelope, ttl_s):
            if key == run_info_key():
                body = open_envelope(envelope, run_id=c.run_id, kinds={MessageKind.RUN_INFO}).body
                self.stored.append(("run_info", decode_body(RunInfo, body).latest_policy_step))
            for step in range(c.latest_policy_step + 2):
                if key == manifest_key(step):
                    if step in self.fail_manifest_of:
                        self.fail_manifest_of.discard(step)
                        raise TimeoutError("DHT store timed out")
                    self.stored.append(("manifest", step))
            return real_store(key, envelope, ttl_s)

        c.publisher.publish, c.swarm.publish = publish, store

    def first(self, record: tuple[str, int]) -> int:
        return self.stored.index(record)

    def close(self) -> None:
        self.gate.set()
        assert self.c.publishing.wait_idle(timeout=120)
        del self.c.publisher.publish, self.c.swarm.publish


@pytest.fixture
def watch(coordinator):
    w = Watch(coordinator)
    try:
        yield w
    finally:
        w.close()


def wait_for(what, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def accept_a_batch_for_the_next_step(c) -> None:
    """One batch (of the policy the step trains: a fake node's key takes each policy step once)."""
    accept_a_batch(c, c.latest_policy_step, c.collect_step, PROMPTS, N, [1, 2, 3], [4, 5, 6], temperature=1.0)


def accept_a_batch_and_train(c) -> dict:
    accept_a_batch_for_the_next_step(c)
    return c.train_once()


def test_train_once_returns_while_the_new_policy_goes_out_and_run_info_follows_the_manifest(coordinator, watch):
    """Before: train_once sharded, stored the manifest and announced inline; held at the gate, it never
    returned."""
    c = coordinator
    step = c.latest_policy_step
    watch.gate.clear()
    trained = threading.Thread(target=accept_a_batch_and_train, args=(c,), daemon=True)
    trained.start()
    trained.join(120)
    assert not trained.is_alive(), "train_once waited for the publish"
    assert c.latest_policy_step == step + 1 and (c.checkpoints / f"step_{step + 1:08d}").is_dir()
    wait_for(lambda: watch.started)  # the publishing thread took the step, and waits at the gate
    # not out yet: nothing names step + 1
    assert c.published_step == step and c.run_info().latest_policy_step == step
    assert watch.started == [step + 1] and ("manifest", step + 1) not in watch.stored
    assert ("run_info", step + 1) not in watch.stored
    c.announce()  # the loop's periodic announce, meanwhile, names the step that is out
    assert watch.stored[-1] == ("run_info", step)

    watch.gate.set()
    assert c.publishing.wait_idle(timeout=120)
    assert c.published_step == step + 1 and c.run_info().latest_policy_step == step + 1
    assert watch.first(("manifest", step + 1)) < watch.first(("run_info", step + 1))
    newest = max(c.swarm.read(run_info_key()), key=lambda e: e.seq)  # what a node reads from the DHT
    assert decode_body(RunInfo, newest.body).latest_policy_step == step + 1


def test_steps_go_out_in_order_one_at_a_time_each_with_deltas_against_the_one_before(coordinator, watch):
    c = coordinator
    first = c.latest_policy_step + 1
    watch.gate.clear()
    opener = threading.Timer(1.0, watch.gate.set)  # a slow publish: the next step's save waits for it
    opener.start()
    for _ in range(3):
        accept_a_batch_and_train(c)
    assert c.publishing.wait_idle(timeout=120)
    steps = list(range(first, first + 3))
    assert watch.started == steps and watch.most_in_flight == 1
    assert [s for kind, s in watch.stored if kind == "manifest"] == steps
    for s in steps:
        assert watch.manifests[s].delta_base_step == s - 1  # the step before was out first
    for i, (kind, s) in enumerate(watch.stored):  # every RunInfo names a step whose manifest is out
        if kind == "run_info" and s >= first:
            assert ("manifest", s) in watch.stored[:i]
    assert c.published_step == c.latest_policy_step == first + 2


def test_a_failed_publish_is_logged_in_words_and_tried_again(coordinator, watch, caplog):
    c = coordinator
    step = c.latest_policy_step + 1
    watch.fail_manifest_of.add(step)
    with caplog.at_level(logging.ERROR, logger="intellect.coordinator.publish"):
        accept_a_batch_and_train(c)
        assert c.publishing.wait_idle(timeout=120)
    assert f"publishing policy step {step} failed (failure 1, trying again in 1 s): TimeoutError: DHT store " \
           "timed out" in caplog.text
    assert c.published_step == step and c.publishing.last_error == ""
    assert watch.started == [step, step]  # the same step again, not the next one
    assert watch.first(("manifest", step)) < watch.first(("run_info", step))


def test_inline_publishing_is_done_when_train_once_returns(coordinator, watch):
    """`publish_in_background = false` (the benchmark's baseline): train_once publishes and announces."""
    c = coordinator
    background = c.publishing
    c.publishing = PublishQueue(c._publish_policy, background=False)
    try:
        step = c.latest_policy_step + 1
        accept_a_batch_and_train(c)
        assert c.published_step == step and ("run_info", step) in watch.stored
    finally:
        c.publishing.close()
        c.publishing = background


def test_run_returns_at_max_steps_only_once_the_last_policy_is_out(coordinator, watch):
    c = coordinator
    last = c.latest_policy_step + 1
    accept_a_batch_for_the_next_step(c)
    watch.gate.clear()
    opener = threading.Timer(2.0, watch.gate.set)
    opener.start()
    c.config = c.config.model_copy(update={"max_steps": last})
    try:
        c.run()
    finally:
        c.config = c.config.model_copy(update={"max_steps": None})
    assert c.latest_policy_step == c.published_step == last and c.publishing.num_pending == 0


def test_close_ends_the_publishing_thread_while_it_waits_to_retry():
    tried = []

    def work(step):
        tried.append(step)
        raise OSError("no route to host")

    queue = PublishQueue(work, background=True, retry_s=600.0)
    queue.put(1)
    queue.put(2)
    wait_for(lambda: tried)
    queue.close(timeout_s=30.0)
    assert not queue._thread.is_alive() and tried == [1] and queue.num_failures == 1
    assert queue.last_error == "OSError: no route to host"


def test_inline_queue_keeps_a_failed_step_first_in_line():
    done, fail = [], [True]

    def work(step):
        if fail and step == 2:
            fail.pop()
            raise TimeoutError("DHT store timed out")
        done.append(step)

    queue = PublishQueue(work, background=False)
    queue.put(1)
    with pytest.raises(TimeoutError):
        queue.put(2)
    assert done == [1] and queue.num_pending == 1
    queue.publish_pending()
    queue.put(3)
    assert done == [1, 2, 3] and queue.num_pending == 0
