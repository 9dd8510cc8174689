"""Task environments: numbered problems with verifiers, seeded prompt choice, prompt rendering,
length-target rewards and GRPO advantages (spec B.3, B.5, B.6).

Imports numpy and pydantic only; math_verify is imported when a math answer is first graded,
reasoning_gym when a gym task is first built.
"""

from .arithmetic import Arithmetic
from .base import Problem, Split, Task, ThinkingFormat
from .config import TaskConfig, completion_reward, setup_task
from .gym import ReasoningGym
from .math_jsonl import MathJsonl, TaskDataError
from .rewards import group_advantages, length_reward
from .sampling import (
    SampledPrompt,
    node_seed_int,
    prompt_token_ids,
    render_prompt,
    sample_batch,
    user_message,
)
from .timelimit import grade_with_timeout

__all__ = [
    "Arithmetic",
    "MathJsonl",
    "Problem",
    "ReasoningGym",
    "SampledPrompt",
    "Split",
    "Task",
    "TaskConfig",
    "TaskDataError",
    "ThinkingFormat",
    "completion_reward",
    "grade_with_timeout",
    "group_advantages",
    "length_reward",
    "node_seed_int",
    "prompt_token_ids",
    "render_prompt",
    "sample_batch",
    "setup_task",
    "user_message",
]
