"""The forwarding relay of the hivemind backend (protocol/swarm/relay.py) in network namespaces
(tests/netns_harness.py): two nodes, each behind its own NAT, join through a public peer. B has
use_auto_relay: the dial-back check finds it behind the NAT, so it is "relayed" through its bootstrap peer
and signs the circuit `<relay>/p2p/<relay id>/p2p-circuit` into a DataAnnounce. A reads that record from
the DHT and streams a 4 MiB blob from B, which the public peer forwards over the connection B holds to it.

The peers are this file run as a module (`--role relay|server|fetcher`) inside the namespaces, as in
tests/test_netns_relay.py. Skipped (with the reason) only where namespaces cannot be made."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
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


def test_two_natted_hivemind_nodes_stream_through_the_bootstrap_relay(tmp_path):
    with netns_harness.Network(tmp_path / "net") as net:
        hosts = {"relay": net.add_public("relay"), "a": net.add_natted("a"), "b": net.add_natted("b")}
        procs = {}

        def start(name: str, *args: str) -> None:
            with open(tmp_path / f"{name}.log", "wb") as log:
                procs[name] = net.popen(hosts[name], [sys.executable, "-m", "tests.test_netns_relay_hivemind",
                                                      "--host", hosts[name].ip, "--out", str(tmp_path / f"{name}.json"),
                                                      *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

        def result(name: str, timeout: float) -> dict:
            return netns_harness.wait_json(tmp_path / f"{name}.json", timeout, tmp_path / f"{name}.log", procs[name])

        start("relay", "--role", "relay")
        relay = result("relay", 120)
        bootstrap = next(a for a in relay["addrs"] if a.startswith(f"/ip4/{hosts['relay'].ip}/"))
        joined = ("--coordinator-key", relay["key"], "--bootstrap", bootstrap)
        start("b", "--role", "server", *joined)
        start("a", "--role", "fetcher", *joined, "--server-info", str(tmp_path / "b.json"))
        b = result("b", 150)
        assert b["reachability"] == "relayed" and "forwards" in b["line"], b
        assert b["hints"] == [f"{bootstrap}/p2p-circuit"], b  # no direct address: it is behind a NAT
        a = result("a", 180)
        print(json.dumps({"shaping": net.shaping, "b": b, "a": a}, indent=1))  # the numbers (-s)
        assert a["hints"] == b["hints"], a  # read from B's signed DHT record
        assert a.get("sha256") == hashlib.sha256(blob()).hexdigest() and a["bytes"] == BLOB_BYTES, a
        assert a["stats"].get("relayed_calls_ok", 0) >= 1 and not a["connected_to_b"], a


# ---- the peer processes ---------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[-300:])


def _hints_from_dht(swarm, server: bytes, deadline: float) -> list[str]:
    """B's dial hints as A learns them: its signed DataAnnounce, read from the DHT and remembered."""
    from intellect.protocol.messages import DataAnnounce, decode_body
    from intellect.protocol.swarm.keys import task_data_key

    while time.monotonic() < deadline:
        for envelope in swarm.read(task_data_key()):
            if envelope.sender == server:
                addrs = decode_body(DataAnnounce, envelope.body).addrs
                swarm.remember_addrs(server, addrs)
                return list(addrs)
        time.sleep(1.0)
    raise TimeoutError("B's DataAnnounce never showed up in the DHT")


def _fetch(swarm, args, out: dict) -> None:
    from intellect.protocol.swarm import SwarmError

    server_info = Path(args.server_info)
    while not server_info.exists():
        time.sleep(0.5)
    server = bytes.fromhex(json.loads(server_info.read_text())["key"])
    out["hints"] = _hints_from_dht(swarm, server, time.monotonic() + 60)
    out["stream_errors"] = []
    for _ in range(3):  # as a fetcher would, it asks again after a broken stream
        t0 = time.monotonic()
        try:
            got = swarm.stream(server, BLOB, b"", timeout=60.0, max_bytes=2 * BLOB_BYTES)
            break
        except SwarmError as e:
            out["stream_errors"].append(str(e))
            time.sleep(2.0)
    else:
        return
    out["stream_s"] = time.monotonic() - t0
    out.update(sha256=hashlib.sha256(got).hexdigest(), bytes=len(got), mbit_s=len(got) * 8 / out["stream_s"] / 1e6,
               connected_to_b=server in swarm.peers())


def _worker() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["relay", "server", "fetcher"], required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--coordinator-key")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--server-info", help="B's json (fetcher): its key")
    args = p.parse_args()
    if os.environ.get("RELAYTEST_DEBUG"):
        logging.basicConfig(level=logging.DEBUG)
        os.environ["GOLOG_LOG_LEVEL"] = os.environ["RELAYTEST_DEBUG"]
        os.environ["HIVEMIND_LOGLEVEL"] = "DEBUG"

    from intellect.protocol.identity import Identity
    from intellect.protocol.messages import DataAnnounce, encode_body
    from intellect.protocol.swarm import SwarmConfig, setup_swarm
    from intellect.protocol.swarm.keys import task_data_key
    from intellect.protocol.wire import MessageKind, run_id_for, seal

    identity = Identity.from_seed(f"relaytest-{args.host}".encode())
    coordinator_key = identity.public_key if args.role == "relay" else bytes.fromhex(args.coordinator_key)
    config = SwarmConfig(host=args.host, port=4001, bootstrap=args.bootstrap, startup_timeout_s=60,
                         join_timeout_s=60, use_auto_relay=args.role == "server")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_id = run_id_for(coordinator_key, "relaytest")
    swarm = setup_swarm(config, identity, run_id, coordinator_key)
    try:
        out = {"key": identity.public_key_hex}
        if args.role == "server":
            data = blob()

            async def serve(peer, request):
                for i in range(0, len(data), CHUNK):
                    yield data[i:i + CHUNK]

            swarm.register_stream_handler(BLOB, serve)
            reach = swarm.check_reachability(timeout=10.0)
            out.update(reachability=reach.case, line=reach.line, hints=swarm.dial_hints())
            announce = DataAnnounce(sha256s=[hashlib.sha256(data).hexdigest()], addrs=out["hints"])
            out["published"] = swarm.publish(task_data_key(), seal(identity, MessageKind.DATA_ANNOUNCE, run_id,
                                                                   encode_body(announce)), ttl_s=600.0)
        if args.role == "fetcher":
            _fetch(swarm, args, out)
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
