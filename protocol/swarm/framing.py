"""What both swarm backends share on the wire and at the door, free of any transport library: the
stream framing, the door of a request handler (in-flight and call-rate limits), and the libp2p peer id of a node key.

Stream framing (both directions over one libp2p stream):
  request:  u32 length, bytes
  answer:   frames of u32 length + bytes; u32 0 ends the answer; u32 0xFFFFFFFF, u32 length and a
            utf-8 "code\\ndetail" is a refusal (RemoteError on the caller's side).

What this module does not know: how streams are opened (the backends) or what the bytes mean.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from intellect.protocol.swarm import PeerKey, RemoteError, RequestRefused, SwarmError

END = 0
ERR = 0xFFFFFFFF
MAX_ERROR_BYTES = 1024
REQUEST_READ_TIMEOUT_S = 30.0
MAX_IN_FLIGHT_PER_PEER = 2
CALLS_PER_S_PER_PEER = 4.0  # an honest node submits a batch every few seconds at most
CALL_BURST_PER_PEER = 16
PENALTY_S = 1.0  # a caller over its own limits gets its refusal this much later
MAX_HELD = 256  # refusals held at once, per handler; beyond, refused at once
MAX_TRACKED_PEERS = 4096  # call-rate buckets kept per handler
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
    async for chunk in answer_frames(readexactly, name, peer, max_bytes):
        buf += chunk
    return buf


async def answer_frames(readexactly, name: str, peer: PeerKey, max_bytes: int):
    """read_answer frame by frame, as they arrive (a relay passes them on without holding the answer)."""
    total = 0
    while True:
        size = int.from_bytes(await readexactly(4), "big")
        if size == END:
            return
        if size == ERR:
            length = int.from_bytes(await readexactly(4), "big")
            if length > MAX_ERROR_BYTES:
                raise SwarmError(f"{name}: oversized refusal from {peer.hex()[:12]}")
            code, _, detail = (await readexactly(length)).decode(errors="replace").partition("\n")
            raise RemoteError(code[:64], detail)
        total += size
        if total > max_bytes:
            raise SwarmError(f"{name}: answer from {peer.hex()[:12]} exceeds {max_bytes} bytes")
        yield await readexactly(size)


async def read_request(readexactly, max_request_bytes: int) -> bytes:
    """The handler's side: u32 length, then that many bytes; a length over the limit is refused unread."""
    size = int.from_bytes(await readexactly(4), "big")
    if size > max_request_bytes:
        raise RequestRefused("too_large", f"request of {size} bytes exceeds {max_request_bytes}")
    return await readexactly(size)


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused at the door, and whether its caller is over its own limits (then its
    answer is held for PENALTY_S: a caller that hammers one handler waits, instead of looping on instant
    refusals that each cost the handler's process a stream)."""

    detail: str
    caller_over_limit: bool


class InFlight:
    """Who one request handler lets in: at most `max_total` requests held (read, queued or running), at
    most `max_per_peer` per caller, and per caller at most `calls_per_s` admitted calls sustained
    (`burst` at once; a token bucket). Used on the swarm's event loop only, so plain counters suffice.

    What it does not know: which callers are honest. Keys are free, so a flood from many keys is bounded
    by `max_total`, by the buckets kept (MAX_TRACKED_PEERS) and by what each connection costs its maker."""

    def __init__(self, max_total: int, max_per_peer: int, calls_per_s: float = CALLS_PER_S_PER_PEER,
                 burst: int = CALL_BURST_PER_PEER) -> None:
        if max_total < 1 or max_per_peer < 1 or calls_per_s <= 0 or burst < 1:
            raise ValueError("in-flight limits must be at least 1 and the call rate positive")
        self.max_total, self.max_per_peer = max_total, max_per_peer
        self.calls_per_s, self.burst = calls_per_s, burst
        self.total = 0
        self.held = 0  # refusals waiting out their PENALTY_S
        self._by_peer: Counter = Counter()
        self._tokens: dict[PeerKey, tuple[float, float]] = {}  # peer -> (tokens, when counted)

    def enter(self, peer: PeerKey, now: float | None = None) -> Refusal | None:
        """None: admitted (call `leave` when done); else why not."""
        now = time.monotonic() if now is None else now
        if self._by_peer[peer] >= self.max_per_peer:
            return Refusal(f"{self.max_per_peer} of your requests are in flight: wait for their answers", True)
        tokens = self._tokens_of(peer, now)
        if tokens < 1.0:
            return Refusal(f"more than {self.calls_per_s:g} calls per second: slow down", True)
        if self.total >= self.max_total:
            return Refusal(f"{self.max_total} requests in flight: retry later", False)
        self._tokens[peer] = (tokens - 1.0, now)
        self.total += 1
        self._by_peer[peer] += 1
        return None

    def leave(self, peer: PeerKey) -> None:
        self.total -= 1
        self._by_peer[peer] -= 1
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]

    async def admit(self, peer: PeerKey, sleep) -> None:
        """The door, before a byte of the request is read: returns once admitted (call `leave` when done),
        else raises RequestRefused("busy"), PENALTY_S later for a caller past its own limits while fewer
        than MAX_HELD refusals are held. `sleep(seconds)` is the backend's event loop sleep."""
        refusal = self.enter(peer)
        if refusal is None:
            return
        if refusal.caller_over_limit and self.held < MAX_HELD:
            self.held += 1
            try:
                await sleep(PENALTY_S)
            finally:
                self.held -= 1
        raise RequestRefused("busy", refusal.detail)

    def _tokens_of(self, peer: PeerKey, now: float) -> float:
        if peer not in self._tokens:
            if len(self._tokens) >= MAX_TRACKED_PEERS:  # forget callers whose bucket has refilled
                self._tokens = {p: (t, at) for p, (t, at) in self._tokens.items()
                                if t + (now - at) * self.calls_per_s < self.burst}
            if len(self._tokens) >= MAX_TRACKED_PEERS:
                return 0.0  # every tracked caller is active: a new one waits its turn
            return float(self.burst)
        tokens, at = self._tokens[peer]
        return min(float(self.burst), tokens + (now - at) * self.calls_per_s)


# A peer of the other backend answers the transport handshake but not the DHT, which reads like a dead
# peer after join_timeout_s. Its dial-back handler (every listening peer has one) names it at once.
PROTOCOL_PREFIX = {"hivemind": "intellect.", "libp2p": "/intellect/"}


def backend_mismatch(addr: str, theirs: str, ours: str):
    from intellect.protocol.swarm import SwarmJoinError

    return SwarmJoinError(f"the bootstrap peer {addr} runs swarm.backend = '{theirs}' and this node '{ours}': "
                          f"start it with --backend {theirs} (or swarm.backend = \"{theirs}\"); the run's join "
                          "line and run file name its backend")
