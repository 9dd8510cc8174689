"""One GRPO policy step under torchrun, to check a multi-GPU (or multi-process CPU) trainer setup.

    torchrun --nproc-per-node 2 -m intellect.coordinator.trainer.fsdp_check [--model DIR] [--device cpu]

Every rank builds the same model (a checkpoint folder, or a random tiny Llama by default) and the
same random samples; with world size > 1 the trainer shards the model with FSDP2 (NCCL on GPUs,
gloo on CPU), rank 0 drives the step, the others follow. Rank 0 prints one JSON line: loss,
grad norm, the device, the world size and the peak GPU memory of this rank. It knows nothing of
the coordinator, the swarm or checkpoints; it only exercises the trainer.
"""

from __future__ import annotations

import argparse
import json
import random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="checkpoint folder (config.json + weights); default: tiny"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    import torch

    from intellect.coordinator.trainer import distributed
    from intellect.coordinator.trainer.config import TrainerConfig
    from intellect.coordinator.trainer.trainer import GRPOTrainer

    distributed.init_from_env()
    rank, world = distributed.rank_and_world()
    torch.manual_seed(0)
    if args.model is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=4096,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=args.seq_len,
                tie_word_embeddings=True,
            )
        )
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    samples = [
        (
            [rng.randrange(vocab) for _ in range(rng.randint(8, 32))],
            [rng.randrange(vocab) for _ in range(rng.randint(8, 96))],
            rng.gauss(0.0, 1.0),
        )
        for _ in range(args.num_samples)
    ]
    config = TrainerConfig(
        device=args.device, seq_len=args.seq_len, warmup_steps=0, optimizer_steps_per_policy_step=2
    )
    trainer = GRPOTrainer(model, config)
    if rank == 0:
        metrics = trainer.train_step(samples)
        trainer.stop_followers()
        peak = torch.cuda.max_memory_allocated() / 2**20 if trainer.device.type == "cuda" else None
        print(
            json.dumps(
                {
                    "check": "fsdp",
                    "world_size": world,
                    "device": str(trainer.device),
                    "loss": metrics["loss"],
                    "grad_norm": metrics["grad_norm"],
                    "tokens_per_s": metrics["tokens_per_s"],
                    "peak_mb_rank0": peak,
                }
            )
        )
    else:
        trainer.follow()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
