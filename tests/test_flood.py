"""A flood: one key submits garbage as fast as the coordinator answers, from 8 threads, for 30 s, while
a coordinator and two honest nodes run (real processes, loopback swarm). Every piece of garbage gets
its verdict (or a `busy` refusal before a byte is read) and the run goes on:
- the caller's calls are bounded at the door: past its call rate (or with 2 already in flight) its
  refusal is held for a second, so 8 threads make ~12 calls a second, not ~470 (before: ~14,000 calls
  in 30 s, the honest round trip's p95 2.8-3.1x its quiet value, mostly the cost of answering);
- the honest round trip's p95 during the flood is at most 2x its quiet value;
- the ledger does not grow with the flood: bytes that are no envelope, replays and a banned key's
  submissions are answered and counted in memory, not written (before, each was an fsynced SQLite
  row taken under the lock honest verdicts wait on: ~4,500 rows in 30 s); the flooder's key has only
  its strikes' rows and is banned;
- the coordinator's memory stays bounded and does not trend up during the flood;
- the honest nodes keep getting verdicts, accepted ones among them.
The flooder is niced (a real attacker floods from their own machine; here it shares 2 cores)."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from intellect.protocol.identity import Identity
from intellect.protocol.swarm.framing import CALL_BURST_PER_PEER, CALLS_PER_S_PER_PEER, PENALTY_S
from tests.coordinator.procs import NODE_ENV, Procs, coordinator_cmd, node_cmd, wait_while_alive, write_toml

FLOODER = Path(__file__).parent / "coordinator" / "flooder.py"
FLOODER_KEY = Identity.from_seed(b"flooder").public_key_hex  # as in flooder.py
QUIET_S = FLOOD_S = 30.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its descendants (its swarm daemon, its workers)."""
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += [c for c, (ppid, _) in stats.items() if ppid == p]
    return total


def honest_latencies(nodes: list[Path], start: float, end: float) -> list[float]:
    """Round trips of the honest verdicts whose submission was sent and answered within [start, end]."""
    out = []
    for d in nodes:
        log = d / "verdicts.jsonl"
        for v in (json.loads(x) for x in (log.read_text().splitlines() if log.exists() else [])):
            if v["at"] - v["latency_s"] >= start and v["at"] <= end:
                out.append(v["latency_s"])
    return out


def accepted_between(nodes: list[Path], start: float, end: float) -> list[dict]:
    return [v for d in nodes for v in map(json.loads, (d / "verdicts.jsonl").read_text().splitlines())
            if v["accepted"] and start <= v["at"] <= end]


def cpu_delta(before: dict, after: dict) -> dict:
    return {name: round(after[name] - before.get(name, 0.0), 1) for name in after}


def trend(samples: list[float]) -> float:
    """Mean of the last third minus mean of the first third."""
    third = len(samples) // 3
    return sum(samples[-third:]) / third - sum(samples[:third]) / third


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.95 * len(values)))]


@pytest.mark.slow
def test_a_flood_is_answered_without_cost_to_the_run(tmp_path, tiny_model_path):
    state = tmp_path / "coordinator"
    config = write_toml(tmp_path / "coordinator.toml", {
        "state_dir": state, "run_name": "flood", "model": str(tiny_model_path), "async_level": 2,
        "batches_per_step": 4, "max_steps": 1000, "threads": 1, "shard_size": 16_000_000,
        "rollouts": {"prompts_per_batch": 2, "completions_per_prompt": 2, "max_new_tokens": 16, "temperature": 1.0},
        "task": {"name": "arithmetic", "max_operand": 20, "operators": "+"},
        "trainer": {"lr": 2e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "temperature": 1.0,
                    "seq_len": 1024},
        "swarm": {"host": "127.0.0.1", "port": 0},
        "intake": {"eos_min_prob": 1e-6, "eos_floor_prob": 1e-6},  # see tests/coordinator/test_intake.py
    })
    procs = Procs(tmp_path)
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    try:
        coordinator = procs.start("coordinator", coordinator_cmd(config))
        wait_while_alive(procs, (state / "run.toml").exists, 120, "the coordinator's run file", "coordinator")
        run_file = state / "run.toml"
        for i, d in enumerate(nodes):
            procs.start(f"node{i}", node_cmd(run_file, d), env=NODE_ENV)
        wait_while_alive(procs, lambda: all((d / "verdicts.jsonl").exists() for d in nodes), 180,
                         "a first verdict for each node", "coordinator", "node0", "node1")
        quiet_start = time.time()
        pids = {name: procs.procs[name].pid for name in ("coordinator", "node0", "node1")}
        cpu0 = {n: tree_cpu_s(p) for n, p in pids.items()}
        quiet_rss = []
        while time.time() < quiet_start + QUIET_S:
            quiet_rss.append(rss_mb(coordinator.pid))
            time.sleep(0.5)
        quiet = honest_latencies(nodes, quiet_start, time.time())
        cpu1 = {n: tree_cpu_s(p) for n, p in pids.items()}

        result, started = tmp_path / "flood.json", tmp_path / "flood.started"
        procs.start("flooder", ["nice", "-n", "19", sys.executable, str(FLOODER), "--run-file", str(run_file),
                                "--seconds", str(FLOOD_S), "--threads", "8", "--result", str(result),
                                "--started", str(started)])
        wait_while_alive(procs, started.exists, 60, "the flooder to join", "flooder", "coordinator")
        flood_start = float(started.read_text())
        rss = []
        pids["flooder"] = procs.procs["flooder"].pid
        cpu2 = {n: tree_cpu_s(p) for n, p in pids.items()}
        while not result.exists():
            cpu3 = {n: tree_cpu_s(p) for n, p in pids.items()}
            procs.check_alive("coordinator", "node0", "node1")
            rss.append(rss_mb(coordinator.pid))
            time.sleep(0.5)
        flood_end = time.time()
        assert procs.wait_exit("flooder", 30) == 0, procs.tails("flooder")
        flooded = honest_latencies(nodes, flood_start, flood_end)
        procs.check_alive("coordinator", "node0", "node1")
    finally:
        procs.close()

    flood = json.loads(result.read_text())
    outcomes = flood["outcomes"]
    summary = (f"honest round trip p95: quiet {p95(quiet):.3f} s ({len(quiet)} verdicts), flood {p95(flooded):.3f} s "
               f"({len(flooded)}); flood {flood}; coordinator RSS MB every 5 s: quiet {quiet_rss[::10]}, flood "
               f"{rss[::10]}; CPU s: quiet {cpu_delta(cpu0, cpu1)}, flood {cpu_delta(cpu2, cpu3)}")
    print(summary)
    assert flood["calls"] >= 5 * FLOOD_S, summary  # it did flood: hundreds of answered calls
    assert outcomes.get("bad_envelope", 0) > 0 and outcomes.get("banned", 0) > 0, summary  # answered, then banned
    assert outcomes.get("refused:busy", 0) > 0, summary  # past its rate, held at the door
    held_door = CALLS_PER_S_PER_PEER * FLOOD_S + CALL_BURST_PER_PEER + 8 * FLOOD_S / PENALTY_S  # admitted + held
    assert flood["calls"] <= 1.2 * held_door, summary  # 8 threads loop no faster than the door lets them
    with sqlite3.connect(state / "ledger.sqlite") as db:
        flooder_rows = db.execute("SELECT COUNT(*) FROM verdicts WHERE node IN (?, 'unknown')",
                                  (FLOODER_KEY,)).fetchone()[0]
        banned = db.execute("SELECT COUNT(*) FROM bans WHERE node = ?", (FLOODER_KEY,)).fetchone()[0]
    assert banned == 1 and flooder_rows <= 5, (flooder_rows, summary)  # its strikes (ban_after_failures), no more
    assert len(quiet) >= 8 and len(flooded) >= 8, summary  # the honest nodes kept getting verdicts
    assert p95(flooded) <= 2 * p95(quiet), summary
    assert any(accepted_between(nodes, flood_start, flood_end)), summary
    assert max(rss) < max(quiet_rss) + 128, summary  # bounded: a plateau, not a function of the calls
    # and no upward trend beyond the run's own (a training coordinator's RSS drifts up ~30 MB in 30 quiet s)
    assert trend(rss) < max(trend(quiet_rss), 0.0) + 32, (trend(rss), trend(quiet_rss), summary)
