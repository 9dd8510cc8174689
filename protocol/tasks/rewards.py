"""Total rewards from task rewards and length targets (spec B.5), and GRPO advantages (B.6).

Pure numpy on numbers: this module does not know texts, tokens or tasks, so the coordinator can
recompute exactly what a node claims from (task reward, target length, output token count).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

LengthMode = Literal["exact", "max", "clip"]
ADVANTAGE_EPS = 1e-6


def length_reward(
    task_reward: float, target_length: int, num_output_tokens: int, alpha: float, mode: LengthMode
) -> tuple[float, float]:
    """(reward, length_penalty) with reward = task_reward - length_penalty, in float32.

    target_length 0 means length targets are off: the reward is the task reward.
      exact: r - alpha*|L_t - n_out|                    (INTELLECT-2's choice)
      max:   r * clip(alpha*(L_t - n_out) + 0.5, 0, 1)
      clip:  0 if n_out > L_t else r
    """
    r = np.float32(task_reward)
    if target_length == 0:
        return float(r), 0.0
    if mode == "exact":
        reward = r - np.float32(alpha * abs(target_length - num_output_tokens))
    elif mode == "max":
        reward = r * np.float32(np.clip(alpha * (target_length - num_output_tokens) + 0.5, 0.0, 1.0))
    elif mode == "clip":
        reward = np.float32(0.0) if num_output_tokens > target_length else r
    else:
        raise ValueError(f"unknown length reward mode {mode!r}")
    reward = np.float32(reward)
    return float(reward), float(np.float32(r - reward))


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """A = (r - mean) / (std(ddof=1) + 1e-6) per row of a [num_prompts, n] array, in float32.

    Identical rewards give exactly 0. n must be >= 2 (ddof=1 of one sample is undefined)."""
    r = np.asarray(rewards, dtype=np.float32)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, n>=2], got shape {r.shape}")
    centered = r - r.mean(axis=1, keepdims=True, dtype=np.float32)
    std = r.std(axis=1, ddof=1, keepdims=True, dtype=np.float32)
    adv = (centered / (std + np.float32(ADVANTAGE_EPS))).astype(np.float32)
    # mean of identical float32 values can differ from them by an ulp; pin the documented 0
    adv[np.all(r == r[:, :1], axis=1)] = 0.0
    return adv
