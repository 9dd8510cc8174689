"""The product's promise: `intellect-node demo --headless --steps 30` on SmolLM2-135M learns visibly on a
2-core CPU, through the real system (swarm, shards, proofs, validation, GRPO)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_reward_rises_within_the_time_budget(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "intellect.node.cli", "demo", "--headless", "--steps", "30",
                           "--state-dir", str(tmp_path / "demo")], capture_output=True, text=True, env=env,
                          timeout=1500, stdin=subprocess.DEVNULL)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = lines[-1]
    steps = lines[:-1]
    assert summary["steps"] == 30 and len(steps) == 30
    assert [s["step"] for s in steps] == list(range(30))
    assert summary["accepted"] >= 60 and summary["rejected"] <= summary["accepted"]
    assert all(s["staleness_max"] <= 2 for s in steps)
    delta = summary["last5_reward"] - summary["first5_reward"]
    print(json.dumps(summary))
    assert delta >= 0.15, summary
    assert summary["wall_s"] <= 900, summary
