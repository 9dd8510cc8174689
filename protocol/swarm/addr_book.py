"""Dial hints: the addresses peers sign into their own shard and data announcements, kept per peer key,
so a caller can dial a holder without asking Kademlia where it is: direct ones (`/ip4|ip6/<ip>/tcp/<port>`)
and, for a peer behind a NAT that holds a slot on a relay, relay circuits
(`/ip4|ip6/<ip>/tcp/<port>/p2p/<relay id>/p2p-circuit`: dial the relay there, and through it the signer).

Why: a call names a peer *id* and the transport looks its address up by peer routing. That lookup fails
where go-libp2p does not keep the peer's addresses in its routing tables (measured in network namespaces
on 198.18.0.0/15: "routing: not found" between two public peers, so every byte came from the origin)
and is slow before the tables settle. A holder that announced `/ip4/<ip>/tcp/<port>` is dialled there.

Hostile hints: keys are free, so a hint is only ever used to dial the key that signed it (the transport
handshake proves that key, so a wrong address only fails), only those two forms are kept (a circuit's relay
id must decode to an identity or sha2-256 multihash of a sane length), direct ones first, at most MAX_ADDRS
per peer and MAX_PEERS peers (the least recently heard of go first), and each peer is dialled by hint at
most once every REDIAL_S: a record naming someone else's address (or relay) gets one connection attempt
per reader per REDIAL_S.

What this module does not know: how a backend dials (a circuit included), whether a relay really holds a
slot for the signer, or which peers are worth calling.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

MAX_ADDRS = 4
MAX_PEERS = 1024
REDIAL_S = 30.0
MAX_FILE_BYTES = 1 << 20
DIRECT_ADDR = re.compile(r"^/(ip4|ip6)/([0-9A-Fa-f.:]{2,45})/tcp/([0-9]{1,5})$")
CIRCUIT = "/p2p-circuit"
CIRCUIT_ADDR = re.compile(r"^(/ip[46]/[0-9A-Fa-f.:]{2,45}/tcp/[0-9]{1,5})/p2p/([1-9A-HJ-NP-Za-km-z]{32,64})/p2p-circuit$")
MAX_CIRCUIT_CHARS = 160  # /ip6/<45>/tcp/<5>/p2p/<64>/p2p-circuit is 141
_IDENTITY_MULTIHASH, _SHA256_MULTIHASH = 0x00, 0x12
_MAX_IDENTITY_BYTES = 42  # go-libp2p inlines public keys up to 42 bytes (Ed25519: 36)


def _direct(addr: str) -> bool:
    """`/ip4|ip6/<ip>/tcp/<port>` with a real IP of that version (not unspecified or multicast) and port."""
    match = DIRECT_ADDR.match(addr)
    if match is None or not 0 < int(match.group(3)) < 65536:
        return False
    try:
        ip = ipaddress.ip_address(match.group(2))
    except ValueError:
        return False
    return ip.version == (4 if match.group(1) == "ip4" else 6) and not ip.is_unspecified and not ip.is_multicast


def peer_id_ok(b58: str) -> bool:
    """A base58 libp2p peer id: an identity multihash of at most 42 bytes, or a sha2-256 one."""
    import base58

    try:
        raw = base58.b58decode(b58)
    except ValueError:
        return False
    if len(raw) < 2 or raw[1] != len(raw) - 2:
        return False
    return (raw[0] == _IDENTITY_MULTIHASH and 0 < raw[1] <= _MAX_IDENTITY_BYTES) or \
        (raw[0] == _SHA256_MULTIHASH and raw[1] == 32)


def dialable(addrs: list[str]) -> list[str]:
    """The plain direct TCP addresses among `addrs` (a `/p2p/<id>` tail dropped), deduplicated, at most
    MAX_ADDRS: no relay circuits, DNS names, unspecified or multicast IPs."""
    out: list[str] = []
    for addr in addrs:
        if not isinstance(addr, str) or len(addr) > 256 or CIRCUIT in addr:
            continue
        base = addr.split("/p2p/", 1)[0]
        if _direct(base) and base not in out:
            out.append(base)
    return out[:MAX_ADDRS]


def circuits(addrs: list[str]) -> list[str]:
    """The relay circuits among `addrs`, exactly `<direct address of the relay>/p2p/<relay id>/p2p-circuit`
    (no tail: the signer is the one dialled through it), deduplicated, at most MAX_ADDRS."""
    out: list[str] = []
    for addr in addrs:
        if not isinstance(addr, str) or len(addr) > MAX_CIRCUIT_CHARS:
            continue
        match = CIRCUIT_ADDR.match(addr)
        if match and _direct(match.group(1)) and peer_id_ok(match.group(2)) and addr not in out:
            out.append(addr)
    return out[:MAX_ADDRS]


def hints(addrs: list[str]) -> list[str]:
    """What is kept of a peer's announced addresses: its direct ones, then its relay circuits, at most
    MAX_ADDRS in all."""
    return [*dialable(addrs), *circuits(addrs)][:MAX_ADDRS]


def relay_circuit(bootstrap_addr: str) -> str | None:
    """`/ip4/../tcp/../p2p/<id>` (a bootstrap peer's address) as the circuit through it, or None if it is
    not in that form."""
    circuit = f"{bootstrap_addr.rstrip('/')}{CIRCUIT}"
    return circuit if circuits([circuit]) else None


class AddrBook:
    """Peer key -> its announced dial hints (`hints`: direct addresses first), thread-safe, bounded."""

    def __init__(self) -> None:
        self._addrs: OrderedDict[bytes, list[str]] = OrderedDict()
        self._dialled_at: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def note(self, peer: bytes, addrs: list[str]) -> None:
        """Remember what `peer` signed about itself (the newest note replaces the last)."""
        kept = hints(addrs)
        if not kept:
            return
        with self._lock:
            if self._addrs.get(peer) != kept:
                self._dialled_at.pop(peer, None)  # new addresses: worth a dial at once
            self._addrs[peer] = kept
            self._addrs.move_to_end(peer)
            while len(self._addrs) > MAX_PEERS:
                gone, _ = self._addrs.popitem(last=False)
                self._dialled_at.pop(gone, None)

    def due(self, peer: bytes) -> list[str]:
        """`peer`'s addresses if it was not dialled by hint in the last REDIAL_S (and mark it dialled);
        else nothing."""
        now = time.monotonic()
        with self._lock:
            addrs = self._addrs.get(peer)
            if not addrs or now - self._dialled_at.get(peer, -REDIAL_S) < REDIAL_S:
                return []
            self._dialled_at[peer] = now
            return list(addrs)

    def knows(self, peer: bytes) -> bool:
        with self._lock:
            return peer in self._addrs

    def relayed_only(self, peer: bytes) -> bool:
        """`peer` announced relay circuits and no direct address: reachable, but through a relay."""
        return bool(self.relays_of(peer))

    def relays_of(self, peer: bytes) -> list[str]:
        """The circuits of a relayed-only `peer` (relayed_only), else none."""
        with self._lock:
            addrs = self._addrs.get(peer) or []
            return [] if dialable(addrs) else circuits(addrs)

    def known(self) -> dict[bytes, list[str]]:
        with self._lock:
            return {peer: list(addrs) for peer, addrs in self._addrs.items()}

    def multiaddrs(self, limit: int = 8) -> list[str]:
        """Up to `limit` peers heard of most recently, as `/ip4/../tcp/../p2p/<id>` at the first direct
        address each announced (peers reached only through a relay are left out): what a node re-bootstraps
        from besides its bootstrap peers."""
        import base58

        from intellect.protocol.swarm.framing import peer_id_bytes  # (framing imports this package)

        newest_first = [(peer, direct) for peer, addrs in list(self.known().items())[::-1]
                        if (direct := dialable(addrs))][:limit]
        return [f"{direct[0]}/p2p/{base58.b58encode(peer_id_bytes(peer)).decode()}" for peer, direct in newest_first]

    def save(self, path: Path) -> None:
        """Write the book (newest last) atomically, so a restarted process can dial these peers again."""
        entries = [[peer.hex(), addrs] for peer, addrs in self.known().items()]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)

    def load(self, path: Path) -> int:
        """Add the entries of a saved book (anything malformed is skipped); how many were kept."""
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                return 0
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            return 0
        kept = 0
        for entry in entries if isinstance(entries, list) else []:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
                continue
            try:
                peer = bytes.fromhex(entry[0])
            except (TypeError, ValueError):
                continue
            if len(peer) == 32 and hints(entry[1]):
                self.note(peer, entry[1])
                kept += 1
        return kept
