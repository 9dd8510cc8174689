"""The little torch.distributed the trainer needs under torchrun: who am I, share the work, sum.

Single process (no process group, or world size 1) every helper is a no-op, so the trainer's code
path is the same with and without torchrun. It knows ranks and tensors only: nothing of models,
losses or what the samples are.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env() -> bool:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) when WORLD_SIZE > 1; True if joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled; rank 0's own input is trusted local data)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64 on the collective's device)."""
    _, world = rank_and_world()
    if world == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def this_ranks_share(micro_batches: list, weights: list) -> tuple[list, list]:
    """Every W-th micro-batch from this rank's index, padded to the same count on every rank.

    FSDP runs collectives in every forward and backward, so all ranks must take the same number of
    them; a rank short of work repeats micro-batch 0 with zero loss weights (spec B.11 clones them
    unmasked, a quirk we do not copy), which adds no gradient.
    """
    rank, world = rank_and_world()
    if world == 1:
        return micro_batches, weights
    count = -(-len(micro_batches) // world)
    mine, mine_w = micro_batches[rank::world], weights[rank::world]
    while len(mine) < count:
        mine.append(micro_batches[0])
        mine_w.append(torch.zeros_like(weights[0]))
    return mine, mine_w
