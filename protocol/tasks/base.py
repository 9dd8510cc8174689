"""The task interface: numbered problems with a prompt and a verifier that scores a completion.

A task knows its problems and how to grade a completion's text. It does not know tokens,
length targets, prompt rendering or advantages: those live in `sampling` and `rewards`, so that
every task gets the same (checkable) treatment from node and coordinator alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

THINK_END = "</think>"
# Which problems a task object holds: the ones nodes train on, or the ones set aside (task.heldout)
# that only the coordinator's evaluation sees. Problem indices count within the split.
Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Problem:
    """One prompt. `answer` is the reference the verifier compares against (kept as text so it
    can be shipped and logged as-is)."""

    index: int
    prompt: str
    answer: str


class Task(ABC):
    """A finite, indexable set of problems plus a verifier with rewards in [0, 1] (most give 0 or 1)."""

    name: str
    # False only for verifiers that are linear-time by construction: they are graded in-process,
    # the others under the run's time limit (see `timelimit`)
    needs_time_limit: bool = True

    @property
    @abstractmethod
    def num_problems(self) -> int: ...

    @abstractmethod
    def problem(self, i: int) -> Problem:
        """Problem `i`, 0 <= i < num_problems; the same i always gives the same problem."""

    @abstractmethod
    def score(self, problem: Problem, completion_text: str) -> float:
        """Task reward of a completion: 1.0 if it answers `problem` correctly, 0.0 if not, and between
        for a verifier that gives partial credit (some reasoning-gym scorers)."""

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_problems:
            raise IndexError(f"{self.name}: problem index {i} outside [0, {self.num_problems})")


class ThinkingFormat(Task):
    """Format rule of spec B.5: reward 0 unless the completion closes its reasoning with
    `</think>`; the inner task grades only the text after the last `</think>`, so an answer
    written inside the reasoning earns nothing."""

    def __init__(self, inner: Task):
        self.inner = inner
        self.name = inner.name
        self.needs_time_limit = inner.needs_time_limit

    @property
    def num_problems(self) -> int:
        return self.inner.num_problems

    def problem(self, i: int) -> Problem:
        return self.inner.problem(i)

    def score(self, problem: Problem, completion_text: str) -> float:
        _, sep, answer_part = completion_text.rpartition(THINK_END)
        if not sep:
            return 0.0
        return self.inner.score(problem, answer_part)


def require_pinned(distribution: str, pinned: str, needed_by: str) -> None:
    """Raise, in words, unless `distribution` is installed at exactly `pinned`: node and coordinator must
    build and grade problems the same way, and another version may do either differently."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version(distribution)
    except PackageNotFoundError as e:
        raise ValueError(f"{needed_by} needs {distribution}=={pinned}: it is not installed") from e
    if installed != pinned:
        raise ValueError(f"{needed_by} needs {distribution}=={pinned}, {installed} is installed")
