"""The inference-engine interface every backend implements, and the types it speaks.

An engine knows token ids only (no chat templates, no tasks, no rewards): it turns prompts into
sampled completions, each with the sampling log-probs and the TOPLOC proofs over its decode
hidden states (spec A.2), and swaps in a new policy's weights in place.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]


class SamplingParams(BaseModel):
    """How to sample. INTELLECT-2 used temperature 0.6, top_p 1 (spec B.4). There is no top-p: every
    engine samples with `protocol.sampling` (seeded Gumbel-max), whose tokens a validator checks exactly,
    and a nucleus boundary could not be checked that way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, description="0 means greedy.")
    max_tokens: int = Field(256, ge=1, description="Most output tokens per completion.")
    stop_token_ids: tuple[int, ...] = Field((), description="Extra stop ids besides the model's EOS ids.")
    ignore_eos: bool = Field(False, description="Do not stop on the model's EOS ids (benchmarks).")
    proofs: bool = Field(True, description="Capture hidden states and build TOPLOC proofs.")


@dataclass
class Completion:
    """One sampled completion.

    `output_logprobs[i]` is log p(output_tokens[i]) under the distribution sampled from,
    log_softmax(logits / T) (T = 1 when greedy).
    `proofs` is the concatenation of 258-byte TOPLOC proofs over the n_out - 1 decode rows,
    b"" when n_out <= 1 or when proofs were off.
    """

    output_tokens: list[int]
    output_logprobs: list[float]
    finish_reason: FinishReason
    proofs: bytes = b""


@dataclass
class EngineStats:
    """Running totals, so a status screen can show throughput."""

    num_output_tokens: int = 0
    seconds: float = 0.0
    num_calls: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.seconds if self.seconds > 0 else 0.0


class Engine(ABC):
    """A generation backend. Subclasses fill `name` and `device` and implement the two methods."""

    name: str
    device: str

    def __init__(self) -> None:
        self.stats = EngineStats()

    @abstractmethod
    def _generate(self, prompts: list[list[int]], params: SamplingParams,
                  seeds: list[int]) -> list[Completion]: ...

    @abstractmethod
    def load_weights(self, checkpoint_dir: str | Path) -> None:
        """Replace the policy's weights in place with those in `checkpoint_dir` (same architecture)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int]) -> list[Completion]:
        """Sample one completion per prompt; `seeds[i]` fixes prompt i's sampling noise (the worker
        derives it with `protocol.sampling.completion_seed`), whatever the batch and the engine."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        start = time.perf_counter()
        out = self._generate(prompts, params, seeds) if prompts else []
        self.stats.seconds += time.perf_counter() - start
        self.stats.num_output_tokens += sum(len(c.output_tokens) for c in out)
        self.stats.num_calls += 1
        return out

    @property
    def tokens_per_s(self) -> float:
        return self.stats.tokens_per_s

    def close(self) -> None:
        """Free what the engine holds (processes, memory). Safe to call twice."""
