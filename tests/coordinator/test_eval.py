"""Held-out evaluation: every task keeps a held-out split out of training, and the coordinator scores
saved policies on it (greedy and mean@k) in a background thread while it goes on training.

The split is checked with the real seeded prompt choice nodes use (`sample_batch` over the task they
build from the announced TaskConfig). The coordinator runs for real (its swarm on 127.0.0.1, ledger,
trainer, publisher); its model is a one-layer Llama built from a config with hand-set weights that
answers "1" to every prompt, so each held-out score is known exactly in advance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.rules import run_rules
from intellect.protocol.tasks import TaskConfig, TaskDataError, sample_batch, setup_task


def _jsonl(tmp_path) -> str:
    rows = [{"prompt": f"What is {i} * 3?", "answer": str(3 * i)} for i in range(60)]
    rows += rows  # a prompt on two lines is held out on both or on neither
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


SPLITS = {  # (task config fields, expected training problems, expected held-out problems)
    "demo pool": ({"pool": 40, "heldout": 120, "instruction": "Answer with just the number."}, 40, 120),
    "all problems": ({"heldout": 100}, 441 - 100, 100),
    "three operators": ({"max_operand": 5, "operators": "+-*", "heldout": 30}, 3 * 36 - 30, 30),
    "jsonl": ({"heldout": 12}, 2 * (60 - 12), 12),  # every prompt is on two lines, held out once
}


@pytest.mark.parametrize("case", SPLITS)
def test_heldout_problems_never_appear_in_training_batches(case, tmp_path):
    fields, num_train, num_heldout = SPLITS[case]
    config = TaskConfig(**({"name": _jsonl(tmp_path)} if case == "jsonl" else {}) | fields)
    train, heldout = setup_task(config), setup_task(config, "heldout")
    assert (train.num_problems, heldout.num_problems) == (num_train, num_heldout)
    held_prompts = {heldout.problem(i).prompt for i in range(heldout.num_problems)}
    assert len(held_prompts) == num_heldout
    assert not held_prompts & {train.problem(i).prompt for i in range(train.num_problems)}
    # the prompts nodes are given and the coordinator checks: many seeded draws, as nodes make them
    rng = np.random.default_rng(7)
    drawn = set()
    for node_seed, step, counter in zip(rng.integers(0, 2**63, 500), rng.integers(0, 1000, 500),
                                        rng.integers(1, 50, 500), strict=True):
        drawn |= {s.problem_index for s in sample_batch(train, int(node_seed), int(step), int(counter), 16)}
    assert len(drawn) > 0.9 * num_train  # the draws cover the training split...
    assert not held_prompts & {train.problem(i).prompt for i in drawn}  # ...and never a held-out problem
    # the coordinator checks submissions against the same training split nodes draw from
    rules_task = run_rules(CoordinatorConfig(state_dir=tmp_path / "c", task=config), "run").task
    assert [rules_task.problem(i) for i in range(num_train)] == [train.problem(i) for i in range(num_train)]


def test_the_split_is_deterministic_and_leaves_the_demo_pool_as_it_was():
    demo = {"pool": 40, "instruction": "Answer with just the number."}
    before = setup_task(TaskConfig(**demo))
    train = setup_task(TaskConfig(**demo, heldout=120))
    assert [train.problem(i) for i in range(40)] == [before.problem(i) for i in range(40)]
    again = setup_task(TaskConfig(**demo, heldout=120), "heldout")
    first = setup_task(TaskConfig(**demo, heldout=120), "heldout")
    assert [again.problem(i) for i in range(120)] == [first.problem(i) for i in range(120)]
    # without a pool, training keeps every problem that is not held out
    full = setup_task(TaskConfig())
    train, held = setup_task(TaskConfig(heldout=100)), setup_task(TaskConfig(heldout=100), "heldout")
    assert sorted(p.prompt for t in (train, held) for p in map(t.problem, range(t.num_problems))) == \
        sorted(full.problem(i).prompt for i in range(full.num_problems))


def test_a_split_that_does_not_fit_is_refused_in_plain_words(tmp_path):
    with pytest.raises(ValueError, match="heldout must be in"):
        setup_task(TaskConfig(pool=400, heldout=100))  # 441 problems
    with pytest.raises(ValueError, match="no held-out problems: set task.heldout"):
        setup_task(TaskConfig(), "heldout")
    with pytest.raises(TaskDataError, match="leaves no training problems"):
        setup_task(TaskConfig(name=_jsonl(tmp_path), heldout=60))  # 60 distinct prompts
    with pytest.raises(ValueError, match="task.heldout is 0"):
        CoordinatorConfig(state_dir=tmp_path / "c", eval={"every": 5})
