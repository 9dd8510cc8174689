"""What the coordinator tests add to `tests/cli_harness.py`: the command lines of a coordinator and a
node as the demo runs them (one torch thread, loopback, headless), a settings dict written as TOML, a
free port, waiting that fails at once when a watched process dies, and the check of what a train step
took from the ledger."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

from tests.cli_harness import Procs, command, wait_for

NODE_ENV = {"INTELLECT_NODE_RESTART_BACKOFF_S": "1"}  # retry quickly after the coordinator went away


def node_cmd(run_file: Path, state_dir: Path, *extra: str) -> list[str]:
    return command("join", "--run-file", str(run_file), "--state-dir", str(state_dir), "--engine", "torch",
                   "--threads", "1", "--host", "127.0.0.1", "--headless", *extra)


def coordinator_cmd(config: Path) -> list[str]:
    return command("coordinator", "--config", str(config), "--headless")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_toml(path: Path, settings: dict) -> Path:
    """A settings dict (values: str, Path, number, bool, list; one level of tables) as a TOML file."""

    def value(v) -> str:
        return json.dumps(str(v) if isinstance(v, Path) else v)  # JSON scalars and arrays are TOML too

    top = [f"{k} = {value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in settings.items() if isinstance(v, dict)]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")
    return path


def wait_while_alive(procs: Procs, check: Callable[[], object], timeout: float, what: str, *watch: str,
                     interval: float = 0.2):
    """`wait_for(check)`, failing at once (with its log) if a watched process exits meanwhile."""

    def checked():
        procs.check_alive(*watch)
        return check()

    return wait_for(checked, timeout, what, lambda: procs.tails(*watch), interval=interval)


def assert_step_took_its_batches(ledger, metrics: dict, batches_per_step: int, async_level: int) -> None:
    """A step trains the oldest `batches_per_step` batches queued for it; the rest moved on to the next
    step, except those too old for it (policy < step + 1 - async level), which stay unused."""
    step = metrics["step"]
    queued = ledger.accepted_for_train_step(step)
    assert metrics["num_batches"] == batches_per_step <= len(queued), (metrics, queued)
    assert all(s.policy_step < step + 1 - async_level for s in queued[batches_per_step:]), queued
    assert all(step - async_level <= s.policy_step <= step for s in queued), queued


__all__ = ["NODE_ENV", "Procs", "assert_step_took_its_batches", "coordinator_cmd", "free_port", "node_cmd",
           "wait_for", "wait_while_alive", "write_toml"]
