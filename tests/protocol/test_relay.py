"""The forwarding relay's request (protocol/swarm/relay.py): what a relay accepts to forward, and that
any bytes get a verdict. The relay on real daemons: tests/protocol/test_swarm.py and
tests/test_netns_relay_hivemind.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intellect.protocol.swarm import RequestRefused
from intellect.protocol.swarm.relay import (
    MAX_INNER_BYTES,
    MAX_RELAYED_BYTES,
    parse_relay_request,
    relay_request,
)

CALLER, RELAY, TARGET = b"c" * 32, b"r" * 32, b"t" * 32


def test_a_request_round_trips_with_the_answer_limit_capped():
    wire = relay_request(TARGET, "shards", b"\x01\x02", 1 << 20)
    assert parse_relay_request(wire, CALLER, RELAY) == (TARGET, "shards", b"\x01\x02", 1 << 20)
    assert parse_relay_request(relay_request(TARGET, "shards", b"", 2**32 - 1), CALLER, RELAY)[3] == MAX_RELAYED_BYTES


@pytest.mark.parametrize("wire, why", [
    (relay_request(TARGET, "swarm.dialback", b"", 10), "own stream handlers"),
    (relay_request(TARGET, "swarm.relay", b"", 10), "own stream handlers"),  # no relay chains
    (relay_request(CALLER, "shards", b"", 10), "caller or to itself"),
    (relay_request(RELAY, "shards", b"", 10), "caller or to itself"),
    (TARGET + bytes([6]) + b"SHARDS" + bytes(4), "own stream handlers"),
    (TARGET + bytes([60]) + b"shards", "own stream handlers"),  # the name runs past the end
    (relay_request(TARGET, "shards", b"", 10) + b"x" * (MAX_INNER_BYTES + 1), "at most 4096 bytes"),
    (b"x" * 5000, "not a relay request"),
    (b"short", "not a relay request"),
])
def test_what_a_relay_refuses_to_forward(wire, why):
    with pytest.raises(RequestRefused, match=why) as e:
        parse_relay_request(wire, CALLER, RELAY)
    assert e.value.code == "bad_request"


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
def test_any_bytes_get_a_verdict(data):
    try:
        target, name, _, max_bytes = parse_relay_request(data, CALLER, RELAY)
    except RequestRefused as e:
        assert e.code == "bad_request"
        return
    assert len(target) == 32 and not name.startswith("swarm.") and 0 <= max_bytes <= MAX_RELAYED_BYTES
