"""Dial hints: the direct addresses peers sign into their own shard and data announcements, kept per
peer key, so a caller can dial a holder without asking Kademlia where it is.

Why: a call names a peer *id* and the transport looks its address up by peer routing. That lookup fails
where go-libp2p does not keep the peer's addresses in its routing tables (measured in network namespaces
on 198.18.0.0/15: "routing: not found" between two public peers, so every byte came from the origin)
and is slow before the tables settle. A holder that announced `/ip4/<ip>/tcp/<port>` is dialled there.

Hostile hints: keys are free, so a hint is only ever used to dial the key that signed it (the transport
handshake proves that key, so a wrong address only fails), only plain `/ip4|ip6/<ip>/tcp/<port>` forms
are kept, at most MAX_ADDRS per peer and MAX_PEERS peers (the least recently heard of go first), and each
peer is dialled by hint at most once every REDIAL_S: a record naming someone else's address gets that
address one connection attempt per reader per REDIAL_S.

What this module does not know: how a backend dials, or which peers are worth calling.
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


def dialable(addrs: list[str]) -> list[str]:
    """The plain direct TCP addresses among `addrs` (a `/p2p/<id>` tail dropped), deduplicated, at most
    MAX_ADDRS: no relay circuits, DNS names, unspecified or multicast IPs."""
    out: list[str] = []
    for addr in addrs:
        if not isinstance(addr, str) or len(addr) > 256 or "/p2p-circuit" in addr:
            continue
        base = addr.split("/p2p/", 1)[0]
        match = DIRECT_ADDR.match(base)
        if match is None or not 0 < int(match.group(3)) < 65536:
            continue
        try:
            ip = ipaddress.ip_address(match.group(2))
        except ValueError:
            continue
        if ip.version != (4 if match.group(1) == "ip4" else 6) or ip.is_unspecified or ip.is_multicast:
            continue
        if base not in out:
            out.append(base)
    return out[:MAX_ADDRS]


class AddrBook:
    """Peer key -> its announced direct addresses, thread-safe, bounded."""

    def __init__(self) -> None:
        self._addrs: OrderedDict[bytes, list[str]] = OrderedDict()
        self._dialled_at: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def note(self, peer: bytes, addrs: list[str]) -> None:
        """Remember what `peer` signed about itself (the newest note replaces the last)."""
        kept = dialable(addrs)
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

    def known(self) -> dict[bytes, list[str]]:
        with self._lock:
            return {peer: list(addrs) for peer, addrs in self._addrs.items()}

    def multiaddrs(self, limit: int = 8) -> list[str]:
        """Up to `limit` peers heard of most recently, as `/ip4/../tcp/../p2p/<id>` at the first address
        each announced: what a node re-bootstraps from besides its bootstrap peers."""
        import base58

        from intellect.protocol.swarm.framing import peer_id_bytes  # (framing imports this package)

        newest_first = list(self.known().items())[::-1][:limit]
        return [f"{addrs[0]}/p2p/{base58.b58encode(peer_id_bytes(peer)).decode()}" for peer, addrs in newest_first]

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
            if len(peer) == 32 and dialable(entry[1]):
                self.note(peer, entry[1])
                kept += 1
        return kept
