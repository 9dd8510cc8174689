"""Dial hints (protocol/swarm/addr_book.py): what is kept of a peer's announced addresses (direct ones and
relay circuits), how often it is dialled, the bounds, and the saved book a restarted process reads back;
and the standard encoding the hivemind backend dials a circuit with."""

from __future__ import annotations

import json

import msgpack
import pytest

from intellect.protocol.messages import ShardAnnounce, WireRejected, decode_body, encode_body
from intellect.protocol.swarm import addr_book
from intellect.protocol.swarm.addr_book import MAX_ADDRS, AddrBook, circuits, dialable, hints, relay_circuit

PEER = bytes(range(32))
H = "ab" * 32
RELAY_ID = "12D3KooWPeuigMJXMh8hCPQxjaB5b9Gu6vBisyyeF6AbP9NkFqSX"  # Identity.from_seed(b"x")'s peer id
RSA_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # a sha2-256 multihash (an RSA key's peer id)
CIRCUIT = f"/ip4/198.18.0.10/tcp/4001/p2p/{RELAY_ID}/p2p-circuit"


def test_only_plain_direct_tcp_addresses_are_kept():
    given = ["/ip4/198.18.0.5/tcp/4001/p2p/12D3KooWExample", "/ip4/198.18.0.5/tcp/4001",  # one address, twice
             "/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/1", "/ip4/224.0.0.1/tcp/9",  # nobody to dial
             "/dns4/example.com/tcp/4001", "/ip4/198.18.0.6/udp/4001/quic",
             "/ip4/198.18.0.7/tcp/4001/p2p/X/p2p-circuit/p2p/Y",  # a relay circuit: its own kind of dial
             "/ip4/198.18.0.8/tcp/0", "/ip4/198.18.0.9/tcp/99999", "/ip4/1.2.3/tcp/1", "/ip6/198.18.0.1/tcp/1",
             "/ip6/2001:db8::1/tcp/4001", 7, "/ip4/198.18.0.10/tcp/1" + "0" * 300]
    assert dialable(given) == ["/ip4/198.18.0.5/tcp/4001", "/ip6/2001:db8::1/tcp/4001"]
    many = [f"/ip4/198.18.0.{i}/tcp/4001" for i in range(1, 20)]
    assert dialable(many) == many[:MAX_ADDRS]


def test_relay_circuits_are_kept_after_direct_addresses():
    assert circuits([CIRCUIT, CIRCUIT, f"/ip6/2001:db8::1/tcp/4001/p2p/{RSA_ID}/p2p-circuit"]) == [
        CIRCUIT, f"/ip6/2001:db8::1/tcp/4001/p2p/{RSA_ID}/p2p-circuit"]
    assert hints([CIRCUIT, "/ip4/198.18.0.5/tcp/4001"]) == ["/ip4/198.18.0.5/tcp/4001", CIRCUIT]  # direct first
    many = [f"/ip4/198.18.0.{i}/tcp/4001/p2p/{RELAY_ID}/p2p-circuit" for i in range(1, 20)]
    assert circuits(many) == many[:MAX_ADDRS] and hints(many) == many[:MAX_ADDRS]
    direct = [f"/ip4/198.18.1.{i}/tcp/4001" for i in range(1, 4)]
    assert hints([*many, *direct]) == [*direct, many[0]]  # still MAX_ADDRS in all
    assert relay_circuit(f"/ip4/198.18.0.10/tcp/4001/p2p/{RELAY_ID}") == CIRCUIT
    assert relay_circuit("/ip4/198.18.0.10/tcp/4001") is None and relay_circuit("/dns4/x/tcp/1/p2p/Qm") is None


@pytest.mark.parametrize("bad", [
    f"/ip4/198.18.0.10/tcp/4001/p2p/{RELAY_ID}/p2p-circuit/p2p/{RELAY_ID}",  # a tail: names whom to reach
    f"/ip4/198.18.0.10/tcp/4001/p2p/{RELAY_ID}/p2p-circuit/",
    "/ip4/198.18.0.10/tcp/4001/p2p-circuit", f"/p2p/{RELAY_ID}/p2p-circuit",  # no relay, no address
    f"/dns4/relay.example/tcp/4001/p2p/{RELAY_ID}/p2p-circuit", f"/ip4/198.18.0.10/udp/4001/p2p/{RELAY_ID}/p2p-circuit",
    f"/ip4/0.0.0.0/tcp/4001/p2p/{RELAY_ID}/p2p-circuit", f"/ip4/198.18.0.10/tcp/0/p2p/{RELAY_ID}/p2p-circuit",
    f"/ip4/198.18.0.10/tcp/70000/p2p/{RELAY_ID}/p2p-circuit", f"/ip6/198.18.0.10/tcp/1/p2p/{RELAY_ID}/p2p-circuit",
    "/ip4/198.18.0.10/tcp/4001/p2p/" + "1" * 40 + "/p2p-circuit",  # decodes to zeros, no multihash
    "/ip4/198.18.0.10/tcp/4001/p2p/0OIl" + RELAY_ID[4:] + "/p2p-circuit",  # not base58
    "/ip4/198.18.0.10/tcp/4001/p2p/" + "z" * 65 + "/p2p-circuit", "/ip4/198.18.0.10/tcp/4001/p2p/Qm/p2p-circuit",
    f"/ip4/198.18.0.10/tcp/4001/p2p/{RELAY_ID}/p2p-circuit" + " " * 200, 7, None,
])
def test_malformed_relay_circuits_are_dropped(bad):
    assert circuits([bad]) == [] and hints([bad]) == []


def test_a_relay_id_must_decode_to_a_sane_multihash():
    import base58

    assert addr_book.peer_id_ok(RELAY_ID) and addr_book.peer_id_ok(RSA_ID)
    for raw in (b"\x00\x2b" + b"k" * 43,  # an identity multihash longer than 42 bytes
                b"\x12\x10" + b"k" * 16,  # sha2-256 of the wrong length
                b"\x13\x20" + b"k" * 32,  # another hash function
                b"\x00\x24" + b"k" * 30):  # shorter than it says
        assert not addr_book.peer_id_ok(base58.b58encode(raw).decode()), raw


def test_a_peer_known_only_by_circuit_is_relayed_only_and_not_a_rebootstrap_peer():
    book = AddrBook()
    book.note(PEER, [CIRCUIT])
    assert book.knows(PEER) and book.relayed_only(PEER) and book.due(PEER) == [CIRCUIT]
    assert book.multiaddrs() == []  # nothing to join through directly
    other = bytes(range(1, 33))
    book.note(other, [CIRCUIT, "/ip4/198.18.0.5/tcp/4001"])
    assert not book.relayed_only(other) and book.known()[other] == ["/ip4/198.18.0.5/tcp/4001", CIRCUIT]
    assert [a.split("/p2p/")[0] for a in book.multiaddrs()] == ["/ip4/198.18.0.5/tcp/4001"]
    assert not book.relayed_only(bytes(32))


def test_a_peer_is_dialled_by_hint_at_most_once_per_redial_period(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(addr_book.time, "monotonic", lambda: now[0])
    book = AddrBook()
    assert book.due(PEER) == []  # nothing known
    book.note(PEER, ["/ip4/198.18.0.5/tcp/4001"])
    assert book.due(PEER) == ["/ip4/198.18.0.5/tcp/4001"] and book.due(PEER) == []
    now[0] += addr_book.REDIAL_S - 1
    book.note(PEER, ["/ip4/198.18.0.5/tcp/4001"])  # the same again: still waits
    assert book.due(PEER) == []
    book.note(PEER, ["/ip4/198.18.0.6/tcp/4001"])  # it moved: dial the new address at once
    assert book.due(PEER) == ["/ip4/198.18.0.6/tcp/4001"]
    now[0] += addr_book.REDIAL_S
    assert book.due(PEER) == ["/ip4/198.18.0.6/tcp/4001"]
    book.note(PEER, ["/dns4/x/tcp/1"])  # nothing dialable: the last good note stands
    assert book.knows(PEER)


def test_the_book_is_bounded_and_forgets_the_least_recently_heard(monkeypatch):
    monkeypatch.setattr(addr_book, "MAX_PEERS", 3)
    book = AddrBook()
    peers = [bytes([i]) * 32 for i in range(4)]
    for p in peers[:3]:
        book.note(p, ["/ip4/198.18.0.5/tcp/4001"])
    book.note(peers[0], ["/ip4/198.18.0.5/tcp/4001"])  # heard again: now the newest
    book.note(peers[3], ["/ip4/198.18.0.5/tcp/4001"])
    assert set(book.known()) == {peers[0], peers[2], peers[3]}


def test_a_saved_book_reads_back_and_junk_is_skipped(tmp_path):
    book = AddrBook()
    book.note(PEER, ["/ip4/198.18.0.5/tcp/4001", "/ip4/127.0.0.1/tcp/4001"])
    path = tmp_path / "known_peers.json"
    book.save(path)
    again = AddrBook()
    assert again.load(path) == 1 and again.known() == book.known()
    path.write_text(json.dumps([["zz", ["/ip4/198.18.0.5/tcp/1"]], [PEER.hex()[:10], ["/ip4/198.18.0.5/tcp/1"]],
                                [PEER.hex(), ["/dns4/x/tcp/1"]], "x", [PEER.hex(), "/ip4/198.18.0.5/tcp/1"],
                                [PEER.hex(), ["/ip4/198.18.0.7/tcp/7"]]]))
    fresh = AddrBook()
    assert fresh.load(path) == 1 and fresh.known() == {PEER: ["/ip4/198.18.0.7/tcp/7"]}
    path.write_text("{not json")
    assert AddrBook().load(path) == 0 and AddrBook().load(tmp_path / "missing.json") == 0
    path.write_bytes(b" " * (addr_book.MAX_FILE_BYTES + 1))
    assert AddrBook().load(path) == 0


@pytest.mark.parametrize("addrs", [["/dns4/example.com/tcp/1"], ["/ip4/198.18.0.5/tcp/1/p2p/X"],
                                   [f"/ip4/198.18.0.{i}/tcp/1" for i in range(5)], ["/ip4/198.18.0.5/tcp/123456"],
                                   [f"{CIRCUIT}/p2p/{RELAY_ID}"], [f"/ip4/198.18.0.5/tcp/1/p2p/{'z' * 65}/p2p-circuit"],
                                   ["/ip4/198.18.0.5/tcp/1/p2p/0OIl/p2p-circuit"]])
def test_an_announcement_with_bad_addresses_is_refused(addrs):
    good = ShardAnnounce(policy_step=1, manifest_sha256=H, shard_sha256s=[H], addrs=["/ip4/198.18.0.5/tcp/1", CIRCUIT])
    assert decode_body(ShardAnnounce, encode_body(good)) == good
    raw = good.model_dump()
    raw["addrs"] = addrs
    with pytest.raises(WireRejected):
        decode_body(ShardAnnounce, msgpack.packb(raw))
