"""Task configuration and the `setup_task` factory: configs select a task by name.

Names: "arithmetic" (generated; see `Arithmetic`), "jsonl:PATH" (math problems from a file) or
"gym:<dataset>" (a reasoning-gym generator; see `ReasoningGym`).
The same `TaskConfig` is given to node and coordinator, so both sample, render and reward the
same way, and both leave the same held-out problems out of training; it is part of what a run announces.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from .arithmetic import Arithmetic
from .base import Problem, Split, Task, ThinkingFormat
from .gym import DATASET_NAME, ReasoningGym
from .math_jsonl import MathJsonl
from .rewards import LengthMode, length_reward
from .timelimit import DEFAULT_GRADE_TIMEOUT_S, grade_with_timeout

# one field of a reasoning-gym dataset's config (e.g. max_terms=3, operators=["+", "-"])
GymOption = (StrictBool | StrictInt | StrictFloat | Annotated[str, Field(max_length=200)]
             | Annotated[list[StrictInt | StrictFloat | Annotated[str, Field(max_length=200)]], Field(max_length=64)])
MAX_GYM_OPTIONS = 32


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("arithmetic", description='"arithmetic", "jsonl:PATH" or "gym:<dataset>"')
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
                             description='arithmetic, gym: sentence after the question, e.g. "Answer with just the '
                                         'number." (gym: asks for <answer> tags when empty)')
    grade_timeout_s: float = Field(DEFAULT_GRADE_TIMEOUT_S, gt=0.0, le=600.0,
                                   description="a completion whose grading takes longer scores 0 (math tasks)")
    gym_seed: int = Field(0, ge=0, lt=2**32, description="gym: the generator seed (problem i is item seed + i)")
    gym_size: int = Field(10_000, ge=1, le=10**8, description="gym: number of training problems")
    gym_options: dict[str, GymOption] = Field(
        default_factory=dict, description='gym: the dataset\'s config fields, e.g. {"max_terms": 3}')

    @field_validator("length_targets")
    @classmethod
    def _targets_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(t <= 0 or t > 1_000_000 for t in v):
            raise ValueError(f"length targets must be in 1..1000000, got {list(v)}")
        return v

    @field_validator("gym_options")
    @classmethod
    def _gym_options_bounded(cls, v: dict) -> dict:
        if len(v) > MAX_GYM_OPTIONS or not all(DATASET_NAME.match(key) for key in v):
            raise ValueError(f"gym_options: at most {MAX_GYM_OPTIONS} fields named in lowercase words, got {list(v)[:40]}")
        return v

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v != "arithmetic" and not (v.startswith("jsonl:") and len(v) > len("jsonl:")) and not (
                v.startswith("gym:") and DATASET_NAME.match(v.removeprefix("gym:"))):
            raise ValueError(f'unknown task {v!r}: use "arithmetic", "jsonl:PATH" or "gym:<dataset>"')
        return v


def setup_task(config: TaskConfig, split: Split = "train") -> Task:
    """The task's training problems (what nodes draw from), or with split="heldout" the problems kept
    out of training for evaluation."""
    if config.name == "arithmetic":
        task: Task = Arithmetic(config.max_operand, config.operators, config.instruction, config.pool,
                                config.heldout, split)
    elif config.name.startswith("gym:"):
        task = ReasoningGym(config.name.removeprefix("gym:"), config.gym_seed, config.gym_size, config.gym_options,
                            config.instruction, config.heldout, split)
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
