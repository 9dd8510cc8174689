"""Real OS processes for the coordinator tests: `intellect-node join` nodes, `intellect-node coordinator`,
and helper scripts. Each runs in its own session (process group) with its DHT process and p2pd daemon, so
`kill` ends exactly what a test started, and `close` ends all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

NODE_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "INTELLECT_NODE_RESTART_BACKOFF_S": "1",
            "INTELLECT_NODE_SUBMIT_TIMEOUT_S": "120"}


def node_cmd(run_file: Path, state_dir: Path, max_batches: int | None = None) -> list[str]:
    """`intellect-node join` as the demo starts it (torch engine, one thread, loopback, headless)."""
    cmd = [sys.executable, "-m", "intellect.node.cli", "join", "--run-file", str(run_file), "--state-dir",
           str(state_dir), "--engine", "torch", "--threads", "1", "--host", "127.0.0.1", "--headless"]
    return cmd + (["--max-batches", str(max_batches)] if max_batches else [])


def coordinator_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "intellect.node.cli", "coordinator", "--config", str(config), "--headless"]


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        if name in self.procs:
            self.kill(name)
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=os.environ | NODE_ENV | (env or {}), start_new_session=True)
        self.procs[name] = proc
        return proc

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def log_tail(self, name: str, num_bytes: int = 4000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_bytes()[-num_bytes:].decode(errors="replace") if path.exists() else ""

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything in its group (DHT process, p2pd), then reap it."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def wait_exit(self, name: str, timeout: float) -> int:
        """Wait for a process to end by itself, then end what is left of its group."""
        try:
            rc = self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout:.0f} s:\n{self.log_tail(name)}") from None
        self.kill(name)
        return rc

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def wait_for(check: Callable[[], object], timeout: float, what: str, procs: Procs | None = None,
             watch: tuple[str, ...] = (), interval: float = 0.2):
    """Poll `check()` until it returns something truthy; fail early if a watched process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for name in watch:
            if procs is not None and name in procs.procs and not procs.alive(name):
                raise AssertionError(f"{name} exited ({procs.procs[name].returncode}) while waiting for "
                                     f"{what}:\n{procs.log_tail(name)}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}\n{procs.log_tail(n, 1500)}" for n in watch) if procs else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(interval)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_toml(path: Path, settings: dict) -> Path:
    """A settings dict (values: str, number, bool, list; one level of tables) as a TOML file."""
    import json

    def value(v) -> str:
        return json.dumps(str(v) if isinstance(v, Path) else v)

    top = [f"{k} = {value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in settings.items() if isinstance(v, dict)]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")
    return path
