"""`intellect-node demo`: a coordinator (this process) and N node processes on 127.0.0.1.

The recipe is chosen so that the mean reward of SmolLM2-135M-Instruct rises within minutes on a
2-core CPU (measured in a separate sweep of tasks, temperatures, batch shapes and learning rates):
"What is a + b? Answer with just the number." with a, b <= 20 and reward 1 when the last number is
right, on a fixed set of 40 such problems (so the first and last steps are scored on the same kind of
problems, not on a luckier draw). The model is right about a third of the time at step 0, so GRPO has
signal from the start.
Answers are short (16 tokens at most), 8 prompts x 8 samples per step, temperature 0.7, and only the
last 8 of 30 layers train (lr 1e-4), which keeps a CPU step short. No supervised warm start.
Everything else is the real system: swarm, shards, proofs, validation. The first and the last policy
are scored on 64 held-out sums (never trained on) while the run goes on, greedy and mean@4; the nodes
stop when the last step is in, so the last evaluation has the CPU. The lr decays linearly from 1e-4 to
1e-5 over the run: at a constant 1e-4 the reward peaked near step 10 and fell back as the sampling
entropy collapsed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

HELDOUT_PROBLEMS = 64  # of the 441 sums a, b <= 20; disjoint from the 40 trained on

DEMO_SETTINGS = {
    "run_name": "demo",
    "async_level": 2,  # INTELLECT-2's; 1 wastes batches that finish just after a step change
    "batches_per_step": 2,  # 2 batches x 4 prompts x 8 completions = 64 completions per step
    "threads": 2,
    # one 2-core machine: a publishing thread only takes the trainer's cores (bench/publish.py: 0.88x on SmolLM2)
    "publish_in_background": False,
    "shard_size": 4_000_000,  # small shards: frozen layers keep their hashes, so nodes fetch only what changed
    "keep_checkpoints": 3,  # async_level + 1: every policy still accepted can be verified
    # groups of 8: with 4 samples a problem's answers were often all right or all wrong (no signal)
    "rollouts": {"prompts_per_batch": 4, "completions_per_prompt": 8, "max_new_tokens": 16, "temperature": 0.7},
    "task": {"name": "arithmetic", "max_operand": 20, "operators": "+", "pool": 40, "heldout": HELDOUT_PROBLEMS,
             "instruction": "Answer with just the number."},
    # the first and the last policy scored on sums never trained on (eval.every = the demo's steps)
    "eval": {"num_problems": HELDOUT_PROBLEMS, "samples": 4, "batch_size": 160},
    "trainer": {"lr": 1e-4, "lr_end_fraction": 0.1, "betas": (0.9, 0.999), "weight_decay": 0.0, "warmup_steps": 0,
                "grad_clip": 1.0,
                "optimizer_steps_per_policy_step": 1, "temperature": 0.7, "seq_len": 512,
                "loss": {"entropy_coef": 0.0}},  # trainable: per model, TRAINABLE
    "swarm": {"host": "127.0.0.1", "port": 0, "record_ttl_s": 60.0},
}


DEMO_MODELS = ("smollm2", "tiny")
# Per model: SmolLM2 trains its last 8 of 30 layers (the recipe above); the tiny model has 2 layers and
# only has to exercise the system, so all of it trains.
TRAINABLE = {"smollm2": "last_n_layers:8", "tiny": "all"}


def demo_config(state_dir: Path, model: str, steps: int, backend: str = "hivemind", overrides: dict | None = None):
    """The demo's coordinator settings; `overrides` (dotted keys, e.g. "async_level") are for benchmarks."""
    from intellect.coordinator.config import CoordinatorConfig
    from intellect.protocol.settings import load_settings

    if model not in DEMO_MODELS:
        raise ValueError(f"the demo runs --model smollm2 or --model tiny, not {model!r} (a checkpoint folder "
                         "runs with `intellect-node coordinator --model PATH`)")
    flags = _flatten(DEMO_SETTINGS) | {"state_dir": state_dir / "coordinator", "model": model, "max_steps": steps,
                                       "trainer.trainable": TRAINABLE[model], "eval.every": steps,
                                       "trainer.decay_steps": steps,  # lr 1e-4 down to 1e-5 at the last step
                                       "swarm.backend": backend}  # the run file names it; the nodes follow
    return load_settings(CoordinatorConfig, None, flags | (overrides or {}))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def start_node(run_file: Path, state_dir: Path, threads: int = 1) -> subprocess.Popen:
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "intellect.node.cli", "join", "--run-file", str(run_file), "--state-dir",
           str(state_dir), "--engine", "torch", "--threads", str(threads), "--host", "127.0.0.1", "--headless"]
    # One machine: a node generating while its last batch is validated only takes CPU from the validator
    # and the trainer, so the demo's nodes wait for each verdict (depth 0) unless the environment says
    # otherwise (bench/pipeline.py compares both).
    env = {"INTELLECT_NODE_PIPELINE_DEPTH": "0"} | os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    with open(state_dir / "stdout.txt", "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def node_lines(state_dirs: list[Path]) -> list[Text]:
    from intellect.node.status import NodeStatus

    lines = []
    for i, d in enumerate(state_dirs):
        s = NodeStatus.read(d / "status.json") or {}
        reward = s.get("last_reward")
        lines.append(Text(
            f"node {i + 1} {s.get('peer_id', '?')}: {s.get('state', 'starting'):<10} policy {s.get('policy_step')} "
            f"submitted {s.get('submitted', 0)} accepted {s.get('accepted', 0)} rejected {s.get('rejected', 0)} "
            f"{s.get('tokens_per_s', 0):.1f} tok/s reward {reward if reward is None else round(reward, 3)} "
            f"{s.get('error', '')}"))
    return lines


def run_demo(steps: int, num_nodes: int, model: str, headless: bool, state_dir: Path | None,
             console: Console, backend: str = "hivemind", overrides: dict | None = None) -> int:
    import threading

    if steps < 1 or num_nodes < 1:
        raise ValueError("--steps and --nodes must be at least 1")
    state_dir = Path(state_dir) if state_dir else Path.home() / ".intellect-node" / "demo" / time.strftime("%Y%m%d-%H%M%S")
    config = demo_config(state_dir, model, steps, backend, overrides)  # a bad --model: before the heavy imports
    state_dir.mkdir(parents=True, exist_ok=True)

    from intellect.coordinator.runner import show_dashboard, start_coordinator
    from intellect.coordinator.service import base_model_dir
    if not headless and not sys.stdout.isatty():
        console.print("demo: no terminal on stdout: one status line per step instead of the screen (--headless)")
        headless = True
    started = time.time()
    console.print(f"demo: state in {state_dir}; preparing the model and the coordinator ...", highlight=False)
    with console.status(f"preparing {model} (converted once, then cached)"):
        base_model_dir(config.model, config.state_dir / "models")
    coordinator = start_coordinator(config)
    node_dirs = [state_dir / f"node{i + 1}" for i in range(num_nodes)]
    procs = [start_node(state_dir / "coordinator" / "run.toml", d) for d in node_dirs]
    done, trained = threading.Event(), threading.Event()
    failed: list[Exception] = []

    def on_step(m: dict) -> None:
        if headless:
            print(json.dumps({k: m[k] for k in ("step", "reward", "length", "num_completions", "staleness_max",
                                                "accepted", "rejected", "step_s") if k in m}), flush=True)
        if m["step"] >= steps - 1:  # the last step is in: the nodes' CPU goes to the held-out evaluation
            trained.set()
            stop_nodes(procs)
            if headless:
                print("demo: trained; scoring the last policy on the held-out problems ...", flush=True)

    def policy_loop() -> None:
        try:
            coordinator.run(on_step=on_step)
        except Exception as e:  # noqa: BLE001 -- re-raised in the main thread once the nodes are stopped
            failed.append(e)
        finally:
            done.set()

    loop = threading.Thread(target=policy_loop, name="policy-loop", daemon=True)
    loop.start()
    try:
        if headless:
            while not done.wait(1.0):
                if not trained.is_set():
                    _check_nodes(procs, node_dirs)
        else:
            show_dashboard(coordinator, done, extra=lambda: node_lines(node_dirs))
    except KeyboardInterrupt:
        coordinator.stop.set()
    finally:
        stop_nodes(procs)
        coordinator.stop.set()
        loop.join(timeout=60)
        coordinator.close()
    if failed:
        raise failed[0]
    rewards = [m["reward"] for m in coordinator.history]
    evals = sorted(coordinator.evals, key=lambda m: m["policy_step"])
    summary = {
        "steps": len(rewards),
        "first5_reward": round(sum(rewards[:5]) / max(len(rewards[:5]), 1), 4),
        "last5_reward": round(sum(rewards[-5:]) / max(len(rewards[-5:]), 1), 4),
        "wall_s": round(time.time() - started, 1),
        "accepted": coordinator.history[-1]["accepted"] if coordinator.history else 0,
        "rejected": coordinator.history[-1]["rejected"] if coordinator.history else 0,
    }
    if len(evals) >= 2 and evals[-1]["policy_step"] == steps:  # before (policy 0) and after (the last)
        before, after = evals[0], evals[-1]
        summary |= {"heldout_problems": after["num_problems"],
                    "heldout_greedy_before": round(before["heldout_greedy"], 4),
                    "heldout_greedy_after": round(after["heldout_greedy"], 4),
                    f"heldout_mean_at_{after['k']}_before": round(before["heldout_mean_at_k"], 4),
                    f"heldout_mean_at_{after['k']}_after": round(after["heldout_mean_at_k"], 4)}
        console.print(f"demo: on {after['num_problems']} held-out sums it never trained on, greedy accuracy went "
                      f"{before['heldout_greedy']:.2f} -> {after['heldout_greedy']:.2f} and mean@{after['k']} "
                      f"(T={after['temperature']:g}) {before['heldout_mean_at_k']:.2f} -> "
                      f"{after['heldout_mean_at_k']:.2f}", highlight=False)
    print(json.dumps(summary), flush=True)
    if not headless:
        console.print(f"state and metrics in {state_dir}; plots: intellect-node report {state_dir / 'coordinator'}")
    return 0 if len(rewards) >= steps else 1


def stop_nodes(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def _check_nodes(procs: list[subprocess.Popen], node_dirs: list[Path]) -> None:
    for p, d in zip(procs, node_dirs, strict=True):
        if p.poll() is not None:
            raise RuntimeError(f"node process in {d} exited with code {p.returncode}; see {d / 'stdout.txt'}")
