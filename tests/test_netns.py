"""The swarm across hosts (tests/netns_harness.py): a coordinator and one node on public addresses, two
nodes each behind its own NAT router (masquerade, nothing inbound), every link shaped. The real
`intellect-node coordinator` and `join` commands run inside the namespaces. The tests share one run and
go in file order: NATed nodes complete policy steps; each node's reachability line names its case; the
coordinator's link goes down for 30 s and the nodes carry on by themselves; a coordinator restarted on
the same key and port is found again; a SIGKILLed coordinator leaves no process behind in its namespace.
All of it on each swarm backend (hivemind, py-libp2p).

Skipped (with the reason) only where namespaces cannot be made: not root, or no `ip`/`nft`."""

from __future__ import annotations

import json
import time

import pytest

from tests import netns_harness
from tests.cli_harness import command, wait_for
from tests.coordinator.procs import NODE_ENV, write_toml

_why_not = netns_harness.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not is not None, reason=str(_why_not))]

PORT = 31337
LINK_DOWN_S = 30.0
NODES = ("pub", "nat1", "nat2")


def node_cmd(run_file, state_dir, host: netns_harness.Host) -> list[str]:
    return command("join", "--run-file", str(run_file), "--state-dir", str(state_dir), "--engine", "torch",
                   "--threads", "1", "--host", host.ip, "--headless")


def swarm_coordinator_cmd(tmp, coord: netns_harness.Host) -> list[str]:
    return command("coordinator", "--config", str(tmp / "coordinator.toml"), "--headless", "--host", coord.ip,
                   "--port", str(PORT))


def status(tmp, name: str) -> dict:
    try:
        return json.loads((tmp / name / "status.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module", params=["hivemind", "libp2p"])
def swarm(request, tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp(f"netns-{request.param}")
    state = tmp / "coordinator"
    write_toml(tmp / "coordinator.toml", {
        "state_dir": state, "run_name": "netns", "model": str(tiny_model_path), "async_level": 1,
        "swarm": {"backend": request.param},
        "batches_per_step": 1, "threads": 1, "shard_size": 4_000_000,
        "rollouts": {"prompts_per_batch": 2, "completions_per_prompt": 4, "max_new_tokens": 16, "temperature": 1.0},
        "task": {"name": "arithmetic", "max_operand": 20, "operators": "+"},
        "trainer": {"lr": 2e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "temperature": 1.0,
                    "seq_len": 512},
        "intake": {"eos_min_prob": 1e-6, "eos_floor_prob": 1e-6},  # see tests/coordinator/test_intake.py
    })
    with netns_harness.Network(tmp) as net:
        coord = net.add_public("coord")
        hosts = {"pub": net.add_public("pub"), "nat1": net.add_natted("nat1"), "nat2": net.add_natted("nat2")}
        procs = net.procs
        procs.start(coord, "coordinator", swarm_coordinator_cmd(tmp, coord))
        run_file = state / "run.toml"

        def ready():
            procs.check_alive("coordinator")
            return run_file.exists()

        wait_for(ready, 300, "the coordinator's run file", lambda: procs.tails("coordinator"))
        for name, host in hosts.items():
            procs.start(host, name, node_cmd(run_file, tmp / name, host), env=NODE_ENV)
        yield net, procs, tmp, coord, hosts, request.param


def accepted(tmp, name: str) -> int:
    return int(status(tmp, name).get("accepted", 0))


def test_natted_nodes_join_fetch_the_policy_and_get_verdicts(swarm):
    _, procs, tmp, _, hosts, _ = swarm
    assert hosts["nat1"].behind_nat and not hosts["pub"].behind_nat

    def all_accepted():
        procs.check_alive("coordinator", *NODES)
        return all(accepted(tmp, n) >= 1 and (status(tmp, n).get("policy_step") or 0) >= 1 for n in NODES)

    wait_for(all_accepted, 600, "an accepted batch on policy step >= 1 from every node",
             lambda: json.dumps({n: status(tmp, n) for n in NODES}, indent=1) + procs.tails(*NODES))


def test_reachability_names_each_nodes_case(swarm):
    tmp = swarm[2]

    def checked():
        return all(status(tmp, n).get("reachability", "unknown") != "unknown" for n in NODES)

    wait_for(checked, 120, "every node's reachability check", lambda: json.dumps(
        {n: status(tmp, n).get("reachability") for n in NODES}))
    lines = {n: status(tmp, n)["reachability"] for n in NODES}
    assert lines["pub"].startswith("public"), lines
    for n in ("nat1", "nat2"):
        assert lines[n].startswith("behind NAT"), lines
        assert "client_mode" in lines[n] and "use_auto_relay" in lines[n], lines  # and what to do


def _wait_for_new_accepts(procs, tmp, before: dict, timeout: float, when: str) -> dict:
    """Wait until every node has a batch accepted beyond `before` (all processes alive); the counts."""
    def all_again():
        procs.check_alive("coordinator", *NODES)
        return all(accepted(tmp, n) > before[n] for n in NODES)

    wait_for(all_again, timeout, f"a newly accepted batch from every node {when}",
             lambda: json.dumps({n: status(tmp, n) for n in NODES}, indent=1) + procs.tails("coordinator", *NODES))
    return {n: accepted(tmp, n) for n in NODES}


def test_nodes_recover_by_themselves_after_the_coordinators_link_was_down(swarm):
    net, procs, tmp, coord, _, _ = swarm
    before = {n: accepted(tmp, n) for n in NODES}
    net.link(coord, up=False)
    time.sleep(LINK_DOWN_S)
    net.link(coord, up=True)
    after = _wait_for_new_accepts(procs, tmp, before, 420, "after the link came back")
    assert all(after[n] > before[n] for n in NODES), (before, after)


def test_a_coordinator_restarted_on_the_same_key_and_port_is_found_again(swarm):
    """Nobody re-runs `join`: the nodes keep running and reach the new coordinator process, well before
    the old process's records expire (record_ttl_s, 300 s): a node whose batch is stale re-dials its
    bootstrap peers. Before that, nodes kept reading the old RunInfo and every batch was stale for ~5 min."""
    _, procs, tmp, coord, _, _ = swarm
    procs.procs["coordinator"].terminate()
    assert procs.wait_exit("coordinator", 60) == 0, procs.tails("coordinator")
    before = {n: accepted(tmp, n) for n in NODES}
    procs.start(coord, "coordinator", swarm_coordinator_cmd(tmp, coord))
    after = _wait_for_new_accepts(procs, tmp, before, 150, "after the restart")
    assert all(after[n] > before[n] for n in NODES), (before, after)


def test_a_sigkilled_coordinator_leaves_nothing_behind_in_its_namespace(swarm):
    _, procs, _, coord, _, backend = swarm
    inside = netns_harness.pids_in(coord.ns)
    assert len(inside) >= (3 if backend == "hivemind" else 1), inside  # hivemind: its DHT process and p2pd too
    procs.procs["coordinator"].kill()  # SIGKILL the main process only (not its group)
    wait_for(lambda: not netns_harness.pids_in(coord.ns), 15, "the coordinator's children to exit",
             lambda: str(netns_harness.pids_in(coord.ns)))
