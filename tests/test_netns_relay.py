"""Circuit relay v2 on the py-libp2p backend (tests/netns_harness.py): two nodes, each behind its own NAT,
join through a public peer, find themselves behind NAT, reserve a slot on it (use_auto_relay: "relayed"),
and one streams 4 MiB from the other through it; DCUtR may then turn the connection direct (hole
punching), and a second stream must arrive over whichever connection holds.

The peers are this file run as a module (`--role relay|node`) inside the namespaces: a process using
py-libp2p must not import hivemind. Skipped (with the reason) only where namespaces cannot be made."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import netns_harness

_why_not = netns_harness.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not is not None, reason=str(_why_not))]

REPO = Path(__file__).resolve().parents[1]
BLOB = "relaytest.blob"
BLOB_BYTES = 4 << 20
CHUNK = 64 << 10


def blob() -> bytes:
    return random.Random(7).randbytes(BLOB_BYTES)


def test_two_natted_nodes_stream_through_a_relay(tmp_path):
    with netns_harness.Network(tmp_path / "net") as net:
        hosts = {"relay": net.add_public("relay"), "a": net.add_natted("a"), "b": net.add_natted("b")}

        def start(name: str, *args: str) -> dict:
            with open(tmp_path / f"{name}.log", "wb") as log:
                proc = net.popen(hosts[name], [sys.executable, "-m", "tests.test_netns_relay", "--host", hosts[name].ip,
                                        "--out", str(tmp_path / f"{name}.json"), *args],
                          stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            return netns_harness.wait_json(tmp_path / f"{name}.json", 150, tmp_path / f"{name}.log", proc)

        relay = start("relay", "--role", "relay")
        bootstrap = [a for a in relay["addrs"] if "/p2p-circuit" not in a]
        b = start("b", "--role", "node", "--coordinator-key", relay["key"], "--bootstrap", bootstrap[0])
        assert b["reachability"] == "relayed", b
        assert any("/p2p-circuit/" in a for a in b["addrs"]) and not b["direct_addrs"], b
        a = start("a", "--role", "node", "--coordinator-key", relay["key"], "--bootstrap", bootstrap[0],
                  "--fetch", b["key"])
        print(json.dumps({"shaping": net.shaping, "a": a}, indent=1))  # the measured times, in the -s output
        assert a["reachability"] == "relayed", a
        first, second = a["fetches"]
        want = hashlib.sha256(blob()).hexdigest()
        assert first["sha256"] == want and second["sha256"] == want, a
        assert "relayed" in first["conns"], a  # no direct dial reaches a NATed node
        assert a["stats"].get("relay_dials_ok", 0) >= 1, a
        assert set(second["conns"]) <= {"relayed", "direct"}, a  # direct: DCUtR punched a hole


# ---- the peer processes ---------------------------------------------------------------------------


def _conn_kinds(swarm, peer: bytes) -> list[str]:
    """"relayed" or "direct" for each of the swarm's connections to `peer`."""
    from libp2p.peer.id import ID

    from intellect.protocol.swarm.framing import peer_id_bytes

    async def kinds() -> list[str]:
        conns = swarm._host.get_network().connections.get(ID(peer_id_bytes(peer)), [])
        return ["relayed" if any("/p2p-circuit" in str(a) for a in c.get_transport_addresses()) else "direct"
                for c in conns]

    return swarm._run(kinds, timeout=10.0)


def _worker() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["relay", "node"], required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--coordinator-key")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--fetch", help="key hex of the node to stream the blob from")
    args = p.parse_args()

    from intellect.protocol.identity import Identity
    from intellect.protocol.swarm import SwarmConfig, setup_swarm
    from intellect.protocol.wire import run_id_for

    identity = Identity.from_seed(f"relaytest-{args.host}".encode())
    coordinator_key = identity.public_key if args.role == "relay" else bytes.fromhex(args.coordinator_key)
    config = SwarmConfig(backend="libp2p", host=args.host, port=4001, bootstrap=args.bootstrap,
                         startup_timeout_s=60, join_timeout_s=30, use_auto_relay=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    swarm = setup_swarm(config, identity, run_id_for(coordinator_key, "relaytest"), coordinator_key)
    try:
        data = blob()

        async def serve(peer, request):
            for i in range(0, len(data), CHUNK):
                yield data[i:i + CHUNK]

        swarm.register_stream_handler(BLOB, serve)
        out = {"key": identity.public_key_hex}
        if args.role == "node":
            t0 = time.monotonic()
            out["reachability"] = swarm.check_reachability(timeout=10.0).case
            out["reachability_s"] = time.monotonic() - t0
            out["direct_addrs"] = swarm.direct_addrs()
        if args.fetch:
            out["fetches"] = []
            peer = bytes.fromhex(args.fetch)
            for wait_for_direct_s in (0.0, 40.0):
                deadline = time.monotonic() + wait_for_direct_s  # DCUtR works in the background
                t0 = time.monotonic()
                while time.monotonic() < deadline and "direct" not in _conn_kinds(swarm, peer):
                    time.sleep(0.5)
                waited_s, t0 = time.monotonic() - t0, time.monotonic()
                got = swarm.stream(peer, BLOB, b"", timeout=60.0, max_bytes=2 * BLOB_BYTES)
                seconds = time.monotonic() - t0
                out["fetches"].append({"sha256": hashlib.sha256(got).hexdigest(), "seconds": seconds, "waited_s": waited_s,
                                       "mbit_s": len(got) * 8 / seconds / 1e6, "conns": _conn_kinds(swarm, peer)})
            out["stats"] = dict(swarm.stats)
        out["addrs"] = swarm.visible_addrs()
        tmp = f"{args.out}.tmp"
        Path(tmp).write_text(json.dumps(out))
        os.replace(tmp, args.out)
        stop.wait()
        return 0
    finally:
        swarm.close()


if __name__ == "__main__":
    sys.exit(_worker())
