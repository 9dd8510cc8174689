"""Task configuration and the `setup_task` factory: configs select a task by name.

Names: "arithmetic" (generated; see `Arithmetic`) or "jsonl:PATH" (math problems from a file).
The same `TaskConfig` is given to node and coordinator, so both sample, render and reward the
same way, and both leave the same held-out problems out of training; it is part of what a run announces.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .arithmetic import Arithmetic
from .base import Problem, Split, Task, ThinkingFormat
from .math_jsonl import MathJsonl
from .rewards import LengthMode, length_reward
from .timelimit import DEFAULT_GRADE_TIMEOUT_S, grade_with_timeout


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("arithmetic", description='"arithmetic" or "jsonl:PATH"')
    length_targets: tuple[int, ...] = Field(
        (), description="'Think for N tokens' targets drawn per prompt; empty turns length rewards off"
    )
    alpha: float = Field(0.0003, ge=0.0, le=1.0, description="length penalty per token of |L_t - n_out|")
    length_mode: LengthMode = Field("exact", description="exact | max | clip (spec B.5)")
    thinking: bool = Field(False, description="open the answer with <think>; reward 0 without </think>")
    max_operand: int = Field(20, ge=1, le=10**6, description="arithmetic: operands in 0..max_operand")
    operators: str = Field("+", description="arithmetic: operator characters drawn from '+-*'")
    pool: int = Field(0, ge=0, le=10**7, description="arithmetic: use a fixed subset of this many problems (0: all)")
    heldout: int = Field(0, ge=0, le=10**6, description="problems set aside for held-out evaluation, never drawn "
                                                         "for training (0: none)")
    instruction: str = Field("", max_length=200,
                             description='arithmetic: sentence after the question, e.g. "Answer with just the number."')
    grade_timeout_s: float = Field(DEFAULT_GRADE_TIMEOUT_S, gt=0.0, le=600.0,
                                   description="a completion whose grading takes longer scores 0 (math tasks)")

    @field_validator("length_targets")
    @classmethod
    def _targets_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(t <= 0 or t > 1_000_000 for t in v):
            raise ValueError(f"length targets must be in 1..1000000, got {list(v)}")
        return v

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v != "arithmetic" and not (v.startswith("jsonl:") and len(v) > len("jsonl:")):
            raise ValueError(f'unknown task {v!r}: use "arithmetic" or "jsonl:PATH"')
        return v


def setup_task(config: TaskConfig, split: Split = "train") -> Task:
    """The task's training problems (what nodes draw from), or with split="heldout" the problems kept
    out of training for evaluation."""
    if config.name == "arithmetic":
        task: Task = Arithmetic(config.max_operand, config.operators, config.instruction, config.pool,
                                config.heldout, split)
    else:
        task = MathJsonl(config.name.removeprefix("jsonl:"), config.heldout, split)
    return ThinkingFormat(task) if config.thinking else task


def completion_reward(
    task: Task,
    config: TaskConfig,
    problem: Problem,
    completion_text: str,
    target_length: int,
    num_output_tokens: int,
) -> tuple[float, float, float]:
    """(reward, task_reward, length_penalty) of one completion, as a node claims and the
    coordinator recomputes it: both grade under the run's time limit, so a completion too slow
    to grade is a zero on both sides."""
    task_reward = grade_with_timeout(task, problem, completion_text, config.grade_timeout_s)
    reward, penalty = length_reward(
        task_reward, target_length, num_output_tokens, config.alpha, config.length_mode
    )
    return reward, task_reward, penalty
