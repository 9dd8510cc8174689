"""Task libraries: reasoning-gym problems rebuilt identically in other processes (node and coordinator)
and graded by their own scorers; math-verify on a table of equivalent and non-equivalent answers; both
bounded by the run's time limit, and their extraction linear on hostile text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from pydantic import ValidationError

from intellect.protocol.tasks import (
    MathJsonl,
    Problem,
    ReasoningGym,
    TaskConfig,
    ThinkingFormat,
    completion_reward,
    grade_with_timeout,
    setup_task,
)
from intellect.protocol.tasks.gym import REASONING_GYM_VERSION, answer_in_tags
from intellect.protocol.tasks.math_answers import MATH_VERIFY_VERSION, answer_region, grade_math_answer

CONFIGS = [
    TaskConfig(name="gym:basic_arithmetic", gym_seed=11, gym_options={"max_terms": 3, "operators": ["+", "*"]}),
    TaskConfig(name="gym:chain_sum", gym_seed=2**32 - 100, gym_size=50, heldout=20, thinking=True),
]

# Node side: another interpreter, with another string-hash seed than this one's, rebuilds each task
# from the config as a node does from the RunInfo it received.
_REBUILD = r"""
import json, sys
from intellect.protocol.tasks import TaskConfig, setup_task
out = {}
for raw in json.loads(sys.argv[1]):
    config = TaskConfig.model_validate(raw)
    for split in ("train", "heldout") if config.heldout else ("train",):
        task = setup_task(config, split)
        out[f"{config.name} {split}"] = [[task.problem(i).prompt, task.problem(i).answer] for i in range(12)]
print(json.dumps(out))
"""


def _problems_here() -> dict:
    out = {}
    for config in CONFIGS:
        for split in ("train", "heldout") if config.heldout else ("train",):
            task = setup_task(config, split)
            out[f"{config.name} {split}"] = [[task.problem(i).prompt, task.problem(i).answer] for i in range(12)]
    return out


def test_gym_problems_are_identical_in_other_processes():
    ours = os.environ.get("PYTHONHASHSEED", "random")
    argv = [sys.executable, "-c", _REBUILD, json.dumps([c.model_dump() for c in CONFIGS])]
    node = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONHASHSEED="2" if ours == "1" else "1"))
    here = _problems_here()
    there = json.loads(node.communicate(timeout=120)[0])
    assert node.returncode == 0
    assert there == here
    train, held = here["gym:chain_sum train"], here["gym:chain_sum heldout"]
    assert not {p for p, _ in train} & {p for p, _ in held}
    # the held-out problems are the generator's items after the training ones
    assert setup_task(CONFIGS[1].model_copy(update={"gym_size": 70, "heldout": 0})).problem(50).prompt == held[0][0]
    other_seed = setup_task(CONFIGS[0].model_copy(update={"gym_seed": 12}))
    assert [other_seed.problem(i).prompt for i in range(12)] != [p for p, _ in here["gym:basic_arithmetic train"]]


def test_gym_training_never_repeats_a_held_out_question():
    config = TaskConfig(name="gym:chain_sum", gym_size=300, heldout=50, gym_options={"max_terms": 2, "max_digits": 1})
    train, held = setup_task(config), setup_task(config, "heldout")
    held_questions = {held.problem(i).prompt for i in range(held.num_problems)}
    unfiltered = setup_task(config.model_copy(update={"heldout": 0}))  # the generator's items 0..299 as they are
    assert held_questions & {unfiltered.problem(i).prompt for i in range(300)}  # 200 possible sums: texts repeat
    assert not held_questions & {train.problem(i).prompt for i in range(300)}
    assert train.problem(7) == setup_task(config).problem(7)  # the replacement is deterministic
    with pytest.raises(ValueError, match="too few distinct problems"):  # every sum held out
        [setup_task(config.model_copy(update={"heldout": 3000})).problem(i) for i in range(300)]


def test_gym_scores_a_right_and_a_wrong_answer_with_its_own_scorer():
    config = TaskConfig(name="gym:chain_sum", gym_options={"max_terms": 3}, grade_timeout_s=60)
    task = setup_task(config)
    assert isinstance(task, ReasoningGym) and task.name == "gym:chain_sum" and task.num_problems == 10_000
    problem = task.problem(3)
    assert problem.prompt.endswith("Give your final answer between <answer> and </answer>.")
    right, wrong = f"so <answer>{problem.answer}</answer>", f"<answer>{int(problem.answer) + 1}</answer>"
    assert task.score(problem, right) == 1.0
    assert task.score(problem, f"<answer> {problem.answer}.00 </answer>") == 1.0  # chain_sum's tolerance
    assert task.score(problem, wrong) == 0.0
    assert task.score(problem, f"the answer is {problem.answer}") == 0.0  # no tags: no answer
    assert task.score(problem, f"<answer>{problem.answer}</answer> wait, <answer>0</answer>") == 0.0  # the last
    # graded in the time-limited helper (the task is rebuilt there), as node and coordinator both do
    assert completion_reward(task, config, problem, right, 0, 9) == (1.0, 1.0, 0.0)
    assert completion_reward(task, config, problem, wrong, 0, 9) == (0.0, 0.0, 0.0)
    thinking = setup_task(config.model_copy(update={"thinking": True}))
    assert isinstance(thinking, ThinkingFormat)
    assert thinking.score(problem, f"<think>hm</think>{right}") == 1.0
    assert thinking.score(problem, f"<think>{right}</think> no idea") == 0.0


def test_gym_passes_fractional_scores_through():
    """The scorer's float is the task reward: spell_backward's scorer gives credit per letter."""
    task = setup_task(TaskConfig(name="gym:spell_backward", gym_seed=5))
    problem = task.problem(0)
    assert task.score(problem, f"<answer>{problem.answer}</answer>") == 1.0
    near = task.score(problem, f"<answer>{problem.answer[:-1]}</answer>")
    assert near == pytest.approx((len(problem.answer) - 1) / len(problem.answer))


def test_bad_gym_tasks_are_refused_in_plain_words():
    with pytest.raises(ValueError, match="not reproducible across processes"):
        setup_task(TaskConfig(name="gym:word_ladder"))
    with pytest.raises(ValueError, match="not a reasoning-gym dataset; use one of: .*chain_sum"):
        setup_task(TaskConfig(name="gym:no_such_dataset"))
    with pytest.raises(ValueError, match="bad options"):
        setup_task(TaskConfig(name="gym:chain_sum", gym_options={"max_terms": 0}))
    with pytest.raises(ValueError, match="bad options"):
        setup_task(TaskConfig(name="gym:chain_sum", gym_options={"no_such_field": 1}))
    with pytest.raises(ValueError, match="task.gym_seed"):
        setup_task(TaskConfig(name="gym:chain_sum", gym_options={"seed": 1}))
    with pytest.raises(ValueError, match="no held-out problems"):
        setup_task(TaskConfig(name="gym:chain_sum"), "heldout")
    for bad in ({"name": "gym:"}, {"name": "gym:Chain Sum"}, {"name": "gym:chain_sum", "gym_seed": 2**32},
                {"name": "gym:chain_sum", "gym_options": {"x": {"nested": 1}}},
                {"name": "gym:chain_sum", "gym_options": {f"k{i}": 1 for i in range(33)}}):
        with pytest.raises(ValidationError):
            TaskConfig(**bad)


def test_the_pinned_versions_are_the_installed_ones():
    """Node and coordinator agree on problems and grades only on the same library versions."""
    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"reasoning-gym=={REASONING_GYM_VERSION}" in deps and f"math-verify=={MATH_VERIFY_VERSION}" in deps
    assert version("reasoning-gym") == REASONING_GYM_VERSION and version("math-verify") == MATH_VERIFY_VERSION


# ---------------------------------------------------------------- math-verify


@pytest.mark.parametrize(
    "completion, reference, same",
    [
        (r"so \boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{\dfrac12}", "1/2", True),
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{\frac14}", "0.25", True),
        (r"\boxed{3.140}", "3.14", True),
        (r"\boxed{1,000}", "1000", True),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
        (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
        (r"\boxed{\pi/2}", "1.5707963267948966", True),
        (r"\boxed{90^\circ}", "90", True),
        (r"\boxed{x=3}", "3", True),
        (r"\boxed{\{2, 1\}}", r"\{1, 2\}", True),  # sets: order does not matter
        (r"\boxed{2, 1}", "1, 2", True),
        (r"\boxed{(1, 2)}", "(1,2)", True),
        ("step 1\nstep 2\nThe final answer is 42.", "42", True),
        ("so x = 5", "5", True),
        (r"so \boxed{\frac{3}{4}} and, finally, \boxed{7}", "7", True),  # the last box
        (r"\boxed{0.333}", "1/3", False),
        (r"\boxed{0.6}", r"\frac{1}{2}", False),
        (r"\boxed{x+1}", "x+2", False),
        (r"\boxed{-2}", "2", False),
        (r"\boxed{\{1,3\}}", r"\{1,2\}", False),
        (r"\boxed{(2,1)}", "(1,2)", False),
        (r"\boxed{(1,2)}", "[1,2]", False),  # an open interval is not a closed one
        ("I think 7, no wait, 8", "7", False),
        ("seven", "7", False),
        ("", "7", False),
        (r"\boxed{" + "1" * 300 + "}", "1" * 300, False),  # over MAX_ANSWER_CHARS: not a math answer
    ],
)
def test_math_verify_on_equivalent_and_different_answers(completion, reference, same):
    assert grade_math_answer(completion, reference) == (1.0 if same else 0.0)


def test_math_jsonl_grades_with_math_verify_under_the_time_limit(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"prompt": "Half of one?", "answer": r"\frac{1}{2}"}, {"prompt": "One?", "answer": "1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TaskConfig(name=f"jsonl:{path}", grade_timeout_s=60)
    task = setup_task(config)
    assert isinstance(task, MathJsonl)
    assert completion_reward(task, config, task.problem(0), r"It is $\boxed{0.5}$.", 0, 5)[1] == 1.0
    assert completion_reward(task, config, task.problem(0), r"It is \boxed{2/4}", 0, 5)[1] == 1.0
    assert completion_reward(task, config, task.problem(0), r"It is \boxed{0.6}", 0, 5)[1] == 0.0


def test_a_hanging_math_answer_is_bounded_by_the_time_limit(tmp_path):
    r"""math-verify does not finish \boxed{10^{10^{10}}} (sympy evaluates the power): the helper is
    killed at the limit, the completion scores 0, and grading goes on."""
    from intellect.protocol.tasks.timelimit import _helper

    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"prompt": "One?", "answer": "1"}) + "\n")
    task = MathJsonl(path)
    assert grade_with_timeout(task, task.problem(0), r"\boxed{1}", timeout_s=60) == 1.0  # the helper is up
    before = _helper.timeouts
    started = time.monotonic()
    assert grade_with_timeout(task, task.problem(0), r"\boxed{10^{10^{10}}}", timeout_s=2.0) == 0.0
    assert time.monotonic() - started < 15  # the limit plus killing the helper
    assert _helper.timeouts == before + 1
    assert grade_with_timeout(task, task.problem(0), r"so \boxed{1}", timeout_s=60) == 1.0


def test_answer_extraction_is_linear_on_hostile_text():
    n = 1_000_000
    texts = ["<answer>" * (n // 8), "</answer>" * (n // 9), "<answer>" + "x" * n + "</answer>",
             "\\boxed{" * (n // 7), "\\boxed" + "{" * n, "\n" * n, "-1" * (n // 2), "answer " * (n // 7)]
    for text in texts:
        started = time.perf_counter()
        answer_in_tags(text)
        region = answer_region(text)
        assert time.perf_counter() - started < 2.0, text[:20]
        assert region is None or len(region) <= 512 + len("\\boxed{}")
    assert answer_in_tags("<answer>" + "x" * n + "</answer>") is None  # too long to be an answer
    assert answer_in_tags("<answer>a <answer> b </answer>") == "b"
    assert answer_region("a\n\n  so it is 3  \n\n") == "so it is 3"
    assert answer_region("x" * 600 + " the answer is 4") == "the answer is 4"


def test_reasoning_gym_is_not_imported_until_a_gym_task_is_built():
    code = ("import sys; from intellect.protocol.tasks import setup_task, TaskConfig; setup_task(TaskConfig()); "
            "print('reasoning_gym' in sys.modules, 'math_verify' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_problem_indices_are_checked():
    task = setup_task(TaskConfig(name="gym:chain_sum", gym_size=5))
    with pytest.raises(IndexError):
        task.problem(5)
    with pytest.raises(IndexError):
        task.score(Problem(7, "q", "1"), "<answer>1</answer>")
