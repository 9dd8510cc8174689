"""Weight distribution across hosts (tests/netns_harness.py), on both swarm backends: a public node and
a node behind a NAT fetch a checkpoint from the origin and from each other (the NATed node dials the
public one at the address it signed into its announcement: no peer routing), then a third node's link
goes down mid-download for a few seconds and it finishes by itself. The fetch_worker processes of
tests/node (the same code as a node's fetcher) run inside the namespaces.

Skipped (with the reason) only where namespaces cannot be made: not root, or no `ip`/`nft`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests import netns_harness

sys.path.insert(0, str(Path(__file__).parent / "node"))
from swarm_harness import Peers, coordinator_key_hex, make_checkpoint, sha256_of

_why_not = netns_harness.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not is not None, reason=str(_why_not))]

COORD = "netns-fetch-coord"
SIZE_MB = 24
LINK_DOWN_S = 6.0


@pytest.mark.parametrize("backend", ["hivemind", "libp2p"])
def test_nodes_on_separate_hosts_share_shards_and_a_flapping_link_resumes(tmp_path, backend):
    checkpoint = make_checkpoint(tmp_path / "checkpoint", SIZE_MB)
    want = sha256_of(checkpoint / "model.safetensors")
    with netns_harness.Network(tmp_path / "net") as net:
        hosts = {"origin": net.add_public("origin"), "pub": net.add_public("pub"), "nat": net.add_natted("nat"),
                 "flap": net.add_public("flap")}
        peers = Peers(tmp_path)
        try:
            def start(name: str, *args: str) -> None:
                peers.start(name, *args, "--backend", backend, "--host", hosts[name].ip,
                            "--ready", f"{name}.ready", "--result", f"{name}.json", prefix=tuple(hosts[name].cmd()))

            start("origin", "--role", "origin", "--seed", COORD, "--cache", "origin", "--checkpoint", str(checkpoint),
                  "--max-upload-mbit", "24", "--max-streams", "2")
            bootstrap = peers.wait_json(tmp_path / "origin.ready", 120, "origin")["addrs"]

            def start_node(name: str, go: str) -> None:
                start(name, "--role", "node", "--seed", name, "--coordinator-key", coordinator_key_hex(COORD),
                      "--cache", name, "--go", go, "--stay", "--max-upload-mbit", "8", "--timeout", "180",
                      *[x for addr in bootstrap for x in ("--bootstrap", addr)])

            for name in ("pub", "nat"):
                start_node(name, "go1")
            ready = {n: peers.wait_json(tmp_path / f"{n}.ready", 120, n) for n in ("pub", "nat")}
            assert all(ready.values())
            (tmp_path / "go1").touch()
            done = {n: peers.wait_json(tmp_path / f"{n}.json", 240, n) for n in ("pub", "nat")}
            for result in done.values():
                assert result["ok"] and sha256_of(tmp_path / result["folder"] / "model.safetensors") == want, result
            assert done["pub"]["reachability"].startswith("public"), done["pub"]["reachability"]
            assert done["nat"]["reachability"].startswith("behind NAT"), done["nat"]["reachability"]
            # the origin seeds each shard once: each node took the other's from it, the NATed one by dialling
            # the public node where it said it was, the public one over the connection the NATed one opened
            assert done["nat"]["stats"].get("bytes_from_peers", 0) > 0, done["nat"]
            assert done["pub"]["stats"].get("bytes_from_peers", 0) > 0, done["pub"]
            if backend == "hivemind":  # p2pd's peer routing does not find hosts on these addresses at all
                assert done["nat"]["swarm_stats"].get("hint_dials_ok", 0) >= 1, done["nat"]

            start_node("flap", "go2")
            peers.wait_json(tmp_path / "flap.ready", 120, "flap")
            (tmp_path / "go2").touch()
            time.sleep(1.0)
            net.link(hosts["flap"], up=False)
            time.sleep(LINK_DOWN_S)
            net.link(hosts["flap"], up=True)
            flap = peers.wait_json(tmp_path / "flap.json", 240, "flap")
            assert flap["ok"] and sha256_of(tmp_path / flap["folder"] / "model.safetensors") == want, flap
            assert flap["seconds"] > LINK_DOWN_S, flap  # the link went down mid-download
        finally:
            peers.close()
