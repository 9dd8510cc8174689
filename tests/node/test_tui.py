"""The status screens, driven for real: `intellect-node coordinator` (dashboard) and `intellect-node join`
(node TUI) run in tmux on the tiny model; keys go in with send-keys, the screen comes out with
capture-pane. Also what a volunteer sees when the run is not there: a plain-words error on the screen,
or an exit naming the bootstrap address that did not answer."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import tomllib
from types import SimpleNamespace

import pytest

from tests.cli_harness import ENV, Tmux, command, coordinator_nodes, group_alive, rollout_counts, wait_for

pytestmark = pytest.mark.timeout(600)

NODE_FLAGS = ("--engine", "torch", "--threads", "1", "--host", "127.0.0.1")


@pytest.fixture(scope="module")
def tmux(tmp_path_factory):
    t = Tmux(tmp_path_factory.mktemp("tmux"))
    yield t
    t.close()


@pytest.fixture(scope="module")
def run(tmux, tmp_path_factory) -> SimpleNamespace:
    """A coordinator on the tiny model with its dashboard in tmux session 'coordinator'."""
    state = tmp_path_factory.mktemp("coordinator")
    tmux.start("coordinator", command("coordinator", "--model", "tiny", "--state-dir", str(state), "--host",
                                      "127.0.0.1", "--port", "0", "--threads", "1"), width=150, height=40)
    run_file = state / "run.toml"
    wait_for(run_file.exists, 180, "the coordinator to write run.toml", lambda: tmux.screen("coordinator"))
    info = tomllib.loads(run_file.read_text())
    return SimpleNamespace(state=state, run_file=run_file, run_id=info["run_id"], bootstrap=info["bootstrap"])


@pytest.mark.slow  # starts the module's coordinator (10-30 s)
def test_dashboard_shows_run_step_and_nodes_table(tmux, run):
    # wait for the last part drawn (the nodes table header), so the capture holds a whole frame
    header_pattern = r"peer id.*engine.*state.*tokens/s.*policy.*accepted.*rejected.*credit.*last seen.*banned"
    screen = tmux.wait_screen("coordinator", header_pattern, 120, "the dashboard").string
    assert "intellect-node coordinator" in screen
    assert re.search(rf"run\s+{re.escape(run.run_id)}\s+coordinator in-", screen), screen
    assert re.search(r"policy\s+step \d+\s+collecting step \d+: \d+/\d+ batches", screen), screen
    header = re.search(header_pattern, screen)
    assert header, f"no nodes table header:\n{screen}"


@pytest.mark.slow
def test_node_screen_progress_pause_resume_and_quit(tmux, run, tmp_path):
    state = tmp_path / "node"
    pgid = tmux.start("node", command("join", "--run-file", str(run.run_file), "--state-dir", str(state),
                                      *NODE_FLAGS))

    # renders: identity, run, policy step, rollout counts going up
    screen = tmux.wait_screen("node", r"accepted [1-9]", 240, "a first accepted batch on the node screen").string
    peer_id = re.search(r"node\s+(in-[a-z0-9]+)", screen).group(1)
    assert re.search(rf"run\s+{re.escape(run.run_id)}\s+coordinator in-", screen), screen
    assert re.search(r"policy\s+step \d+\s+collecting step \d+", screen), screen
    assert re.search(r"engine\s+torch on cpu", screen), screen
    assert re.search(r"busy\s+generating \d+%\s+waiting for a policy \d+%\s+for verdicts \d+%", screen), screen
    keys = subprocess.run(command("keys", "show", "--state-dir", str(state)), capture_output=True, text=True, check=False,
                          timeout=60)
    assert f"peer id     {peer_id}" in keys.stdout, "the screen must show the identity of the key file"

    # the coordinator's dashboard lists this node once its batches are accepted, with what its heartbeat says
    tmux.wait_screen("coordinator", rf"{re.escape(peer_id)}[\s│]+torch on cpu[\s│]+working", 60,
                     "the node's row on the dashboard, with its engine and state")

    # pace: how long one batch takes here, so the paused wait below spans several
    accepted = rollout_counts(screen)[1]
    started = time.monotonic()
    tmux.wait_screen("node", rf"accepted (?!{accepted}\b)\d+", 120, "a second accepted batch")
    per_batch = time.monotonic() - started

    tmux.keys("node", "p")
    tmux.wait_screen("node", r"intellect-node · PAUSED\b", 120, "the PAUSED state after p")
    paused = tmux.wait_screen("node", r"\[p\] resume", 5, "the resume hint").string
    counts, ledger = rollout_counts(paused), coordinator_nodes(run.state)[peer_id]
    time.sleep(max(3 * per_batch, 8.0))
    # the next heartbeat (every 15 s, read every 5 s) tells the dashboard
    tmux.wait_screen("coordinator", rf"{re.escape(peer_id)}[\s│]+torch on cpu[\s│]+paused", 45,
                     "the dashboard showing the node paused")
    still = tmux.screen("node")
    assert "PAUSED" in still, still
    assert rollout_counts(still) == counts, f"the node submitted while paused:\n{still}"
    assert coordinator_nodes(run.state)[peer_id] == ledger, "the coordinator got batches from a paused node"

    tmux.keys("node", "p")
    tmux.wait_screen("node", rf"submitted (?!{counts[0]}\b)\d+", 120, "a new submission after resuming")
    assert "PAUSED" not in tmux.screen("node")

    # q: a clean exit, exit status 0, the summary line, nothing of the node left running
    tmux.keys("node", "q")
    wait_for(lambda: tmux.exit_status("node") is not None, 60, "the node to exit after q",
             lambda: tmux.screen("node"))
    final = tmux.screen("node")
    assert tmux.exit_status("node") == 0, final
    assert re.search(r"stopped: submitted \d+, accepted \d+", final), final
    assert "Traceback" not in final and "terminate called" not in final, final
    wait_for(lambda: not group_alive(pgid), 15, "the node's DHT process and p2pd daemon to end")


@pytest.mark.slow  # starts the module's coordinator (10-30 s)
def test_node_screen_says_the_coordinator_is_missing(tmux, run, tmp_path):
    """A live bootstrap peer but no coordinator for this run: the screen says so in plain words."""
    ghost = ["join", "--bootstrap", run.bootstrap[0], "--run", "no-such-run", "--coordinator", "ab" * 32,
             "--state-dir", str(tmp_path / "ghost"), *NODE_FLAGS]
    pgid = tmux.start("ghost", command(*ghost))
    screen = tmux.wait_screen("ghost", r"the coordinator is not in the swarm", 180, "the missing-coordinator "
                              "message").string
    assert "intellect-node · ERROR" in screen, screen
    assert "--bootstrap points at a live peer" in re.sub(r"[│\s]+", " ", screen), "the message says what to check"
    assert re.search(r"run\s+no-such-run", screen), screen
    tmux.keys("ghost", "q")
    wait_for(lambda: tmux.exit_status("ghost") is not None, 60, "the node to exit after q",
             lambda: tmux.screen("ghost"))
    assert tmux.exit_status("ghost") == 0, tmux.screen("ghost")
    wait_for(lambda: not group_alive(pgid), 15, "the node's DHT process and p2pd daemon to end")


def _dead_address() -> str:
    """A well-formed multiaddr of a peer that is not there: a closed port and a fresh peer id."""
    from intellect.protocol.identity import Identity
    from intellect.protocol.swarm.hivemind_backend import libp2p_peer_id

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = libp2p_peer_id(Identity.from_seed(b"nobody-home").public_key).to_base58()
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"


def test_join_with_a_dead_bootstrap_exits_naming_the_address(tmp_path):
    address = _dead_address()
    cmd = command("join", "--bootstrap", address, "--run", "some-run", "--coordinator", "cd" * 32, "--state-dir",
                  str(tmp_path / "node"), *NODE_FLAGS)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True,
                            env=os.environ | ENV | {"INTELLECT_NODE_SWARM__JOIN_TIMEOUT_S": "8"})
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    assert "could not join the swarm" in out, out
    assert address in out, f"the error must name the address, unbroken (it gets copied):\n{out}"
    assert "Traceback" not in out, out
    wait_for(lambda: not group_alive(proc.pid), 15, "the node's DHT process and p2pd daemon to end")
