"""Start swarm peers (tests/node/fetch_worker.py) as real OS processes on 127.0.0.1 and end them all.

Each peer runs in its own session (process group) with its DHT process and p2pd daemon, so `kill`
can end exactly the processes it started. Used by tests/node/test_fetch.py and bench/distribution.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("fetch_worker.py")


def make_checkpoint(folder: Path, size_mb: float, seed: int = 0) -> Path:
    """A real safetensors file of random float32 tensors, about `size_mb` MB."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    numel = int(size_mb * 1e6 / 4)
    tensors = {"embed.weight": torch.randn(numel // 2, generator=gen),
               "head.weight": torch.randn(numel - numel // 2, generator=gen)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"seed": seed, "numel": numel}))
    return folder


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def coordinator_key_hex(seed: str) -> str:
    from intellect.protocol.identity import Identity

    return Identity.from_seed(seed.encode()).public_key_hex


class Peers:
    """The peer processes of one test; `close()` ends every one of them and their children."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        """`prefix`: a command to run the worker under (`ip netns exec NS` in bench/distribution.py)."""
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([*prefix, sys.executable, str(WORKER), *args], stdout=log, stderr=log,
                                    cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def wait_json(self, path: Path, timeout: float, name: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            proc = self.procs.get(name) if name else None
            if proc is not None and proc.poll() is not None and not path.exists():
                raise AssertionError(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")
            time.sleep(0.05)
        raise AssertionError(f"{path.name} not written in {timeout:.0f} s: {self.log_tail(name) if name else ''}")

    def log_tail(self, name: str, num_bytes: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_bytes()[-num_bytes:].decode(errors="replace") if path.exists() else ""

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM the peer (it writes its result and closes its swarm), then end its group."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(name)

    def kill(self, name: str) -> None:
        """SIGKILL the peer and everything in its process group (DHT process, p2pd)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
