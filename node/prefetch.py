"""Fetch the run's newest policy while the node generates, so a new policy step costs the work loop only
the weight copy into its engine.

A thread of its own asks the swarm for the run's state every `poll_s` seconds; when the run has a newer
policy than the one it fetched last, it downloads, verifies and assembles it (`ShardFetcher.fetch`: every
shard against the coordinator-signed manifest). The loop asks for a step with `get`: the newest fetched
step at or above it is handed over at once, or the thread is told to fetch that step and `get` waits for
it. All policy fetches of a node go through this one thread, so two never race over the same shards.
A failed fetch is kept for `get` to raise (the loop shows it and retries) and tried again on the next
poll.

What this module does not know: how the run's state is read (`read_latest`, the worker's signed
RunInfo), how shards travel or are checked (`ShardFetcher`), or how an engine loads weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

POLL_S = 5.0  # between reads of the run's state: a new policy waits at most this long to start downloading


class PolicyPrefetch:
    def __init__(self, fetch: Callable[[int, float], Path], read_latest: Callable[[], int | None], *,
                 poll_s: float = POLL_S, timeout_s: float = 600.0) -> None:
        self._fetch = fetch  # (step, timeout_s) -> the checkpoint folder; raises when it cannot
        self._read_latest = read_latest  # the run's newest policy step, None when unknown right now
        self.poll_s, self.timeout_s = poll_s, timeout_s
        self._cond = threading.Condition()
        self._wanted = -1  # the newest step anyone asked for or the run announced
        self._ready: tuple[int, Path] | None = None  # the newest step fetched, and its folder
        self._error: tuple[int, Exception] | None = None  # the last failed step, for `get` to raise
        self._failed = False  # the last try failed: wait for the next poll before trying again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="policy-prefetch", daemon=True)

    def start(self) -> PolicyPrefetch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    @property
    def ready_step(self) -> int | None:
        with self._cond:
            return None if self._ready is None else self._ready[0]

    def get(self, step: int, timeout_s: float, stop: threading.Event | None = None) -> tuple[int, Path]:
        """The newest fetched policy at or above `step` and its folder; waits up to `timeout_s` for it.
        Raises the fetch's own error when fetching `step` failed, TimeoutError when it is not there in
        time (or `stop` is set)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if step > self._wanted:
                self._wanted, self._failed = step, False
                self._cond.notify_all()
            while self._ready is None or self._ready[0] < step:
                if self._error is not None and self._error[0] >= step:
                    failed, self._error = self._error, None
                    raise failed[1]
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set() or (stop is not None and stop.is_set()):
                    raise TimeoutError(f"policy step {step} was not fetched within {timeout_s:.0f} s")
                self._cond.wait(min(left, 0.25))  # short waits: `stop` is an Event, it does not notify us
            return self._ready

    def _loop(self) -> None:
        next_poll = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_s
                latest = self._poll()
                with self._cond:
                    self._wanted = max(self._wanted, latest if latest is not None else -1)
                    self._failed = False  # a failed fetch is tried again once per poll
            with self._cond:
                ready = -1 if self._ready is None else self._ready[0]
                if self._wanted <= ready or self._failed:  # nothing to do until a poll or a `get`
                    self._cond.wait(max(0.0, next_poll - time.monotonic()))
                    continue
                step = self._wanted
            self._fetch_one(step)

    def _fetch_one(self, step: int) -> None:
        try:
            folder = self._fetch(step, self.timeout_s)
        except Exception as e:  # noqa: BLE001 -- `get` raises it to the loop; the next poll tries again
            logger.warning("fetching policy step %s in the background failed: %s", step, e)
            with self._cond:
                self._error, self._failed = (step, e), True
                self._cond.notify_all()
            return
        with self._cond:
            if self._ready is None or step > self._ready[0]:
                self._ready = (step, folder)
            if self._error is not None and self._error[0] <= step:
                self._error = None
            self._cond.notify_all()

    def _poll(self) -> int | None:
        try:
            return self._read_latest()
        except Exception as e:  # noqa: BLE001 -- the loop's own read says what is wrong, in words
            logger.debug("reading the run's state for prefetching failed: %s", e)
            return None
