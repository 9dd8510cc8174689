"""Serving checkpoint shards to peers: the `shard.get` stream protocol, an upload rate limit, and the
origin's super-seeding. Used alike by the coordinator (origin) and by nodes (who re-serve what they hold).

Request: the shard's sha256 as 64 lowercase hex characters, optionally followed by "!" meaning "every
other holder I knew of failed me". Answer: the shard's bytes, or a refusal (not_found, busy, bad_request).
A shard delta (protocol/delta.py) is served the same way, named by its own sha256: to this module it
is one more content-addressed blob in the store.

Super-seeding (BitTorrent's trick for a slow origin): the origin sends each shard to one peer, refuses
("busy") a shard it is sending or has sent in the last `hold_s` seconds, so others take it from peers.
A "!" request skips the hold: a peer that found only bad or dead holders still gets it.

What this module does not know: manifests, or which shards a peer should hold; the caller says which
shards may be served (`allow`), and receivers check every shard against the signed manifest anyway.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator

from intellect.protocol.manifest import ShardStore
from intellect.protocol.messages import ShardEntry
from intellect.protocol.swarm import PeerKey, RequestRefused, Swarm

SHARD_PROTOCOL = "shard.get"
CHUNK_BYTES = 256 * 1024
_REQUEST = re.compile(rb"^([0-9a-f]{64})(!?)$")


class TokenBucket:
    """Async token bucket in bytes; rate None = unlimited. Lives on the swarm's event loop."""

    def __init__(self, rate_bytes_per_s: float | None, burst_bytes: int = CHUNK_BYTES) -> None:
        self.rate = rate_bytes_per_s
        self.burst = max(burst_bytes, CHUNK_BYTES)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, num_bytes: int) -> None:
        if self.rate is None:
            return
        async with self._lock:  # FIFO: uploads share the rate fairly, chunk by chunk
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= num_bytes
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


class ShardServer:
    def __init__(self, store: ShardStore, *, upload_bytes_per_s: float | None = None, super_seed: bool = False,
                 hold_s: float = 10.0, max_streams: int | None = None) -> None:
        self.store = store
        self.super_seed, self.hold_s, self.max_streams = super_seed, hold_s, max_streams
        self._bucket: TokenBucket | None = None
        self._rate = upload_bytes_per_s
        self._allowed: set[str] = set()
        self._inflight: dict[str, PeerKey] = {}
        self._seeded_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.num_served = 0
        self.num_refused = 0

    def attach(self, swarm: Swarm) -> None:
        swarm.register_stream_handler(SHARD_PROTOCOL, self.rpc_get_shard, max_request_bytes=65)

    def allow(self, sha256s: Iterable[str]) -> None:
        with self._lock:
            self._allowed.update(sha256s)

    def disallow(self, sha256s: Iterable[str]) -> None:
        with self._lock:
            self._allowed.difference_update(sha256s)

    async def rpc_get_shard(self, peer: PeerKey, request: bytes) -> AsyncIterator[bytes]:
        match = _REQUEST.match(request)
        if match is None:
            raise RequestRefused("bad_request", "expected a sha256 hex digest")
        sha256, others_failed = match.group(1).decode(), bool(match.group(2))
        self._admit(peer, sha256, others_failed)
        if self._bucket is None:
            self._bucket = TokenBucket(self._rate)
        try:
            for chunk in self._chunks(sha256):
                await self._bucket.take(len(chunk))
                yield chunk
                with self._lock:
                    self.bytes_sent += len(chunk)
            with self._lock:
                self.num_served += 1
                self._seeded_at[sha256] = time.monotonic()
        finally:
            with self._lock:
                if self._inflight.get(sha256) == peer:
                    del self._inflight[sha256]

    def _admit(self, peer: PeerKey, sha256: str, others_failed: bool) -> None:
        with self._lock:
            refusal = None
            if sha256 not in self._allowed or not self.store.has(sha256):
                refusal = ("not_found", "shard not held here")
            elif self.max_streams is not None and len(self._inflight) >= self.max_streams:
                refusal = ("busy", "all upload slots taken")
            elif self.super_seed and not others_failed:
                if sha256 in self._inflight:
                    refusal = ("busy", "being seeded to another peer: fetch it from peers")
                elif time.monotonic() - self._seeded_at.get(sha256, -1e18) < self.hold_s:
                    refusal = ("busy", "already seeded: fetch it from peers")
            if refusal is not None:
                self.num_refused += 1
                raise RequestRefused(*refusal)
            self._inflight[sha256] = peer

    def _chunks(self, sha256: str) -> Iterator[bytes]:
        """The shard's bytes in chunks. Reads come from the page cache in practice; small enough to do inline."""
        try:
            with open(self.store.path(sha256), "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk
        except FileNotFoundError:
            raise RequestRefused("not_found", "shard was pruned") from None


def call_get_shard(swarm: Swarm, peer: PeerKey, entry: ShardEntry, timeout: float, others_failed: bool = False) -> bytes:
    """Fetch one shard's bytes from `peer` (unverified: the caller checks them against the manifest)."""
    request = entry.sha256.encode() + (b"!" if others_failed else b"")
    return swarm.stream(peer, SHARD_PROTOCOL, request, timeout=timeout, max_bytes=entry.size)
