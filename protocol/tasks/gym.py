"""reasoning-gym's procedural datasets as tasks, `gym:<dataset>`: problem i is generated from
(dataset, options, seed, i) and graded by the dataset's own scorer, whose score in [0, 1] is the
task reward.

Node and coordinator build the same problems because both run the reasoning-gym version pinned in
pyproject.toml (`REASONING_GYM_VERSION` is checked at build) with the seed and options the run
announces; reasoning-gym seeds item i with `seed + i`, so the training problems are generator
indices [0, size) and the held-out ones [size, size + heldout). Small problem spaces repeat texts
(chain_sum with 2-digit terms: 71 of 200 held-out prompts were also among 10 000 training ones), so a
training item whose question is a held-out one is replaced by the next index's item that is not.
Datasets that are not reproducible across processes are refused (`UNREPRODUCIBLE`).

The answer is the text inside the completion's last <answer>...</answer> (reasoning-gym's own
convention; the prompt asks for it): no tags, no answer. reasoning_gym is imported when a gym task
is first built (about 2 s: it loads every generator). What this module does not know: what any
dataset generates or how its scorer decides.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from functools import lru_cache

from .base import Problem, Split, Task, require_pinned

REASONING_GYM_VERSION = "0.1.25"
ANSWER_INSTRUCTION = "Give your final answer between <answer> and </answer>."
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_ANSWER_CHARS = 16_384  # longer than any dataset's answer (a sudoku grid, a sorted word list)
MAX_PROBLEMS = 10**9
CACHE_ENTRIES = 4096  # generated items kept for scoring: the scorer needs the item's metadata
DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_SKIPS = 64  # training items in a row that may repeat held-out questions before the task is refused

# Their problems change with Python's per-process string hashing (set iteration order): items of
# seed 7 differed between processes run with PYTHONHASHSEED 1 and 2 (items 0, 1, 500) and 3 and 4
# (items 0-7, 1000, 1500, 1999) for these five, and for no other dataset of 0.1.25 (default
# options). `composite` mixes other datasets and needs their configs.
UNREPRODUCIBLE = frozenset({"isomorphic_strings", "knight_swap", "polynomial_multiplication", "ransom_note",
                            "word_ladder"})
UNSUPPORTED = UNREPRODUCIBLE | {"composite"}


def answer_in_tags(text: str) -> str | None:
    """The stripped text between the last `</answer>` and the `<answer>` before it, or None (also
    when it is longer than MAX_ANSWER_CHARS). Two reverse scans: linear on any text."""
    end = text.rfind(ANSWER_CLOSE)
    if end == -1:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start == -1:
        return None
    answer = text[start + len(ANSWER_OPEN) : end].strip()
    return answer if len(answer) <= MAX_ANSWER_CHARS else None


@lru_cache(maxsize=8)  # a node builds its task once per batch: generators and held-out sets are reused
def _build_dataset(dataset: str, seed: int, size: int, options_json: str):
    options = json.loads(options_json)
    require_pinned("reasoning-gym", REASONING_GYM_VERSION, f"gym:{dataset}")
    from reasoning_gym.factory import DATASETS, create_dataset

    if dataset not in DATASETS or dataset in UNSUPPORTED:
        why = "is not reproducible across processes" if dataset in UNREPRODUCIBLE else "is not supported"
        if dataset not in DATASETS:
            why = "is not a reasoning-gym dataset"
        names = ", ".join(sorted(set(DATASETS) - UNSUPPORTED))
        raise ValueError(f"gym:{dataset} {why}; use one of: {names}")
    if {"seed", "size"} & set(options):
        raise ValueError(f"gym:{dataset}: set the seed and size with task.gym_seed and task.gym_size, not options")
    try:
        return create_dataset(dataset, seed=seed, size=size, **options)
    except (TypeError, AssertionError, ValueError) as e:  # an unknown option, or one its config refuses
        raise ValueError(f"gym:{dataset}: bad options {options}: {e}") from e


@lru_cache(maxsize=8)
def _heldout_questions(dataset: str, seed: int, size: int, options_json: str, heldout: int) -> frozenset[str]:
    generator = _build_dataset(dataset, seed, size + heldout, options_json)
    return frozenset(generator[size + k]["question"] for k in range(heldout))


class ReasoningGym(Task):
    needs_time_limit = True  # scorers are arbitrary Python (some parse with sympy)

    def __init__(self, dataset: str, seed: int = 0, size: int = 10_000, options: dict | None = None,
                 instruction: str = "", heldout: int = 0, split: Split = "train"):
        if not DATASET_NAME.match(dataset):
            raise ValueError(f"gym dataset names are lowercase words with underscores, got {dataset!r}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"gym seed must be in [0, 2**32), got {seed}")
        if size < 1 or heldout < 0 or size + heldout > MAX_PROBLEMS:
            raise ValueError(f"gym: need size >= 1, heldout >= 0, size + heldout <= {MAX_PROBLEMS}; "
                             f"got {size}, {heldout}")
        if split == "heldout" and not heldout:
            raise ValueError("this task has no held-out problems: set task.heldout")
        self.name = f"gym:{dataset}"
        self._args = (dataset, seed, size, dict(options or {}), instruction, heldout, split)
        self.instruction = instruction or ANSWER_INSTRUCTION
        self._offset, self._count = (size, heldout) if split == "heldout" else (0, size)
        options_json = json.dumps(options or {}, sort_keys=True)
        self._dataset = _build_dataset(dataset, seed, size + heldout, options_json)
        self._held = (_heldout_questions(dataset, seed, size, options_json, heldout) if split == "train" and heldout
                      else frozenset())
        self._items: OrderedDict[int, dict] = OrderedDict()

    def __reduce__(self):
        # the grading helper rebuilds the generator from its arguments instead of unpickling its
        # state (word lists, boards) once per task
        return (ReasoningGym, self._args)

    @property
    def num_problems(self) -> int:
        return self._count

    def _item(self, i: int) -> dict:
        self._check_index(i)
        item = self._items.get(i)
        if item is None:
            item = self._generate(i)
            self._items[i] = item
            if len(self._items) > CACHE_ENTRIES:
                self._items.popitem(last=False)
        return item

    def _generate(self, i: int) -> dict:
        index = self._offset + i
        for _ in range(MAX_SKIPS + 1):
            item = self._dataset[index]
            if item["question"] not in self._held:
                return item
            index = (index + 1) % self._count  # only training skips (`_held` is empty otherwise)
        raise ValueError(f"{self.name}: training problem {i} and the {MAX_SKIPS} after it all repeat held-out "
                         f"problems: too few distinct problems for heldout={self._args[5]}")

    def problem(self, i: int) -> Problem:
        item = self._item(i)
        return Problem(index=i, prompt=f"{item['question']}\n\n{self.instruction}", answer=str(item["answer"]))

    def score(self, problem: Problem, completion_text: str) -> float:
        score = float(self._dataset.score_answer(answer_in_tags(completion_text), self._item(problem.index)))
        return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0
