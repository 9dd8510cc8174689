"""GRPOTrainer: one policy step of GRPO on a batch of scored completions (spec B.6, B.9-B.11).

A policy step drops zero-advantage samples, splits the rest into `optimizer_steps_per_policy_step`
optimizer batches, packs each into rows, computes log pi_old for every row with one no-grad pass at
the start (so the ratio measures drift within the step only), then takes the optimizer steps with
gradient accumulation over micro-batches and global-norm clipping. It knows nothing about where
samples come from, rollouts on disk, or publishing; checkpoints go through `checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from intellect.coordinator.trainer import checkpoint
from intellect.coordinator.trainer._compat import attention_mask_for
from intellect.coordinator.trainer.config import TrainerConfig
from intellect.coordinator.trainer.loss import LossOutput, aggregation_weights, policy_loss, token_logprobs
from intellect.coordinator.trainer.optim import select_trainable, setup_optimizer, setup_scheduler
from intellect.coordinator.trainer.packing import PackedBatch, TrainSample, pack, pad_each, segment_mask


@dataclass
class OptimizerBatch:
    """The samples of one optimizer step, packed, with their loss weights and frozen log-probs."""

    micro_batches: list[PackedBatch]
    weights: list[Tensor]  # per micro-batch [r, S]; over the whole optimizer batch they sum like the loss
    old_logprobs: list[Tensor | None]  # per micro-batch [r, S], log pi_old; None: the loss's own forward
    ref_logprobs: list[Tensor | None]  # per micro-batch [r, S] when a KL reference is used


def drop_zero_advantages(samples: Sequence[Any]) -> tuple[list[TrainSample], int]:
    """B.6 online filter: samples whose advantage is exactly 0 carry no gradient and are dropped."""
    kept = [TrainSample(*s) for s in samples if float(s[2]) != 0.0]
    return kept, len(samples) - len(kept)


class GRPOTrainer:
    """Owns the model's trainable parameters, optimizer and schedule; `train_step` is one policy step."""

    def __init__(
        self, model: torch.nn.Module, config: TrainerConfig, ref_model: torch.nn.Module | None = None
    ):
        if config.loss.kl_coef > 0 and ref_model is None:
            raise ValueError("loss.kl_coef > 0 needs a ref_model")
        self.model, self.config, self.ref_model = model, config, ref_model
        self.device = next(model.parameters()).device
        self.parameters = select_trainable(model, config)
        self.optimizer = setup_optimizer(self.parameters, config)
        self.scheduler = setup_scheduler(self.optimizer, config)
        self.policy_step = 0  # policy steps completed = version of the policy the model now holds
        self.optimizer_step = 0
        model.train()

    def train_step(self, samples: Sequence[Any]) -> dict[str, float]:
        """One policy step on `samples` ((input_tokens, output_tokens, advantage[, reward]) each)."""
        start = time.perf_counter()
        kept, num_dropped = drop_zero_advantages(samples)
        metrics = _sample_metrics(samples, num_dropped)
        if not kept:
            return metrics
        chunks = _split(kept, self.config.optimizer_steps_per_policy_step)
        # With one optimizer step the model is still at the step's start when it computes the loss,
        # so log pi_old is that same forward, detached: skip the separate no-grad pass (B.9).
        batches = [self._prepare(chunk, need_old=len(chunks) > 1) for chunk in chunks]
        step_metrics = [self._optimizer_step(batch) for batch in batches]
        self.policy_step += 1
        elapsed = time.perf_counter() - start
        num_real = sum(mb.num_real_tokens for b in batches for mb in b.micro_batches)
        num_slots = sum(mb.input_ids.numel() for b in batches for mb in b.micro_batches)
        metrics |= _reduce(step_metrics)
        metrics |= {
            "packing_efficiency": num_real / num_slots,
            "tokens_per_s": num_real / elapsed,
            "seconds": elapsed,
            "lr": self.scheduler.get_last_lr()[0],
            "policy_step": float(self.policy_step),
        }
        return metrics

    def save(self, directory: str | Path, keep: int = 2, tokenizer: Any = None) -> Path:
        """Crash-safe checkpoint of the policy and the whole training state; returns its folder."""
        extra = {"optimizer_step": self.optimizer_step}
        return checkpoint.save_checkpoint(
            directory, self.policy_step, self.model, self.optimizer, self.scheduler, extra, tokenizer, keep
        )

    def resume(self, directory: str | Path) -> bool:
        """Restore the latest complete checkpoint under `directory`; False if there is none."""
        loaded = checkpoint.load_latest(directory, self.model, self.optimizer, self.scheduler)
        if loaded is None:
            return False
        self.policy_step, self.optimizer_step = loaded.step, int(loaded.extra["optimizer_step"])
        return True

    def _prepare(self, samples: list[TrainSample], need_old: bool = True) -> OptimizerBatch:
        cfg = self.config
        if cfg.collate == "packing":
            layout = pack(samples, cfg.seq_len, cfg.pad_token_id)
        else:
            layout = pad_each(samples, cfg.pad_token_id, max_len=cfg.seq_len)
        weights = aggregation_weights(layout.loss_mask, layout.sample_ids, cfg.loss.aggregation, cfg.seq_len)
        micro, weights_mb = [], []
        for start in range(0, layout.num_rows, cfg.micro_batch_rows):
            mb = layout.rows(start, start + cfg.micro_batch_rows)
            # Cut the padded tail: pad tokens come after every real token of a row and carry no loss,
            # so they change nothing but compute (the last packed row is often far from full).
            width = mb.used_width
            micro.append(mb.columns(width).to(self.device))
            weights_mb.append(weights[start : start + cfg.micro_batch_rows, :width].to(self.device))
        with torch.no_grad():
            old = [self._logprobs(self.model, mb)[0] if need_old else None for mb in micro]
            ref = [
                self._logprobs(self.ref_model, mb)[0] if self.ref_model is not None else None for mb in micro
            ]
        return OptimizerBatch(micro, weights_mb, old, ref)

    def _optimizer_step(self, batch: OptimizerBatch) -> dict[str, float]:
        outputs: list[LossOutput] = []
        for mb, weights, old, ref in zip(
            batch.micro_batches, batch.weights, batch.old_logprobs, batch.ref_logprobs
        ):
            logprobs, entropy = self._logprobs(self.model, mb)
            old = logprobs.detach() if old is None else old
            out = policy_loss(logprobs, entropy, old, mb.advantages, weights, self.config.loss, ref)
            out.loss.backward()  # weights are global to the optimizer batch: plain accumulation
            outputs.append(out)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1
        num_tokens = float(sum(o.num_tokens for o in outputs))
        return {
            "loss": float(sum(o.loss.detach() for o in outputs)),
            "num_clipped": float(sum(o.num_clipped for o in outputs)),
            "entropy_sum": float(sum(o.entropy_sum for o in outputs)),
            "kl_sum": float(sum(o.kl_sum for o in outputs)),
            "num_tokens": num_tokens,
            "grad_norm": float(grad_norm),
        }

    def _logprobs(self, model: torch.nn.Module, mb: PackedBatch) -> tuple[Tensor, Tensor]:
        """(logprobs, entropy), each [r, S], at temperature tau, samples isolated by the block mask."""
        on_gpu = self.device.type == "cuda"
        compute_dtype = torch.bfloat16 if on_gpu else next(model.parameters()).dtype
        mask = attention_mask_for(model, segment_mask(mb.sample_ids), compute_dtype)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
        with autocast:
            logits = model(
                input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=mask, use_cache=False
            ).logits
        return token_logprobs(logits, mb.input_ids, self.config.temperature)


def _split(samples: list[TrainSample], num_chunks: int) -> list[list[TrainSample]]:
    """Consecutive, near-equal chunks; fewer than `num_chunks` when there are fewer samples."""
    num_chunks = min(num_chunks, len(samples))
    n = len(samples)
    return [samples[i * n // num_chunks : (i + 1) * n // num_chunks] for i in range(num_chunks)]


def _sample_metrics(samples: Sequence[Any], num_dropped: int) -> dict[str, float]:
    rewards = [float(s[3]) for s in samples if len(s) > 3 and s[3] is not None]
    metrics = {
        "num_samples": float(len(samples) - num_dropped),
        "num_dropped": float(num_dropped),
        "mean_length": sum(len(s[1]) for s in samples) / max(len(samples), 1),
    }
    if rewards:
        metrics["mean_reward"] = sum(rewards) / len(rewards)
    return metrics


def _reduce(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Policy-step metrics from per-optimizer-step ones: loss summed per step then averaged."""
    num_tokens = max(sum(m["num_tokens"] for m in step_metrics), 1.0)
    return {
        "loss": sum(m["loss"] for m in step_metrics) / len(step_metrics),
        "clip_ratio": sum(m["num_clipped"] for m in step_metrics) / num_tokens,
        "entropy": sum(m["entropy_sum"] for m in step_metrics) / num_tokens,
        "kl": sum(m["kl_sum"] for m in step_metrics) / num_tokens,
        "grad_norm": sum(m["grad_norm"] for m in step_metrics) / len(step_metrics),
        "grad_norm_max": max(m["grad_norm"] for m in step_metrics),
        "num_optimizer_steps": float(len(step_metrics)),
    }
