"""Math problems from a JSONL file, graded by math-verify (see `math_answers`).

Each line is an object with "prompt" (or "problem") and "answer" (string or number); other keys
are ignored. The file is read once, bounded in size, and any bad line fails the whole load with
an error naming the file and line: a silently skipped line would shift every problem index and
break seeded prompt choice between node and coordinator.

The held-out split (`heldout` problems) is chosen by content: the distinct prompts with the smallest
sha256, so it does not depend on line order, and a prompt written on several lines is held out on
all of them. Training keeps the other lines in file order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .base import Problem, Split, Task
from .math_answers import MAX_ANSWER_CHARS, grade_math_answer, require_math_verify

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_PROMPT_CHARS = 32_768


class TaskDataError(ValueError):
    """A task data file is missing, too large, or has a malformed line."""


def _parse_line(raw: str, where: str) -> tuple[str, str]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt", obj.get("problem"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskDataError(f"{where}: needs a non-empty string 'prompt' or 'problem'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise TaskDataError(f"{where}: prompt longer than {MAX_PROMPT_CHARS} characters")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TaskDataError(f"{where}: needs an 'answer' string or number")
    answer = str(answer).strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        raise TaskDataError(f"{where}: answer must be 1..{MAX_ANSWER_CHARS} characters")
    return prompt, answer


def load_problems(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a JSONL file; blank lines are allowed and not counted."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TaskDataError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES} allowed")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TaskDataError(f"cannot read task file {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    rows = [_parse_line(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise TaskDataError(f"{path}: no problems")
    return rows


def split_rows(rows: list[tuple[str, str]], heldout: int, split: Split, where: Path) -> list[tuple[str, str]]:
    """The rows of one split: held-out are the `heldout` distinct prompts of smallest sha256 (one row
    each), training every row whose prompt is not one of them."""
    if split == "heldout" and not heldout:
        raise TaskDataError(f"{where}: this task has no held-out problems: set task.heldout")
    if not heldout:
        return rows
    digests = {}
    for prompt, answer in rows:
        digests.setdefault(hashlib.sha256(prompt.encode()).digest(), (prompt, answer))
    if heldout >= len(digests):
        raise TaskDataError(f"{where}: heldout {heldout} leaves no training problems, the file has "
                            f"{len(digests)} distinct prompts")
    held = {digests[d][0]: digests[d] for d in sorted(digests)[:heldout]}
    if split == "heldout":
        return list(held.values())
    return [row for row in rows if row[0] not in held]


class MathJsonl(Task):
    def __init__(self, path: str | Path, heldout: int = 0, split: Split = "train"):
        require_math_verify()
        self.path = Path(path)
        self.name = f"jsonl:{self.path}"
        self._rows = split_rows(load_problems(self.path), heldout, split, self.path)

    @property
    def num_problems(self) -> int:
        return len(self._rows)

    def problem(self, i: int) -> Problem:
        self._check_index(i)
        prompt, answer = self._rows[i]
        return Problem(index=i, prompt=prompt, answer=answer)

    def score(self, problem: Problem, completion_text: str) -> float:
        return grade_math_answer(completion_text, problem.answer)
