"""One swarm peer in its own OS process, for the swarm tests and bench/distribution.py.

Roles:
  origin  start a swarm as the coordinator, publish --checkpoint as --step, serve it; on SIGTERM write
          the result JSON (bytes sent) and exit.
  node    join, wait for --go (a file) if given, fetch --step, write the result JSON (stats, time, the
          assembled folder); with --stay keep serving until SIGTERM.

--ready FILE gets {"addrs": [...], "key": hex} once the swarm is up. --corrupt makes a node serve
flipped bytes (a malicious peer). --data FILE: the origin also serves FILE as task data (its entry goes
in the .published JSON); --data-entry SHA:SIZE: a node fetches that task data instead of --step.
Every file is written atomically. FETCH_WORKER_LOG=INFO in the environment logs each failed transfer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from intellect.protocol.identity import Identity
from intellect.protocol.swarm import SwarmConfig, setup_swarm
from intellect.protocol.swarm.shard_server import ShardServer
from intellect.protocol.wire import run_id_for


class CorruptShardServer(ShardServer):
    def _chunks(self, sha256: str):
        first = True
        for chunk in super()._chunks(sha256):
            if first:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                first = False
            yield chunk


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, path)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["origin", "node"], required=True)
    p.add_argument("--seed", required=True, help="identity seed (tests derive keys deterministically)")
    p.add_argument("--coordinator-key", help="hex public key of the coordinator (nodes)")
    p.add_argument("--run-name", default="swarmtest")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--host", default="127.0.0.1", help="IP to listen on (bench/distribution.py --netns)")
    p.add_argument("--backend", default="hivemind", choices=["hivemind", "libp2p"])
    p.add_argument("--cache", required=True)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--checkpoint")
    p.add_argument("--shard-kb", type=int, default=256)
    p.add_argument("--max-upload-mbit", type=float)
    p.add_argument("--origin-only", action="store_true")
    p.add_argument("--no-super-seed", action="store_true")
    p.add_argument("--max-streams", type=int, default=2)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--corrupt", action="store_true")
    p.add_argument("--data")
    p.add_argument("--data-entry")
    p.add_argument("--ready")
    p.add_argument("--go")
    p.add_argument("--result")
    p.add_argument("--stay", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0)
    return p.parse_args()


def main() -> int:
    args = parse()
    logging.basicConfig(level=os.environ.get("FETCH_WORKER_LOG", "WARNING"), stream=sys.stderr)
    identity = Identity.from_seed(args.seed.encode())
    coordinator_key = identity.public_key if args.role == "origin" else bytes.fromhex(args.coordinator_key)
    run_id = run_id_for(coordinator_key, args.run_name)
    config = SwarmConfig(host=args.host, bootstrap=args.bootstrap, max_upload_mbit=args.max_upload_mbit,
                         startup_timeout_s=60, join_timeout_s=30, backend=args.backend)
    stop = threading.Event()
    swarm = setup_swarm(config, identity, run_id, coordinator_key)
    # after the DHT process is forked: it must keep the default SIGTERM (hivemind terminates it with one)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        joined_at = time.time()
        if args.role == "node":
            swarm.check_reachability(timeout=10.0)  # as a joining node does: NATed nodes announce no address
        if args.ready:
            write_json(args.ready, {"addrs": swarm.visible_addrs(), "key": identity.public_key_hex,
                                    "joined_at": joined_at})
        if args.role == "origin":
            return run_origin(args, swarm, identity, config, stop)
        return run_node(args, swarm, config, coordinator_key, stop)
    finally:
        swarm.close()


def run_origin(args, swarm, identity, config, stop) -> int:
    from intellect.coordinator.publish import Publisher

    publisher = Publisher(swarm, identity, config, Path(args.cache), super_seed=not args.no_super_seed,
                          max_streams=None if args.no_super_seed else args.max_streams)
    wait_for(args.go, stop)
    manifest = publisher.publish(Path(args.checkpoint), args.step, shard_size=args.shard_kb * 1024)
    data = publisher.publish_data(Path(args.data)).model_dump() if args.data else None
    if args.result:
        write_json(args.result + ".published", {"total_size": manifest.total_size, "data": data})
    stop.wait()
    if args.result:
        write_json(args.result, {"bytes_sent": publisher.bytes_sent, "served": publisher.server.num_served,
                                 "refused": publisher.server.num_refused, "stats": dict(swarm.stats)})
    publisher.close()
    return 0


def run_node(args, swarm, config, coordinator_key, stop) -> int:
    from intellect.node.fetch import FetchTuning, ShardFetcher, ShardUnavailable
    from intellect.protocol.manifest import ShardStore

    cache = Path(args.cache)
    server = None
    if args.corrupt:
        server = CorruptShardServer(ShardStore(cache / "shards"), upload_bytes_per_s=config.upload_bytes_per_s)
    tuning = FetchTuning(parallel=args.parallel, origin_only=args.origin_only, shard_timeout_s=30.0)
    fetcher = ShardFetcher(swarm, config, cache, coordinator_key, tuning=tuning, server=server)
    held_before = len(fetcher.store.held())
    wait_for(args.go, stop)
    started = time.monotonic()
    result: dict = {"held_before": held_before}
    try:
        if args.data_entry:
            from intellect.protocol.messages import ShardEntry

            sha, size = args.data_entry.split(":")
            out = fetcher.fetch_data(ShardEntry(sha256=sha, size=int(size)), timeout_s=args.timeout)
        else:
            out = fetcher.fetch(args.step, timeout_s=args.timeout)
        result.update(ok=True, folder=str(out))
    except ShardUnavailable as e:
        result.update(ok=False, error=str(e))
    result.update(seconds=time.monotonic() - started, stats=dict(fetcher.stats), swarm_stats=dict(swarm.stats),
                  bad_peers=[k.hex() for k in fetcher.bad_peers], bytes_sent=fetcher.server.bytes_sent,
                  reachability=swarm.reachability.line if swarm.reachability else None,
                  direct_addrs=swarm.direct_addrs(),
                  addr_book={k.hex()[:12]: v for k, v in swarm.addr_book.known().items()})
    if args.result:
        write_json(args.result, result)
    if args.stay:
        stop.wait()
    fetcher.close()
    return 0 if result["ok"] else 1


def wait_for(path: str | None, stop: threading.Event) -> None:
    while path and not os.path.exists(path) and not stop.is_set():
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
