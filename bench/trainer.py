"""Benchmark: one GRPO policy step on SmolLM2-135M (CPU, fp32), packed rows vs naive padded batches.

Both runs train the same 16 (--num-samples) variable-length completions (prompt 30-60, completion 10-200 tokens,
random ids, random advantages) from the same starting weights with the same trainer; only
`collate` differs. Baseline: micro-batches of `--pad-rows` consecutive samples, each right-padded to
its longest. Packed: first-fit-decreasing rows of `--seq-len` (one row per forward, so the token
budget per forward is about the same). Throughput = real (non-pad) tokens / wall time of the whole
policy step (no-grad pi_old pass + forward/backward + AdamW). `last_n_layers:4` keeps the CPU run
short; the forward pass, which dominates, runs through all layers either way.

Memory (`peak_mb_dense`, `peak_mb_chunked`, `memory_ratio`): one packed row of `--memory-seq-len`
(4096) tokens through one policy step of a tiny Llama (hidden 64, 2 layers) with a
`--memory-vocab` (151936, Qwen's) vocabulary, log-probs from the full logits (the baseline) vs
chunked from the final hidden states; each in a fresh process from the same weights, peak = the
step's high-water mark above the process's before it (CUDA: max_memory_allocated; CPU: ru_maxrss).
`memory_loss_dense` / `memory_loss_chunked` must agree within 1e-5. `--memory-only` skips the
SmolLM2 throughput part (machines without the SmolLM2 package).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path


def make_samples(num: int, vocab: int, seed: int) -> list[tuple[list[int], list[int], float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(30, 60))]
        completion = [rng.randrange(100, vocab) for _ in range(rng.randint(10, 200))]
        out.append((prompt, completion, rng.gauss(0.0, 1.0)))
    return out


def run(model, snapshot, samples, collate: str, args) -> dict:
    from intellect.coordinator.trainer.config import LossConfig, TrainerConfig
    from intellect.coordinator.trainer.trainer import GRPOTrainer

    model.load_state_dict(snapshot)  # same starting weights for both layouts
    rows = args.pad_rows if collate == "padding" else 1
    config = TrainerConfig(
        collate=collate,
        seq_len=args.seq_len,
        micro_batch_rows=rows,
        optimizer_steps_per_policy_step=1,
        warmup_steps=0,
        trainable=args.trainable,
        device=args.device,
        loss=LossConfig(aggregation="token_mean"),
    )
    return GRPOTrainer(model, config).train_step(samples)


def memory_child(mode: str, args) -> None:
    """In a fresh process: one packed policy step with `mode` log-probs; prints {peak_mb, loss}."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from intellect.coordinator.trainer.config import LossConfig, TrainerConfig
    from intellect.coordinator.trainer.trainer import GRPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.memory_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.memory_seq_len,
                         tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    rng = random.Random(args.seed)
    samples, used = [], 0
    while used < args.memory_seq_len:  # fill exactly one row: 64-token prompts, 192-token completions
        size = min(256, args.memory_seq_len - used)
        ids = [rng.randrange(100, args.memory_vocab) for _ in range(size)]
        cut = max(1, size // 4)
        samples.append((ids[:cut], ids[cut:], rng.gauss(0.0, 1.0)))
        used += size
    trainer_config = TrainerConfig(seq_len=args.memory_seq_len, optimizer_steps_per_policy_step=1, warmup_steps=0,
                                   device=args.device, logprobs=mode, loss=LossConfig(aggregation="token_mean"))
    trainer = GRPOTrainer(model, trainer_config)
    on_gpu = trainer.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    metrics = trainer.train_step(samples)
    if on_gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak_mb": peak / 2**20, "loss": metrics["loss"], "num_samples": len(samples)}))


def measure_memory(args) -> dict:
    results = {}
    for mode in ("dense", "chunked"):
        command = [sys.executable, __file__, "--memory-child", mode, "--memory-seq-len", str(args.memory_seq_len),
                   "--memory-vocab", str(args.memory_vocab), "--device", args.device, "--threads", str(args.threads),
                   "--seed", str(args.seed)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    dense, chunked = results["dense"], results["chunked"]
    return {
        "memory_model": f"tiny Llama (hidden 64, 2 layers, vocab {args.memory_vocab}), one packed row, {args.device}",
        "memory_seq_len": args.memory_seq_len,
        "peak_mb_dense": round(dense["peak_mb"], 1),
        "peak_mb_chunked": round(chunked["peak_mb"], 1),
        "memory_ratio": round(dense["peak_mb"] / max(chunked["peak_mb"], 1e-9), 2),
        "memory_loss_dense": dense["loss"],
        "memory_loss_chunked": chunked["loss"],
        "memory_loss_abs_diff": abs(dense["loss"] - chunked["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pad-rows", type=int, default=8, help="samples per padded micro-batch (naive: each padded "
                                                                "to the longest in it, like a padding collator)")
    parser.add_argument("--random-init", type=Path, default=None,
                        help="build the model from this folder's config.json with random weights (speed does not "
                             "depend on weight values; for machines without the SmolLM2 package)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trainable", default="last_n_layers:4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/intellect-node/models").expanduser())
    parser.add_argument("--memory-seq-len", type=int, default=4096)
    parser.add_argument("--memory-vocab", type=int, default=151_936)
    parser.add_argument("--memory-only", action="store_true", help="only the chunked vs dense memory figures")
    parser.add_argument("--memory-child", choices=["dense", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    if args.memory_only:
        print(json.dumps({"bench": "trainer", "threads": args.threads} | measure_memory(args)))
        return

    import torch

    from intellect.coordinator.trainer.packing import first_fit_decreasing
    from intellect.protocol.model import default_model_dir, load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.random_init is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_init)).to(args.device)
    else:
        model, _ = load_model(default_model_dir(args.cache_dir), dtype=torch.float32, device=args.device)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    samples = make_samples(args.num_samples, model.config.vocab_size, args.seed)
    run(model, snapshot, samples[:2], "packing", args)  # warm-up: first-call allocations, kernels

    start = time.perf_counter()
    padded = run(model, snapshot, samples, "padding", args)
    packed = run(model, snapshot, samples, "packing", args)
    lengths = [len(p) + len(c) for p, c, _ in samples]
    num_bins = len(first_fit_decreasing(lengths, args.seq_len))
    result = {
        "bench": "trainer",
        "model": f"SmolLM2-135M-Instruct ({'random init, ' if args.random_init else ''}fp32, {args.device})",
        "pad_rows": args.pad_rows,
        "threads": args.threads,
        "num_samples": args.num_samples,
        "real_tokens": sum(lengths),
        "seq_len": args.seq_len,
        "trainable": args.trainable,
        "packing_efficiency": round(packed["packing_efficiency"], 4),
        "ffd_row_efficiency": round(sum(lengths) / (num_bins * args.seq_len), 4),
        "padded_efficiency": round(padded["packing_efficiency"], 4),
        "padded_tok_s": round(padded["tokens_per_s"], 1),
        "packed_tok_s": round(packed["tokens_per_s"], 1),
        "speedup": round(packed["tokens_per_s"] / padded["tokens_per_s"], 3),
        "loss_packed": packed["loss"],
        "loss_padded": padded["loss"],
        "seconds": round(time.perf_counter() - start, 1),
        "intake_per_s": None,
    }
    print(json.dumps(result | measure_memory(args)))


if __name__ == "__main__":
    main()
