"""What both swarm backends share on the wire and at the door, free of any transport library: the
stream framing, the in-flight limits of a request handler, and the libp2p peer id of a node key.

Stream framing (both directions over one libp2p stream):
  request:  u32 length, bytes
  answer:   frames of u32 length + bytes; u32 0 ends the answer; u32 0xFFFFFFFF, u32 length and a
            utf-8 "code\\ndetail" is a refusal (RemoteError on the caller's side).

What this module does not know: how streams are opened (the backends) or what the bytes mean.
"""

from __future__ import annotations

from collections import Counter

from intellect.protocol.swarm import PeerKey, RemoteError, RequestRefused, SwarmError

END = 0
ERR = 0xFFFFFFFF
MAX_ERROR_BYTES = 1024
REQUEST_READ_TIMEOUT_S = 30.0
MAX_IN_FLIGHT_PER_PEER = 2
_ED25519_PUBKEY_PB = b"\x08\x01\x12\x20"  # libp2p PublicKey protobuf: type Ed25519, 32-byte data


def peer_id_bytes(peer: PeerKey) -> bytes:
    """The libp2p PeerID bytes of a node key (identity multihash of the protobuf public key)."""
    if len(peer) != 32:
        raise ValueError("a node key is 32 bytes")
    encoded = _ED25519_PUBKEY_PB + peer
    return b"\x00" + bytes([len(encoded)]) + encoded


def node_key_of_bytes(raw: bytes) -> PeerKey | None:
    """Inverse of peer_id_bytes; None for peers whose libp2p key is not an Ed25519 node key."""
    if len(raw) == 38 and raw[:2] == b"\x00\x24" and raw[2:6] == _ED25519_PUBKEY_PB:
        return raw[6:]
    return None


def refusal_frame(code: str, detail: str) -> bytes:
    message = f"{code}\n{detail}".encode()[:MAX_ERROR_BYTES]
    return ERR.to_bytes(4, "big") + len(message).to_bytes(4, "big") + message


async def read_answer(readexactly, name: str, peer: PeerKey, max_bytes: int) -> bytearray:
    """The caller's side: frames until END (a bytearray: no copy of a shard-sized answer), or RemoteError
    for a refusal, or SwarmError past `max_bytes`. `readexactly(n)` is the backend's exact read."""
    buf = bytearray()
    while True:
        size = int.from_bytes(await readexactly(4), "big")
        if size == END:
            return buf
        if size == ERR:
            length = int.from_bytes(await readexactly(4), "big")
            if length > MAX_ERROR_BYTES:
                raise SwarmError(f"{name}: oversized refusal from {peer.hex()[:12]}")
            code, _, detail = (await readexactly(length)).decode(errors="replace").partition("\n")
            raise RemoteError(code[:64], detail)
        if len(buf) + size > max_bytes:
            raise SwarmError(f"{name}: answer from {peer.hex()[:12]} exceeds {max_bytes} bytes")
        buf += await readexactly(size)


async def read_request(readexactly, max_request_bytes: int) -> bytes:
    """The handler's side: u32 length, then that many bytes; a length over the limit is refused unread."""
    size = int.from_bytes(await readexactly(4), "big")
    if size > max_request_bytes:
        raise RequestRefused("too_large", f"request of {size} bytes exceeds {max_request_bytes}")
    return await readexactly(size)


class InFlight:
    """How many requests one handler holds (read, queued or running), in total and per caller. Used on
    the swarm's event loop only, so plain counters suffice."""

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        if max_total < 1 or max_per_peer < 1:
            raise ValueError("in-flight limits must be at least 1")
        self.max_total, self.max_per_peer = max_total, max_per_peer
        self.total = 0
        self._by_peer: Counter = Counter()

    def enter(self, peer: PeerKey) -> bool:
        if self.total >= self.max_total or self._by_peer[peer] >= self.max_per_peer:
            return False
        self.total += 1
        self._by_peer[peer] += 1
        return True

    def leave(self, peer: PeerKey) -> None:
        self.total -= 1
        self._by_peer[peer] -= 1
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]


# A peer of the other backend answers the transport handshake but not the DHT, which reads like a dead
# peer after join_timeout_s. Its dial-back handler (every listening peer has one) names it at once.
PROTOCOL_PREFIX = {"hivemind": "intellect.", "libp2p": "/intellect/"}


def backend_mismatch(addr: str, theirs: str, ours: str):
    from intellect.protocol.swarm import SwarmJoinError

    return SwarmJoinError(f"the bootstrap peer {addr} runs swarm.backend = '{theirs}' and this node '{ours}': "
                          f"start it with --backend {theirs} (or swarm.backend = \"{theirs}\"); the run's join "
                          "line and run file name its backend")
