"""The forwarding relay of the hivemind backend: how a caller asks a peer to carry one stream to a peer
behind a NAT, and what the relay accepts.

Why not p2pd's circuit relay: hivemind's bundled p2pd (1.1.12) registers a second relay service with
go-libp2p's default limits (128 KiB and 2 min per relayed connection) over the one its flags configure
(`-relayDataLimit`), and which of the two answers depends on start-up timing; measured in network
namespaces, a relayed stream reset after exactly 131 072 bytes. A shard is 50 MB.

So a NATed node's announcements name its bootstrap peers as relays (`<relay>/p2p/<relay id>/p2p-circuit`,
addr_book.py), and a caller that cannot dial it sends the relay one `swarm.relay` request:

    32 bytes  target node key
    u8        length of the stream name, then the name (`intellect.<name>` on the target)
    u32       most answer bytes the caller takes
    rest      the request for the target (at most MAX_INNER_BYTES)

The relay opens the stream to the target over the connection the target holds to it (the target dialled
out through its NAT), and passes the answer on frame by frame (framing.answer_frames), refusals included.

Hostile callers: the relay forwards only to a peer it is connected to now (it dials nobody for anyone),
never to the caller, itself or another `swarm.*` handler, at most MAX_RELAYED_BYTES per answer, within the
in-flight limits of its door. The target sees the relay as its caller, so its per-caller limits count all
relayed callers together. The relay can read and change what it carries: callers use relays only for
content they check by hash (shards, data blobs), as for any other peer.

What this module does not know: how streams are opened (the backend), or whether the target is still
connected when the request arrives.
"""

from __future__ import annotations

import re

from intellect.protocol.swarm import RequestRefused

RELAY_RPC = "swarm.relay"
MAX_INNER_BYTES = 4096
MAX_RELAYED_BYTES = 256 << 20
MAX_REQUEST_BYTES = 32 + 1 + 64 + 4 + MAX_INNER_BYTES
MAX_IN_FLIGHT = 8
STREAM_NAME = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")


def relay_request(target: bytes, name: str, request: bytes, max_bytes: int) -> bytes:
    """What a caller sends the relay to reach `target`'s `name` handler with `request`."""
    if len(target) != 32 or not STREAM_NAME.match(name) or len(request) > MAX_INNER_BYTES:
        raise ValueError("a relayed request names a 32-byte key and a stream, and carries at most 4 KiB")
    return target + bytes([len(name)]) + name.encode() + min(max_bytes, MAX_RELAYED_BYTES).to_bytes(4, "big") + request


def parse_relay_request(data: bytes, caller: bytes, us: bytes) -> tuple[bytes, str, bytes, int]:
    """(target, name, request, max_bytes) of a `swarm.relay` request, or RequestRefused("bad_request")."""
    if len(data) < 32 + 1 + 1 + 4 or len(data) > MAX_REQUEST_BYTES:
        raise RequestRefused("bad_request", "not a relay request")
    target, name_len = data[:32], data[32]
    name_end = 33 + name_len
    name = data[33:name_end].decode("ascii", errors="replace")
    if not STREAM_NAME.match(name) or name.startswith("swarm.") or len(data) < name_end + 4:
        raise RequestRefused("bad_request", "the relay forwards only to a peer's own stream handlers")
    if target in (caller, us):
        raise RequestRefused("bad_request", "the relay does not forward to the caller or to itself")
    max_bytes = int.from_bytes(data[name_end:name_end + 4], "big")
    request = data[name_end + 4:]
    if len(request) > MAX_INNER_BYTES:
        raise RequestRefused("bad_request", f"a relayed request carries at most {MAX_INNER_BYTES} bytes")
    return target, name, request, min(max_bytes, MAX_RELAYED_BYTES)
