"""The shared swarm cases (`swarm_cases`) on the py-libp2p backend, in one fresh process that never
imports hivemind (the two cannot share a process: both define the protobuf symbol crypto.pb.KeyType,
and this pytest process may hold hivemind already). Skipped where py-libp2p is not installed
(`pip install 'intellect-node[libp2p]'`; install.sh --dev does)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .swarm_cases import RESULT_MARK, case_names

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libp2p") is None, reason="py-libp2p is not installed")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results() -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.protocol.swarm_cases", "libp2p"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert lines, f"the case process printed no result (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len(RESULT_MARK):])


def test_hivemind_is_never_imported_beside_libp2p(results):
    assert results["hivemind_imported"] is False


@pytest.mark.parametrize("name", case_names("libp2p"))
def test_swarm_case_on_libp2p(results, name):
    assert results[name] == "ok", results[name]


def test_libp2p_starts_fast(results):
    assert results["startup_s"] < 20, results  # two hosts, imports included (hivemind's p2pd: ~10 s each)
