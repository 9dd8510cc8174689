"""Benchmark: one GRPO policy step on SmolLM2-135M (CPU, fp32), packed rows vs naive padded batches.

Both runs train the same 16 (--num-samples) variable-length completions (prompt 30-60, completion 10-200 tokens,
random ids, random advantages) from the same starting weights with the same trainer; only
`collate` differs. Baseline: micro-batches of `--pad-rows` consecutive samples, each right-padded to
its longest. Packed: first-fit-decreasing rows of `--seq-len` (one row per forward, so the token
budget per forward is about the same). Throughput = real (non-pad) tokens / wall time of the whole
policy step (no-grad pi_old pass + forward/backward + AdamW). `last_n_layers:4` keeps the CPU run
short; the forward pass, which dominates, runs through all layers either way.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
        loss=LossConfig(aggregation="token_mean"),
    )
    return GRPOTrainer(model, config).train_step(samples)


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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
