"""Generated arithmetic: "What is a + b?" with exact integer answers, decoded from the index.

Problem i is a pure function of (i, operators, max_operand), so node and coordinator agree on
every problem without shipping a dataset. The verifier is deliberately lenient about format
(the LAST number in the completion is the answer): a 135M model gets reward signal at step 0
this way, where a strict answer tag gave 0 of 96.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import numpy as np

from .base import Problem, Task

POOL_SEED = 1234
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

    def __init__(self, max_operand: int = 20, operators: str = "+", instruction: str = "", pool: int = 0):
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
        # a fixed subset of the problems (demo runs learn faster and measure less noisily on one)
        self._pool = np.random.default_rng(POOL_SEED).permutation(full)[:pool].tolist() if pool else None

    @property
    def num_problems(self) -> int:
        return len(self._pool) if self._pool else len(self.operators) * self._side**2

    def problem(self, i: int) -> Problem:
        self._check_index(i)
        k = self._pool[i] if self._pool else i
        op = self.operators[k // self._side**2]
        a, b = divmod(k % self._side**2, self._side)
        prompt = f"What is {a} {op} {b}?" + (f" {self.instruction}" if self.instruction else "")
        return Problem(index=i, prompt=prompt, answer=str(OPERATORS[op](a, b)))

    def score(self, problem: Problem, completion_text: str) -> float:
        got = last_number(completion_text)
        return 1.0 if got is not None and got == Decimal(problem.answer) else 0.0
