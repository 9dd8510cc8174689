"""Which parameters train, AdamW, the warm-up schedule, and FSDP wrapping (spec B.10).

Knows a causal LM only as a torch module whose decoder layers are `model.get_decoder().layers`
(true of Llama, Qwen, Mistral in transformers); knows nothing of losses or data.
"""

from __future__ import annotations

import torch

from intellect.coordinator.trainer.config import TrainerConfig


def select_trainable(model: torch.nn.Module, config: TrainerConfig) -> list[torch.nn.Parameter]:
    """Freeze what `config.trainable` excludes and return the parameters that train.

    "last_n_layers:K" keeps the last K decoder layers and the final norm; embeddings and the LM
    head (often tied to them) stay frozen, so backward stops at layer -K.
    """
    num_last = config.num_last_layers
    if num_last is None:
        return [p for p in model.parameters() if p.requires_grad]
    decoder = model.get_decoder()
    layers = decoder.layers
    if num_last > len(layers):
        raise ValueError(f"last_n_layers:{num_last} but the model has {len(layers)} layers")
    model.requires_grad_(False)
    trainable = [*layers[len(layers) - num_last :], decoder.norm]
    for module in trainable:
        module.requires_grad_(True)
    return [p for module in trainable for p in module.parameters()]


def setup_optimizer(parameters: list[torch.nn.Parameter], config: TrainerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def setup_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps` optimizer steps, then constant (B.10: cosine over 1e19 steps),
    or with `decay_steps` a linear decay to `lr_end_fraction` over that many steps, then constant.

    Step k (0-based) uses lr * (k + 1) / warmup_steps: unlike transformers' warm-up, whose first
    step has lr 0, no optimizer step is wasted. Decay step j (0-based, after warm-up) uses
    lr * (1 - (1 - end) * j / decay_steps), so the first step after warm-up has the full lr.
    """
    warmup, decay, end = config.warmup_steps, config.decay_steps, config.lr_end_fraction

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == 0:
            return 1.0
        return 1.0 - (1.0 - end) * min(1.0, (step - warmup) / decay)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup_fsdp(model: torch.nn.Module, bf16: bool = True) -> torch.nn.Module:
    """Shard `model` with FSDP2 under torchrun: one unit per decoder layer plus the root (embeddings,
    final norm, LM head); fp32 master shards, bf16 compute params when `bf16`, fp32 reductions.

    Call after `torch.distributed.init_process_group` and `select_trainable`, and before building
    the optimizer (the parameters become DTensor shards). On CPU (gloo) pass bf16=False.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("setup_fsdp needs torch.distributed initialised (run under torchrun)")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
