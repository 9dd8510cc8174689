"""The swarm interface on its hivemind backend: record rules (pure), then real DHT + libp2p daemons on
127.0.0.1 (each swarm here runs its own DHT process and p2pd): records, calls, streams, refusals,
joining and reachability."""

from __future__ import annotations

import asyncio
import importlib.util
import pickle
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intellect.protocol.identity import Identity
from intellect.protocol.messages import RunInfo, ShardAnnounce, decode_body, encode_body
from intellect.protocol.swarm import (
    RequestRefused,
    SwarmConfig,
    SwarmJoinError,
    setup_swarm,
)
from intellect.protocol.swarm.keys import (
    RecordRejected,
    dht_key,
    manifest_key,
    open_record,
    run_info_key,
    seal_record,
    shards_key,
    verify_record,
)
from intellect.protocol.swarm.shard_server import TokenBucket
from intellect.protocol.wire import MessageKind, run_id_for, seal

from .test_fuzz_decoders import mutations

COORD, PEER, EVIL = Identity.from_seed(b"coord"), Identity.from_seed(b"peer"), Identity.from_seed(b"evil")
RUN = run_id_for(COORD.public_key, "swarm")
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def mutated(valid: bytes):
    """A hypothesis strategy of test_fuzz_decoders' mutations: one case per drawn seed."""
    return st.integers(0, 2**32).map(lambda seed: next(mutations(valid, seed=seed, cases=1)))


def announce(identity: Identity, run_id: str = RUN) -> bytes:
    body = ShardAnnounce(policy_step=1, manifest_sha256="a" * 64, shard_sha256s=["b" * 64])
    return seal(identity, MessageKind.SHARD_ANNOUNCE, run_id, encode_body(body))


def record(identity: Identity, key: str, envelope: bytes, expiration: float, run_id: str = RUN) -> bytes:
    return seal_record(identity, run_id, key, envelope, expiration)


def test_record_rules_drop_and_count_everything_not_allowed():
    stats = Counter()
    exp = time.time() + 60

    def check(key, subkey, value, expiration=exp):
        return verify_record(key, subkey, value, expiration, run_id=RUN, coordinator_key=COORD.public_key,
                             stats=stats)

    manifest_by = lambda ident: seal(ident, MessageKind.POLICY_MANIFEST, RUN, b"\x80")
    assert check(shards_key(1), PEER.public_key_hex, record(PEER, shards_key(1), announce(PEER), exp)) is not None
    assert check(manifest_key(1), COORD.public_key_hex, record(COORD, manifest_key(1), manifest_by(COORD), exp))
    refused = {
        "not_allowed": check(manifest_key(1), EVIL.public_key_hex, record(EVIL, manifest_key(1), manifest_by(EVIL), exp)),
        "subkey_mismatch": check(shards_key(1), EVIL.public_key_hex, record(EVIL, shards_key(1), announce(PEER), exp)),
        "wrong_run": check(shards_key(1), PEER.public_key_hex,
                           record(PEER, shards_key(1), announce(PEER, run_id="other-run"), exp)),
        "bad_record": check(shards_key(1), PEER.public_key_hex, b"garbage"),
        "not_bytes": check(shards_key(1), PEER.public_key_hex, "not bytes"),
        "bad_envelope": check(manifest_key(1), PEER.public_key_hex, record(PEER, manifest_key(1), announce(PEER), exp)),
        "wrong_key": check(shards_key(2), PEER.public_key_hex, record(PEER, shards_key(1), announce(PEER), exp)),
        # a valid record of someone else, re-stored under our subkey, or with a later expiration
        "bad_record_signature": check(shards_key(1), EVIL.public_key_hex,
                                      record(PEER, shards_key(1), announce(PEER), exp), exp + 1e6),
        "bad_subkey": check(shards_key(1), "peer", record(PEER, shards_key(1), announce(PEER), exp)),
    }
    tampered = bytearray(announce(PEER))
    tampered[-70] ^= 1
    refused["unsigned"] = check(shards_key(1), PEER.public_key_hex, record(PEER, shards_key(1), bytes(tampered), exp))
    assert all(v is None for v in refused.values()), refused
    assert stats["records_ok"] == 2 and stats["records_rejected"] == len(refused)
    for reason in refused:
        assert stats[f"rejected_{reason}"] == 1, (reason, stats)
    for bad in ("nonsense/1", "run_info/1", "manifest", "manifest/01", "manifest/-1", "shards/1/2"):
        with pytest.raises(ValueError):
            dht_key(RUN, bad)


def test_store_time_validator_takes_only_our_sealed_records():
    """The records exactly as hivemind hands them to a validator on a store or a find: key as its DHTID
    bytes, subkey and value msgpack-serialized, the expiration beside them."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer, get_dht_time

    from intellect.protocol.swarm.hivemind_backend import RunRecordValidator
    from intellect.protocol.tasks.config import TaskConfig

    validator = RunRecordValidator(RUN, COORD.public_key, max_ttl_s=600)
    now = get_dht_time()

    def as_stored(key: str, subkey, value, expiration: float, run_id: str = RUN) -> DHTRecord:
        return DHTRecord(DHTID.generate(source=dht_key(run_id, key)).to_bytes(), MSGPackSerializer.dumps(subkey),
                         MSGPackSerializer.dumps(value), expiration)

    info = RunInfo(run_id=RUN, run_name="swarm", coordinator_peer_id=COORD.peer_id,
                   task=TaskConfig(name="arithmetic"), collect_step=3, latest_policy_step=3, async_level=1,
                   prompts_per_batch=1, completions_per_prompt=2, max_new_tokens=8, temperature=1.0,
                   model_config_hash="c" * 64, eos_token_ids=[2])
    run_info = seal(COORD, MessageKind.RUN_INFO, RUN, encode_body(info))
    ours = record(COORD, run_info_key(), run_info, now + 300)
    assert validator.validate(as_stored(run_info_key(), COORD.public_key_hex, ours, now + 300))
    assert validator.validate(as_stored(shards_key(4), PEER.public_key_hex,
                                        record(PEER, shards_key(4), announce(PEER), now + 300), now + 300))
    key_id = DHTID.generate(source=dht_key(RUN, run_info_key())).to_bytes()
    evil_info = record(EVIL, run_info_key(), seal(EVIL, MessageKind.RUN_INFO, RUN, encode_body(info)), now + 300)
    refused = {  # what a vandal stores -> why it is refused
        "bad_record": as_stored(run_info_key(), COORD.public_key_hex, b"junk", now + 300),
        "no_subkey": DHTRecord(key_id, MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(b"junk"), now + 1e9),
        "not_allowed": as_stored(run_info_key(), EVIL.public_key_hex, evil_info, now + 300),
        "expires_too_late": as_stored(run_info_key(), COORD.public_key_hex,
                                      record(COORD, run_info_key(), run_info, now + 1e6), now + 1e6),
        "bad_record_signature": as_stored(run_info_key(), COORD.public_key_hex, ours, now + 500),  # forged expiration
        "wrong_key": DHTRecord(DHTID.generate(source=dht_key(RUN, manifest_key(1))).to_bytes(),
                               MSGPackSerializer.dumps(COORD.public_key_hex), MSGPackSerializer.dumps(ours), now + 300),
        "wrong_run": as_stored(run_info_key(), COORD.public_key_hex, record(
            COORD, run_info_key(), seal(COORD, MessageKind.RUN_INFO, "other", encode_body(info)), now + 300), now + 300),
        "bad_subkey": as_stored(run_info_key(), 7, ours, now + 300),
    }
    for reason, bad in refused.items():
        assert not validator.validate(bad), reason
        with pytest.raises(RecordRejected) as e:
            validator.check(bad)
        assert e.value.reason == reason
    plain_ours = DHTRecord(key_id, MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(ours), now + 300)
    ext_type = DHTRecord(key_id, MSGPackSerializer.dumps(COORD.public_key_hex), b"\xd4\x01\x00", now + 300)
    assert not validator.validate(plain_ours) and not validator.validate(ext_type)
    assert pickle.loads(pickle.dumps(validator)).validate(as_stored(run_info_key(), COORD.public_key_hex, ours,
                                                                    now + 300))  # crosses to the DHT process


VALID_EXPIRATION = 1.9e9
VALID_RECORD = seal_record(PEER, RUN, shards_key(3), announce(PEER), VALID_EXPIRATION)


@FUZZ
@given(data=mutated(VALID_RECORD))
def test_a_changed_record_is_refused_or_means_the_same(data):
    def opened(value):
        name, envelope = open_record(value, subkey=PEER.public_key_hex, expiration=VALID_EXPIRATION, run_id=RUN,
                                     coordinator_key=COORD.public_key, max_expiration=None)
        return name, envelope.digest()

    try:
        result = opened(data)
    except RecordRejected:
        return
    assert result == opened(VALID_RECORD)


@FUZZ
@given(key=st.binary(max_size=24), subkey=st.one_of(st.binary(max_size=80), st.just(b"\xc0")),
       value=st.one_of(st.binary(max_size=300), mutated(VALID_RECORD).map(lambda v: b"\xc5" + len(v).to_bytes(2, "big") + v)),
       expiration=st.floats(allow_nan=True, allow_infinity=True))
def test_the_validator_answers_any_record_without_raising(key, subkey, value, expiration):
    from hivemind.dht.validation import DHTRecord

    from intellect.protocol.swarm.hivemind_backend import RunRecordValidator

    verdict = RunRecordValidator(RUN, COORD.public_key, 600).validate(DHTRecord(key, subkey, value, expiration))
    assert verdict is False  # random keys never hash to a run key, so nothing here may pass


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
def test_records_are_checked_when_stored(pair):
    """What our DHT refuses to store, even from its own process, and what a plain hivemind peer (no
    validator, no key of the run) cannot do to the records of honest peers: hide them behind a plain value
    with a far expiration (which blocks every later subkey store), or replace them with junk."""
    import hivemind
    from hivemind.utils import get_dht_time

    a, b = pair
    assert b.publish(shards_key(7), announce(PEER), 60)
    assert a.publish(shards_key(7), announce(COORD), 60)
    assert {e.sender for e in a.read(shards_key(7))} == {PEER.public_key, COORD.public_key}
    assert not b.publish(manifest_key(7), seal(PEER, MessageKind.POLICY_MANIFEST, RUN, b"\x80"), 60)  # coordinator's
    assert a.read(manifest_key(7)) == []
    with pytest.raises(ValueError):
        b.publish(shards_key(7), announce(PEER), ttl_s=10**5)  # beyond max_record_ttl_s
    now = get_dht_time()
    refused = b.counters()["dht_records_refused"]
    assert not b._dht.store(dht_key(RUN, shards_key(7)), announce(PEER), now + 60, subkey=PEER.public_key_hex)
    assert not b._dht.store(dht_key(RUN, shards_key(8)), b"junk", now + 60)
    assert b.counters()["dht_records_refused"] >= refused + 2  # counted in the DHT's process, read here

    vandal = hivemind.DHT(initial_peers=a.visible_addrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        for step in (7, 9):
            key = dht_key(RUN, shards_key(step))
            vandal.store(key, b"junk", now + 1e9)  # a plain value: today it blocks every later subkey store
            vandal.store(key, b"junk", now + 1e9, subkey=PEER.public_key_hex)
            vandal.store(key, announce(EVIL), now + 1e9, subkey=EVIL.public_key_hex)
        # not asserted: hivemind reports the answer of the last replica to reply, which may be the vandal's no
        b.publish(shards_key(9), announce(PEER), 60)
        a.publish(shards_key(9), announce(COORD), 60)
        for step in (7, 9):
            assert {e.sender for e in a.read(shards_key(step))} == {PEER.public_key, COORD.public_key}
            assert {e.sender for e in b.read(shards_key(step))} == {PEER.public_key, COORD.public_key}
    finally:
        vandal.shutdown()


def run_info_envelope(step: int) -> bytes:
    from intellect.protocol.tasks.config import TaskConfig

    info = RunInfo(run_id=RUN, run_name="swarm", coordinator_peer_id=COORD.peer_id,
                   task=TaskConfig(name="arithmetic"), collect_step=step, latest_policy_step=step,
                   async_level=1, prompts_per_batch=1, completions_per_prompt=2, max_new_tokens=8, temperature=1.0,
                   model_config_hash="c" * 64, eos_token_ids=[2])
    return seal(COORD, MessageKind.RUN_INFO, RUN, encode_body(info))


@pytest.mark.slow
def test_a_node_never_follows_an_older_run_info(pair, tmp_path):
    """An old, genuinely signed RunInfo that wins in the DHT (here: re-published with a later expiration)
    must not take a node back to an old collect step."""
    from intellect.node.config import NodeConfig
    from intellect.node.status import NodeStatus
    from intellect.node.worker import Worker

    a, b = pair
    old, new = run_info_envelope(2), run_info_envelope(5)
    worker = Worker(NodeConfig(state_dir=tmp_path, run_id=RUN, coordinator_key=COORD.public_key_hex), PEER, b,
                    fetcher=None, status=NodeStatus())
    assert a.publish(run_info_key(), new, 60)
    assert worker.follow_policy().collect_step == 5
    assert a.publish(run_info_key(), old, 120)  # the later expiration wins in the DHT
    assert [decode_body(RunInfo, e.body).collect_step for e in b.read(run_info_key())] == [2]
    assert worker.follow_policy().collect_step == 5 and worker.status.collect_step == 5
    assert a.publish(run_info_key(), run_info_envelope(6), 180)
    assert worker.follow_policy().collect_step == 6


def test_in_flight_counts_per_handler_and_per_caller():
    from intellect.protocol.swarm.framing import InFlight

    limit = InFlight(max_total=3, max_per_peer=2)
    assert limit.enter(b"p") is None and limit.enter(b"p") is None
    assert limit.enter(b"p").caller_over_limit  # a caller's share: its refusal is held
    assert limit.enter(b"q") is None
    full = limit.enter(b"r")
    assert full is not None and not full.caller_over_limit  # the handler's: refused at once
    limit.leave(b"p")
    assert limit.enter(b"r") is None and limit.total == 3


def test_in_flight_bounds_each_callers_call_rate():
    from intellect.protocol.swarm.framing import InFlight

    limit = InFlight(max_total=100, max_per_peer=100, calls_per_s=2.0, burst=4)
    for _ in range(4):
        assert limit.enter(b"p", now=10.0) is None
        limit.leave(b"p")
    slow_down = limit.enter(b"p", now=10.0)
    assert slow_down.caller_over_limit and "calls per second" in slow_down.detail
    assert limit.enter(b"q", now=10.0) is None  # another caller has its own bucket
    assert limit.enter(b"p", now=10.4) is not None and limit.enter(b"p", now=10.5) is None  # 2 per second
    assert limit.enter(b"p", now=10.6) is not None


def test_in_flight_forgets_idle_callers_and_bounds_the_rest(monkeypatch):
    from intellect.protocol.swarm import framing

    monkeypatch.setattr(framing, "MAX_TRACKED_PEERS", 3)
    limit = framing.InFlight(max_total=100, max_per_peer=100, calls_per_s=1.0, burst=2)
    for p in (b"a", b"b", b"c"):
        assert limit.enter(p, now=0.0) is None
    assert limit.enter(b"d", now=0.0).caller_over_limit  # three active buckets: a new caller waits
    assert limit.enter(b"d", now=5.0) is None  # the others' buckets refilled: forgotten, room again
    assert len(limit._tokens) == 1


def test_held_refusals_are_bounded(monkeypatch):
    """Two refusals of a caller past its share are held; a third is answered at once; once the held
    ones are answered, the next is held again."""
    from intellect.protocol.swarm import RequestRefused, framing

    monkeypatch.setattr(framing, "MAX_HELD", 2)
    limit = framing.InFlight(max_total=1, max_per_peer=1)
    assert limit.enter(b"p") is None  # p's one request is in flight: more from p are past its share

    async def main():
        release = asyncio.Event()

        async def sleep(_seconds):  # the penalty lasts until released
            await release.wait()

        async def refused():
            with pytest.raises(RequestRefused, match="in flight"):
                await limit.admit(b"p", sleep)

        held = [asyncio.create_task(refused()) for _ in range(2)]
        await asyncio.sleep(0)
        assert limit.held == 2
        await asyncio.wait_for(refused(), 5)  # the third is not held: it would wait for `release`
        release.set()
        await asyncio.gather(*held)
        assert limit.held == 0
        release.clear()
        again = asyncio.create_task(refused())
        await asyncio.sleep(0)
        assert limit.held == 1
        release.set()
        await again

    asyncio.run(main())


@pytest.mark.slow
def test_a_busy_coordinator_leaves_the_batch_in_the_outbox(pair, tmp_path):
    """A `busy` refusal reads to the node like a timeout: the batch stays in the outbox for the next turn."""
    from intellect.node.config import NodeConfig
    from intellect.node.status import NodeStatus
    from intellect.node.worker import Worker, WorkError
    from intellect.protocol.messages import SUBMIT_RPC
    from tests.protocol.test_rollouts import make_batch

    a, b = pair

    def refuse(peer, request):
        raise RequestRefused("busy", "8 requests in flight (2 per peer): retry later")

    a.register_request_handler(SUBMIT_RPC, refuse)
    worker = Worker(NodeConfig(state_dir=tmp_path, run_id=RUN, coordinator_key=COORD.public_key_hex), PEER, b,
                    fetcher=None, status=NodeStatus())
    path = worker.write(make_batch())
    with pytest.raises(WorkError, match="busy.*stays in the outbox"):
        worker.submit(path, info=None)
    assert path.exists() and worker.status.pending == 1 and worker.status.submitted == 0


@pytest.mark.slow
def test_reachability_check(pair):
    _, b = pair
    r = b.check_reachability()
    assert r.reachable is True and r.case == "public" and r.line.startswith("public: peers can dial"), r


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a_late_joiner_reads_every_writer_and_a_departed_peer_does_not_stall_reads",
                                  "calls_streams_and_refusals", "requests_beyond_the_in_flight_limit_are_refused_busy",
                                  "a_caller_over_its_call_rate_waits_for_its_refusal",
                                  "reachability_checks_at_once_all_find_a_public_peer"])
def test_shared_case(pair, name):
    """Cases tests/protocol/test_swarm_libp2p.py runs on py-libp2p, here on hivemind (the others have
    hivemind-specific versions above)."""
    from .swarm_cases import CASES, run_case

    assert run_case(CASES[name], *pair) == "ok"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libp2p") is None, reason="py-libp2p is not installed")
def test_a_libp2p_node_refuses_a_hivemind_bootstrap_peer_at_once(pair):
    """In its own process (py-libp2p cannot be imported beside hivemind): the join fails at the first
    attempt, naming the backend to use, instead of waiting out join_timeout_s."""
    a, _ = pair
    script = ("import sys; from intellect.protocol.identity import Identity; "
              "from intellect.protocol.swarm import SwarmConfig, SwarmJoinError, setup_swarm\n"
              "try:\n"
              f"    setup_swarm(SwarmConfig(host='127.0.0.1', backend='libp2p', bootstrap={a.visible_addrs()!r}, "
              f"join_timeout_s=120), Identity.from_seed(b'late'), {RUN!r}, bytes.fromhex({COORD.public_key_hex!r}))\n"
              "except SwarmJoinError as e:\n"
              "    print(e); sys.exit(3)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "runs swarm.backend = 'hivemind'" in done.stdout and "--backend hivemind" in done.stdout, done.stdout
    assert time.monotonic() - started < 60  # not join_timeout_s (120 s)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libp2p") is None, reason="py-libp2p is not installed")
def test_a_hivemind_node_refuses_a_libp2p_bootstrap_peer_at_once():
    script = ("import sys; from intellect.protocol.identity import Identity; "
              "from intellect.protocol.swarm import SwarmConfig, setup_swarm\n"
              "s = setup_swarm(SwarmConfig(host='127.0.0.1', backend='libp2p'), Identity.from_seed(b'coord'), "
              f"{RUN!r}, bytes.fromhex({COORD.public_key_hex!r}))\n"
              "print(s.visible_addrs()[0], flush=True); sys.stdin.read(); s.close()\n")
    server = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        addr = server.stdout.readline().strip()
        assert addr.startswith("/ip4/127.0.0.1/"), addr
        started = time.monotonic()
        with pytest.raises(SwarmJoinError, match="runs swarm.backend = 'libp2p'.*--backend libp2p"):
            setup_swarm(SwarmConfig(host="127.0.0.1", bootstrap=[addr], join_timeout_s=120), PEER, RUN,
                        COORD.public_key)
        assert time.monotonic() - started < 60  # not join_timeout_s (120 s)
    finally:
        server.communicate("", timeout=30)


@pytest.mark.slow
def test_a_peer_forwards_a_stream_to_a_peer_connected_to_it(pair):
    """The forwarding relay (protocol/swarm/relay.py) on real daemons: a third peer reaches b's stream
    through a (b's bootstrap peer), b's refusals come back as they were, and a refuses what it must not
    forward: a peer not connected to it, a swarm.* handler, the caller itself."""
    import base58

    from intellect.protocol.swarm import RemoteError, relay
    from intellect.protocol.swarm.framing import peer_id_bytes

    a, b = pair
    data = bytes(range(256)) * 4096  # 1 MiB, in 16 frames

    async def blob(peer, request):
        if request != b"blob":
            raise RequestRefused("not_found", "no such blob")
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    b.register_stream_handler("relaytest", blob)
    a_addr = next(x for x in a.visible_addrs() if "/127.0.0.1/" in x).split("/p2p/")[0]
    circuit = f"{a_addr}/p2p/{base58.b58encode(peer_id_bytes(COORD.public_key)).decode()}/p2p-circuit"
    c = setup_swarm(SwarmConfig(host="127.0.0.1", bootstrap=a.visible_addrs()), EVIL, RUN, COORD.public_key)
    try:
        c.remember_addrs(PEER.public_key, [circuit])  # b as a NATed peer announces itself
        relays = c._relays_of(PEER.public_key)
        assert relays == [(COORD.public_key, a_addr)]

        def through(target, name, request, max_bytes=2 << 20):
            return c._run(c._call_through(relays, target, name, request, max_bytes), timeout=30.0)

        def refused(*args) -> str:
            with pytest.raises(RemoteError) as e:
                through(*args)
            return e.value.code

        assert through(PEER.public_key, "relaytest", b"blob") == data
        assert a.stats["relayed_bytes"] == len(data) and c.stats["relayed_calls_ok"] == 1
        assert refused(PEER.public_key, "relaytest", b"other") == "not_found"  # b's own answer
        assert refused(Identity.from_seed(b"nobody").public_key, "relaytest", b"blob") == "not_connected"
        assert refused(PEER.public_key, "swarm.dialback", b"") == "bad_request"
        assert refused(EVIL.public_key, "relaytest", b"blob") == "bad_request"  # the caller itself
        with pytest.raises(RemoteError, match="exceeds"):  # the relay stops at the caller's limit
            through(PEER.public_key, "relaytest", b"blob", len(data) - 1)
        assert a.stats["relayed_bytes"] < 3 * len(data)
    finally:
        c.close()
    with pytest.raises(ValueError):
        relay.relay_request(PEER.public_key, "relaytest", b"x" * (relay.MAX_INNER_BYTES + 1), 10)
