"""Run `intellect-node` the way a volunteer does: the installed command from the venv's bin folder as
real processes, and the interactive screens inside tmux (keys in with send-keys, screen out with
capture-pane).

Every process runs in its own session (process group) together with its DHT process and p2pd daemon,
so a test ends exactly what it started: `Procs.close()` and `Tmux.close()` kill those groups and
nothing else. What this module does not know: what the screens say (the tests decide that).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

INTELLECT_NODE = Path(sys.executable).with_name("intellect-node")

# One torch thread per process: the machine (and CI's) has 2 cores for a coordinator and 3 nodes.
# PYTHONFAULTHANDLER: a process that hangs can be made to print every thread's stack (`Procs.dump`).
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "INTELLECT_NODE_SUBMIT_TIMEOUT_S": "120",
       "PYTHONFAULTHANDLER": "1"}


def command(*args: str) -> list[str]:
    return [str(INTELLECT_NODE), *args]


def wait_for(check: Callable[[], object], timeout: float, what: str, diagnose: Callable[[], str] = lambda: "",
             interval: float = 0.3):
    """Poll `check()` until it returns something truthy; on timeout fail with `diagnose()` attached."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")
        time.sleep(interval)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Is any process of this process group still there (zombies included)?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------------- plain processes


class Procs:
    """Background processes of one test, each logging stdout and stderr to WORKDIR/NAME.log."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is already running"
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=os.environ | ENV | (env or {}), start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, *names: str, num_chars: int = 2500) -> str:
        return "\n".join(f"--- {n} (exit {self.procs[n].poll()})\n{self.log(n)[-num_chars:]}"
                         for n in names or self.procs)

    def check_alive(self, *names: str) -> None:
        for n in names:
            if self.procs[n].poll() is not None:
                raise AssertionError(f"{n} exited with {self.procs[n].returncode}\n{self.tails(n)}")

    def stacks(self, name: str) -> str:
        """End a stuck process with SIGABRT so that the fault handler prints every thread's stack into
        its log, and return that log's end. For failure messages only: the process is gone after it."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGABRT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return f"--- stacks of {name}:\n{self.log(name)[-12000:]}"

    def wait_exit(self, name: str, timeout: float) -> int:
        """The exit status; a process still running after `timeout` fails the test with its stacks."""
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running {timeout:.0f} s later\n{self.stacks(name)}") from None

    def kill(self, name: str) -> None:
        """SIGKILL the process and its whole group (DHT process, p2pd), as a crash of the machine would."""
        proc = self.procs[name]
        _kill_group(proc.pid)
        proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


# ---------------------------------------------------------------------------------- tmux

_TMUX_CONF = """\
set -g remain-on-exit on
set -g status off
set -g history-limit 5000
"""


class Tmux:
    """One private tmux server (its own socket). Panes run the command itself, no shell, and stay
    after it exits, so a test reads the last screen and the exit status."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("tmux") is None:
            raise RuntimeError("these tests drive the TUIs in tmux: apt-get install -y tmux "
                               "(./install.sh --dev does it where apt-get exists)")
        self.socket = f"intellect-test-{uuid.uuid4().hex[:10]}"
        self.conf = Path(workdir) / "tmux.conf"
        self.conf.write_text(_TMUX_CONF)
        self.pgids: dict[str, int] = {}

    def _tmux(self, *args: str) -> str:
        # An explicit env: something in the test process sets COLUMNS=80 and LINES=24 in the C-level
        # environment (not in os.environ); children would inherit them, and rich obeys them over the pane size.
        out = subprocess.run(["tmux", "-L", self.socket, "-f", str(self.conf), *args], capture_output=True,
                             text=True, timeout=30, env=dict(os.environ), check=False)
        if out.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def start(self, session: str, cmd: list[str], env: dict[str, str] | None = None, width: int = 120,
              height: int = 36) -> int:
        """Run `cmd` in a new session's only pane; returns its pid (also its process group id)."""
        env_args = [f"{k}={v}" for k, v in (ENV | (env or {})).items()]
        line = "exec env -u COLUMNS -u LINES " + shlex.join([*env_args, *cmd])
        self._tmux("new-session", "-d", "-s", session, "-x", str(width), "-y", str(height), line)
        pid = int(self._tmux("display-message", "-p", "-t", session, "#{pane_pid}").strip())
        self.pgids[session] = pid  # a pane's process leads its own session, hence its own group
        return pid

    def screen(self, session: str) -> str:
        return self._tmux("capture-pane", "-p", "-t", session)

    def keys(self, session: str, *keys: str) -> None:
        self._tmux("send-keys", "-t", session, *keys)

    def exit_status(self, session: str) -> int | None:
        """The pane command's exit status, or None while it runs."""
        dead, status = self._tmux("display-message", "-p", "-t", session,
                                  "#{pane_dead} #{pane_dead_status}").split(" ", 1)
        return int(status) if dead == "1" and status.strip() else None

    def wait_screen(self, session: str, pattern: str, timeout: float, what: str) -> re.Match:
        """Poll the pane until `pattern` (a regex, searched over the screen) matches."""
        last = {"screen": ""}

        def check():
            last["screen"] = self.screen(session)
            return re.search(pattern, last["screen"])

        def diagnose() -> str:
            status = self.exit_status(session)
            return (f"the command exited with {status}\n" if status is not None else "") + \
                f"last screen of {session}:\n{last['screen']}"

        return wait_for(check, timeout, what, diagnose)

    def close(self) -> None:
        for pgid in self.pgids.values():
            _kill_group(pgid)
        try:
            self._tmux("kill-server")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # no server left: every pane had ended
        tmpdir = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (tmpdir / self.socket).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- reading results


def coordinator_nodes(state_dir: Path) -> dict[str, tuple[int, int]]:
    """peer id -> (accepted, rejected) verdicts, read-only from the coordinator's ledger."""
    db = sqlite3.connect(f"file:{Path(state_dir) / 'ledger.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT n.peer_id, SUM(v.accepted = 1), SUM(v.accepted = 0) FROM nodes n"
            " LEFT JOIN verdicts v ON v.node = n.public_key GROUP BY n.public_key").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return {}
    finally:
        db.close()
    return {peer: (acc or 0, rej or 0) for peer, acc, rej in rows}


ROLLOUTS = re.compile(r"submitted (\d+)\s+accepted (\d+)\s+rejected (\d+)")


def rollout_counts(screen: str) -> tuple[int, int, int] | None:
    """(submitted, accepted, rejected) from the node screen's rollouts line."""
    m = ROLLOUTS.search(screen)
    return tuple(int(g) for g in m.groups()) if m else None
