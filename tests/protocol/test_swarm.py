"""The swarm interface on its hivemind backend: record rules (pure), then real DHT + libp2p daemons on
127.0.0.1 (each swarm here runs its own DHT process and p2pd): records, calls, streams, refusals,
joining and reachability."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter

import pytest

from intellect.protocol.identity import Identity
from intellect.protocol.messages import ShardAnnounce, encode_body
from intellect.protocol.swarm import (
    RemoteError,
    RequestRefused,
    SwarmConfig,
    SwarmError,
    SwarmJoinError,
    setup_swarm,
)
from intellect.protocol.swarm.keys import dht_key, manifest_key, shards_key, verify_record
from intellect.protocol.swarm.shard_server import TokenBucket
from intellect.protocol.wire import MessageKind, run_id_for, seal

COORD, PEER, EVIL = Identity.from_seed(b"coord"), Identity.from_seed(b"peer"), Identity.from_seed(b"evil")
RUN = run_id_for(COORD.public_key, "swarm")


def announce(identity: Identity, run_id: str = RUN) -> bytes:
    body = ShardAnnounce(policy_step=1, manifest_sha256="a" * 64, shard_sha256s=["b" * 64], complete=False)
    return seal(identity, MessageKind.SHARD_ANNOUNCE, run_id, encode_body(body))


def test_record_rules_drop_and_count_everything_not_allowed():
    stats = Counter()

    def check(key, subkey, value):
        return verify_record(key, subkey, value, run_id=RUN, coordinator_key=COORD.public_key, stats=stats)

    manifest_by = lambda ident: seal(ident, MessageKind.POLICY_MANIFEST, RUN, b"\x80")
    assert check(shards_key(1), PEER.public_key_hex, announce(PEER)) is not None
    assert check(manifest_key(1), COORD.public_key_hex, manifest_by(COORD)) is not None
    assert check(manifest_key(1), EVIL.public_key_hex, manifest_by(EVIL)) is None  # only the coordinator
    assert check(shards_key(1), PEER.public_key_hex, announce(EVIL)) is None  # someone else's subkey
    assert check(shards_key(1), PEER.public_key_hex, announce(PEER, run_id="other-run")) is None
    assert check(shards_key(1), PEER.public_key_hex, b"garbage") is None
    assert check(shards_key(1), PEER.public_key_hex, "not bytes") is None
    assert check(manifest_key(1), PEER.public_key_hex, announce(PEER)) is None  # wrong kind for the key
    tampered = bytearray(announce(PEER))
    tampered[-70] ^= 1
    assert check(shards_key(1), PEER.public_key_hex, bytes(tampered)) is None
    assert stats["records_ok"] == 2 and stats["records_rejected"] == 7
    for reason in ("not_allowed", "subkey_mismatch", "wrong_run", "unsigned", "not_bytes", "bad_envelope"):
        assert stats[f"rejected_{reason}"] >= 1, reason
    with pytest.raises(ValueError):
        dht_key(RUN, "nonsense/1")


def test_config_is_validated_and_converts_the_upload_limit():
    assert SwarmConfig(max_upload_mbit=200).upload_bytes_per_s == 25e6
    assert SwarmConfig().upload_bytes_per_s is None
    with pytest.raises(ValueError):
        SwarmConfig(host="localhost")
    with pytest.raises(ValueError):
        SwarmConfig(bootstrap=["127.0.0.1:4000"])


def test_libp2p_peer_id_is_the_node_key():
    from intellect.protocol.swarm.hivemind_backend import libp2p_peer_id, node_key_of

    pid = libp2p_peer_id(PEER.public_key)
    assert pid.to_base58().startswith("12D3KooW")
    assert node_key_of(pid) == PEER.public_key


def test_token_bucket_holds_the_rate():
    async def send(num_bytes: int) -> float:
        bucket = TokenBucket(1e6)  # 8 Mbit/s
        start = time.monotonic()
        for _ in range(num_bytes // 65536):
            await bucket.take(65536)
        return time.monotonic() - start

    assert asyncio.run(send(2 * 2**20)) >= 1.7  # 2 MiB at 1 MB/s, less one burst


@pytest.fixture(scope="module")
def pair():
    a = setup_swarm(SwarmConfig(host="127.0.0.1"), COORD, RUN, COORD.public_key)
    b = setup_swarm(SwarmConfig(host="127.0.0.1", bootstrap=a.visible_addrs()), PEER, RUN, COORD.public_key)
    yield a, b
    b.close()
    a.close()


@pytest.mark.slow
def test_records_are_verified_on_read(pair):
    a, b = pair
    assert b.publish(shards_key(7), announce(PEER), 60)
    assert a.publish(shards_key(7), announce(COORD), 60)
    assert {e.sender for e in a.read(shards_key(7))} == {PEER.public_key, COORD.public_key}
    before = Counter(a.stats)
    # a peer writes a manifest (coordinator only) and a record under another peer's subkey
    assert b.publish(manifest_key(7), seal(PEER, MessageKind.POLICY_MANIFEST, RUN, b"\x80"), 60)
    from hivemind.utils import get_dht_time

    b._dht.store(dht_key(RUN, shards_key(7)), announce(PEER), get_dht_time() + 60, subkey=EVIL.public_key_hex)
    b._dht.store(dht_key(RUN, shards_key(8)), b"not an envelope", get_dht_time() + 60, subkey=PEER.public_key_hex)
    assert a.read(manifest_key(7)) == []
    assert len(a.read(shards_key(7))) == 2
    assert a.read(shards_key(8)) == []
    assert a.stats["rejected_not_allowed"] == before["rejected_not_allowed"] + 1
    assert a.stats["rejected_subkey_mismatch"] == before["rejected_subkey_mismatch"] + 1
    assert a.stats["rejected_unsigned"] == before["rejected_unsigned"] + 1


@pytest.mark.slow
def test_calls_streams_and_refusals(pair):
    a, b = pair
    a.register_request_handler("echo", lambda peer, req: peer + req[::-1], max_request_bytes=16)

    def broken(peer, req):
        raise KeyError("bug")

    a.register_request_handler("broken", broken)

    async def chunks(peer, req):
        if req == b"later":
            raise RequestRefused("busy", "try again")
        for _ in range(8):
            yield b"x" * 100_000

    a.register_stream_handler("chunks", chunks)
    assert b.call(COORD.public_key, "echo", b"abc", timeout=10) == PEER.public_key + b"cba"  # caller authenticated
    assert b.stream(COORD.public_key, "chunks", b"go", timeout=10, max_bytes=800_000) == b"x" * 800_000
    with pytest.raises(RemoteError) as e:
        b.stream(COORD.public_key, "chunks", b"later", timeout=10, max_bytes=10**6)
    assert e.value.code == "busy"
    with pytest.raises(RemoteError) as e:
        b.call(COORD.public_key, "echo", b"y" * 17, timeout=10)
    assert e.value.code == "too_large"
    with pytest.raises(RemoteError) as e:
        b.call(COORD.public_key, "broken", b"", timeout=10)
    assert e.value.code == "internal" and a.stats["handler_errors"] == 1
    with pytest.raises(SwarmError):
        b.stream(COORD.public_key, "chunks", b"go", timeout=10, max_bytes=100_000)  # answer too large
    with pytest.raises(SwarmError):
        b.call(COORD.public_key, "no-such-handler", b"", timeout=5)
    assert b.call(COORD.public_key, "echo", b"ok", timeout=10).endswith(b"ko")  # the handler still serves
    assert a.peers() == [PEER.public_key] and COORD.public_key in b.peers()


@pytest.mark.slow
def test_reachability_check(pair):
    _, b = pair
    r = b.check_reachability()
    assert r.reachable is True, r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_join_names_the_bootstrap_peers_it_tried():
    dead = [f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{_pid(i)}"
            for i in range(2)]
    config = SwarmConfig(host="127.0.0.1", bootstrap=dead, join_timeout_s=3, startup_timeout_s=30)
    with pytest.raises(SwarmJoinError) as e:
        setup_swarm(config, PEER, RUN, COORD.public_key)
    assert all(addr in str(e.value) for addr in dead)


@pytest.mark.slow
def test_join_survives_a_dead_bootstrap_peer(pair):
    a, _ = pair
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{_pid(9)}"
    c = setup_swarm(SwarmConfig(host="127.0.0.1", bootstrap=[dead, *a.visible_addrs()]), EVIL, RUN,
                    COORD.public_key)
    try:
        assert COORD.public_key in c.peers()
    finally:
        c.close()


def _pid(i: int) -> str:
    from intellect.protocol.swarm.hivemind_backend import libp2p_peer_id

    return libp2p_peer_id(Identity.from_seed(bytes([i])).public_key).to_base58()
