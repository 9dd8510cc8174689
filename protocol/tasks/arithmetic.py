"""Generated arithmetic: "What is a + b?" with exact integer answers, decoded from the index.

Problem i is a pure function of (i, operators, max_operand), so node and coordinator agree on
every problem without shipping a dataset. The verifier is deliberately lenient about format
(the LAST number in the completion is the answer): a 135M model gets reward signal at step 0
this way, where a strict answer tag gave 0 of 96.

Pool and held-out split both come from one fixed permutation of the problems: the pool (or, without
one, everything else) from its start, the `heldout` problems from its end, so the two never meet.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import numpy as np

from .base import Problem, Split, Task

POOL_SEED = 1234
MAX_PERMUTED = 10**7  # a pool or held-out split holds a permutation of every problem index in memory
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

# A minus sign counts only when it is not a binary minus ("3-2" ends in 2, not -2).
_NUMBER = re.compile(r"(?<![\d.])-?\d{1,60}(?:\.\d{1,60})?")


def last_number(text: str) -> Decimal | None:
    """The last decimal number written in `text`, or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return Decimal(matches[-1])
    except InvalidOperation:  # the regex admits only valid decimals; kept as a typed guard
        return None


class Arithmetic(Task):
    name = "arithmetic"
    needs_time_limit = False  # one regex pass over the text

    def __init__(self, max_operand: int = 20, operators: str = "+", instruction: str = "", pool: int = 0,
                 heldout: int = 0, split: Split = "train"):
        if max_operand < 1 or max_operand > 10**6:
            raise ValueError(f"max_operand must be in [1, 1e6], got {max_operand}")
        if (
            not operators
            or any(op not in OPERATORS for op in operators)
            or len(set(operators)) != len(operators)
        ):
            raise ValueError(f"operators must be distinct characters of {''.join(OPERATORS)!r}")
        self.max_operand = max_operand
        self.operators = operators
        self.instruction = instruction
        self._side = max_operand + 1  # operands run 0..max_operand inclusive
        full = len(operators) * self._side**2
        if not 0 <= pool <= full:
            raise ValueError(f"pool must be in [0, {full}] (0: every problem), got {pool}")
        if not 0 <= heldout <= full - max(pool, 1):
            raise ValueError(f"heldout must be in [0, {full - max(pool, 1)}]: {full} problems, {pool or 'at least 1'} "
                             f"kept for training; got {heldout}")
        if split == "heldout" and not heldout:
            raise ValueError("this task has no held-out problems: set task.heldout")
        self._pool = None  # None: every problem, in index order
        if pool or heldout:
            if full > MAX_PERMUTED:
                raise ValueError(f"pool and heldout need at most {MAX_PERMUTED} problems, this task has {full}")
            # the pool: a fixed subset (demo runs learn faster and measure less noisily on one)
            order = np.random.default_rng(POOL_SEED).permutation(full)
            if split == "heldout":
                self._pool = order[full - heldout:]
            else:
                self._pool = order[:pool] if pool else order[:full - heldout]

    @property
    def num_problems(self) -> int:
        return len(self._pool) if self._pool is not None else len(self.operators) * self._side**2

    def problem(self, i: int) -> Problem:
        self._check_index(i)
        k = int(self._pool[i]) if self._pool is not None else i
        op = self.operators[k // self._side**2]
        a, b = divmod(k % self._side**2, self._side)
        prompt = f"What is {a} {op} {b}?" + (f" {self.instruction}" if self.instruction else "")
        return Problem(index=i, prompt=prompt, answer=str(OPERATORS[op](a, b)))

    def score(self, problem: Problem, completion_text: str) -> float:
        got = last_number(completion_text)
        return 1.0 if got is not None and got == Decimal(problem.answer) else 0.0
