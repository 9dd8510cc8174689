"""A vandal in the swarm: a plain hivemind peer (no key of the run, no validator) stores junk, plain
values and an old, genuinely signed RunInfo under every key space of the run, with a far expiration,
again and again while a coordinator and two nodes run. Before store-time validation one plain value
under `run_info` with a far expiration blocked every later record there: nodes saw "the coordinator is
not in the swarm" and the run stopped. Now the run keeps training: policy steps advance and both nodes
keep submitting after the vandalism began."""

from __future__ import annotations

import json
import threading
import time
import tomllib

import pytest

from intellect.protocol.swarm.keys import KEY_SPACES, dht_key
from tests.coordinator.procs import NODE_ENV, Procs, coordinator_cmd, node_cmd, wait_while_alive, write_toml

MIN_STEPS = 2  # the run trains at least this far, with both nodes taking part after the vandalism began
FAR = 1e9  # seconds: "forever"


def vandal_keys(run_id: str) -> list[str]:
    names = []
    for space, rule in KEY_SPACES.items():
        names += [f"{space}/{step}" for step in range(MIN_STEPS + 4)] if rule.indexed else [space]
    return [dht_key(run_id, name) for name in names]


class Vandal:
    """A plain hivemind.DHT joined through the coordinator; every round stores, under each key: junk
    under the coordinator's subkey and under a subkey of its own, the old RunInfo record it captured
    (with a far expiration and with its own), and last a plain junk value that outlives them all."""

    def __init__(self, bootstrap: list[str], run_id: str, coordinator_hex: str) -> None:
        import hivemind

        self.dht = hivemind.DHT(initial_peers=bootstrap, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        self.keys, self.coordinator_hex = vandal_keys(run_id), coordinator_hex
        self.run_info_key = dht_key(run_id, "run_info")
        self.old_run_info = None
        self.rounds, self.first_round_at = 0, None
        self.stop = threading.Event()

    def capture_run_info(self) -> bool:
        found = self.dht.get(self.run_info_key, latest=True)
        if found is not None and isinstance(found.value, dict) and self.coordinator_hex in found.value:
            self.old_run_info = found.value[self.coordinator_hex]  # value and expiration, as stored
        return self.old_run_info is not None

    def vandalize(self) -> None:
        from hivemind.utils import get_dht_time

        now = get_dht_time()
        stores = []
        for key in self.keys:
            stores += [(key, b"junk", now + FAR, self.coordinator_hex), (key, b"junk", now + FAR, "ee" * 32)]
            if key == self.run_info_key:
                old = self.old_run_info
                stores += [(key, old.value, old.expiration_time, self.coordinator_hex),  # replayed as it was
                           (key, old.value, now + FAR, self.coordinator_hex)]
        futures = [self.dht.store(key, value, expiration, subkey=subkey, return_future=True)
                   for key, value, expiration, subkey in stores]
        # last, plain values that outlive all of the above: they blocked every later subkey store
        futures += [self.dht.store(key, b"junk", now + FAR + 1, return_future=True) for key in self.keys]
        for future in futures:
            future.result(timeout=60)
        self.rounds += 1
        self.first_round_at = self.first_round_at or time.time()

    def run(self) -> None:
        while not self.stop.is_set():
            self.vandalize()
            self.stop.wait(3.0)

    def close(self) -> None:
        self.stop.set()
        self.dht.shutdown()


def took_part(node_dir, since: float | None) -> bool:
    """The node had a batch accepted after `since` and follows a policy past step 0."""
    try:
        verdicts = [json.loads(x) for x in (node_dir / "verdicts.jsonl").read_text().splitlines()]
        status = json.loads((node_dir / "status.json").read_text())
    except (OSError, ValueError):
        return False
    return since is not None and any(v["accepted"] and v["at"] > since for v in verdicts) \
        and (status.get("policy_step") or 0) >= 1 and (status.get("collect_step") or 0) >= 1  # null until known


@pytest.mark.slow
def test_a_vandal_does_not_stop_the_run(tmp_path, tiny_model_path):
    state = tmp_path / "coordinator"
    config = write_toml(tmp_path / "coordinator.toml", {
        "state_dir": state, "run_name": "vandal", "model": str(tiny_model_path), "async_level": 1,
        "batches_per_step": 2, "max_steps": 1000, "threads": 1, "shard_size": 16_000_000,
        "rollouts": {"prompts_per_batch": 2, "completions_per_prompt": 2, "max_new_tokens": 16, "temperature": 1.0},
        "task": {"name": "arithmetic", "max_operand": 20, "operators": "+"},
        "trainer": {"lr": 2e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "temperature": 1.0,
                    "seq_len": 1024},
        "swarm": {"host": "127.0.0.1", "port": 0, "record_ttl_s": 60.0},
        "intake": {"eos_min_prob": 1e-6, "eos_floor_prob": 1e-6},  # see tests/coordinator/test_intake.py
    })
    procs, vandal, thread = Procs(tmp_path), None, None
    try:
        procs.start("coordinator", coordinator_cmd(config))
        wait_while_alive(procs, (state / "run.toml").exists, 120, "the coordinator's run file", "coordinator")
        run = tomllib.loads((state / "run.toml").read_text())
        vandal = Vandal(run["bootstrap"], run["run_id"], run["coordinator_key"])
        wait_while_alive(procs, vandal.capture_run_info, 60, "the vandal to read the first RunInfo", "coordinator")
        nodes = [tmp_path / "node0", tmp_path / "node1"]
        for i, d in enumerate(nodes):
            procs.start(f"node{i}", node_cmd(state / "run.toml", d), env=NODE_ENV)
        vandal.vandalize()  # before any node read anything
        thread = threading.Thread(target=vandal.run, daemon=True)
        thread.start()
        # until both nodes had batches accepted after the vandalism began (one fast node can train a short
        # run alone: a fixed max_steps of 2 was once over before the other's first batch came in)
        wait_while_alive(procs, lambda: vandal.rounds >= 2 and all(took_part(d, vandal.first_round_at) for d in nodes),
                         300, "both nodes to have batches accepted after the vandalism began",
                         "coordinator", "node0", "node1")
        procs.procs["coordinator"].terminate()
        assert procs.wait_exit("coordinator", 60) == 0, procs.tails()
    finally:
        if vandal is not None:
            vandal.close()
        if thread is not None:
            thread.join(30)
        procs.close()

    metrics = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics]
    assert steps == list(range(len(steps))) and len(steps) >= MIN_STEPS, steps
    assert vandal.rounds >= 2
    for d in nodes:  # both nodes took part after the vandalism began and followed the run forward
        verdicts = [json.loads(x) for x in (d / "verdicts.jsonl").read_text().splitlines()]
        accepted = [v for v in verdicts if v["accepted"] and v["at"] > vandal.first_round_at]
        assert accepted, verdicts
        status = json.loads((d / "status.json").read_text())  # past the replayed RunInfo of step 0
        assert status["collect_step"] >= 1 and status["policy_step"] >= 1, status
        assert status["swarm"]["dht_records_refused"] > 0, status  # the vandal's stores, counted where refused
