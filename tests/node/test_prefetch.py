"""Policies fetched in the background (node/prefetch.py) over a real hivemind swarm in this process: a new
step is downloaded and verified before the loop asks for it, and a failed fetch reaches the loop and is
tried again."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from swarm_harness import sha256_of
from test_fetch import delta_swarm, make_policy_steps  # noqa: F401  (a fixture)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_new_policy_is_fetched_before_the_loop_asks_and_a_failure_is_retried(delta_swarm, tmp_path):  # noqa: F811
    from intellect.node.fetch import ShardUnavailable
    from intellect.node.prefetch import PolicyPrefetch

    steps = make_policy_steps(tmp_path / "policies", num_steps=3)
    fetcher = delta_swarm.node("a")
    announced = [1]  # the run's newest policy step, as the node's read of the signed run info gives it
    fetched: list[int] = []

    def fetch(step: int, timeout_s: float) -> Path:
        fetched.append(step)
        return fetcher.fetch(step, timeout_s=min(timeout_s, 3.0))

    prefetch = PolicyPrefetch(fetch, lambda: announced[0], poll_s=0.2, timeout_s=3.0).start()
    try:
        delta_swarm.publisher.publish(steps[0], 1, shard_size=64 * 1024)
        step, folder = prefetch.get(1, timeout_s=30)
        assert step == 1 and sha256_of(folder / "model.safetensors") == sha256_of(steps[0] / "model.safetensors")

        # The run announces step 2: it is fetched with no one asking, and handed over at once.
        delta_swarm.publisher.publish(steps[1], 2, shard_size=64 * 1024)
        announced[0] = 2
        wait_until(lambda: prefetch.ready_step == 2, 30, "step 2 was not fetched in the background")
        began = time.monotonic()
        step, folder = prefetch.get(2, timeout_s=0.5)
        assert time.monotonic() - began < 0.1
        assert step == 2 and sha256_of(folder / "model.safetensors") == sha256_of(steps[1] / "model.safetensors")
        assert fetched == [1, 2]  # once each: the loop's `get` did not fetch again

        # A step no one publishes: the loop hears why, and the fetch is tried again once it exists.
        with pytest.raises((ShardUnavailable, TimeoutError)):
            prefetch.get(3, timeout_s=20)
        assert prefetch.ready_step == 2
        delta_swarm.publisher.publish(steps[2], 3, shard_size=64 * 1024)
        step, folder = prefetch.get(3, timeout_s=30)
        assert step == 3 and sha256_of(folder / "model.safetensors") == sha256_of(steps[2] / "model.safetensors")
        assert fetched.count(3) >= 2
    finally:
        prefetch.close()
