"""Known peers (node/known_peers.py) on real hivemind swarms on 127.0.0.1: a node keeps the peers it
learnt from signed announcements in its state dir, and joins through them once its bootstrap peer (the
coordinator) is gone; when they are gone too, the error names both."""

from __future__ import annotations

import time

import pytest

from intellect.node import known_peers
from intellect.protocol.identity import Identity
from intellect.protocol.messages import ShardAnnounce, decode_body, encode_body
from intellect.protocol.swarm import SwarmConfig, SwarmJoinError, setup_swarm
from intellect.protocol.swarm.keys import shards_key
from intellect.protocol.wire import MessageKind, run_id_for, seal

COORD, PEER, NODE = Identity.from_seed(b"coord"), Identity.from_seed(b"peer"), Identity.from_seed(b"node")
RUN = run_id_for(COORD.public_key, "known-peers")


def learn_from_announcements(node, step: int, timeout: float = 30.0) -> None:
    """What the fetcher does with each holder's announcement: note the addresses it signed."""
    deadline = time.monotonic() + timeout
    while not node.addr_book.knows(PEER.public_key) and time.monotonic() < deadline:
        for envelope in node.read(shards_key(step)):
            node.remember_addrs(envelope.sender, decode_body(ShardAnnounce, envelope.body).addrs)
        time.sleep(0.5)


@pytest.mark.slow
def test_a_node_whose_bootstrap_peer_is_gone_joins_through_the_peers_it_knew(tmp_path):
    coordinator = setup_swarm(SwarmConfig(host="127.0.0.1"), COORD, RUN, COORD.public_key)
    bootstrap = coordinator.visible_addrs()
    peer = setup_swarm(SwarmConfig(host="127.0.0.1", bootstrap=bootstrap), PEER, RUN, COORD.public_key)
    config = SwarmConfig(host="127.0.0.1", bootstrap=bootstrap, join_timeout_s=3)
    try:
        node = known_peers.join(config, NODE, RUN, COORD.public_key, tmp_path)
        body = ShardAnnounce(policy_step=1, manifest_sha256="a" * 64, shard_sha256s=["b" * 64],
                             addrs=peer.direct_addrs())
        assert body.addrs and all(a.startswith("/ip4/127.0.0.1/tcp/") for a in body.addrs)
        assert peer.publish(shards_key(1), seal(PEER, MessageKind.SHARD_ANNOUNCE, RUN, encode_body(body)), 60)
        learn_from_announcements(node, 1)
        known_peers.save(node, tmp_path)
        node.close()
        coordinator.close()

        again = known_peers.join(config, NODE, RUN, COORD.public_key, tmp_path)
        try:
            assert PEER.public_key in again.peers()
            assert again.addr_book.knows(PEER.public_key)  # and it will re-bootstrap from it
            assert any(a.startswith(body.addrs[0]) for a in again.rebootstrap_addrs())
        finally:
            again.close()
    finally:
        peer.close()
        coordinator.close()
    with pytest.raises(SwarmJoinError, match="known from earlier sessions"):
        known_peers.join(config, NODE, RUN, COORD.public_key, tmp_path)
