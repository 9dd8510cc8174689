"""The peer-to-peer plane behind one small interface: signed DHT records, request/response calls and
binary streams between peers named by their Ed25519 public keys.

A peer's transport identity is derived from its node key, so the peer that answers a call is the key
the caller named, and a handler learns the caller's key from the authenticated connection.

What this module does not know: manifests, shards or the coordinator's logic; `setup_swarm` imports only
the backend `config.backend` names (hivemind and py-libp2p cannot share a process: each defines the
protobuf symbol `crypto.pb.KeyType`).
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import AsyncIterator, Callable

from intellect.protocol.identity import Identity
from intellect.protocol.swarm.addr_book import CIRCUIT, AddrBook, dialable, hints, relay_circuit
from intellect.protocol.swarm.config import SwarmConfig
from intellect.protocol.wire import Envelope

PeerKey = bytes  # 32-byte Ed25519 public key
RequestHandler = Callable[[PeerKey, bytes], bytes]  # sync; runs in a worker thread
StreamHandler = Callable[[PeerKey, bytes], AsyncIterator[bytes]]  # async generator on the swarm's loop


class SwarmError(Exception):
    """A peer could not be reached or broke the stream protocol (retry elsewhere)."""


class SwarmJoinError(SwarmError):
    """No bootstrap peer answered, or the transport daemon did not start; the message says which."""


class RemoteError(SwarmError):
    """The peer answered with a refusal: `code` is short (busy, not_found, bad_request, internal)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code, self.detail = code, detail


class RequestRefused(Exception):
    """Raised by a handler to answer with a RemoteError(code, detail) on the caller's side."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code, detail)
        self.code, self.detail = code, detail


class Swarm(abc.ABC):
    config: SwarmConfig
    identity: Identity
    run_id: str
    stats: Counter  # records_ok, rejected_<reason>, requests_served, handler_errors, ...
    addr_book: AddrBook  # dial hints from peers' signed announcements (addr_book.py)
    reachability = None  # the last check_reachability() answer (reachability.Reachability)

    def remember_addrs(self, peer: PeerKey, addrs: list[str]) -> None:
        """Dial hints `peer` signed about itself; calls to `peer` dial them first (at most every 30 s)."""
        if peer != self.identity.public_key:
            self.addr_book.note(peer, addrs)

    def direct_addrs(self) -> list[str]:
        """The addresses we sign into our announcements for peers to dial: `announce_addrs` if set, else
        our visible direct ones (loopback last); none in client mode or once the dial-back check found us
        behind a NAT or reached only through a relay (nobody could dial them)."""
        if self.config.client_mode:
            return []
        if self.config.announce_addrs:
            return dialable(self.config.announce_addrs)
        if self.reachability is not None and self.reachability.case in ("behind NAT", "relayed"):
            return []
        return dialable(sorted(self.visible_addrs(), key=lambda a: "/127." in a or "/::1/" in a))

    def relay_addrs(self) -> list[str]:
        """The relay circuits we sign into our announcements (`<relay addr>/p2p/<relay id>/p2p-circuit`): none
        unless the dial-back check found us "relayed". The relays are those our visible addresses name
        (py-libp2p lists its reservations), else our bootstrap peers (on hivemind they forward requests to us:
        relay.py)."""
        if self.config.client_mode or self.reachability is None or self.reachability.case != "relayed":
            return []
        held = [a.split(CIRCUIT, 1)[0] for a in self.visible_addrs() if CIRCUIT in a]
        return [c for c in (relay_circuit(a) for a in held or self.config.bootstrap) if c]

    def dial_hints(self) -> list[str]:
        """What our announcements carry for peers to dial us: direct addresses first, then relay circuits."""
        return hints([*self.direct_addrs(), *self.relay_addrs()])

    def rebootstrap_addrs(self) -> list[str]:
        """The bootstrap peers, then the known ones: dialled again when records went missing or stale."""
        return [*self.config.bootstrap, *(a for a in self.addr_book.multiaddrs() if a not in self.config.bootstrap)]

    def check_reachability(self, timeout: float = 20.0):
        """Public (dialled), relayed, behind NAT, client mode or unknown: see `reachability.py`."""
        from intellect.protocol.swarm.reachability import ask_for_dialback

        self.reachability = ask_for_dialback(self, timeout)
        return self.reachability

    def counters(self) -> dict[str, int]:
        """`stats` plus `dht_records_refused`: records our DHT's validator refused to store or to take
        from a lookup (a vandal's junk, replays, plain values), which hostile peers cost us."""
        return {**self.stats, "dht_records_refused": self._dht_records_refused()}

    @abc.abstractmethod
    def _dht_records_refused(self) -> int: ...

    @abc.abstractmethod
    def rebootstrap_soon(self) -> None:
        """Dial the bootstrap peers again, in the background and at most every 15 s: our records may be
        stale or missing because a bootstrap peer (a coordinator on the same key and port) restarted with
        an empty DHT and neither routing table lists the other."""

    @abc.abstractmethod
    def publish(self, key: str, envelope: bytes, ttl_s: float) -> bool:
        """Store our signed envelope under `key` (a name from `keys`), subkey = our public key, for `ttl_s`.
        The answer is a hint: hivemind reports the last replica's reply, and a vandal's storage says no."""

    @abc.abstractmethod
    def read(self, key: str) -> list[Envelope]:
        """Verified envelopes under `key`; anything else is dropped and counted in `stats`."""

    @abc.abstractmethod
    def register_request_handler(self, name: str, fn: RequestHandler, max_request_bytes: int = 65536,
                                 max_in_flight: int = 8) -> None:
        """Answer `name` calls with `fn`. At most `max_in_flight` calls are held at once (a few per caller);
        the rest are refused with `busy` before their request is read, so callers back off and retry."""

    @abc.abstractmethod
    def register_stream_handler(self, name: str, fn: StreamHandler, max_request_bytes: int = 4096) -> None: ...

    @abc.abstractmethod
    def call(self, peer: PeerKey, name: str, request: bytes, timeout: float, max_bytes: int = 1 << 20) -> bytes: ...

    @abc.abstractmethod
    def stream(self, peer: PeerKey, name: str, request: bytes, timeout: float, max_bytes: int) -> bytes:
        """Send `request`, collect the streamed answer (at most `max_bytes`) before `timeout`."""

    @abc.abstractmethod
    def peers(self) -> list[PeerKey]:
        """Peers we are connected to now (those speaking with node keys)."""

    @abc.abstractmethod
    def visible_addrs(self) -> list[str]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


def setup_swarm(config: SwarmConfig, identity: Identity, run_id: str, coordinator_key: bytes) -> Swarm:
    """Start and join a swarm (raises SwarmJoinError naming the bootstrap peers tried)."""
    if config.backend == "libp2p":
        try:
            from intellect.protocol.swarm.libp2p_backend import Libp2pSwarm
        except ImportError as e:
            raise SwarmJoinError(f"swarm.backend = 'libp2p' needs py-libp2p ({e}): pip install "
                                 "'intellect-node[libp2p]'") from None
        return Libp2pSwarm.start(config, identity, run_id, coordinator_key)
    from intellect.protocol.swarm.hivemind_backend import HivemindSwarm

    return HivemindSwarm.start(config, identity, run_id, coordinator_key)


__all__ = ["PeerKey", "RemoteError", "RequestRefused", "Swarm", "SwarmConfig", "SwarmError", "SwarmJoinError",
           "setup_swarm"]
