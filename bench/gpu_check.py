"""Device check for a lent GPU machine, in two halves.

On the GPU:   python bench/gpu_check.py gpu --model DIR --cpu-rollouts FILE --out OUT
  - the torch engine generates on CUDA in bf16 with TOPLOC proofs (saved for the CPU half);
  - proofs made on the CPU here (FILE) are verified by a CUDA bf16 prefill;
  - the GRPO trainer takes a few steps on CUDA (bf16 autocast): loss falls, weights move.
On the CPU:   python bench/gpu_check.py cpu-make --model DIR --out FILE      (before the GPU run)
              python bench/gpu_check.py cpu-verify --model DIR --gpu-rollouts FILE
  - CPU-made rollouts for the GPU to verify, and the GPU-made proofs verified by a CPU prefill.
Each half prints one JSON line. The model is a small random Llama written by `make-model`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import msgpack
import torch


def make_model(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from intellect.protocol.model import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(Path("/tmp/intellect-gpu-cache")))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prompts_for(tokenizer, num: int) -> list[list[int]]:
    from intellect.protocol.tasks import Arithmetic, prompt_token_ids

    task = Arithmetic(max_operand=50)
    return [prompt_token_ids(tokenizer, task.problem(i), 0, False) for i in range(num)]


def generate(model_dir: Path, device: str, num: int = 48, max_tokens: int = 96) -> dict:
    from intellect.node.engine import SamplingParams, TorchEngineConfig, setup_engine

    engine = setup_engine(TorchEngineConfig(device=device, dtype="bfloat16", max_batch_size=16), model_dir)
    prompts = prompts_for(engine.tokenizer, num)
    start = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True),
                          seeds=list(range(num)))
    seconds = time.perf_counter() - start
    engine.close()
    return {"prompts": prompts, "outputs": [c.output_tokens for c in out], "proofs": [c.proofs for c in out],
            "device": device, "gen_s": seconds, "tok_s": sum(len(c.output_tokens) for c in out) / seconds}


def verify(model_dir: Path, device: str, rollouts: dict) -> dict:
    from intellect.protocol.model import load_model
    from intellect.protocol.toploc_torch import verify_completions

    model, _ = load_model(model_dir, torch.bfloat16, device)
    # seeded samples: every token re-drawn from this device's prefill (seeds are range(num), T = 1)
    checks = verify_completions(model, rollouts["prompts"], rollouts["outputs"], rollouts["proofs"], batch_size=16,
                                temperature=1.0, seeds=list(range(len(rollouts["outputs"]))))
    worst = max((c.exp_mismatches for ch in checks for c in ch.chunks), default=0)
    tokens = {k: sum(getattr(ch.tokens, k) for ch in checks) for k in ("exact", "tie", "mismatch")}
    torch.manual_seed(1)
    with torch.no_grad():  # the attack of a node running other weights: a different random init
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, float(p.float().std()))
    bad = verify_completions(model, rollouts["prompts"], rollouts["outputs"], rollouts["proofs"], batch_size=16)
    return {"made_on": rollouts["device"], "verified_on": device, "accepted": sum(c.accepted for c in checks),
            "total": len(checks), "worst_exp_mismatches": worst, "sampled_tokens": tokens,
            "worst_tie_gap": max((ch.tokens.worst_gap for ch in checks), default=0.0),
            "other_weights_detected": sum(not c.accepted for c in bad)}


def train(model_dir: Path, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    from intellect.coordinator.trainer.config import TrainerConfig
    from intellect.coordinator.trainer.trainer import GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0, seq_len=256,
                                               optimizer_steps_per_policy_step=1, temperature=1.0))
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(3, 1000, (12,), generator=g).tolist(), torch.randint(3, 1000, (20,), generator=g).tolist(),
                1.0 if i % 2 else -1.0, 0.0) for i in range(16)]
    losses = [trainer.train_step(samples)["loss"] for _ in range(4)]
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(model.parameters(), before))
    return {"train_device": device, "losses": losses, "weights_moved": moved > 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make-model", "cpu-make", "gpu", "cpu-verify"])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cpu-rollouts", type=Path)
    ap.add_argument("--gpu-rollouts", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.mode == "make-model":
        make_model(args.model)
    elif args.mode == "cpu-make":
        args.out.write_bytes(msgpack.packb(generate(args.model, "cpu", num=32, max_tokens=64)))
    elif args.mode == "gpu":
        assert torch.cuda.is_available(), "no CUDA device"
        args.out.mkdir(parents=True, exist_ok=True)
        made = generate(args.model, "cuda")
        (args.out / "gpu_rollouts.msgpack").write_bytes(msgpack.packb(made))
        cpu = msgpack.unpackb(args.cpu_rollouts.read_bytes())
        report = {"gpu": torch.cuda.get_device_name(), "gpu_tok_s": made["tok_s"],
                  "cpu_proofs_on_gpu": verify(args.model, "cuda", cpu),
                  "gpu_proofs_on_gpu": verify(args.model, "cuda", made), **train(args.model, "cuda")}
        (args.out / "gpu_report.json").write_text(json.dumps(report))
        print(json.dumps(report))
    else:
        made = msgpack.unpackb(args.gpu_rollouts.read_bytes())
        print(json.dumps({"gpu_proofs_on_cpu": verify(args.model, "cpu", made)}))


if __name__ == "__main__":
    main()
