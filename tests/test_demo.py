"""The product's promise: `intellect-node demo --headless` (20 steps) on SmolLM2-135M learns visibly on a
2-core CPU, through the real system (swarm, shards, proofs, validation, GRPO).

RL on 64 samples a step is noisy: a run can miss the +0.15 by chance. The test allows one more run when
the first misses, and says so; both must finish within the time budget and keep every invariant."""

import json
import os
import subprocess
import sys

import pytest

STEPS = 20  # the demo's default


def run_demo(state_dir) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "intellect.node.cli", "demo", "--headless", "--steps", str(STEPS),
                           "--state-dir", str(state_dir)], capture_output=True, text=True, env=env,
                          timeout=1500, stdin=subprocess.DEVNULL, check=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, steps = lines[-1], lines[:-1]
    print(json.dumps(summary))
    assert summary["steps"] == STEPS and [s["step"] for s in steps] == list(range(STEPS))
    assert summary["accepted"] >= 2 * STEPS and summary["rejected"] <= summary["accepted"]
    assert all(s["staleness_max"] <= 2 for s in steps)
    assert summary["wall_s"] <= 900, summary
    return summary


@pytest.mark.slow
def test_demo_reward_rises_within_the_time_budget(tmp_path):
    summary = run_demo(tmp_path / "demo")
    if summary["last5_reward"] - summary["first5_reward"] < 0.15:
        print(f"first demo run rose only {summary['last5_reward'] - summary['first5_reward']:.3f}; running again")
        summary = run_demo(tmp_path / "demo-again")
    assert summary["last5_reward"] - summary["first5_reward"] >= 0.15, summary
