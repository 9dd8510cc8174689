"""The product's promise: `intellect-node demo --headless` (20 steps) on SmolLM2-135M learns visibly on a
2-core CPU, through the real system (swarm, shards, proofs, validation, GRPO), and the gain holds on
sums it never trained on: mean@4 on the demo's 64 held-out problems, first policy against last.

RL on 64 samples a step is noisy: a run can miss the training reward's +0.15 or the held-out +0.10 by
chance. The test allows one more run when the first misses, and says so; both must finish within the
time budget and keep every invariant."""

import json
import os
import subprocess
import sys

import pytest

STEPS = 20  # the demo's default
REWARD_GAIN = 0.15  # mean training reward, last 5 steps against the first 5
HELDOUT_GAIN = 0.10  # held-out mean@4, the last policy against the first


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
    assert summary["heldout_problems"] == 64, summary  # both evaluations ran
    return summary


def gains(summary: dict) -> tuple[float, float]:
    return (summary["last5_reward"] - summary["first5_reward"],
            summary["heldout_mean_at_4_after"] - summary["heldout_mean_at_4_before"])


@pytest.mark.slow
def test_demo_learns_within_the_time_budget_and_on_held_out_problems(tmp_path):
    summary = run_demo(tmp_path / "demo")
    reward, heldout = gains(summary)
    if reward < REWARD_GAIN or heldout < HELDOUT_GAIN:
        print(f"first demo run: reward {reward:+.3f}, held-out {heldout:+.3f}; running again")
        summary = run_demo(tmp_path / "demo-again")
        reward, heldout = gains(summary)
    assert reward >= REWARD_GAIN and heldout >= HELDOUT_GAIN, summary
