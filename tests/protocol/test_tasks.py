"""Tasks: verifiers on tricky texts, JSONL loading, seeded prompt choice, length rewards, GRPO
advantages, prompt rendering (math-verify's answer table is in test_task_libraries.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from intellect.protocol.tasks import (
    Arithmetic,
    MathJsonl,
    Problem,
    TaskConfig,
    TaskDataError,
    ThinkingFormat,
    completion_reward,
    group_advantages,
    length_reward,
    node_seed_int,
    prompt_token_ids,
    render_prompt,
    sample_batch,
    setup_task,
)

# ---------------------------------------------------------------- arithmetic


def test_arithmetic_problems_are_deterministic_and_cover_the_range():
    task = Arithmetic(max_operand=20, operators="+-")
    assert task.num_problems == 2 * 21 * 21
    assert task.problem(0) == Problem(0, "What is 0 + 0?", "0")
    assert task.problem(21 * 21 + 3 * 21 + 17) == Problem(21 * 21 + 3 * 21 + 17, "What is 3 - 17?", "-14")
    assert Arithmetic(20, "+-").problem(500) == task.problem(500)
    with pytest.raises(IndexError):
        task.problem(task.num_problems)
    with pytest.raises(ValueError):
        Arithmetic(20, "+/")


@pytest.mark.parametrize(
    "text, answer, reward",
    [
        ("3 + 4 = 7", "7", 1.0),
        ("The answer is 7.", "7", 1.0),
        ("7.0", "7", 1.0),
        ("I think 7, no wait, 8", "7", 0.0),
        ("The answer is 7. Let me check: 3 + 4", "7", 0.0),
        ("10-3=7", "7", 1.0),
        ("3 - 17 = -14", "-14", 1.0),
        ("3-17 is 14", "-14", 0.0),
        ("seven", "7", 0.0),
        ("", "7", 0.0),
        ("12.5", "5", 0.0),
    ],
)
def test_arithmetic_scores_the_last_number(text, answer, reward):
    assert Arithmetic().score(Problem(0, "q", answer), text) == reward


def test_thinking_format_grades_only_text_after_think():
    task = ThinkingFormat(Arithmetic())
    p = Problem(0, "What is 3 + 4?", "7")
    assert task.score(p, "3 + 4 = 7") == 0.0  # no </think>: format failure
    assert task.score(p, "<think>it is 7</think> I don't know") == 0.0
    assert task.score(p, "<think>hmm 8</think> 7") == 1.0
    assert task.score(p, "<think>a</think>b</think> 7") == 1.0  # after the LAST </think>


# ---------------------------------------------------------------- JSONL loader


def test_jsonl_task_loads_and_grades(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"prompt": "Half of one?", "answer": r"\frac{1}{2}"}, {"problem": "2+2?", "answer": 4, "x": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = setup_task(TaskConfig(name=f"jsonl:{path}"))
    assert isinstance(task, MathJsonl) and task.num_problems == 2
    assert task.problem(1) == Problem(1, "2+2?", "4")
    assert task.score(task.problem(0), r"It is \boxed{0.5}") == 1.0
    assert task.score(task.problem(0), r"It is \boxed{0.6}") == 0.0
    assert task.score(task.problem(1), "so the answer is 4") == 1.0


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"\n', ":2: not valid JSON"),
        ('{"prompt": "a", "answer": "1"}\n\n["x"]\n', ":3: expected a JSON object"),
        ('{"prompt": "a"}\n', ":1: needs an 'answer'"),
        ('{"prompt": "a", "answer": true}\n', ":1: needs an 'answer'"),
        ('{"answer": "1"}\n', ":1: needs a non-empty string 'prompt'"),
        ('{"prompt": "a", "answer": ""}\n', ":1: answer must be"),
        ("\n\n", "no problems"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TaskDataError, match=message):
        MathJsonl(path)


def test_jsonl_missing_and_binary_files(tmp_path):
    with pytest.raises(TaskDataError, match="cannot read"):
        MathJsonl(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TaskDataError, match="not UTF-8"):
        MathJsonl(tmp_path / "bin.jsonl")


# ---------------------------------------------------------------- seeded prompt choice


def test_node_seed_int_is_first_eight_bytes():
    assert node_seed_int(bytes(range(32))) == 0x0001020304050607
    with pytest.raises(ValueError):
        node_seed_int(b"short")


def test_sample_batch_follows_spec_b3_and_reproduces():
    task = Arithmetic()
    seed = node_seed_int(bytes.fromhex("ff" * 32))
    batch = sample_batch(task, seed, step=7, batch_counter=2, batch_size=16, length_targets=(100, 200, 300))
    rng = np.random.default_rng(seed * 2 + 7)
    assert [p.problem_index for p in batch] == rng.integers(0, task.num_problems, 16).tolist()
    assert batch == sample_batch(task, seed, 7, 2, 16, (100, 200, 300))
    assert {p.target_length for p in batch} <= {100, 200, 300}
    assert len({p.target_length for p in batch}) > 1
    assert batch != sample_batch(task, seed, 7, 3, 16, (100, 200, 300))
    assert batch != sample_batch(task, seed + 1, 7, 2, 16, (100, 200, 300))
    # same indices whether or not targets are drawn (targets come after, from the same rng)
    off = sample_batch(task, seed, 7, 2, 16)
    assert [p.problem_index for p in off] == [p.problem_index for p in batch]
    assert {p.target_length for p in off} == {0}


def test_sample_batch_draws_with_replacement():
    picks = [p.problem_index for p in sample_batch(Arithmetic(max_operand=1), 12345, 0, 1, 32)]
    assert len(set(picks)) < len(picks) and set(picks) <= set(range(4))


def test_sample_batch_rejects_bad_counters():
    with pytest.raises(ValueError, match="batch_counter"):
        sample_batch(Arithmetic(), 1, 0, 0, 4)


# ---------------------------------------------------------------- rewards and advantages


def test_group_advantages_worked_example_b6():
    adv = group_advantages(np.array([[1, 0.64, 0, -0.03], [0.3, 0.3, 0.3, 0.3]]))
    assert adv.dtype == np.float32
    np.testing.assert_allclose(adv[0], [1.185, 0.471, -0.798, -0.858], atol=1e-3)
    assert np.all(adv[1] == 0.0)
    with pytest.raises(ValueError):
        group_advantages(np.array([[1.0]]))


def test_length_reward_modes_b5():
    assert length_reward(1.0, 4000, 5200, 0.0003, "exact")[0] == pytest.approx(0.64, abs=1e-6)
    reward, penalty = length_reward(0.0, 4000, 3900, 0.0003, "exact")
    assert reward == pytest.approx(-0.03, abs=1e-6) and penalty == pytest.approx(0.03, abs=1e-6)
    assert length_reward(1.0, 4000, 4000, 0.0003, "max")[0] == pytest.approx(0.5)
    assert length_reward(1.0, 4000, 1000, 0.0003, "max")[0] == 1.0
    assert length_reward(1.0, 4000, 9000, 0.0003, "max")[0] == 0.0
    assert length_reward(1.0, 100, 101, 0.0003, "clip") == (0.0, 1.0)
    assert length_reward(1.0, 100, 100, 0.0003, "clip") == (1.0, 0.0)
    assert length_reward(1.0, 0, 5000, 0.0003, "exact") == (1.0, 0.0)  # targets off


def test_completion_reward_combines_task_and_length():
    config = TaskConfig(length_targets=(10,), alpha=0.01)
    task = setup_task(config)
    problem = task.problem(5)  # What is 0 + 5?
    assert completion_reward(task, config, problem, "it is 5", 10, 30) == pytest.approx((0.8, 1.0, 0.2))


def test_task_config_validation():
    assert isinstance(setup_task(TaskConfig(thinking=True)), ThinkingFormat)
    with pytest.raises(ValidationError):
        TaskConfig(name="gsm8k")
    with pytest.raises(ValidationError):
        TaskConfig(length_targets=(0,))
    with pytest.raises(ValidationError):
        TaskConfig(lenght_targets=(10,))  # typo is an error, not a silently ignored field
    with pytest.raises(ValidationError):
        TaskConfig(length_mode="linear")


# ---------------------------------------------------------------- prompt rendering


def _tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "<s>",
        "<unk>",
        "user",
        "assistant",
        ":",
        "<",
        ">",
        "think",
        "What",
        "is",
        "3",
        "+",
        "4",
        "?",
        "Think",
        "for",
        "50",
        "tokens",
        "before",
        "giving",
        "a",
        "response",
        ".",
    ]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


TEMPLATE = (  # jinja trims a newline after a block tag, so newlines are written as expressions
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '\\nassistant: ' }}{% endif %}"
)


def test_prompt_rendering_with_chat_template():
    tok = _tokenizer(TEMPLATE)
    problem = Problem(0, "What is 3 + 4?", "7")
    text = render_prompt(tok, problem, 50, thinking=False)
    assert text == "user: What is 3 + 4? Think for 50 tokens before giving a response.\nassistant: "
    assert render_prompt(tok, problem, 0, thinking=True) == "user: What is 3 + 4?\nassistant: <think>\n"
    ids = prompt_token_ids(tok, problem, 50, thinking=False)
    assert ids == prompt_token_ids(tok, problem, 50, thinking=False)
    assert tok.convert_ids_to_tokens(ids)[:3] == ["user", ":", "What"]
    assert tok.convert_ids_to_tokens(ids)[-3:] == [".", "assistant", ":"]
    assert prompt_token_ids(tok, problem, 50, False) != prompt_token_ids(tok, problem, 0, False)


def test_prompt_rendering_without_template_falls_back_to_plain_text():
    tok = _tokenizer(None)
    problem = Problem(0, "What is 3 + 4?", "7")
    assert render_prompt(tok, problem, 0, thinking=False) == "What is 3 + 4?\n"
    ids = prompt_token_ids(tok, problem, 0, thinking=False)
    assert tok.convert_ids_to_tokens(ids) == ["What", "is", "3", "+", "4", "?"]
    assert ids == tok("What is 3 + 4?\n")["input_ids"]  # with the tokenizer's own special tokens


def test_arithmetic_pool_is_a_fixed_subset_with_an_instruction():
    from intellect.protocol.tasks import TaskConfig, setup_task

    task = setup_task(TaskConfig(name="arithmetic", pool=40, instruction="Answer with just the number."))
    again = setup_task(TaskConfig(name="arithmetic", pool=40, instruction="Answer with just the number."))
    assert task.num_problems == 40
    problems = [task.problem(i) for i in range(40)]
    assert [p.prompt for p in problems] == [again.problem(i).prompt for i in range(40)]
    assert len({p.prompt for p in problems}) == 40
    assert all(p.prompt.endswith("? Answer with just the number.") for p in problems)
    p = problems[7]
    a, b = (int(x) for x in p.prompt.removeprefix("What is ").split("?")[0].split(" + "))
    assert p.answer == str(a + b) and p.index == 7
    assert task.score(p, f"The answer is {a + b}.") == 1.0


# ---------------------------------------------------------------- linear-time graders, time limit (issue 12)

# Each grader on ~1 MB of hostile text, in a fresh interpreter with a deadline: the quadratic
# last_boxed of before took 8 s on 7 KB of "\boxed{" (and hours on 1 MB) instead of failing fast.
_GRADE_BIG = r"""
import json, sys, time
from intellect.protocol.tasks import Arithmetic, MathJsonl, Problem, ThinkingFormat
math = MathJsonl(sys.argv[1])
n = 1_000_000
texts = {"open boxes": "\\boxed{" * (n // 7), "closed boxes": "\\boxed{1}" * (n // 9),
         "open braces": "\\boxed" + "{" * n, "answer is": "answer is " * (n // 10), "digits": "9" * n,
         "spaces": "answer" + " " * n, "thinks": "</think>" * (n // 8), "minus": "-1" * (n // 2)}
graders = {"math": (math, math.problem(0)), "thinking math": (ThinkingFormat(math), math.problem(0)),
           "arithmetic": (Arithmetic(), Problem(0, "What is 3 + 4?", "7"))}
math.score(math.problem(0), "\\boxed{1}")  # sympy's import is not the grader's time
slowest = {}
for text_name, text in texts.items():
    for grader_name, (task, problem) in graders.items():
        started = time.perf_counter()
        task.score(problem, "</think>" + text if grader_name.startswith("thinking") else text)
        slowest[f"{grader_name} on {text_name}"] = time.perf_counter() - started
print(json.dumps(slowest))
"""


def test_graders_are_linear_time_on_hostile_text(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"prompt": "Half of one?", "answer": r"\frac{1}{2}"}) + "\n")
    done = subprocess.run([sys.executable, "-c", _GRADE_BIG, str(path)], capture_output=True, text=True, timeout=120,
                          check=True)
    seconds = json.loads(done.stdout.strip().splitlines()[-1])
    print(seconds)
    worst = max(seconds, key=seconds.get)
    assert seconds[worst] < 10.0, f"{worst}: {seconds[worst]:.1f} s for 1 MB"  # ~1 s measured on a busy CPU


def _quadratic_last_boxed(text: str) -> str | None:
    """The reference: the old scan from each \\boxed to its closing brace."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j]
        start = text.rfind("\\boxed", 0, start)
    return None


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["\\boxed", "\\boxed ", "{", "}", " ", "x", "1"]), max_size=24))
def test_last_boxed_agrees_with_the_quadratic_reference(parts):
    from intellect.protocol.tasks.math_answers import last_boxed

    text = "".join(parts)
    assert last_boxed(text) == _quadratic_last_boxed(text)


class SleepyTask(Arithmetic):
    """A verifier that hangs on one answer and fails on another (stand-ins for a sympy blow-up: the
    graders' own bounds are meant to make a real one impossible to find)."""

    needs_time_limit = True

    def score(self, problem, completion_text):
        if "hang" in completion_text:
            time.sleep(600)
        if "crash" in completion_text:
            raise RuntimeError("verifier bug")
        if "hog" in completion_text:
            return float(len(bytearray(8 << 30)))  # past the helper's memory cap
        return super().score(problem, completion_text)


def test_grading_under_a_time_limit_scores_zero_and_goes_on():
    from intellect.protocol.tasks import grade_with_timeout
    from intellect.protocol.tasks.timelimit import _helper

    task, problem = SleepyTask(), Problem(0, "What is 3 + 4?", "7")
    assert grade_with_timeout(task, problem, "it is 7", timeout_s=60) == 1.0  # the helper starts
    before = _helper.timeouts
    started = time.monotonic()
    assert grade_with_timeout(task, problem, "7, hang on", timeout_s=1.0) == 0.0
    assert time.monotonic() - started < 30  # the limit plus killing the helper, not the 600 s sleep
    assert _helper.timeouts == before + 1
    assert grade_with_timeout(task, problem, "7 crash", timeout_s=60) == 0.0  # a failing verifier: zero
    assert grade_with_timeout(task, problem, "7 hog", timeout_s=60) == 0.0  # over the memory cap: zero
    assert grade_with_timeout(task, problem, "it is 7", timeout_s=60) == 1.0  # a new helper grades on


def test_a_grader_timeout_is_the_same_zero_for_node_and_coordinator():
    """Node (`Worker._score`) and coordinator (`checks.check_rewards`) both call completion_reward:
    a completion too slow to grade is worth exactly what a wrong answer is, on both sides."""
    config = TaskConfig(length_targets=(10,), alpha=0.01, grade_timeout_s=1.0)
    task, problem = SleepyTask(), Problem(0, "What is 3 + 4?", "7")
    wrong = completion_reward(task, config, problem, "it is 8", 10, 30)
    assert completion_reward(task, config, problem, "7, hang on", 10, 30) == wrong == pytest.approx((-0.2, 0.0, 0.2))
    with pytest.raises(ValidationError):
        TaskConfig(grade_timeout_s=0)


_KILLED_MID_GRADING = r"""
from intellect.protocol.tasks import Problem, grade_with_timeout
from intellect.protocol.tasks.timelimit import _helper
from tests.protocol.test_tasks import SleepyTask
grade_with_timeout(SleepyTask(), Problem(0, "q", "7"), "7", timeout_s=60)
print(_helper._process.pid, flush=True)
grade_with_timeout(SleepyTask(), Problem(0, "q", "7"), "hang", timeout_s=600)
"""


def test_grading_helper_leaves_with_its_parent():
    """SIGKILL the process while its helper hangs in a grading: the helper exits too (no orphan)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_MID_GRADING], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=root))
    try:
        helper = int(parent.stdout.readline())
        time.sleep(1.0)  # the hanging grading has begun
    finally:
        parent.kill()
        parent.wait()
    def alive() -> bool:
        try:
            os.kill(helper, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 15
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    survived = alive()
    if survived:
        os.kill(helper, 9)
    assert not survived, "the grading helper outlived its parent"
