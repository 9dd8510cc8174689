"""The whole training state every `full_state_every` steps, the policy alone at the others: a restart
resumes from the newest whole state and never makes a published policy step twice.

A real coordinator (tiny model, its swarm on 127.0.0.1, real ledger, trainer and checkpoints), closed
without its exit save (as a crash leaves it) and started again on the same state dir."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.trainer.checkpoint import (
    POLICY_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
    complete_checkpoints,
    resumable_checkpoints,
)
from tests.coordinator.batches import accept_a_batch

pytestmark = pytest.mark.slow  # two coordinator starts with their swarms

PROMPTS, N = 2, 2


def start(state_dir, model):
    from intellect.coordinator.runner import start_coordinator

    return start_coordinator(CoordinatorConfig(
        state_dir=state_dir, run_name="full-state", model=str(model), async_level=1, batches_per_step=1,
        threads=1, keep_checkpoints=2, full_state_every=3,
        rollouts={"prompts_per_batch": PROMPTS, "completions_per_prompt": N, "max_new_tokens": 8},
        trainer={"lr": 1e-3, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "seq_len": 64},
        swarm={"host": "127.0.0.1", "port": 0, "record_ttl_s": 60.0}))


def train(c) -> None:
    accept_a_batch(c, c.latest_policy_step, c.collect_step, PROMPTS, N, [1, 2, 3], [4, 5, 6], temperature=1.0)
    c.train_once()
    assert c.publishing.wait_idle(timeout=120)


def names(paths) -> list[str]:
    return [p.name for p in paths]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_policy_only_steps_and_a_restart_that_numbers_on(tmp_path, tiny_model_path):
    state = tmp_path / "c"
    checkpoints = state / "checkpoints"
    c = start(state, tiny_model_path)
    try:
        for _ in range(5):
            train(c)
        # step 3 holds the whole state and outlives keep_checkpoints = 2; steps 4 and 5 the policy alone
        assert names(resumable_checkpoints(checkpoints)) == ["step_00000003"]
        assert names(complete_checkpoints(checkpoints)) == ["step_00000003", "step_00000004", "step_00000005"]
        assert sorted(os.listdir(checkpoints / "step_00000005")) == [POLICY_DIR]
        published = digest(checkpoints / "step_00000005" / POLICY_DIR / "model.safetensors")
        assert c.published_step == 5
    finally:
        c.close()  # no exit save: the state on disk is what a SIGKILL after step 5 leaves

    c = start(state, tiny_model_path)
    try:
        # trained on from step 3's weights, numbered after the newest policy, which is left as it was
        assert c.trainer.policy_step == 5 and c.latest_policy_step == 5 and c.published_step == 5
        saved = load_file(checkpoints / "step_00000003" / WEIGHTS_FILE)
        trained = {n: p.detach() for n, p in c.trainer.model.named_parameters() if n in saved}
        assert trained and all(torch.equal(v, saved[n]) for n, v in trained.items())
        assert digest(checkpoints / "step_00000005" / POLICY_DIR / "model.safetensors") == published
        train(c)
        train(c)
        assert c.latest_policy_step == 7 and names(resumable_checkpoints(checkpoints)) == ["step_00000006"]
        assert not (checkpoints / "step_00000003").exists()  # its state was superseded, then it was pruned
        # at exit the newest policy gets its state, and the older state goes
        before = digest(checkpoints / "step_00000007" / POLICY_DIR / "model.safetensors")
        c.save_training_state()
        assert names(resumable_checkpoints(checkpoints)) == ["step_00000007"]
        assert not (checkpoints / "step_00000006" / STATE_FILE).exists()
        assert digest(checkpoints / "step_00000007" / POLICY_DIR / "model.safetensors") == before
    finally:
        c.close()
