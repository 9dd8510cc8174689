"""Swarm cases that hold on every backend, run against a real pair of swarms on 127.0.0.1: `a` (the
coordinator's key) and `b` (a peer's), b joined through a. Records and their rules, calls, streams,
refusals, in-flight limits, reachability, joining. Backend-specific cases (a vandal speaking the
backend's own DHT, its store-time validator) are in BACKEND_CASES.

`python -m tests.protocol.swarm_cases BACKEND` runs them all in one fresh process and prints one JSON
line: case -> "ok" or the failure, and whether hivemind was imported (the libp2p backend must not be).
This module imports no backend itself.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import traceback

from intellect.protocol.identity import Identity
from intellect.protocol.swarm import (
    RemoteError,
    RequestRefused,
    SwarmConfig,
    SwarmError,
    SwarmJoinError,
    setup_swarm,
)
from intellect.protocol.swarm.keys import manifest_key, shards_key
from intellect.protocol.wire import MessageKind, run_id_for, seal

COORD, PEER, EVIL = Identity.from_seed(b"coord"), Identity.from_seed(b"peer"), Identity.from_seed(b"evil")
RUN = run_id_for(COORD.public_key, "swarm")
RESULT_MARK = "SWARM-CASES "


def announce(identity: Identity, run_id: str = RUN) -> bytes:
    # the record rules read the kind, run and signer, never the body
    return seal(identity, MessageKind.SHARD_ANNOUNCE, run_id, b"\x80")


def senders(swarm, key: str) -> set[bytes]:
    return {e.sender for e in swarm.read(key)}


def wait_for_senders(swarm, key: str, expected: set[bytes], timeout: float = 30.0) -> set[bytes]:
    deadline = time.monotonic() + timeout
    while (found := senders(swarm, key)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_bootstrap(i: int) -> str:
    import base58

    from intellect.protocol.swarm.framing import peer_id_bytes

    pid = base58.b58encode(peer_id_bytes(Identity.from_seed(bytes([i])).public_key)).decode()
    return f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{pid}"


def config(**kwargs) -> SwarmConfig:
    return SwarmConfig(host="127.0.0.1", backend=BACKEND, **kwargs)


BACKEND = "hivemind"  # set by main()
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def records_of_every_writer_are_read_and_foreign_ones_refused(a, b):
    assert b.publish(shards_key(7), announce(PEER), 60)
    assert a.publish(shards_key(7), announce(COORD), 60)
    both = {PEER.public_key, COORD.public_key}
    assert wait_for_senders(a, shards_key(7), both) == both
    assert wait_for_senders(b, shards_key(7), both) == both
    assert not b.publish(manifest_key(7), seal(PEER, MessageKind.POLICY_MANIFEST, RUN, b"\x80"), 60)  # coordinator's
    assert a.read(manifest_key(7)) == []
    try:
        b.publish(shards_key(7), announce(PEER), ttl_s=10**5)  # beyond max_record_ttl_s
        raise AssertionError("a ttl beyond max_record_ttl_s was published")
    except ValueError:
        pass
    assert b.read(shards_key(12345)) == []


@case
def a_late_joiner_reads_every_writer_and_a_departed_peer_does_not_stall_reads(a, b):
    c = setup_swarm(config(bootstrap=a.visible_addrs()), EVIL, RUN, COORD.public_key)
    try:
        b.publish(shards_key(21), announce(PEER), 60)  # the answer is a hint (Swarm.publish): the reads decide
        c.publish(shards_key(21), announce(EVIL), 60)
        both = {PEER.public_key, EVIL.public_key}
        assert wait_for_senders(c, shards_key(21), both) == both
        assert wait_for_senders(b, shards_key(21), both) == both
    finally:
        c.close()
    started = time.monotonic()
    assert PEER.public_key in senders(a, shards_key(21))
    assert time.monotonic() - started < 8, "a read waited on the peer that left"


@case
def calls_streams_and_refusals(a, b):
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

    def refusal(fn, *args, **kwargs) -> BaseException:
        try:
            fn(*args, **kwargs)
        except (RemoteError, SwarmError) as e:
            return e
        raise AssertionError(f"{args[1]} was not refused")

    assert refusal(b.stream, COORD.public_key, "chunks", b"later", timeout=10, max_bytes=10**6).code == "busy"
    assert refusal(b.call, COORD.public_key, "echo", b"y" * 17, timeout=10).code == "too_large"
    assert refusal(b.call, COORD.public_key, "broken", b"", timeout=10).code == "internal"
    assert a.stats["handler_errors"] == 1
    too_long = refusal(b.stream, COORD.public_key, "chunks", b"go", timeout=10, max_bytes=100_000)
    assert not isinstance(too_long, RemoteError) and "exceeds" in str(too_long)
    assert not isinstance(refusal(b.call, COORD.public_key, "no-such-handler", b"", timeout=5), RemoteError)
    assert b.call(COORD.public_key, "echo", b"ok", timeout=10).endswith(b"ko")  # the handler still serves
    assert a.peers() == [PEER.public_key] and COORD.public_key in b.peers()


@case
def requests_beyond_the_in_flight_limit_are_refused_busy(a, b):
    entered, release = threading.Event(), threading.Event()

    def slow(peer, request):
        entered.set()
        release.wait(60)
        return b"done"

    a.register_request_handler("slow", slow, max_request_bytes=16, max_in_flight=1)
    results = []
    first = threading.Thread(target=lambda: results.append(b.call(COORD.public_key, "slow", b"1", timeout=60)))
    first.start()
    try:
        assert entered.wait(30)
        try:  # refused before its (oversized) request is read
            b.call(COORD.public_key, "slow", b"x" * 1000, timeout=30)
            raise AssertionError("a call beyond the limit was served")
        except RemoteError as e:
            assert e.code == "busy" and a.stats["refused_slow_busy"] == 1, (e, a.stats)
    finally:
        release.set()
        first.join(60)
    assert results == [b"done"]
    assert b.call(COORD.public_key, "slow", b"2", timeout=30) == b"done"  # the slot is free again


@case
def a_caller_over_its_call_rate_waits_for_its_refusal(a, b):
    from intellect.protocol.swarm.framing import CALL_BURST_PER_PEER, CALLS_PER_S_PER_PEER, PENALTY_S

    a.register_request_handler("rated", lambda peer, request: b"ok", max_request_bytes=16)
    served, started = 0, time.monotonic()
    while True:  # calls back to back until the first refusal
        sent = time.monotonic()
        try:
            assert b.call(COORD.public_key, "rated", b"", timeout=30) == b"ok"
            served += 1
        except RemoteError as e:
            assert e.code == "busy" and "calls per second" in e.detail, e
            break
        assert served < 10 * CALL_BURST_PER_PEER, "the call rate is not bounded"
    assert CALL_BURST_PER_PEER <= served <= CALL_BURST_PER_PEER + CALLS_PER_S_PER_PEER * (sent - started) + 1
    assert time.monotonic() - sent >= PENALTY_S * 0.9  # held: a hammering caller loops at most this fast
    assert b.call(COORD.public_key, "rated", b"", timeout=30) == b"ok"  # the bucket refilled meanwhile


@case
def reachability_check_finds_a_public_peer(a, b):
    r = b.check_reachability()
    assert r.reachable is True and r.case == "public" and r.line.startswith("public: peers can dial"), r
    started = time.monotonic()  # the throwaway dialler is gone: no lookup may wait on it
    assert b.publish(shards_key(31), announce(PEER), 60) and time.monotonic() - started < 8


@case
def reachability_checks_at_once_all_find_a_public_peer(a, b):
    """The asked peer dials back one caller at a time and answers the others `busy`: a busy peer says
    nothing about us (nodes that joined together were all judged "behind NAT" by their coordinator)."""
    results = [None] * 3

    def check(i: int) -> None:
        results[i] = b.check_reachability(timeout=30.0)

    threads = [threading.Thread(target=check, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.case if r else None for r in results] == ["public"] * 3, [r.line if r else None for r in results]


@case
def join_names_the_bootstrap_peers_it_tried(a, b):
    dead = [dead_bootstrap(i) for i in range(2)]
    try:
        setup_swarm(config(bootstrap=dead, join_timeout_s=3, startup_timeout_s=30), PEER, RUN, COORD.public_key)
        raise AssertionError("joined through dead peers")
    except SwarmJoinError as e:
        assert all(addr in str(e) for addr in dead), e


@case
def join_survives_a_dead_bootstrap_peer(a, b):
    c = setup_swarm(config(bootstrap=[dead_bootstrap(9), *a.visible_addrs()]), EVIL, RUN, COORD.public_key)
    try:
        assert COORD.public_key in c.peers()
    finally:
        c.close()


def libp2p_store_time_validator(a, b):
    """The records a vandal hands py-libp2p's DHT, and why each is refused; select keeps the latest."""
    import msgpack

    from intellect.protocol.swarm.keys import RecordRejected, seal_record
    from intellect.protocol.swarm.libp2p_backend import RunRecordValidator, record_dht_key

    v = RunRecordValidator(RUN, COORD.public_key, max_ttl_s=600)
    now = time.time()

    def value(identity, key, envelope, exp, stored_exp=None):
        return msgpack.packb([stored_exp or exp, seal_record(identity, RUN, key, envelope, exp)], use_bin_type=True)

    def at(key, identity=PEER, run_id=RUN):
        return record_dht_key(run_id, key, identity.public_key_hex)

    ours = value(PEER, shards_key(4), announce(PEER), now + 300)
    assert v.check(at(shards_key(4)), ours) == (shards_key(4), now + 300)
    manifest_by = lambda ident: seal(ident, MessageKind.POLICY_MANIFEST, RUN, b"\x80")
    refused = {
        "wrong_run": (record_dht_key("other-run", shards_key(4), PEER.public_key_hex), ours),
        "bad_record": (at(shards_key(4)), b"junk"),
        "expired": (at(shards_key(4)), value(PEER, shards_key(4), announce(PEER), now - 1)),
        "expires_too_late": (at(shards_key(4)), value(PEER, shards_key(4), announce(PEER), now + 1e6)),
        "bad_record_signature": (at(shards_key(4)), value(PEER, shards_key(4), announce(PEER), now + 300, now + 500)),
        "wrong_key": (at(shards_key(5)), ours),
        "not_allowed": (at(manifest_key(1), EVIL), value(EVIL, manifest_key(1), manifest_by(EVIL), now + 300)),
        "subkey_mismatch": (at(shards_key(4), EVIL), value(EVIL, shards_key(4), announce(PEER), now + 300)),
        "bad_subkey": (f"/intellect/{RUN}/{shards_key(4)}/peer", ours),
    }
    for reason, (key, stored) in refused.items():
        try:
            v.validate(key, stored)
            raise AssertionError(f"{reason}: accepted")
        except RecordRejected as e:
            assert e.reason == reason, (reason, e)
    later = value(PEER, shards_key(4), announce(PEER), now + 400)
    assert v.select(at(shards_key(4)), [ours, later]) == 1 and v.select(at(shards_key(4)), [later, ours]) == 0
    assert v.select(at(shards_key(4)), [b"junk", ours]) == 1


def libp2p_a_vandal_cannot_replace_or_hide_records(a, b):
    """A plain py-libp2p peer that stores anything (no validator) cannot make honest peers store or use
    junk under the run's keys, nor a record of its own under another writer's key."""
    import msgpack
    import multiaddr
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.records.validator import BlankValidator, NamespacedValidator
    from libp2p.tools.anyio_service import background_trio_service

    from intellect.protocol.swarm.keys import RecordRejected, seal_record
    from intellect.protocol.swarm.libp2p_backend import provider_key, record_dht_key

    assert b.publish(shards_key(9), announce(PEER), 60) and a.publish(shards_key(9), announce(COORD), 60)
    now = time.time()
    evil_under_peer = msgpack.packb([now + 1e5, seal_record(EVIL, RUN, shards_key(9), announce(EVIL), now + 1e5)])

    coordinator = info_from_p2p_addr(multiaddr.Multiaddr(a.visible_addrs()[0]))

    async def vandalize() -> None:
        host = new_host(key_pair=create_new_key_pair(EVIL.public_key))
        dht = KadDHT(host, DHTMode.SERVER, validator=NamespacedValidator({"intellect": BlankValidator()}),
                     validator_changed=True)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), background_trio_service(dht):
            await host.connect(coordinator)
            await dht.routing_table.add_peer(coordinator)
            own = host.get_public_key().to_bytes().hex()  # the writer the vandal's provider record names
            for key, stored in ((record_dht_key(RUN, shards_key(9), own), b"junk"),
                                (record_dht_key(RUN, shards_key(9), PEER.public_key_hex), b"junk"),
                                (record_dht_key(RUN, shards_key(9), PEER.public_key_hex), evil_under_peer),
                                (record_dht_key(RUN, shards_key(9), EVIL.public_key_hex), b"junk")):
                with trio.move_on_after(2):  # honest peers reset the stream; the vandal's wait is its own
                    await dht.put_value(key, stored)
            await dht.provide(provider_key(RUN, shards_key(9)))
            for swarm in (a, b):  # read while the vandal is online, answering with what it holds
                began = time.monotonic()
                found[swarm] = await trio.to_thread.run_sync(senders, swarm, shards_key(9))
                assert time.monotonic() - began < 8, "the vandal's answers stalled a read"
            await host.close()

    found = {}
    refused_before = a.counters()["dht_records_refused"] + b.counters()["dht_records_refused"]
    trio.run(vandalize)
    both = {PEER.public_key, COORD.public_key}
    assert found == {a: both, b: both}, found
    refused = a.counters()["dht_records_refused"] + b.counters()["dht_records_refused"]
    assert refused > refused_before, (a.counters(), b.counters())  # the vandal's stores are counted
    try:  # our own DHT refuses junk even from its own process
        a._run(a._dht.put_value, record_dht_key(RUN, shards_key(9), COORD.public_key_hex), b"junk", timeout=10)
        raise AssertionError("junk was stored")
    except RecordRejected as e:
        assert e.reason == "bad_record"


BACKEND_CASES = {"libp2p": {f.__name__: f for f in (libp2p_store_time_validator,
                                                    libp2p_a_vandal_cannot_replace_or_hide_records)}}


def case_names(backend: str) -> list[str]:
    return [*CASES, *BACKEND_CASES.get(backend, {})]


def run_case(fn, a, b) -> str:
    """"ok", or the failure's traceback (for the test to name)."""
    try:
        fn(a, b)
    except BaseException:  # noqa: BLE001 - every failure is reported to the test, which names it
        return traceback.format_exc(limit=6)
    return "ok"


def main(backend: str) -> None:
    global BACKEND
    BACKEND = backend
    results: dict[str, object] = {}
    started = time.monotonic()
    a = setup_swarm(config(), COORD, RUN, COORD.public_key)
    b = setup_swarm(config(bootstrap=a.visible_addrs()), PEER, RUN, COORD.public_key)
    results["startup_s"] = round(time.monotonic() - started, 2)
    try:
        for name, fn in {**CASES, **BACKEND_CASES.get(backend, {})}.items():
            began = time.monotonic()
            results[name] = run_case(fn, a, b)
            results[f"{name}_s"] = round(time.monotonic() - began, 2)
    finally:
        began = time.monotonic()
        b.close()
        a.close()
        results["close_s"] = round(time.monotonic() - began, 2)
    results["hivemind_imported"] = "hivemind" in sys.modules
    print(RESULT_MARK + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
