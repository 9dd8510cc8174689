"""SIGKILL the coordinator process at the worst moments, restart it from the same state dir, and check
that nothing accepted is lost, no half-written checkpoint is used, and training picks up where the last
complete checkpoint left it.

One run per swarm backend (hivemind, py-libp2p): `intellect-node coordinator --config ... --headless` and
two `intellect-node join` nodes that stay up throughout (their outboxes retry what got no verdict). The
coordinator is started again and again with INTELLECT_COORD_PAUSE_AT naming one point of intake or
training (see `coordinator/faults.py`); when it reaches the point it writes a marker and stops, and the
test SIGKILLs its process group. Mid-checkpoint is caught without a hook: the test SIGKILLs as soon as
the checkpoint's temp folder appears. After each kill the disk is checked (ledger, accepted files, checkpoints); after
the last restart the run goes on to `max_steps` and the whole history is checked.

A restarted coordinator joins the swarm through a node (`swarm.bootstrap`): without it the nodes never
read its records again (their DHT keeps the old instance), though they can still submit.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from intellect.coordinator.faults import PAUSE_AT_ENV, PAUSE_FILE_ENV
from intellect.coordinator.ledger import Ledger
from intellect.coordinator.trainer.checkpoint import (
    POLICY_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
    complete_checkpoints,
)
from intellect.protocol.identity import Identity
from intellect.protocol.rollouts import read_rollouts
from tests.coordinator.procs import (
    NODE_ENV,
    Procs,
    assert_step_took_its_batches,
    coordinator_cmd,
    free_port,
    node_cmd,
    wait_while_alive,
    write_toml,
)

pytestmark = pytest.mark.slow

ASYNC_LEVEL = 1
MAX_STEPS = 12
RESUMED = re.compile(r"resumed at policy step (\d+)")


class Cluster:
    """The coordinator process (restarted many times) and two node processes, all on 127.0.0.1."""

    def __init__(self, tmp: Path, model: Path, backend: str) -> None:
        self.tmp = tmp
        self.state = tmp / "coordinator"
        self.procs = Procs(tmp)
        self.marker = tmp / "paused"
        self.node_dirs = [tmp / "node0", tmp / "node1"]
        self.node_ports = [free_port(), free_port()]
        self.settings = {
            "state_dir": self.state, "run_name": "crash", "model": str(model), "async_level": ASYNC_LEVEL,
            "batches_per_step": 2, "max_steps": MAX_STEPS, "threads": 1, "shard_size": 16_000_000,
            "keep_checkpoints": 3,
            "full_state_every": 1,  # every checkpoint resumable: each kill resumes exactly where it was
            "rollouts": {"prompts_per_batch": 4, "completions_per_prompt": 4, "max_new_tokens": 24,
                         "temperature": 1.0},
            "task": {"name": "arithmetic", "max_operand": 20, "operators": "+"},
            "trainer": {"lr": 2e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "temperature": 1.0,
                        "seq_len": 1024},
            "swarm": {"host": "127.0.0.1", "port": free_port(), "record_ttl_s": 30.0, "backend": backend},
            "intake": {"eos_min_prob": 1e-6, "eos_floor_prob": 1e-6},  # see tests/coordinator/test_intake.py
        }
        self.starts = 0

    # ------------------------------------------------------------------ processes

    def start_coordinator(self, pause_at: str | None) -> None:
        self.marker.unlink(missing_ok=True)
        if self.starts:  # rejoin the swarm through the nodes (see the module docstring)
            self.settings["swarm"]["bootstrap"] = [self.node_addr(i) for i in range(2)]
        config = write_toml(self.tmp / "coordinator.toml", self.settings)
        env = {PAUSE_AT_ENV: pause_at or "", PAUSE_FILE_ENV: str(self.marker)}
        self.procs.start("coordinator", coordinator_cmd(config), env=env)
        self.starts += 1

    def start_nodes(self) -> None:
        run_file = self.state / "run.toml"
        wait_while_alive(self.procs, run_file.exists, 120, "the coordinator's run file", "coordinator")
        for i, d in enumerate(self.node_dirs):
            self.procs.start(f"node{i}", node_cmd(run_file, d, "--port", str(self.node_ports[i])), env=NODE_ENV)

    def node_addr(self, i: int) -> str:
        import base58

        from intellect.protocol.swarm.framing import peer_id_bytes  # the same id on either backend

        key = Identity.from_pem((self.node_dirs[i] / "node_key.pem").read_bytes()).public_key
        return f"/ip4/127.0.0.1/tcp/{self.node_ports[i]}/p2p/{base58.b58encode(peer_id_bytes(key)).decode()}"

    def wait_paused(self, point: str, timeout: float = 180) -> None:
        wait_while_alive(self.procs, lambda: self.marker.exists() and self.marker.read_text() == point, timeout,
                         f"the coordinator to reach {point}", "coordinator", "node0", "node1")

    def kill_coordinator(self) -> None:
        self.procs.kill("coordinator")

    # ------------------------------------------------------------------ state on disk

    def metrics_steps(self) -> list[int]:
        path = self.state / "metrics.jsonl"
        return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []

    def checkpoint_steps(self) -> list[int]:
        return [int(p.name.removeprefix("step_")) for p in complete_checkpoints(self.state / "checkpoints")]

    def resumed_at(self) -> list[int]:
        return [int(m) for m in RESUMED.findall((self.state / "log.txt").read_text())]

    def node_verdicts(self) -> list[dict]:
        out = []
        for d in self.node_dirs:
            path = d / "verdicts.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            out += [json.loads(x) for x in lines if x.endswith("}")]  # a line being written is skipped
        return out

    def accepted_in_ledger(self, ledger: Ledger) -> dict[str, list]:
        """content hash -> ledger rows of it, over every train step the run can have reached."""
        found: dict[str, list] = {}
        for step in range(MAX_STEPS + ASYNC_LEVEL + 2):
            for sub in ledger.accepted_for_train_step(step):
                found.setdefault(sub.content_hash, []).append(sub)
        return found

    def check_disk(self) -> dict[str, list]:
        """Invariants that must hold at any moment the coordinator can die; returns the accepted set."""
        with Ledger(self.state / "ledger.sqlite") as ledger:
            assert ledger.integrity_ok()
            accepted = self.accepted_in_ledger(ledger)
            for sha, subs in accepted.items():
                assert len(subs) == 1, f"{sha} accepted {len(subs)} times"
                path = Path(subs[0].stored_path)
                if not path.exists():  # killed between the ledger commit and the move: the restart moves it
                    path = self.state / "inbox" / path.name
                data = path.read_bytes()  # exists ...
                assert hashlib.sha256(data).hexdigest() == sha  # ... whole ...
                assert len(read_rollouts(data).rows) == subs[0].num_completions  # ... and readable
            # accepted/ never holds a file the ledger did not accept
            assert {p.stem for p in (self.state / "accepted").glob("*.parquet")} <= set(accepted)
            for v in self.node_verdicts():  # every acknowledgement a node holds is backed by the ledger
                if v["accepted"]:
                    assert v["file_sha256"] in accepted, v
        folders = sorted((self.state / "checkpoints").glob("step_*"))
        for folder in folders:  # only whole checkpoints carry a step name
            assert (folder / POLICY_DIR / "model.safetensors").is_file(), folder
        if folders:  # the newest one can be resumed from (older ones drop their training state)
            assert {STATE_FILE, WEIGHTS_FILE} <= {p.name for p in folders[-1].iterdir()}, folders[-1]
        return accepted

    def close(self) -> None:
        self.procs.close()


@pytest.fixture(scope="module", params=["hivemind", "libp2p"])
def cluster(request, tmp_path_factory, tiny_model_path):
    c = Cluster(tmp_path_factory.mktemp(f"crash-{request.param}"), tiny_model_path, request.param)
    yield c
    c.close()


@pytest.fixture(scope="module")
def history(cluster):
    """Run every kill in order; what each one left behind, for the tests below."""
    c = cluster
    h: dict = {}

    # 1. mid-validation: the file sits in the inbox, no verdict exists
    c.start_coordinator("intake.validating")
    c.start_nodes()
    c.wait_paused("intake.validating")
    c.kill_coordinator()
    h["inbox_at_kill"] = {p.stem for p in (c.state / "inbox").glob("*.parquet")}
    h["validating_accepted"] = c.check_disk()

    # 2. verdict committed, the file not yet moved from the inbox to accepted/
    c.start_coordinator("intake.stored")
    c.wait_paused("intake.stored")
    c.kill_coordinator()
    stored = c.check_disk()
    h["recorded_in_inbox"] = {p.stem for p in (c.state / "inbox").glob("*.parquet")} & set(stored)

    # 3. file in accepted/, the node not yet answered
    c.start_coordinator("intake.recorded")
    c.wait_paused("intake.recorded")
    c.kill_coordinator()
    recorded = c.check_disk()
    acked = {v["file_sha256"] for v in c.node_verdicts()}
    h["unacknowledged"] = set(recorded) - acked
    h["accepted_after_restart"] = {p.stem for p in (c.state / "accepted").glob("*.parquet")}
    h["inbox_after_restart"] = {p.stem for p in (c.state / "inbox").glob("*.parquet")}

    # 4. during training: the step's batches taken, the optimizer stepped, nothing saved
    c.start_coordinator("train.trained")
    c.wait_paused("train.trained")
    c.kill_coordinator()
    c.check_disk()
    h["trained"] = (c.checkpoint_steps()[-1], c.metrics_steps())

    # 5. mid-checkpoint: SIGKILL as soon as the checkpoint's temp folder exists
    h["mid_write"] = []
    for _ in range(3):
        # a temp folder may be left from an earlier kill: only a new one is this process's write
        stale = set((c.state / "checkpoints").glob(".tmp-*"))
        c.start_coordinator(None)
        before = c.checkpoint_steps()[-1]
        tmp_dirs = wait_while_alive(c.procs, lambda s=stale: set((c.state / "checkpoints").glob(".tmp-step_*")) - s,
                                    180, "a checkpoint being written", "coordinator", interval=0.001)
        c.kill_coordinator()
        c.check_disk()
        left = [p for p in tmp_dirs if p.exists()]
        h["mid_write"].append((before, c.checkpoint_steps()[-1], bool(left), c.metrics_steps()))
        if left:
            break

    # 6. checkpoint whole, the new policy not yet published
    c.start_coordinator("train.saved")
    c.wait_paused("train.saved")
    c.kill_coordinator()
    c.check_disk()
    h["saved"] = (c.checkpoint_steps()[-1], c.metrics_steps())

    # 7. the rest of the run, to max_steps, without interruption
    c.start_coordinator(None)
    assert c.procs.wait_exit("coordinator", 900) == 0, c.procs.tails("coordinator")  # a loaded CI machine
    h["final_accepted"] = c.check_disk()
    for i in range(2):
        c.procs.kill(f"node{i}")
    return h


def test_unanswered_submission_is_dropped_and_resubmitted(cluster, history):
    """Killed mid-validation: the inbox file is dropped at restart, the node sends it again and gets a
    verdict; it was accepted once."""
    inbox = history["inbox_at_kill"]
    assert inbox and not inbox & set(history["validating_accepted"])
    # dropped at the restart; a file in the inbox now was being validated when the run reached max_steps
    # (the same state as a kill mid-validation: the next start drops it, its node resends it)
    assert not inbox & {p.stem for p in (cluster.state / "inbox").glob("*.parquet")}
    answered = {v["file_sha256"]: v["reason"] for v in cluster.node_verdicts()}
    for sha in inbox:
        assert sha in answered
        if answered[sha] in ("accepted", "replay"):
            assert sha in history["final_accepted"]


def test_recorded_file_left_in_the_inbox_is_moved_at_restart(cluster, history):
    """Killed between committing the verdict and moving the file: accepted/ never held a file the
    ledger had not accepted (check_disk, after every kill); the restart moves the file from the inbox
    to accepted/, and the node's resend is told it was already taken."""
    moved = history["recorded_in_inbox"]
    assert moved
    assert moved <= history["accepted_after_restart"] and not moved & history["inbox_after_restart"]
    assert moved <= set(history["final_accepted"])
    answered = {v["file_sha256"]: v["reason"] for v in cluster.node_verdicts()}
    for sha in moved:
        assert answered[sha] == "replay", answered.get(sha)


def test_recorded_but_unacknowledged_is_answered_on_resend(cluster, history):
    """Killed after the verdict was committed, before the node heard it: the node resends, is told
    the file was already taken, and the ledger has it exactly once."""
    assert history["unacknowledged"]
    answered = {v["file_sha256"]: v for v in cluster.node_verdicts()}
    for sha in history["unacknowledged"]:
        assert sha in history["final_accepted"]
        assert answered[sha]["reason"] == "replay", answered[sha]


def test_killed_during_training_redoes_the_step(cluster, history):
    """Killed after the optimizer step, before the checkpoint: no metrics line, no new checkpoint;
    the restart resumed at the last checkpoint."""
    last_checkpoint, steps = history["trained"]
    assert steps == list(range(last_checkpoint))
    assert cluster.resumed_at()[3] == last_checkpoint  # the 5th start (the 1st logs no resume) followed it


def test_half_written_checkpoint_is_never_loaded(cluster, history):
    before, after, left, steps = history["mid_write"][-1]
    assert left, f"no kill landed inside a checkpoint write in {len(history['mid_write'])} tries"
    assert after == before  # the temp folder is not a checkpoint
    assert steps[-1] == before  # that step's metrics line was written, its checkpoint was not
    assert not list((cluster.state / "checkpoints").glob(".tmp-*"))  # removed by a later save
    assert cluster.resumed_at()[3 + len(history["mid_write"])] == before


def test_killed_after_checkpoint_resumes_after_it(cluster, history):
    last_checkpoint, steps = history["saved"]
    assert steps == list(range(last_checkpoint))
    assert cluster.resumed_at()[-1] == last_checkpoint


def test_training_sequence_continues_and_nothing_accepted_is_lost(cluster, history):
    """After seven restarts: each step 0..max_steps-1 trained once in metrics.jsonl (redone steps
    replaced), staleness within the async level, every accepted batch trained by the step it was
    queued for (or, too old for the next step, left unused), and the final checkpoint is max_steps."""
    lines = [json.loads(x) for x in (cluster.state / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(MAX_STEPS))
    assert max(m["staleness_max"] for m in lines) <= ASYNC_LEVEL
    assert cluster.checkpoint_steps()[-1] == MAX_STEPS
    with Ledger(cluster.state / "ledger.sqlite") as ledger:
        for m in lines:
            assert_step_took_its_batches(ledger, m, cluster.settings["batches_per_step"], ASYNC_LEVEL)
        assert not ledger.accepted_for_train_step(MAX_STEPS + 1)
    assert set(history["final_accepted"]) == {p.stem for p in (cluster.state / "accepted").glob("*.parquet")}
    resumed = cluster.resumed_at()
    assert len(resumed) == cluster.starts - 1 and resumed == sorted(resumed)
