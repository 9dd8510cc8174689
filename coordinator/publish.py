"""Publish a policy checkpoint through the swarm: shard it into the coordinator's store, sign the
manifest, put it under the run's manifest key for its step, announce that
the origin holds every shard, and serve them (rate-limited, super-seeding so each shard leaves the
origin about once while peers spread it).

When the step before is still published, the manifest also gives each changed shard a delta against
it (protocol/manifest.add_deltas), served like the shards, so nodes holding that step fetch a few
percent of the checkpoint.

Records expire in the DHT, so a background thread republishes the last `cache_steps` steps.

A "jsonl:" task's data file is served the same way (`publish_data`): one blob named by its sha256.

What this module does not know: training; it is handed a checkpoint folder and a step number.
"""

from __future__ import annotations

import hashlib
import logging
import threading
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
                             shard_sha256s=sorted(_blobs(manifest)))
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


def _blobs(manifest: PolicyManifest) -> set[str]:
    """Everything the origin serves for a step: its shards and their deltas."""
    return {s.sha256 for s in manifest.shards} | {d.sha256 for d in manifest_deltas(manifest)}
