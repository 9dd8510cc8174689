"""No orphans: a SIGKILLed `intellect-node coordinator` or `join` main process takes its hivemind DHT
process and p2pd daemon with it, and SIGTERM stops either, children included, within seconds. Real
processes on 127.0.0.1; the children are found with psutil before the kill. The tests share one
coordinator and run in file order."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from tests.coordinator.procs import NODE_ENV, Procs, coordinator_cmd, node_cmd, wait_while_alive, write_toml

GONE_WITHIN_S = 10.0


def swarm_children(pid: int) -> list[psutil.Process]:
    """The process's descendants once its swarm is up: a DHT process (python) and p2pd."""
    kids = psutil.Process(pid).children(recursive=True)
    return kids if any(k.name() == "p2pd" for k in kids) else []


def survivors(procs: list[psutil.Process], timeout: float) -> list[str]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return [f"{p.pid} {p.name()}" for p in alive]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_path):
    """One coordinator for the module (starting one is the slow part); the last test ends it."""
    tmp = tmp_path_factory.mktemp("orphans")
    state = tmp / "coordinator"
    config = write_toml(tmp / "coordinator.toml", {
        "state_dir": state, "run_name": "orphans", "model": str(tiny_model_path), "threads": 1,
        "rollouts": {"prompts_per_batch": 2, "completions_per_prompt": 2, "max_new_tokens": 8},
        "task": {"name": "arithmetic", "max_operand": 20, "operators": "+"},
        "swarm": {"host": "127.0.0.1", "port": 0, "record_ttl_s": 60.0},
    })
    procs = Procs(tmp)
    try:
        procs.start("coordinator", coordinator_cmd(config))
        wait_while_alive(procs, (state / "run.toml").exists, 240, "the coordinator's run file", "coordinator")
        yield procs, state / "run.toml", tmp
    finally:
        procs.close()  # kills the process groups: whatever a failed test left


def start_node(procs: Procs, run_file, state_dir, name: str) -> int:
    pid = procs.start(name, node_cmd(run_file, state_dir), env=NODE_ENV).pid
    wait_while_alive(procs, lambda: swarm_children(pid), 120, f"{name}'s DHT process and p2pd", name)
    return pid


def working(state_dir) -> bool:
    """Joined and the engine loaded. Before that the work loop may sit in torch's imports for long on a
    loaded machine, and a stop waits for the loop (up to 30 s: a thread inside torch at exit aborts)."""
    try:
        return bool(json.loads((state_dir / "status.json").read_text())["engine"])
    except (OSError, ValueError, KeyError):
        return False


@pytest.mark.slow
def test_sigkill_of_a_node_takes_its_dht_process_and_p2pd_along(run):
    procs, run_file, tmp = run
    pid = start_node(procs, run_file, tmp / "node", "node")
    children = swarm_children(pid)
    os.kill(pid, signal.SIGKILL)  # the main process only, not its group
    procs.procs["node"].wait(10)
    left = survivors(children, GONE_WITHIN_S)
    assert not left, f"the node was SIGKILLed but its children survive: {left}"


@pytest.mark.slow
def test_sigterm_stops_a_node_with_its_children(run):
    procs, run_file, tmp = run
    pid = start_node(procs, run_file, tmp / "node2", "node2")
    wait_while_alive(procs, lambda: working(tmp / "node2"), 240, "the node's engine", "node2")
    children = swarm_children(pid)
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    assert procs.wait_exit("node2", 30) == 0, procs.tails("node2")
    took = time.monotonic() - started
    assert took < 30, f"the node took {took:.0f} s to stop"
    left = survivors(children, GONE_WITHIN_S)
    assert not left, f"the node stopped but its children survive: {left}"


@pytest.mark.slow
def test_a_coordinator_whose_dht_process_died_still_stops_on_sigterm(run):
    """Seen before: a headless coordinator whose DHT child had died ignored SIGTERM, and p2pd outlived it.
    (A SIGKILLed coordinator is tested at the end of tests/test_netns.py, which has one running.)"""
    procs, _, _ = run
    coordinator = procs.procs["coordinator"].pid
    children = swarm_children(coordinator)
    dht = [c for c in children if c.name() != "p2pd" and c.ppid() == coordinator]
    assert dht, [c.name() for c in children]
    dht[0].kill()
    time.sleep(1.0)
    started = time.monotonic()
    os.kill(coordinator, signal.SIGTERM)
    procs.wait_exit("coordinator", 30)  # fails with the stacks when it hangs
    took = time.monotonic() - started
    assert took < 30, f"the coordinator took {took:.0f} s to stop"
    left = survivors(children, GONE_WITHIN_S)
    assert not left, f"children survive: {left}"
