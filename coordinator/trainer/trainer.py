"""GRPOTrainer: one policy step of GRPO on a batch of scored completions (spec B.6, B.9-B.11).

A policy step drops zero-advantage samples, splits the rest into `optimizer_steps_per_policy_step`
optimizer batches, packs each into rows, computes log pi_old for every row with one no-grad pass at
the start, then takes the optimizer steps with gradient accumulation over micro-batches and
global-norm clipping. The importance ratio is taken against the behaviour log-probs mu the samples
carry, or split into pi_theta / pi_old times a truncated weight pi_old / mu (`LossConfig.ratio_against`);
pi_old also serves the mismatch-KL metric and samples without mu.
Log-probs come chunked from the final hidden states (`lm_head.py`) unless `logprobs = "dense"`.
On CUDA the forward runs under bf16 autocast over fp32 weights. Under torchrun (world size > 1)
the model is sharded with FSDP2 and every rank takes every W-th micro-batch (`distributed.py`).
It knows nothing about where samples come from, rollouts on disk, or publishing; checkpoints go
through `checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from intellect.coordinator.trainer import checkpoint, distributed
from intellect.coordinator.trainer._compat import attention_mask_for
from intellect.coordinator.trainer.config import TrainerConfig
from intellect.coordinator.trainer.lm_head import chunked_logprobs, final_hidden_states, supports_chunking
from intellect.coordinator.trainer.loss import LossOutput, aggregation_weights, policy_loss, token_logprobs
from intellect.coordinator.trainer.optim import select_trainable, setup_fsdp, setup_optimizer, setup_scheduler
from intellect.coordinator.trainer.packing import PackedBatch, TrainSample, pack, pad_each, segment_mask

logger = logging.getLogger(__name__)

# per optimizer step, summed over micro-batches (and ranks): the order of the all-reduced vector
_SUMS = (
    "loss",
    "num_clipped",
    "num_masked",
    "num_truncated",
    "entropy_sum",
    "kl_sum",
    "mismatch_kl_sum",
    "num_behaviour",
    "num_tokens",
)


@dataclass
class OptimizerBatch:
    """The samples of one optimizer step, packed, with their loss weights and frozen log-probs."""

    micro_batches: list[PackedBatch]
    weights: list[Tensor]  # per micro-batch [r, S]; over the whole optimizer batch they sum like the loss
    old_logprobs: list[Tensor | None]  # per micro-batch [r, S], log pi_old; None: the loss's own forward
    ref_logprobs: list[Tensor | None]  # per micro-batch [r, S] when a KL reference is used


def resolve_device(name: str) -> torch.device:
    """`trainer.device` -> a torch device; under torchrun on CUDA, this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("trainer.device is cuda but torch sees no CUDA device")
    return torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())


def drop_zero_advantages(samples: Sequence[Any]) -> tuple[list[TrainSample], int]:
    """B.6 online filter: samples whose advantage is exactly 0 carry no gradient and are dropped."""
    kept = [TrainSample(*s) for s in samples if float(s[2]) != 0.0]
    return kept, len(samples) - len(kept)


class GRPOTrainer:
    """Owns the model's trainable parameters, optimizer and schedule; `train_step` is one policy step.

    The model is moved to `config.device`. Under torchrun (world size > 1) it is sharded with FSDP2:
    rank 0 calls `train_step`, every other rank calls `follow()`, which runs the same steps on the
    samples rank 0 broadcasts until rank 0 calls `stop_followers()`.
    """

    def __init__(
        self, model: torch.nn.Module, config: TrainerConfig, ref_model: torch.nn.Module | None = None
    ):
        if config.loss.kl_coef > 0 and ref_model is None:
            raise ValueError("loss.kl_coef > 0 needs a ref_model")
        self.rank, self.world_size = distributed.rank_and_world()
        if self.world_size > 1 and ref_model is not None:
            raise ValueError("a KL reference model is not supported under FSDP yet")
        self.device = resolve_device(config.device)
        self.model, self.config, self.ref_model = model.to(self.device), config, ref_model
        if ref_model is not None:
            ref_model.to(self.device)
        why_dense = supports_chunking(model) if config.logprobs == "chunked" else None
        if why_dense:
            logger.warning("chunked log-probs off, using the full logits: %s", why_dense)
        self.parameters = select_trainable(model, config)
        if self.world_size > 1:
            setup_fsdp(model, bf16=self.device.type == "cuda")
            self.parameters = [p for p in model.parameters() if p.requires_grad]  # now DTensors
        self.optimizer = setup_optimizer(self.parameters, config)
        self.scheduler = setup_scheduler(self.optimizer, config)
        self.policy_step = 0  # policy steps completed = version of the policy the model now holds
        self.optimizer_step = 0
        model.train()

    def train_step(self, samples: Sequence[Any]) -> dict[str, float]:
        """One policy step on `samples` ((input_tokens, output_tokens, advantage[, reward[, behaviour
        log-probs[, policy step]]]) each). Under FSDP only rank 0 calls it (the others `follow`)."""
        if self.world_size > 1:
            distributed.broadcast_object(("train", list(samples)))
        return self._train_step(samples)

    def follow(self) -> None:
        """Ranks > 0 under torchrun: run what rank 0 runs until it calls `stop_followers()`."""
        while True:
            command = distributed.broadcast_object(None)
            if command[0] == "stop":
                return
            if command[0] == "save":  # the gather is collective; rank 0 writes
                self._save(Path(command[1]), command[2], None, command[3])
            elif command[0] == "add_state":
                self._add_training_state(Path(command[1]))
            elif command[0] == "resume":
                self._resume(Path(command[1]))
            else:
                self._train_step(command[1])

    def stop_followers(self) -> None:
        if self.world_size > 1:
            distributed.broadcast_object(("stop",))

    def _train_step(self, samples: Sequence[Any]) -> dict[str, float]:
        start = time.perf_counter()
        kept, num_dropped = drop_zero_advantages(samples)
        metrics = _sample_metrics(samples, num_dropped) | staleness_histogram(samples, self.policy_step)
        if not kept:
            return metrics
        chunks = _split(kept, self.config.optimizer_steps_per_policy_step)
        # With one optimizer step the model is still at the step's start when it computes the loss,
        # so log pi_old is that same forward, detached: skip the separate no-grad pass (B.9).
        batches = [self._prepare(chunk, need_old=len(chunks) > 1) for chunk in chunks]
        step_metrics = [self._optimizer_step(batch) for batch in batches]
        self.policy_step += 1
        elapsed = time.perf_counter() - start
        real = [
            mb.num_real_tokens if w.any() else 0 for b in batches for mb, w in zip(b.micro_batches, b.weights)
        ]
        slots = [
            mb.input_ids.numel() if w.any() else 0
            for b in batches
            for mb, w in zip(b.micro_batches, b.weights)
        ]
        num_real, num_slots = distributed.all_sum([float(sum(real)), float(sum(slots))])
        metrics |= _reduce(step_metrics)
        metrics |= {
            "packing_efficiency": num_real / max(num_slots, 1.0),
            "tokens_per_s": num_real / elapsed,
            "seconds": elapsed,
            "lr": self.scheduler.get_last_lr()[0],
            "policy_step": float(self.policy_step),
        }
        return metrics

    def save(self, directory: str | Path, keep: int = 2, tokenizer: Any = None, full_state: bool = True) -> Path | None:
        """Crash-safe checkpoint of the policy and (`full_state`) the whole training state; returns its
        folder. Under FSDP rank 0 calls it: every rank gathers, rank 0 writes (the others get None)."""
        if self.world_size > 1:
            distributed.broadcast_object(("save", str(directory), keep, full_state))
        return self._save(Path(directory), keep, tokenizer, full_state)

    def _save(self, directory: Path, keep: int, tokenizer: Any, full_state: bool) -> Path | None:
        extra = {"optimizer_step": self.optimizer_step}
        if self.world_size == 1:
            return checkpoint.save_checkpoint(
                directory, self.policy_step, self.model, self.optimizer, self.scheduler, extra, tokenizer, keep,
                full_state=full_state,
            )
        model_state, optimizer_state = _gather_full_state(self.model, self.optimizer, full_state)  # on rank 0
        path = None
        if self.rank == 0:
            path = checkpoint.save_checkpoint(
                directory, self.policy_step, self.model, self.optimizer, self.scheduler, extra, tokenizer, keep,
                model_state=model_state, optimizer_state=optimizer_state, full_state=full_state,
            )
        distributed.barrier()
        return path

    def add_training_state(self, directory: str | Path) -> None:
        """Write the whole training state into the checkpoint of the current policy step, whose policy
        was saved without it (`save(full_state=False)`); under FSDP rank 0 calls it, as `save`."""
        if self.world_size > 1:
            distributed.broadcast_object(("add_state", str(directory)))
        self._add_training_state(Path(directory))

    def _add_training_state(self, directory: Path) -> None:
        folder = checkpoint.step_dir(directory, self.policy_step)
        extra = {"optimizer_step": self.optimizer_step}
        if self.world_size == 1:
            checkpoint.add_training_state(folder, self.model, self.optimizer, self.scheduler, extra)
            return
        model_state, optimizer_state = _gather_full_state(self.model, self.optimizer)
        if self.rank == 0:
            checkpoint.add_training_state(folder, self.model, self.optimizer, self.scheduler, extra,
                                          model_state=model_state, optimizer_state=optimizer_state)
        distributed.barrier()

    def resume(self, directory: str | Path) -> bool:
        """Restore the latest complete checkpoint under `directory`; False if there is none. Under FSDP
        rank 0 calls it: rank 0 reads the checkpoint and every rank takes its shard of it."""
        if self.world_size > 1:
            distributed.broadcast_object(("resume", str(directory)))
        return self._resume(Path(directory))

    def _resume(self, directory: Path) -> bool:
        if self.world_size == 1:
            loaded = checkpoint.load_latest(directory, self.model, self.optimizer, self.scheduler)
            if loaded is None:
                return False
            self.policy_step, self.optimizer_step = loaded.step, int(loaded.extra["optimizer_step"])
            return True
        found = checkpoint.read_latest(directory) if self.rank == 0 else None
        meta = None if found is None else {k: found[2][k] for k in ("step", "extra", "scheduler")} | {
            "by_name": bool(found[2].get("optimizer_by_name"))}
        meta = distributed.broadcast_object(meta)
        if meta is None:
            return False
        if not meta["by_name"]:
            raise ValueError(f"the newest checkpoint under {directory} was written by a single-process trainer; "
                             "resume it in one process (without torchrun), or start the run afresh")
        weights, optimizer_state = ({}, {}) if found is None else (checkpoint.tied(found[1], self.model),
                                                                    found[2]["optimizer"])
        _scatter_full_state(self.model, self.optimizer, weights, optimizer_state)
        self.scheduler.load_state_dict(meta["scheduler"])
        if found is not None:
            checkpoint.restore_rng(found[2]["rng"])
        self.policy_step, self.optimizer_step = int(meta["step"]), int(meta["extra"]["optimizer_step"])
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
        micro, weights_mb = distributed.this_ranks_share(micro, weights_mb)
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
            if self.config.loss.entropy_coef == 0:
                entropy = entropy.detach()  # a metric only: no backward through the entropy
            old = logprobs.detach() if old is None else old
            out = policy_loss(
                logprobs, entropy, old, mb.advantages, weights, self.config.loss, ref, mb.behaviour_logprobs
            )
            # weights are global to the optimizer batch: plain accumulation; FSDP averages over
            # ranks, so each rank's share is scaled back up to a sum
            (out.loss * self.world_size).backward()
            outputs.append(out)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1
        local = [float(sum(getattr(o, name).detach() for o in outputs)) for name in _SUMS]
        return dict(zip(_SUMS, distributed.all_sum(local))) | {"grad_norm": float(grad_norm)}

    def _logprobs(self, model: torch.nn.Module, mb: PackedBatch) -> tuple[Tensor, Tensor]:
        return batch_logprobs(model, mb, self.config, self.device)


def batch_logprobs(
    model: torch.nn.Module, mb: PackedBatch, config: TrainerConfig, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy), each [r, S], at temperature tau, samples isolated by the block mask; zero
    outside the loss mask on the chunked path (nothing reads them there).

    Chunked from the final hidden states when `config.logprobs` says so and the model allows it,
    else from the full logits; on CUDA under bf16 autocast.
    """
    on_gpu = device.type == "cuda"
    compute_dtype = torch.bfloat16 if on_gpu else next(model.parameters()).dtype
    mask = attention_mask_for(model, segment_mask(mb.sample_ids), compute_dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    inputs = {
        "input_ids": mb.input_ids,
        "position_ids": mb.position_ids,
        "attention_mask": mask,
        "use_cache": False,
    }
    tau = config.temperature
    with autocast:
        if config.logprobs == "dense" or supports_chunking(model) is not None:
            return token_logprobs(model(**inputs).logits, mb.input_ids, tau)
        hidden = final_hidden_states(model, **inputs)
        weight = model.get_output_embeddings().weight
        # Only positions that predict a completion token carry loss: the LM head (a quarter of the
        # model's work per token, twice in backward) skips prompts and padding, most of a GRPO row.
        trained = mb.loss_mask.to(hidden.device)
        trained[:, 0] = False  # column 0 has no prefix (as token_logprobs)
        picked_lp, picked_ent = chunked_logprobs(
            hidden[:, :-1][trained[:, 1:]], weight, mb.input_ids[trained], tau, config.chunk_tokens
        )
    logprobs = torch.zeros(trained.shape, dtype=picked_lp.dtype, device=hidden.device)
    entropy = torch.zeros_like(logprobs)
    return logprobs.masked_scatter(trained, picked_lp), entropy.masked_scatter(trained, picked_ent)


def staleness_histogram(samples: Sequence[Any], policy_step: int) -> dict[str, float]:
    """Rows per policy-step lag (trainer's policy - the policy that sampled them): staleness_lag_K."""
    lags = Counter(policy_step - int(s[5]) for s in samples if len(s) > 5 and s[5] is not None)
    return {f"staleness_lag_{lag}": float(n) for lag, n in sorted(lags.items())}


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
    num_behaviour = sum(m["num_behaviour"] for m in step_metrics)
    metrics = {
        "loss": sum(m["loss"] for m in step_metrics) / len(step_metrics),
        "clip_ratio": sum(m["num_clipped"] for m in step_metrics) / num_tokens,
        "masked_ratio": sum(m["num_masked"] for m in step_metrics) / num_tokens,
        "truncated_ratio": sum(m["num_truncated"] for m in step_metrics) / num_tokens,
        "entropy": sum(m["entropy_sum"] for m in step_metrics) / num_tokens,
        "kl": sum(m["kl_sum"] for m in step_metrics) / num_tokens,
        "grad_norm": sum(m["grad_norm"] for m in step_metrics) / len(step_metrics),
        "grad_norm_max": max(m["grad_norm"] for m in step_metrics),
        "num_optimizer_steps": float(len(step_metrics)),
        "behaviour_fraction": num_behaviour / num_tokens,
    }
    if num_behaviour:  # KL(mu || pi_old at the step's start), per token with a known mu
        metrics["mismatch_kl"] = sum(m["mismatch_kl_sum"] for m in step_metrics) / num_behaviour
    return metrics


def _gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       with_optimizer: bool = True) -> tuple[dict, dict | None]:
    """The full (unsharded) model and optimizer state, on rank 0's CPU (empty dicts elsewhere); collective.
    The optimizer's is keyed by parameter name; None when not `with_optimizer`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    return model_state, get_optimizer_state_dict(model, optimizer, options=options) if with_optimizer else None


def _scatter_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        optimizer_state: dict) -> None:
    """Rank 0's full state into every rank's shards (the other ranks pass empty dicts); collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
