"""FSDP2 under a 2-process gloo group (CPU) gives the loss and gradients of one process.

Each rank is a real process (torch.multiprocessing spawn) holding half of every parameter; rank 0
drives `train_step`, rank 1 `follow`s, as under torchrun. Gradients are read in an optimizer
pre-step hook (gathered to full tensors) and compared with a single-process trainer's.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from intellect.coordinator.trainer.config import LossConfig, TrainerConfig

pytestmark = pytest.mark.slow


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def samples():
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(10):
        prompt = torch.randint(1, 512, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        completion = torch.randint(
            1, 512, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g
        ).tolist()
        behaviour = (-torch.rand(len(completion), generator=g) * 8).tolist()  # a stale mu: clipping acts
        out.append((prompt, completion, float(torch.randn(1, generator=g)), 0.5, behaviour, 0))
    return out


def trainer_config(logprobs: str) -> TrainerConfig:
    return TrainerConfig(
        lr=1e-3,
        warmup_steps=0,
        grad_clip=1.0,
        seq_len=24,
        micro_batch_rows=1,
        device="cpu",
        optimizer_steps_per_policy_step=2,
        logprobs=logprobs,
        loss=LossConfig(aggregation="token_mean"),
    )


def run_one_step(logprobs: str, rank: int = 0, world: int = 1):
    """Metrics and the gradients (full tensors, by parameter name) of both optimizer steps."""
    from intellect.coordinator.trainer.trainer import GRPOTrainer

    torch.manual_seed(0)
    model = tiny_llama()
    trainer = GRPOTrainer(model, trainer_config(logprobs))
    names = {id(p): n for n, p in model.named_parameters()}
    grads: list[dict[str, torch.Tensor]] = []

    def capture(optimizer, *_):
        full = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                full[names[id(p)]] = g.detach().clone()
        grads.append(full)

    trainer.optimizer.register_step_pre_hook(capture)
    if rank == 0:
        metrics = trainer.train_step(samples())
        trainer.stop_followers()
    else:
        trainer.follow()
        metrics = None
    return metrics, grads


def _worker(rank: int, world: int, port: int, logprobs: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metrics, grads = run_one_step(logprobs, rank, world)
        torch.save({"metrics": metrics, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_two_processes_match_one(tmp_path):
    # chunked log-probs: the LM-head weight (tied to the embedding, in FSDP's root unit) is read
    # outside the head's own forward, the path most likely to miss a gather or a reduction
    logprobs = "chunked"
    mp.spawn(_worker, args=(2, _free_port(), logprobs, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    expected_metrics, expected_grads = run_one_step(logprobs)
    metrics = ranks[0]["metrics"]
    for key in ("loss", "grad_norm", "clip_ratio", "entropy", "mismatch_kl", "num_samples"):
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-7), key
    assert expected_metrics["clip_ratio"] > 0  # the behaviour ratio clips: the comparison covers it
    for got in (ranks[0]["grads"], ranks[1]["grads"]):  # both ranks hold the same reduced gradient
        assert len(got) == len(expected_grads) == 2
        for step_got, step_expected in zip(got, expected_grads):
            assert step_got.keys() == step_expected.keys()
            for name, grad in step_expected.items():
                assert torch.allclose(step_got[name], grad, rtol=1e-4, atol=1e-6), name


def save_then_resume(ckpt: str, rank: int = 0):
    """Train one step from seed 0, checkpoint it, resume a trainer built from other weights (seed 1) and
    train a second step: that step's metrics, and the resumed step number."""
    from intellect.coordinator.trainer.trainer import GRPOTrainer

    torch.manual_seed(0)
    first = GRPOTrainer(tiny_llama(), trainer_config("chunked"))
    if rank == 0:
        first.train_step(samples())
        first.save(ckpt, keep=2)
        first.stop_followers()
    else:
        first.follow()
    resumed = GRPOTrainer(tiny_llama(seed=1), trainer_config("chunked"))
    if rank != 0:
        resumed.follow()
        return None
    assert resumed.resume(ckpt)
    metrics = resumed.train_step(samples())
    resumed.stop_followers()
    return metrics, resumed.policy_step, resumed.optimizer_step


def _save_resume_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = save_then_resume(os.path.join(out_dir, "fsdp"), rank)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_checkpoints_and_resumes_like_one_process(tmp_path):
    """Before: GRPOTrainer.save and resume raised NotImplementedError under FSDP. Now every rank gathers,
    rank 0 writes the same checkpoint one process writes, and a trainer built from other weights resumes
    it (its shards and the optimizer's) and trains on as one process does."""
    from safetensors.torch import load_file

    from intellect.coordinator.trainer.checkpoint import POLICY_DIR

    mp.spawn(_save_resume_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    metrics, policy_step, optimizer_step = torch.load(tmp_path / "result.pt", weights_only=False)
    expected, expected_policy_step, expected_optimizer_step = save_then_resume(str(tmp_path / "single"))
    assert (policy_step, optimizer_step) == (expected_policy_step, expected_optimizer_step) == (2, 4)
    for key in ("loss", "grad_norm", "clip_ratio", "mismatch_kl"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    fsdp, single = (load_file(tmp_path / d / "step_00000001" / POLICY_DIR / "model.safetensors")
                    for d in ("fsdp", "single"))
    assert fsdp.keys() == single.keys() and "lm_head.weight" not in fsdp  # tied: the embedding holds it
    for name, tensor in single.items():
        assert torch.equal(fsdp[name], tensor), name
