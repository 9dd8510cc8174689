"""Publish a policy checkpoint through the swarm: shard it into the coordinator's store, sign the
manifest, put it under the run's manifest key for its step, announce that
the origin holds every shard, and serve them (rate-limited, super-seeding so each shard leaves the
origin about once while peers spread it).

When the step before is still published, the manifest also gives each changed shard a delta against
it (protocol/manifest.add_deltas), served like the shards, so nodes holding that step fetch a few
percent of the checkpoint.

Records expire in the DHT, so a background thread republishes the last `cache_steps` steps.

`PublishQueue` takes publishing off the training loop's critical path: the loop hands each new step over
and trains on while one thread publishes the steps in order (a delta is against the step before, so
none is skipped or reordered), retrying a failed one until it is out.

A "jsonl:" task's data file is served the same way (`publish_data`): one blob named by its sha256.

What this module does not know: training; it is handed a checkpoint folder and a step number.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from intellect.protocol.identity import Identity
from intellect.protocol.manifest import (
    ShardStore,
    add_deltas,
    manifest_deltas,
    manifest_digest,
    shard_checkpoint,
    sign_manifest,
)
from intellect.protocol.messages import PolicyManifest, ShardAnnounce, ShardEntry, encode_body
from intellect.protocol.model import model_config_hash
from intellect.protocol.swarm import Swarm, SwarmError
from intellect.protocol.swarm.config import SwarmConfig
from intellect.protocol.swarm.keys import manifest_key, shards_key
from intellect.protocol.swarm.shard_server import ShardServer
from intellect.protocol.tasks.math_jsonl import MAX_FILE_BYTES, TaskDataError
from intellect.protocol.wire import MessageKind, seal

logger = logging.getLogger(__name__)


class Publisher:
    def __init__(self, swarm: Swarm, identity: Identity, config: SwarmConfig, state_dir: Path, *,
                 super_seed: bool = True, max_streams: int | None = 2, hold_s: float = 10.0) -> None:
        assert swarm.identity.public_key == identity.public_key, "the origin publishes with the coordinator key"
        self.swarm, self.identity, self.config = swarm, identity, config
        self.store = ShardStore(Path(state_dir) / "shards")
        self.server = ShardServer(self.store, upload_bytes_per_s=config.upload_bytes_per_s,
                                  super_seed=super_seed, max_streams=max_streams, hold_s=hold_s)
        self.server.attach(swarm)
        self._published: dict[int, tuple[bytes, PolicyManifest]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name="manifest-refresh", daemon=True)
        self._refresher.start()

    @property
    def bytes_sent(self) -> int:
        return self.server.bytes_sent

    def publish(self, checkpoint: Path, step: int, *, shard_size: int, config_hash: str | None = None) -> PolicyManifest:
        manifest = shard_checkpoint(checkpoint, self.store, run_id=self.swarm.run_id, policy_step=step,
                                    model_config_hash=config_hash or model_config_hash(checkpoint),
                                    shard_size=shard_size)
        with self._lock:
            base = self._published.get(step - 1)
        if base is not None:
            manifest = add_deltas(manifest, base[1], self.store)
        signed = sign_manifest(self.identity, manifest)
        self.server.allow(_blobs(manifest))
        with self._lock:
            self._published[step] = (signed, manifest)
            for old in sorted(self._published)[:-self.config.cache_steps]:
                self._retire(old)
        self._announce(step, signed, manifest)
        return manifest

    def publish_data(self, path: Path) -> ShardEntry:
        """Serve a task data file as one content-addressed blob; its entry goes in the signed RunInfo, so
        a node checks what any peer hands it against the coordinator's word."""
        if path.stat().st_size > MAX_FILE_BYTES:  # the bound every node's loader applies
            raise TaskDataError(f"{path} is {path.stat().st_size} bytes; task data files are at most {MAX_FILE_BYTES}")
        data = path.read_bytes()
        entry = ShardEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        self.store.put(entry, data)
        self.server.allow([entry.sha256])
        return entry

    def _announce(self, step: int, signed: bytes, manifest: PolicyManifest) -> None:
        ttl = self.config.record_ttl_s
        self.swarm.publish(manifest_key(step), signed, ttl)
        body = ShardAnnounce(policy_step=step, manifest_sha256=manifest_digest(signed),
                             shard_sha256s=sorted(_blobs(manifest)), addrs=self.swarm.direct_addrs())
        self.swarm.publish(shards_key(step),
                           seal(self.identity, MessageKind.SHARD_ANNOUNCE, self.swarm.run_id, encode_body(body)), ttl)

    def _retire(self, step: int) -> None:
        _, manifest = self._published.pop(step)
        live = {sha for _, m in self._published.values() for sha in _blobs(m)}
        gone = _blobs(manifest) - live
        self.server.disallow(gone)
        for sha in gone:
            self.store.remove(sha)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.record_ttl_s / 3):
            with self._lock:
                published = list(self._published.items())
            for step, (signed, manifest) in published:
                try:
                    self._announce(step, signed, manifest)
                except (SwarmError, TimeoutError, OSError) as e:
                    logger.warning("republishing step %s failed: %s", step, e)

    def close(self) -> None:
        self._stop.set()
        self._refresher.join(timeout=5.0)


class PublishQueue:
    """Steps handed over with `put`, each given to `work(step)` (the caller's: publish, then announce) in
    order, one at a time: by a thread of its own (`background`), or inline, in `put` itself.

    A step leaves the queue only when `work` returned. In the background, a failure is logged in plain
    words and the same step is tried again after a backoff (doubling from `retry_s` up to `retry_max_s`);
    inline, it raises to the caller and the step stays first in line for `publish_pending`.
    """

    def __init__(self, work: Callable[[int], None], *, background: bool, retry_s: float = 1.0,
                 retry_max_s: float = 60.0) -> None:
        self._work = work
        self._retry_s, self._retry_max_s = retry_s, retry_max_s
        self._pending: deque[int] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.num_failures = 0  # failed tries so far
        self.last_error = ""  # the last failure in words, until a step goes out
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="policy-publish", daemon=True)
            self._thread.start()

    @property
    def num_pending(self) -> int:
        """Steps handed over and not yet out (the one being published included)."""
        with self._cond:
            return len(self._pending)

    def put(self, step: int) -> None:
        with self._cond:
            assert not self._pending or step > self._pending[-1], f"step {step} handed over after {self._pending[-1]}"
            self._pending.append(step)
            self._cond.notify_all()
        self.publish_pending()

    def publish_pending(self) -> None:
        """Inline: publish every step still pending, oldest first; raises what `work` raised. In the
        background, the thread does that: this returns at once."""
        if self._thread is not None:
            return
        while True:
            with self._cond:
                if not self._pending:
                    return
                step = self._pending[0]
            self._work(step)
            with self._cond:
                self._pending.popleft()

    def wait_idle(self, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Until every step handed over is out (True), or `stop` is set or `timeout` passes (False).
        Inline, it publishes them here and raises what `work` raised."""
        self.publish_pending()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending:
                if (stop is not None and stop.is_set()) or self._closed:
                    return False
                left = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)  # short waits: `stop` is an Event, it does not notify us
        return True

    def _loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                step = self._pending[0]
            try:
                self._work(step)
            except Exception as e:  # the thread outlives any one failure, as the policy loop does
                failures += 1
                self.num_failures += 1
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                backoff = min(self._retry_max_s, self._retry_s * 2 ** (failures - 1))
                network = isinstance(e, (SwarmError, TimeoutError, OSError))  # expected: no traceback
                logger.error("publishing policy step %s failed (failure %s, trying again in %.0f s): %s",
                             step, failures, backoff, self.last_error, exc_info=not network)
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, timeout=backoff)
                continue
            failures, self.last_error = 0, ""
            with self._cond:
                self._pending.popleft()
                self._cond.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop after the step being published (if any); steps still pending are dropped (a restarted
        coordinator publishes its newest checkpoints again). Waits at most `timeout_s`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                logger.warning("a policy step was still being published at close (%.0f s); a restart publishes "
                               "the newest checkpoints again", timeout_s)


def _blobs(manifest: PolicyManifest) -> set[str]:
    """Everything the origin serves for a step: its shards and their deltas."""
    return {s.sha256 for s in manifest.shards} | {d.sha256 for d in manifest_deltas(manifest)}
