import time

import msgpack
import pytest

from intellect.protocol.identity import Identity
from intellect.protocol.wire import (
    MessageKind,
    ReplayGuard,
    WireRejected,
    open_envelope,
    run_id_for,
    seal,
)

ALICE = Identity.from_seed(b"alice")
MALLORY = Identity.from_seed(b"mallory")
RUN = run_id_for(b"k" * 32, "test-run")


def sealed(body=b"hello", seq=None, kind=MessageKind.HEARTBEAT, run=RUN, ident=ALICE, **kw):
    return seal(ident, kind, run, body, seq=seq, **kw)


def test_round_trip():
    env = open_envelope(sealed(seq=7), run_id=RUN)
    assert env.body == b"hello" and env.seq == 7 and env.sender == ALICE.public_key
    assert env.kind is MessageKind.HEARTBEAT and env.sender_id == ALICE.peer_id


def test_every_tampered_byte_is_rejected():
    data = sealed()
    for i in range(len(data)):
        for flip in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= flip
            with pytest.raises(WireRejected):
                open_envelope(bytes(bad), run_id=RUN)


def test_truncated_is_rejected():
    data = sealed()
    for n in range(len(data)):
        with pytest.raises(WireRejected):
            open_envelope(data[:n], run_id=RUN)


def test_wrong_key_wrong_run_wrong_kind_oversize():
    fields = msgpack.unpackb(sealed(), raw=False)
    fields[3] = MALLORY.public_key  # claim another sender, keep Alice's signature
    with pytest.raises(WireRejected, match="bad signature"):
        open_envelope(msgpack.packb(fields, use_bin_type=True), run_id=RUN)
    with pytest.raises(WireRejected, match="expected"):
        open_envelope(sealed(ident=MALLORY), run_id=RUN, expected_sender=ALICE.public_key)
    with pytest.raises(WireRejected, match="not 'other"):
        open_envelope(sealed(), run_id="other-run")
    with pytest.raises(WireRejected, match="not accepted here"):
        open_envelope(sealed(), run_id=RUN, kinds={MessageKind.SUBMISSION})
    with pytest.raises(WireRejected, match="exceeds the limit"):
        open_envelope(sealed(body=b"x" * 2000), run_id=RUN, max_bytes=1000)


def test_unknown_version_and_kind():
    fields = msgpack.unpackb(sealed(), raw=False)
    fields[0] = 99
    with pytest.raises(WireRejected, match="version 99"):
        open_envelope(msgpack.packb(fields, use_bin_type=True), run_id=RUN)
    fields = msgpack.unpackb(sealed(), raw=False)
    fields[1] = "launch_missiles"
    with pytest.raises(WireRejected, match="unknown message kind"):
        open_envelope(msgpack.packb(fields, use_bin_type=True), run_id=RUN)


def test_replay_and_reordering_rejected_per_sender():
    guard = ReplayGuard()
    first = sealed(seq=5)
    open_envelope(first, run_id=RUN, replay_guard=guard)
    with pytest.raises(WireRejected, match="replay"):
        open_envelope(first, run_id=RUN, replay_guard=guard)
    with pytest.raises(WireRejected, match="replay"):
        open_envelope(sealed(seq=4), run_id=RUN, replay_guard=guard)
    open_envelope(sealed(seq=6), run_id=RUN, replay_guard=guard)
    open_envelope(sealed(seq=1, ident=MALLORY), run_id=RUN, replay_guard=guard)  # other sender: own counter


def test_default_sequence_numbers_increase():
    seqs = [open_envelope(sealed(), run_id=RUN).seq for _ in range(50)]
    assert seqs == sorted(set(seqs))


def test_timestamps_from_the_future_or_too_old_are_rejected():
    with pytest.raises(WireRejected, match="future"):
        open_envelope(sealed(timestamp=time.time() + 3600), run_id=RUN)
    old = sealed(timestamp=time.time() - 7200)
    with pytest.raises(WireRejected, match="old"):
        open_envelope(old, run_id=RUN)
    assert open_envelope(old, run_id=RUN, max_age_s=None).body == b"hello"


def test_run_id_is_bound_to_key_and_name():
    assert run_id_for(b"a" * 32, "r") != run_id_for(b"b" * 32, "r")
    assert run_id_for(b"a" * 32, "r").startswith("r-")
    with pytest.raises(ValueError):
        run_id_for(b"a" * 32, "bad name!")
