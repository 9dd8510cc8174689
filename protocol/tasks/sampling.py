"""Seeded prompt choice (spec B.3), the sampling seeds of a batch, and prompt rendering, identical on
node and coordinator.

For batch `batch_counter` (1, 2, ... within a step) of policy step `step`, a node's prompts and
their length targets come from one numpy generator seeded with node_seed * batch_counter + step,
so the coordinator can recompute both and reject cherry-picked prompts or targets (spec A.12,
"gaps worth closing": INTELLECT-2 drew targets from an unseeded RNG). This module knows nothing
about generation, rewards or what a tokenizer's vocabulary is.

The sampling seed of completion j of a batch (`completion_seed`) is a hash of (run id, node key,
policy step, batch counter, j): the node chooses nothing in it, and protocol/sampling.py turns it
into the noise of every token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Problem, Task

NODE_SEED_BYTES = 8
SEED_DOMAIN = b"intellect-node/sampling-seed/v1\0"
THINK_START = "<think>\n"


def node_seed_int(public_key: bytes) -> int:
    """The node's seed: its public key's first 8 bytes as a big-endian unsigned int."""
    if len(public_key) < NODE_SEED_BYTES:
        raise ValueError(f"public key must have at least {NODE_SEED_BYTES} bytes, got {len(public_key)}")
    return int.from_bytes(public_key[:NODE_SEED_BYTES], "big")


def completion_seed(run_id: str, node_public_key: bytes, policy_step: int, batch_counter: int, index: int) -> int:
    """The sampling seed of completion `index` of batch `batch_counter` (63 bits)."""
    if policy_step < 0 or batch_counter < 1 or index < 0:
        raise ValueError(f"need policy_step >= 0, batch_counter >= 1, index >= 0; got {policy_step}, "
                         f"{batch_counter}, {index}")
    run = run_id.encode()
    msg = (SEED_DOMAIN + len(run).to_bytes(2, "big") + run + len(node_public_key).to_bytes(2, "big")
           + bytes(node_public_key) + policy_step.to_bytes(8, "big") + batch_counter.to_bytes(8, "big")
           + index.to_bytes(8, "big"))
    return int.from_bytes(hashlib.sha256(msg).digest()[:8], "big") >> 1


def batch_seeds(run_id: str, node_public_key: bytes, policy_step: int, batch_counter: int, num: int) -> list[int]:
    return [completion_seed(run_id, node_public_key, policy_step, batch_counter, j) for j in range(num)]


@dataclass(frozen=True)
class SampledPrompt:
    problem_index: int
    target_length: int  # 0: length targets off


def sample_batch(
    task: Task,
    node_seed: int,
    step: int,
    batch_counter: int,
    batch_size: int,
    length_targets: Sequence[int] = (),
) -> list[SampledPrompt]:
    """Problem indices drawn WITH replacement, then one length target per prompt drawn from the
    same generator (after the indices, so the indices match prime-rl's for the same seed)."""
    if node_seed < 0 or step < 0 or batch_counter < 1 or batch_size < 1:
        raise ValueError(
            f"need node_seed >= 0, step >= 0, batch_counter >= 1, batch_size >= 1; "
            f"got {node_seed}, {step}, {batch_counter}, {batch_size}"
        )
    rng = np.random.default_rng(node_seed * batch_counter + step)
    indices = rng.integers(0, task.num_problems, batch_size)
    if length_targets:
        targets = np.asarray(length_targets, dtype=np.int64)[rng.integers(0, len(length_targets), batch_size)]
    else:
        targets = np.zeros(batch_size, dtype=np.int64)
    return [SampledPrompt(int(i), int(t)) for i, t in zip(indices, targets, strict=True)]


def user_message(problem: Problem, target_length: int) -> str:
    """The user turn: the prompt, plus the thinking budget sentence when a target is set."""
    if target_length <= 0:
        return problem.prompt
    return f"{problem.prompt} Think for {target_length} tokens before giving a response."


def render_prompt(tokenizer, problem: Problem, target_length: int, thinking: bool) -> str:
    """Prompt text through the tokenizer's chat template (assistant turn opened, and begun with
    "<think>\\n" when the task uses thinking); plain "user text\\n" when there is no template."""
    content = user_message(problem, target_length)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        if thinking:
            messages.append({"role": "assistant", "content": THINK_START})
            return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return content + "\n" + (THINK_START if thinking else "")


def prompt_token_ids(tokenizer, problem: Problem, target_length: int, thinking: bool) -> list[int]:
    """Token ids of the rendered prompt. A chat template already writes any BOS it wants, so
    special tokens are added only for the plain-text fallback."""
    text = render_prompt(tokenizer, problem, target_length, thinking)
    add_special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
