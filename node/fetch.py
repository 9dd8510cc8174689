"""Pull a policy checkpoint from the swarm: many peers at once, every shard verified, resumable.

For a policy step the fetcher reads the coordinator-signed manifest (only the run's pinned coordinator
key counts), learns who holds which shards from the peers' signed announcements, downloads missing
shards in parallel (rarest first, least-loaded holder first, non-origin peers before the origin),
checks each against the manifest as it lands, announces and serves it at once, and assembles the
checkpoint folder. Verified shards stay on disk, so a restarted node fetches only what it lacks; a peer
that served bad bytes is dropped for good; timeouts move the shard to another holder.

Deltas: when the manifest gives a shard a delta and the node holds the delta's base (the shard at the
same place of the step before), it fetches the delta instead (checked against its signed hash like a
shard, so a wrong one is a bad peer), rebuilds the shard and checks it against the manifest before
use; after `MAX_DELTA_FAILURES` failed copies, or a delta that does not rebuild, it fetches the whole
shard. Held deltas are announced and served like shards.

Task data (`fetch_data`): a "jsonl:" run's data file, named by its sha256 and size in the signed RunInfo,
is one more blob: fetched from the peers announcing it (`task_data` records), the coordinator last,
checked like a shard, then served, announced and kept for as long as the node runs the task.

What this module does not know: models or engines (it hands back a folder), or how the swarm travels.
"""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from intellect.protocol.delta import DeltaRejected
from intellect.protocol.manifest import (
    ShardRejected,
    ShardStore,
    assemble,
    check_shard,
    delta_entry,
    manifest_deltas,
    manifest_digest,
    missing_shards,
    open_manifest,
    rebuild_shard,
)
from intellect.protocol.messages import (
    DataAnnounce,
    PolicyManifest,
    ShardAnnounce,
    ShardEntry,
    decode_body,
    encode_body,
)
from intellect.protocol.swarm import PeerKey, RemoteError, Swarm, SwarmError
from intellect.protocol.swarm.config import SwarmConfig
from intellect.protocol.swarm.keys import manifest_key, shards_key, task_data_key
from intellect.protocol.swarm.shard_server import ShardServer, call_get_shard
from intellect.protocol.wire import MessageKind, WireRejected, seal

logger = logging.getLogger(__name__)
MAX_DELTA_FAILURES = 2  # bad or failed copies of a delta before the node takes the whole shard
DATA_ORIGIN_ROUNDS = 2  # rounds of peers and a super-seeding origin before asking it with "!"


class ShardUnavailable(Exception):
    """A manifest or shard could not be obtained before the deadline; the message says what was missing."""


@dataclass(frozen=True)
class FetchProgress:
    step: int
    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float
    num_shards_done: int
    num_shards_total: int
    num_sources: int


@dataclass
class FetchTuning:
    """How hard to pull. The defaults suit a home link; tests and benchmarks change them."""

    parallel: int = 4  # shard downloads at once
    per_peer: int = 2  # of them to one peer
    origin_parallel: int = 1  # of them to the origin (others should get shards from peers)
    shard_timeout_s: float = 120.0
    holders_refresh_s: float = 0.25
    origin_only: bool = False  # SHARDCAST-style baseline: ignore peers


@dataclass
class _Job:
    entry: ShardEntry  # the shard this job gets the node
    peer: PeerKey
    others_failed: bool
    blob: ShardEntry  # what it downloads: the shard itself, or its delta
    started: float = field(default_factory=time.monotonic)

    @property
    def is_delta(self) -> bool:
        return self.blob.sha256 != self.entry.sha256


class ShardFetcher:
    def __init__(self, swarm: Swarm, config: SwarmConfig, cache_dir: Path, coordinator_key: bytes, *,
                 tuning: FetchTuning | None = None, progress: Callable[[FetchProgress], None] | None = None,
                 server: ShardServer | None = None) -> None:
        self.swarm, self.config, self.coordinator_key = swarm, config, coordinator_key
        self.tuning = tuning or FetchTuning()
        self.progress = progress
        self.cache_dir = Path(cache_dir)
        self.store = ShardStore(self.cache_dir / "shards")
        self.server = server or ShardServer(self.store, upload_bytes_per_s=config.upload_bytes_per_s)
        self.bad_peers: dict[PeerKey, str] = {}
        self.stats: Counter = Counter()
        self._announce: dict[int, tuple[str, PolicyManifest]] = {}  # step -> (manifest digest, manifest)
        self._data: set[str] = set()  # task data files held and verified: served, announced, never pruned
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        if not config.client_mode:
            self.server.attach(swarm)
        self._announcer = threading.Thread(target=self._announce_loop, name="shard-announcer", daemon=True)
        self._announcer.start()
        for step in self._cached_steps():  # resume: serve and announce what is already on disk
            try:
                manifest, signed = self._manifest_from_disk(step)
            except (OSError, WireRejected):
                continue
            self._follow(step, manifest, signed)

    # ---- manifests --------------------------------------------------------------------------------

    def manifest(self, step: int, wait_s: float = 0.0) -> tuple[PolicyManifest, bytes]:
        """The coordinator-signed manifest of `step` (disk cache first, then the DHT until `wait_s`)."""
        try:
            return self._manifest_from_disk(step)
        except (OSError, WireRejected):
            pass
        deadline = time.monotonic() + wait_s
        while True:
            found = []
            for envelope in self.swarm.read(manifest_key(step)):
                signed = envelope_bytes(envelope)
                try:
                    manifest = self._open(signed)
                except WireRejected as e:
                    self.stats["manifests_rejected"] += 1
                    logger.warning("ignoring manifest for step %s: %s", step, e)
                    continue
                if manifest.policy_step == step:
                    found.append((envelope.seq, manifest, signed))
            if found:
                _, manifest, signed = max(found, key=lambda item: item[0])
                path = self._step_dir(step) / "manifest.signed"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(signed)
                return manifest, signed
            if time.monotonic() >= deadline:
                raise ShardUnavailable(f"no manifest for step {step} signed by the run's coordinator "
                                       f"(rejected so far: {self.stats['manifests_rejected']})")
            time.sleep(0.5)

    def _open(self, signed: bytes) -> PolicyManifest:
        return open_manifest(signed, run_id=self.swarm.run_id, coordinator_key=self.coordinator_key)

    def _manifest_from_disk(self, step: int) -> tuple[PolicyManifest, bytes]:
        signed = (self._step_dir(step) / "manifest.signed").read_bytes()
        return self._open(signed), signed

    # ---- the fetch --------------------------------------------------------------------------------

    def fetch(self, step: int, timeout_s: float = 3600.0) -> Path:
        """Download, verify and assemble the checkpoint of `step`; returns its folder."""
        deadline = time.monotonic() + timeout_s
        manifest, signed = self.manifest(step, wait_s=timeout_s)
        self._follow(step, manifest, signed)
        out = self._step_dir(step) / "checkpoint"
        for _ in range(2):
            self._download(step, manifest, manifest_digest(signed), deadline)
            try:
                assemble(manifest, self._shard_path, out)
                break
            except ShardRejected as e:  # a shard rotted on disk: drop it and fetch it again
                logger.warning("step %s: %s; refetching", step, e)
                self._drop_corrupt(manifest)
        else:
            raise ShardUnavailable(f"step {step}: shards on disk keep failing their hash check")
        self.prune(keep_step=step)
        return out

    def _download(self, step: int, manifest: PolicyManifest, digest: str, deadline: float) -> None:
        pending = {e.sha256: e for e in missing_shards(manifest, self.store)}
        state = _PickState()
        for sha, entry in list(pending.items()):
            if entry.delta is None or not self.store.has(entry.delta.base_sha256):
                continue
            if self.store.has(entry.delta.sha256) and self._rebuild(entry):  # fetched before a restart
                pending.pop(sha)
            else:
                state.deltas[sha] = delta_entry(entry.delta)
        total = sum(e.size for e in manifest.shards)
        done_bytes = total - sum(e.size for e in pending.values())
        started, first_done = time.monotonic(), done_bytes
        jobs: dict[Future, _Job] = {}
        with ThreadPoolExecutor(self.tuning.parallel, thread_name_prefix="shard-fetch") as pool:
            while pending:
                if time.monotonic() > deadline:
                    raise ShardUnavailable(f"step {step}: {len(pending)} shards still missing at the deadline")
                if time.monotonic() - state.refreshed > self.tuning.holders_refresh_s:
                    state.holders = self._holders(step, digest)
                    state.connected = self._connected()
                    state.refreshed = time.monotonic()
                while len(jobs) < self.tuning.parallel:
                    job = self._pick(pending, jobs.values(), state)
                    if job is None:
                        break
                    jobs[pool.submit(call_get_shard, self.swarm, job.peer, job.blob,
                                     self.tuning.shard_timeout_s, job.others_failed)] = job
                if not jobs and time.monotonic() - state.failures_cleared > 2.0:
                    state.failed.clear()  # every holder failed once: give them another chance
                    state.failures_cleared = time.monotonic()
                if not jobs:
                    time.sleep(0.05)
                    continue
                finished, _ = wait(list(jobs), timeout=0.05, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = jobs.pop(future)
                    if self._settle(step, job, future, state):
                        pending.pop(job.entry.sha256, None)
                        done_bytes += job.entry.size
                        self._report(step, manifest, done_bytes, total, first_done, started, state)
            for future in jobs:  # the pool's exit waits for them; their shards are stored if good
                future.cancel()

    def _pick(self, pending: dict[str, ShardEntry], running, state: _PickState) -> _Job | None:
        """Next (shard, peer): rarest shard first from the least-loaded peer; the origin last. A shard
        with a usable delta is looked up, and fetched, by the delta's hash."""
        now = time.monotonic()
        busy = {j.entry.sha256 for j in running}
        load = Counter(j.peer for j in running)
        origin = self.coordinator_key
        usable = [s for s in pending if s not in busy]
        best = None
        if not self.tuning.origin_only:
            for sha in usable:
                peers = [p for p in state.holders.get(state.blob(pending[sha]).sha256, ())
                         if p != origin and self._usable(p, load, state, now) and p not in state.failed[sha]]
                # holders we can reach first: connected, or announced where to dial them (the others
                # may sit behind a NAT, and a dial that cannot succeed holds a download slot until it fails);
                # those reached directly before those reached only through a relay
                peers = ([p for p in peers if self._reachable(p, state, relayed=False)]
                         or [p for p in peers if self._reachable(p, state)] or peers)
                if peers:
                    peer = min(peers, key=lambda p: (load[p], random.random()))
                    key = (len(peers), load[peer], random.random())
                    if best is None or key < best[0]:
                        best = (key, sha, peer)
            if best is not None:
                return _Job(pending[best[1]], best[2], False, state.blob(pending[best[1]]))
        limit = self.tuning.parallel if self.tuning.origin_only else self.tuning.origin_parallel
        if load[origin] >= limit or not self._usable(origin, Counter(), state, now):
            return None
        candidates = [s for s in usable if state.origin_busy_until.get(s, 0) <= now and origin not in state.failed[s]]
        if not candidates:
            return None
        sha = random.choice(candidates)
        blob = state.blob(pending[sha])
        # "every other holder failed me" lifts the origin's super-seeding hold: holders we had no way to
        # reach (behind a NAT, never connected) do not count, or NATed nodes would drain the origin
        others_failed = (any(self._reachable(p, state) for p in state.failed[sha])
                         or any(p in self.bad_peers for p in state.holders.get(blob.sha256, ())))
        return _Job(pending[sha], origin, others_failed, blob)

    def _reachable(self, peer: PeerKey, state: _PickState, relayed: bool = True) -> bool:
        """Connected now, or it announced where to dial it (`relayed`: a relay circuit counts)."""
        book = self.swarm.addr_book
        return peer in state.connected or (book.knows(peer) and (relayed or not book.relayed_only(peer)))

    def _usable(self, peer: PeerKey, load: Counter, state: _PickState, now: float) -> bool:
        return (peer not in self.bad_peers and peer != self.swarm.identity.public_key
                and load[peer] < self.tuning.per_peer and state.cooldown.get(peer, 0) <= now)

    def _settle(self, step: int, job: _Job, future: Future, state: _PickState) -> bool:
        """Store a finished download, or record why it failed. True when the shard is now held."""
        peer, sha, now = job.peer, job.entry.sha256, time.monotonic()
        is_origin = peer == self.coordinator_key
        try:
            data = future.result()
            self.store.put(job.blob, data)
        except ShardRejected as e:
            self.bad_peers[peer] = str(e)
            self.stats["deltas_rejected" if job.is_delta else "shards_rejected"] += 1
            logger.warning("peer %s served a bad %s (%s); dropping it", peer.hex()[:12],
                           "delta" if job.is_delta else "shard", e)
            self._delta_failed(job, state)
            return False
        except RemoteError as e:
            self.stats[f"remote_{e.code}"] += 1
            if e.code == "busy" and is_origin and "slots" in e.detail:  # every upload slot taken
                state.cooldown[peer] = now + random.uniform(0.1, 0.3)
            elif e.code == "busy" and is_origin:  # this shard was seeded to someone: take it from peers
                state.origin_busy_until[sha] = now + random.uniform(0.5, 1.0)
                state.cooldown[peer] = now + random.uniform(0.02, 0.05)
            elif e.code == "busy":
                state.cooldown[peer] = now + random.uniform(0.1, 0.5)
            else:
                state.failed[sha].add(peer)
                self._delta_failed(job, state)
            return False
        except SwarmError as e:
            self.stats["transfer_errors"] += 1
            state.failed[sha].add(peer)
            state.errors[peer] += 1
            state.cooldown[peer] = now + min(30.0, 0.5 * 2 ** state.errors[peer])
            logger.info("shard %s from %s failed: %s", sha[:12], peer.hex()[:12], e)
            self._delta_failed(job, state)
            return False
        state.errors[peer] = 0
        self.stats["bytes_downloaded"] += job.blob.size
        self.stats["bytes_from_origin" if is_origin else "bytes_from_peers"] += job.blob.size
        state.sources.add(peer)
        self.server.allow([job.blob.sha256])
        self._dirty.set()
        if not job.is_delta:
            self.stats["shards_downloaded"] += 1
            return True
        self.stats["delta_bytes"] += job.blob.size
        if self._rebuild(job.entry):
            return True
        self._delta_failed(job, state, give_up=True)
        return False

    def _rebuild(self, entry: ShardEntry) -> bool:
        """Shard = its held base + its held delta, checked against the manifest. False (and the delta
        dropped) when the signed delta does not rebuild the shard: the node then fetches it whole."""
        try:
            rebuild_shard(entry, self.store)
        except (ShardRejected, DeltaRejected) as e:
            self.stats["deltas_unusable"] += 1
            logger.warning("shard %s: its delta does not rebuild it (%s); fetching it whole", entry.sha256[:12], e)
            self.server.disallow([entry.delta.sha256])
            self.store.remove(entry.delta.sha256)
            return False
        self.stats["shards_from_delta"] += 1
        self.server.allow([entry.sha256])
        return True

    def _delta_failed(self, job: _Job, state: _PickState, give_up: bool = False) -> None:
        """Count a failed copy of a delta; past the limit (or at once with `give_up`) fetch the whole shard."""
        if not job.is_delta:
            return
        sha = job.entry.sha256
        state.delta_failures[sha] += 1
        if (give_up or state.delta_failures[sha] >= MAX_DELTA_FAILURES) and state.deltas.pop(sha, None):
            self.stats["delta_fallbacks"] += 1
            state.failed[sha].clear()  # they failed the delta, not the shard

    def _report(self, step, manifest, done_bytes, total, first_done, started, state) -> None:
        if self.progress is None:
            return
        elapsed = max(time.monotonic() - started, 1e-6)
        held = sum(1 for s in manifest.shards if self.store.has(s.sha256))
        self.progress(FetchProgress(step, done_bytes, total, (done_bytes - first_done) / elapsed, held,
                                    len(manifest.shards), len(state.sources)))

    def _holders(self, step: int, digest: str) -> dict[str, list[PeerKey]]:
        holders: dict[str, list[PeerKey]] = defaultdict(list)
        try:
            envelopes = self.swarm.read(shards_key(step))
        except (SwarmError, TimeoutError) as e:
            logger.info("could not read announcements for step %s: %s", step, e)
            return holders
        for envelope in envelopes:
            try:
                announce = decode_body(ShardAnnounce, envelope.body)
            except WireRejected:
                self.stats["announces_rejected"] += 1
                continue
            self.swarm.remember_addrs(envelope.sender, announce.addrs)
            if announce.policy_step != step or announce.manifest_sha256 != digest:
                self.stats["announces_other_manifest"] += 1
                continue
            for sha in announce.shard_sha256s:
                holders[sha].append(envelope.sender)
        return holders

    def _connected(self) -> set[PeerKey]:
        try:
            return set(self.swarm.peers())
        except (SwarmError, TimeoutError):
            return set()

    # ---- task data --------------------------------------------------------------------------------

    def fetch_data(self, entry: ShardEntry, timeout_s: float = 600.0) -> Path:
        """The run's task data file (RunInfo.task_data), checked against its hash and size: from the peers
        that announce it, else the coordinator (which, super-seeding, sends each file about once; after
        DATA_ORIGIN_ROUNDS rounds without a good copy the node says "every other holder failed me").
        A peer that served bad bytes is dropped for good. Returns the file's path in the store."""
        sha = entry.sha256
        if self.holds_data(sha):
            return self.store.path(sha)
        held = self.store.get(sha)
        if held is not None:  # from before a restart: checked again, it may have rotted
            try:
                check_shard(entry, held)
            except ShardRejected:
                self.store.remove(sha)
        deadline = time.monotonic() + timeout_s
        rounds = 0
        while not self.store.has(sha):
            if time.monotonic() > deadline or self._stop.is_set():
                raise ShardUnavailable(f"task data {sha[:12]}: no good copy from any peer or the coordinator "
                                       f"within {timeout_s:.0f} s")
            peers = [p for p in self._data_holders(sha) if p != self.coordinator_key
                     and p not in self.bad_peers and p != self.swarm.identity.public_key]
            random.shuffle(peers)
            for peer in [*peers, self.coordinator_key]:
                if self._fetch_data_from(peer, entry, others_failed=rounds >= DATA_ORIGIN_ROUNDS):
                    break
            else:
                rounds += 1
                self._stop.wait(min(2.0, 0.25 * rounds))
        with self._lock:
            self._data.add(sha)
        self.server.allow([sha])
        self._dirty.set()
        return self.store.path(sha)

    def holds_data(self, sha256: str) -> bool:
        """A task data file fetched and checked since this fetcher started."""
        with self._lock:
            return sha256 in self._data

    def _fetch_data_from(self, peer: PeerKey, entry: ShardEntry, others_failed: bool) -> bool:
        try:
            self.store.put(entry, call_get_shard(self.swarm, peer, entry, self.tuning.shard_timeout_s, others_failed))
        except ShardRejected as e:
            self.bad_peers[peer] = str(e)
            self.stats["data_rejected"] += 1
            logger.warning("peer %s served a bad copy of the task data (%s); dropping it", peer.hex()[:12], e)
            return False
        except RemoteError as e:
            self.stats[f"remote_{e.code}"] += 1
            return False
        except SwarmError as e:
            self.stats["transfer_errors"] += 1
            logger.info("task data from %s failed: %s", peer.hex()[:12], e)
            return False
        self.stats["bytes_from_origin" if peer == self.coordinator_key else "bytes_from_peers"] += entry.size
        self.stats["data_downloaded"] += 1
        return True

    def _data_holders(self, sha: str) -> list[PeerKey]:
        try:
            envelopes = self.swarm.read(task_data_key())
        except (SwarmError, TimeoutError) as e:
            logger.info("could not read task data announcements: %s", e)
            return []
        holders = []
        for envelope in envelopes:
            try:
                announce = decode_body(DataAnnounce, envelope.body)
                self.swarm.remember_addrs(envelope.sender, announce.addrs)
                if sha in announce.sha256s:
                    holders.append(envelope.sender)
            except WireRejected:
                self.stats["announces_rejected"] += 1
        return holders

    # ---- announcing and serving -------------------------------------------------------------------

    def _follow(self, step: int, manifest: PolicyManifest, signed: bytes) -> None:
        self.server.allow(self._held(manifest))
        with self._lock:
            self._announce[step] = (manifest_digest(signed), manifest)
        self._dirty.set()

    def _announce_loop(self) -> None:
        """Publish what we hold per followed step: at once after a change (batched), and before expiry."""
        last_full = 0.0
        while not self._stop.is_set():
            changed = self._dirty.wait(timeout=1.0)
            if self._stop.is_set():
                return
            if not changed and time.monotonic() - last_full < self.config.record_ttl_s / 3:
                continue
            self._dirty.clear()
            last_full = time.monotonic()
            with self._lock:
                followed = list(self._announce.items())
            for step, (digest, manifest) in followed:
                self._publish_announce(step, digest, manifest)
            self._publish_data_announce()
            time.sleep(0.05)  # batch the next few shards into one record

    def _publish_announce(self, step: int, digest: str, manifest: PolicyManifest) -> None:
        if self.config.client_mode:
            return
        shas = self._held(manifest)
        if not shas:
            return
        body = ShardAnnounce(policy_step=step, manifest_sha256=digest, shard_sha256s=shas, addrs=self._direct_addrs())
        envelope = seal(self.swarm.identity, MessageKind.SHARD_ANNOUNCE, self.swarm.run_id, encode_body(body))
        try:
            self.swarm.publish(shards_key(step), envelope, self.config.record_ttl_s)
        except (SwarmError, TimeoutError, OSError) as e:
            logger.info("announce for step %s failed: %s (will retry)", step, e)
            self._dirty.set()

    def _publish_data_announce(self) -> None:
        with self._lock:
            held = sorted(self._data)
        if self.config.client_mode or not held:
            return
        envelope = seal(self.swarm.identity, MessageKind.DATA_ANNOUNCE, self.swarm.run_id,
                        encode_body(DataAnnounce(sha256s=held[:16], addrs=self._direct_addrs())))
        try:
            self.swarm.publish(task_data_key(), envelope, self.config.record_ttl_s)
        except (SwarmError, TimeoutError, OSError) as e:
            logger.info("task data announce failed: %s (will retry)", e)
            self._dirty.set()

    def _direct_addrs(self) -> list[str]:
        """Where peers can dial us (direct addresses, then relay circuits), for our announcements."""
        try:
            return self.swarm.dial_hints()
        except (SwarmError, TimeoutError) as e:
            logger.info("could not list our addresses for the announcement: %s", e)
            return []

    def _held(self, manifest: PolicyManifest) -> list[str]:
        """The manifest's shards and deltas this node holds (and so serves)."""
        wanted = {s.sha256 for s in manifest.shards} | {d.sha256 for d in manifest_deltas(manifest)}
        return sorted(sha for sha in wanted if self.store.has(sha))

    # ---- the cache --------------------------------------------------------------------------------

    def prune(self, keep_step: int | None = None) -> None:
        """Keep the newest `cache_steps` steps (and `keep_step`), then drop the oldest while over the disk cap."""
        steps = self._cached_steps()
        keep = set(steps[-self.config.cache_steps:]) | ({keep_step} if keep_step is not None else set())
        for step in steps:
            if step not in keep:
                self._drop_step(step)
        for step in [s for s in steps if s in keep and s != keep_step]:
            if self._cache_bytes() <= self.config.max_cache_bytes:
                break
            self._drop_step(step)
        referenced = set()
        for step in self._cached_steps():
            try:
                manifest = self._manifest_from_disk(step)[0]
                referenced.update(s.sha256 for s in manifest.shards)
                referenced.update(d.sha256 for d in manifest_deltas(manifest))
            except (OSError, WireRejected):
                continue
        with self._lock:
            referenced |= self._data
        orphans = self.store.held() - referenced
        self.server.disallow(orphans)
        for sha in orphans:
            self.store.remove(sha)

    def _drop_step(self, step: int) -> None:
        with self._lock:
            self._announce.pop(step, None)
        shutil.rmtree(self._step_dir(step), ignore_errors=True)

    def _cache_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.cache_dir.rglob("*") if p.is_file())

    def _cached_steps(self) -> list[int]:
        steps_dir = self.cache_dir / "steps"
        if not steps_dir.is_dir():
            return []
        return sorted(int(p.name) for p in steps_dir.iterdir() if p.name.isdigit())

    def _step_dir(self, step: int) -> Path:
        return self.cache_dir / "steps" / str(int(step))

    def _shard_path(self, sha256: str) -> Path | None:
        return self.store.path(sha256) if self.store.has(sha256) else None

    def _drop_corrupt(self, manifest: PolicyManifest) -> None:
        for entry in manifest.shards:
            data = self.store.get(entry.sha256)
            if data is None:
                continue
            try:
                check_shard(entry, data)
            except ShardRejected:
                self.server.disallow([entry.sha256])
                self.store.remove(entry.sha256)

    def close(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._announcer.join(timeout=5.0)


@dataclass
class _PickState:
    holders: dict[str, list[PeerKey]] = field(default_factory=dict)
    connected: set = field(default_factory=set)  # peers with a connection open now
    refreshed: float = 0.0
    failures_cleared: float = field(default_factory=time.monotonic)
    failed: defaultdict = field(default_factory=lambda: defaultdict(set))  # sha -> peers that failed it
    cooldown: dict[PeerKey, float] = field(default_factory=dict)
    origin_busy_until: dict[str, float] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)
    sources: set = field(default_factory=set)
    deltas: dict[str, ShardEntry] = field(default_factory=dict)  # shard sha -> its delta, while the delta is wanted
    delta_failures: Counter = field(default_factory=Counter)

    def blob(self, entry: ShardEntry) -> ShardEntry:
        """What to download for this shard: its delta while that is wanted, else the shard."""
        return self.deltas.get(entry.sha256, entry)


def envelope_bytes(envelope) -> bytes:
    """Re-encode a verified envelope to the signed bytes it came as (msgpack is canonical here)."""
    import msgpack

    return msgpack.packb([envelope.version, str(envelope.kind), envelope.run_id, envelope.sender, envelope.seq,
                          envelope.timestamp, envelope.body, envelope.signature], use_bin_type=True)
