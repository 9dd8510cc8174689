"""Configuration of the GRPO trainer (pydantic, no torch import).

Defaults are INTELLECT-2's final run (spec B.9, B.10) except `lr` and the sequence length, which
are scaled for the small models a volunteer run trains. This module only describes and validates
settings; it knows nothing about models or tensors, so a CLI can parse it before importing torch.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_LAST_N = re.compile(r"^last_n_layers:([1-9][0-9]*)$")


class LossConfig(BaseModel):
    """Which policy-gradient loss, how it is aggregated over tokens, and its regularisers."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["grpo_two_sided", "grpo_clip", "token_mask"] = Field(
        "grpo_two_sided",
        description="grpo_two_sided: INTELLECT-2 clip with the ratio capped at delta (B.9); "
        "grpo_clip: the standard PPO/GRPO clip, no cap; token_mask: plain ratio x A with the tokens "
        "whose probability moved more than mask_high / mask_low dropped (prime-rl's DPPO mask).",
    )
    ratio_against: Literal["behaviour", "step_start", "decoupled"] = Field(
        "behaviour",
        description="behaviour: rho = pi_theta / mu with mu the log-probs the rollout was sampled with "
        "(off-policy correct); step_start: rho = pi_theta / pi_old recomputed by the trainer at the "
        "start of the policy step (INTELLECT-2's B.9: rho = 1 on the first optimizer step); decoupled: "
        "the step_start loss weighted per token by min(pi_old / mu, behaviour_weight_cap), no gradient "
        "through the weight (decoupled PPO: the clip bounds the update, the weight corrects staleness). "
        "Samples without behaviour log-probs always use step_start.",
    )
    behaviour_weight_cap: float = Field(
        2.0, gt=0, description="decoupled: the importance weight pi_old / mu is truncated here"
    )
    mask_high: float = Field(
        0.2, gt=0, le=1, description="token_mask: A > 0 tokens whose p rose by more are dropped"
    )
    mask_low: float = Field(
        0.2, gt=0, le=1, description="token_mask: A < 0 tokens whose p fell by more are dropped"
    )
    eps_low: float = Field(0.2, gt=0, lt=1, description="lower clip: ratio floor 1 - eps_low")
    eps_high: float = Field(0.2, gt=0, description="upper clip: ratio ceiling 1 + eps_high")
    delta: float = Field(4.0, description="cap on the ratio (clamp_log_prob_coef); only grpo_two_sided")
    entropy_coef: float = Field(1e-3, ge=0, description="entropy bonus weight; loss = pg - coef * H")
    kl_coef: float = Field(0.0, ge=0, description="KL to a reference policy (k3 estimator); 0 = none")
    aggregation: Literal["constant", "token_mean", "sequence_mean"] = Field(
        "constant",
        description="constant: token sum / (seq_len x rows), INTELLECT-2 final; token_mean: masked "
        "token mean over the optimizer batch; sequence_mean: 1/G sum_i 1/|o_i| sum_t (original GRPO).",
    )

    @model_validator(mode="after")
    def _delta_above_clip(self) -> LossConfig:
        # B.9: the two written forms of the loss only agree when delta > 1 + eps_high.
        if self.type == "grpo_two_sided" and self.delta <= 1 + self.eps_high:
            raise ValueError(f"delta ({self.delta}) must exceed 1 + eps_high ({1 + self.eps_high})")
        return self


class TrainerConfig(BaseModel):
    """Optimizer, schedule, batching and precision of one GRPO trainer process."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-6, gt=0, description="AdamW peak learning rate (INTELLECT-2 32B used 3e-7)")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay")
    warmup_steps: int = Field(25, ge=0, description="linear warm-up in optimizer steps, then constant")
    decay_steps: int = Field(0, ge=0, description="after warm-up, decay the lr linearly over this many optimizer "
                                                  "steps to lr x lr_end_fraction, then hold it (0: constant)")
    lr_end_fraction: float = Field(0.1, ge=0, le=1, description="the decayed lr as a fraction of lr")
    grad_clip: float = Field(0.1, gt=0, description="global gradient-norm clip")
    collate: Literal["packing", "padding"] = Field(
        "packing",
        description="packing: first-fit-decreasing rows of seq_len (B.11); padding: one sample per row, "
        "each micro-batch right-padded to its longest sample (the naive baseline).",
    )
    seq_len: int = Field(2048, ge=8, description="length of one packed row; longer samples are truncated")
    micro_batch_rows: int = Field(
        1, ge=1, description="rows per forward; with packing the token budget is rows x seq_len"
    )
    temperature: float = Field(0.6, gt=0, description="tau: every log-prob uses logits / tau (B.9)")
    optimizer_steps_per_policy_step: int = Field(
        8, ge=1, description="optimizer steps taken on one policy step's samples (step_per_rollout)"
    )
    trainable: str = Field(
        "all",
        description='"all", or "last_n_layers:K": only the last K decoder layers and the final norm '
        "train (embeddings and LM head frozen), so CPU demos skip most of the backward pass.",
    )
    pad_token_id: int = Field(0, ge=0, description="token id written into the padded tail of a row")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the trainer runs: auto = cuda when a GPU is visible; on cuda the forward runs "
        "under bf16 autocast over fp32 master weights.",
    )
    logprobs: Literal["chunked", "dense"] = Field(
        "chunked",
        description="chunked: log-probs and entropy from the final hidden states and the LM-head weight, "
        "chunk_tokens at a time (never the whole [tokens, vocab] logits); dense: the model's full logits.",
    )
    chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens per LM-head chunk with logprobs = chunked; None: 2^24 / vocab (one chunk's "
        "fp32 logits near 64 MiB; 110 tokens at a 150k vocabulary)",
    )
    loss: LossConfig = Field(default_factory=LossConfig)

    @field_validator("trainable")
    @classmethod
    def _check_trainable(cls, value: str) -> str:
        if value != "all" and not _LAST_N.match(value):
            raise ValueError(f'trainable must be "all" or "last_n_layers:K", got {value!r}')
        return value

    @property
    def num_last_layers(self) -> int | None:
        """K of "last_n_layers:K", or None when every parameter trains."""
        match = _LAST_N.match(self.trainable)
        return int(match.group(1)) if match else None
