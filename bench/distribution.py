"""Checkpoint distribution: peer-assisted swarm vs. origin-only (SHARDCAST without relays).

Runs an origin and N node processes on 127.0.0.1 with the origin's upload capped at --origin-mbit, twice:
  swarm        nodes fetch from each other and from the origin, which super-seeds;
  origin_only  every node fetches every shard from the origin (the baseline, measured in the same run).
Times run from the moment all peers are up and the manifest is published to the moment every node holds
a verified, assembled checkpoint. One JSON object per swarm backend (--backend hivemind,libp2p runs both
on the same checkpoint, one after the other):
  {"backend","nodes","size_mb","origin_mbit","swarm_s","origin_only_s","speedup","origin_egress_ratio",
   "peer_share","startup_s","all_verified"}
startup_s = the median node's time from process start to a joined swarm.
origin_egress_ratio = bytes the origin sent in the swarm run / checkpoint size.

With --netns (root, Linux; tests/netns_harness.py) the origin and the nodes are separate hosts in
network namespaces, --natted of the nodes each behind its own NAT router, every link shaped (netem
--delay-ms and --loss-pct where the kernel has netem, tbf --link-mbit); the JSON adds "netns", "natted",
"shaping", "peer_share" (bytes nodes got from peers / bytes they got) and "nat_first_accept_s" (the
real coordinator on a public host and `intellect-node join` behind a NAT: seconds from the join to the
node's first accepted batch, tiny model).

With --delta it measures policy updates as shard deltas instead (bench/delta.py, whose options follow:
real GRPO steps on SmolLM2, one JSON line per learning rate with delta_share, full_share and exact).

Usage: python bench/distribution.py --nodes 8 --size-mb 64 --origin-mbit 200 [--backend hivemind,libp2p]
       sudo .venv/bin/python bench/distribution.py --netns --nodes 8 --natted 4 --size-mb 64
       python bench/distribution.py --delta --lr 1e-6 --lr 3e-7
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "node"))
sys.path.insert(0, str(ROOT))
from swarm_harness import Peers, coordinator_key_hex, make_checkpoint, sha256_of

COORD = "bench-coordinator"


def run_once(workdir: Path, checkpoint: Path, args, origin_only: bool, hosts: dict | None = None) -> dict:
    """hosts: name -> netns_harness.Host (origin, node0..); None runs every peer on 127.0.0.1."""
    workdir.mkdir(parents=True)
    peers = Peers(workdir)

    def where(name: str) -> dict:
        if hosts is None:
            return {}
        return {"prefix": tuple(hosts[name].cmd()), "host": hosts[name].ip}

    started_at: dict[str, float] = {}

    def start(name: str, *worker_args: str) -> None:
        w = where(name)
        started_at[name] = time.time()
        peers.start(name, *worker_args, "--backend", args.backend, *(["--host", w["host"]] if w else []),
                    prefix=w.get("prefix", ()))

    try:
        origin_args = ["--role", "origin", "--seed", COORD, "--cache", "origin", "--checkpoint", str(checkpoint),
                       "--ready", "origin.ready", "--result", "origin.json", "--shard-kb", str(args.shard_kb),
                       "--max-upload-mbit", str(args.origin_mbit), "--max-streams", str(args.origin_streams)]
        start("origin", *origin_args, *(["--no-super-seed"] if origin_only else []))
        bootstrap = peers.wait_json(workdir / "origin.ready", 120, "origin")["addrs"]
        peers.wait_json(workdir / "origin.json.published", 120, "origin")
        names = [f"node{i}" for i in range(args.nodes)]
        for name in names:
            node_args = ["--role", "node", "--seed", name, "--coordinator-key", coordinator_key_hex(COORD),
                         "--cache", name, "--ready", f"{name}.ready", "--result", f"{name}.json", "--go", "go",
                         "--stay", "--timeout", str(args.timeout), "--parallel", str(args.parallel)]
            for addr in bootstrap:
                node_args += ["--bootstrap", addr]
            if args.node_mbit:
                node_args += ["--max-upload-mbit", str(args.node_mbit)]
            start(name, *node_args, *(["--origin-only"] if origin_only else []))
        ready = {name: peers.wait_json(workdir / f"{name}.ready", 120, name) for name in names}
        # process start to a joined swarm, per node (the reachability check that follows not counted)
        startup = sorted(ready[n]["joined_at"] - started_at[n] for n in names)
        start = time.monotonic()
        (workdir / "go").touch()
        results = {}
        for name in names:
            results[name] = peers.wait_json(workdir / f"{name}.json", args.timeout + 30, name)
        seconds = time.monotonic() - start
        peers.stop("origin")
        origin = peers.wait_json(workdir / "origin.json", 30)
        sent = origin["bytes_sent"]
        want = sha256_of(checkpoint / "model.safetensors")
        verified = all(r["ok"] and sha256_of(workdir / r["folder"] / "model.safetensors") == want
                       for r in results.values())
        from_peers = sum(r["stats"].get("bytes_from_peers", 0) for r in results.values())
        print(json.dumps({"mode": "origin_only" if origin_only else "swarm", "seconds": round(seconds, 2),
                          "origin_bytes_sent": sent, "origin_refused": origin["refused"], "bytes_from_peers": from_peers, "verified": verified,
                          "node_seconds": sorted(round(r["seconds"], 2) for r in results.values()),
                          "node_stats": dict(sum((Counter(r["stats"]) + Counter(r["swarm_stats"])
                                                  for r in results.values()), Counter()))}),
              flush=True)
        return {"seconds": seconds, "origin_bytes_sent": sent, "verified": verified, "bytes_from_peers": from_peers,
                "startup_s": startup[len(startup) // 2]}
    finally:
        peers.close()


def main() -> None:
    if "--delta" in sys.argv[1:]:
        import delta  # bench/delta.py, beside this file

        delta.main([a for a in sys.argv[1:] if a != "--delta"])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--size-mb", type=float, default=64)
    p.add_argument("--origin-mbit", type=float, default=200)
    p.add_argument("--node-mbit", type=float, default=None, help="nodes' upload cap (default: unlimited)")
    p.add_argument("--shard-kb", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=4, help="concurrent shard downloads per node")
    p.add_argument("--origin-streams", type=int, default=2, help="origin upload slots in the swarm run")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--netns", action="store_true", help="separate hosts in network namespaces (root)")
    p.add_argument("--natted", type=int, default=4, help="--netns: nodes behind their own NAT router")
    p.add_argument("--delay-ms", type=float, default=40.0, help="--netns: one-way delay per link")
    p.add_argument("--loss-pct", type=float, default=0.5, help="--netns: loss per link")
    p.add_argument("--link-mbit", type=float, default=100.0, help="--netns: rate of each link, each way")
    p.add_argument("--backend", default="hivemind",
                   help="swarm backends to run, comma-separated (hivemind,libp2p: one line each, same checkpoint)")
    args = p.parse_args()
    backends = args.backend.split(",")
    if not set(backends) <= {"hivemind", "libp2p"}:
        raise SystemExit("--backend takes hivemind, libp2p or hivemind,libp2p")
    with tempfile.TemporaryDirectory(prefix="bench-distribution-") as tmp:
        tmp = Path(tmp)
        checkpoint = make_checkpoint(tmp / "checkpoint", args.size_mb)
        size = sum(f.stat().st_size for f in checkpoint.iterdir())
        for backend in backends:
            args.backend = backend
            if args.netns:
                extra, swarm, baseline = run_netns(tmp / backend, checkpoint, args)
            else:
                extra = {}
                swarm = run_once(tmp / backend / "swarm", checkpoint, args, origin_only=False)
                baseline = run_once(tmp / backend / "origin_only", checkpoint, args, origin_only=True)
            print(json.dumps({
                "backend": backend, "nodes": args.nodes, "size_mb": args.size_mb, "origin_mbit": args.origin_mbit,
                "swarm_s": round(swarm["seconds"], 2), "origin_only_s": round(baseline["seconds"], 2),
                "speedup": round(baseline["seconds"] / swarm["seconds"], 2),
                "origin_egress_ratio": round(swarm["origin_bytes_sent"] / size, 3),
                "peer_share": round(swarm["bytes_from_peers"] / (size * args.nodes), 3),
                "startup_s": round(swarm["startup_s"], 2),
                "all_verified": swarm["verified"] and baseline["verified"], **extra,
            }), flush=True)


def run_netns(tmp: Path, checkpoint: Path, args) -> tuple[dict, dict, dict]:
    from tests import netns_harness

    why = netns_harness.unavailable()
    if why:
        raise SystemExit(f"--netns: {why}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the namespaces are deleted
    shape = netns_harness.Shape(args.delay_ms, args.loss_pct, args.link_mbit)
    tmp.mkdir(parents=True, exist_ok=True)
    with netns_harness.Network(tmp, shape) as net:
        hosts = {"origin": net.add_public("origin")}
        for i in range(args.nodes):
            name = f"node{i}"
            hosts[name] = net.add_natted(name) if i >= args.nodes - args.natted else net.add_public(name)
        swarm = run_once(tmp / "swarm", checkpoint, args, origin_only=False, hosts=hosts)
        baseline = run_once(tmp / "origin_only", checkpoint, args, origin_only=True, hosts=hosts)
        extra = {"netns": True, "natted": args.natted, "shaping": net.shaping,
                 "nat_first_accept_s": round(nat_first_accept(tmp / "loop", net, args.backend), 1)}
    return extra, swarm, baseline


def nat_first_accept(tmp: Path, net, backend: str) -> float:
    """Seconds from `intellect-node join` on a host behind a NAT to its first accepted batch, with the
    real coordinator (the tiny random model, so the time is the swarm's, not the model's) on a public
    host of the same network: joining, reachability, policy fetch, generation, submission, verdict."""
    from intellect.protocol.model import tiny_model_dir
    from tests.cli_harness import command, wait_for
    from tests.coordinator.procs import NODE_ENV, write_toml

    tmp.mkdir(parents=True)
    state = tmp / "coordinator"
    write_toml(tmp / "coordinator.toml", {
        "state_dir": state, "run_name": "nat-first-accept", "model": str(tiny_model_dir(tmp / "models", seed=0)),
        "async_level": 1, "batches_per_step": 1, "threads": 1, "swarm": {"backend": backend},
        "rollouts": {"prompts_per_batch": 2, "completions_per_prompt": 4, "max_new_tokens": 16},
        "task": {"name": "arithmetic", "max_operand": 20, "operators": "+"},
        "intake": {"eos_min_prob": 1e-6, "eos_floor_prob": 1e-6},  # a random model: see tests/test_netns.py
    })
    coord, node = net.add_public("acoord"), net.add_natted("anode")
    procs = net.procs
    procs.start(coord, "coordinator", command("coordinator", "--config", str(tmp / "coordinator.toml"), "--headless",
                                              "--host", coord.ip, "--port", "31338"))
    wait_for(lambda: procs.check_alive("coordinator") or (state / "run.toml").exists(), 300,
             "the coordinator's run file", lambda: procs.tails("coordinator"))
    started = time.monotonic()
    procs.start(node, "node", command("join", "--run-file", str(state / "run.toml"), "--state-dir", str(tmp / "node"),
                                      "--engine", "torch", "--threads", "1", "--host", node.ip, "--headless"),
                env=NODE_ENV)

    def accepted() -> bool:
        procs.check_alive("coordinator", "node")
        try:
            return json.loads((tmp / "node" / "status.json").read_text()).get("accepted", 0) >= 1
        except (OSError, ValueError):
            return False

    wait_for(accepted, 600, "the NATed node's first accepted batch", lambda: procs.tails("coordinator", "node"))
    seconds = time.monotonic() - started
    for name in ("node", "coordinator"):
        procs.procs[name].terminate()
    return seconds


if __name__ == "__main__":
    main()
