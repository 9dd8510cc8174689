r"""Math answer checks with math-verify (pinned in pyproject.toml, so node and coordinator parse and
compare alike): fractions, LaTeX, decimals, sets, intervals and equations compare by value.

What math-verify is shown is bounded here first, in one pass: the last balanced \boxed{} of a
completion, or else the end of its last non-empty line, since math-verify's own extraction is
superlinear on long hostile text (a 1 MB line of "-1" took 25 s). Its signal-based timeouts are
off: they work only in a main thread, and the run's one time limit (`timelimit`, the grading helper)
already bounds a parse or comparison that blows up ("\boxed{9^9^9^9}" never finishes).
math_verify is imported when a math answer is first graded. This module does not know where
problems or reference answers come from.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from .base import require_pinned

MATH_VERIFY_VERSION = "0.9.0"
MAX_ANSWER_CHARS = 256  # a \boxed{} answer longer than this is not a math answer: it scores 0
MAX_LINE_CHARS = 512  # how much of the last line is searched for an answer when nothing is boxed

_BRACE = re.compile(r"[{}]")
_SPACE = re.compile(r"\s")


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} whose braces balance, or None. One pass over the text
    (a completion is untrusted and long: scanning to the end from each `\boxed` was quadratic)."""
    closing = _matching_braces(text)
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{" and i in closing:
            return text[i + 1 : closing[i]]
        start = text.rfind("\\boxed", 0, start)
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each balanced "{" -> position of its "}"; unmatched braces are left out."""
    closing, open_at = {}, []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            open_at.append(m.start())
        elif open_at:
            closing[open_at.pop()] = m.start()
    return closing


def answer_region(text: str) -> str | None:
    r"""The part of a completion math-verify reads: "\boxed{<last boxed content>}", or the last
    MAX_LINE_CHARS of the last non-empty line (cut after a space, so no number is split), or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return f"\\boxed{{{boxed}}}" if len(boxed.strip()) <= MAX_ANSWER_CHARS else None
    line = _last_line(text)
    if len(line) > MAX_LINE_CHARS:
        tail = line[-MAX_LINE_CHARS:]
        space = _SPACE.search(tail)
        line = tail[space.end() :] if space else ""
    return line or None


def _last_line(text: str) -> str:
    """The last non-empty line, stripped; rstrip first so that two reverse scans find it."""
    text = text.rstrip()
    return text[max(text.rfind("\n"), text.rfind("\r")) + 1 :].strip()


def _quiet_timeout_warning(record: logging.LogRecord) -> bool:
    # math-verify warns once per process that its own timeouts are off: they are, on purpose
    return "Timeout is disabled" not in record.getMessage()


def require_math_verify() -> None:
    """Raise, in words, unless the pinned math-verify is installed: another version may grade an
    answer differently than the coordinator does (a node's honest reward would then be a mismatch)."""
    require_pinned("math-verify", MATH_VERIFY_VERSION, "grading math answers")


@lru_cache(maxsize=1)
def _math_verify():
    require_math_verify()
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_quiet_timeout_warning)
    return math_verify


@lru_cache(maxsize=4096)
def _parsed_reference(reference: str):
    """A reference answer as math-verify's gold: written without math delimiters in task files, so
    it is read as inline LaTeX unless it already has them."""
    mv = _math_verify()
    text = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    return mv.parse(text, parsing_timeout=None)


def equivalent(given: str, reference: str) -> bool:
    """Whether `given` (a completion's answer region) has the value of `reference`."""
    mv = _math_verify()
    gold = _parsed_reference(reference)
    return bool(gold) and mv.verify(gold, mv.parse(given, parsing_timeout=None), timeout_seconds=None)


def warm_up() -> None:
    """Import math-verify and parse once (its LaTeX parser builds its tables on first use)."""
    equivalent("\\boxed{\\frac{1}{2}}", "0.5")


def grade_math_answer(completion_text: str, reference: str) -> float:
    """1.0 when the completion's answer equals the reference by math-verify, else 0.0."""
    region = answer_region(completion_text)
    return 1.0 if region is not None and equivalent(region, reference) else 0.0
