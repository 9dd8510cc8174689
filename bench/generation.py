"""Generation throughput: our torch engine against plain transformers `generate()`, and the vLLM
engine, on the same work (SmolLM2-135M-Instruct, same chat prompts, batch, output length, bf16).

Every sequence generates exactly `--max-tokens` tokens (EOS ignored on all sides, `min_new_tokens`
for HF), so every contender does identical work. Runs alternate and the best of `--reps` counts,
which damps the noise of a shared machine. Proof overhead = time with proofs / time without - 1.

Prints progress to stderr and one JSON object as the LAST stdout line:
  ours_tok_s, hf_tok_s, ratio (ours / hf, target >= 1), proof_overhead (target <= 0.02),
  vllm_tok_s, vllm_proof_overhead (target <= 0.02), plus the settings.

  python bench/generation.py [--batch 8] [--max-tokens 64] [--reps 2] [--dtype bfloat16] [--no-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

QUESTIONS = [
    "Explain why the sky is blue.", "Write a short poem about rivers.", "What is 17 times 23?",
    "List three uses of copper.", "Describe a cat to someone who has never seen one.",
    "Why do we have seasons?", "Give me a recipe idea with rice.", "What is a prime number?",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def best_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_torch(model_dir: Path, prompts, args) -> dict:
    import torch

    from intellect.node.engine import SamplingParams, TorchEngineConfig, setup_engine

    eng = setup_engine(TorchEngineConfig(dtype=args.dtype, max_batch_size=args.batch, threads=args.threads),
                       model_dir)
    on = SamplingParams(temperature=0.6, max_tokens=args.max_tokens, ignore_eos=True)
    off = on.model_copy(update={"proofs": False})
    seeds = list(range(len(prompts)))
    model, pad = eng.model, eng.pad_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def hf() -> None:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.6, top_p=1.0, top_k=0,
                           max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, pad_token_id=pad)

    eng.generate(prompts[:2], on.model_copy(update={"max_tokens": 4}), seeds[:2])  # warm-up
    hf_t = ours_t = off_t = float("inf")
    for _ in range(args.reps):  # interleave, so drifting machine load hits all three alike
        hf_t = min(hf_t, best_time(hf, 1))
        ours_t = min(ours_t, best_time(lambda: eng.generate(prompts, on, seeds), 1))
        off_t = min(off_t, best_time(lambda: eng.generate(prompts, off, seeds), 1))
        log(f"torch: hf {hf_t:.2f}s ours {ours_t:.2f}s ours-no-proofs {off_t:.2f}s")
    num = len(prompts) * args.max_tokens
    eng.close()
    return {"ours_tok_s": num / ours_t, "hf_tok_s": num / hf_t, "ratio": hf_t / ours_t,
            "proof_overhead": ours_t / off_t - 1.0}


def bench_vllm(model_dir: Path, prompts, args) -> dict:
    from intellect.node.engine import SamplingParams, VllmEngineConfig, setup_engine

    start = time.perf_counter()
    eng = setup_engine(VllmEngineConfig(dtype=args.dtype, max_batch_size=args.batch, threads=args.threads,
                                        max_model_len=512), model_dir)
    log(f"vllm: start-up {time.perf_counter() - start:.1f}s")
    on = SamplingParams(temperature=0.6, max_tokens=args.max_tokens, ignore_eos=True)
    off = on.model_copy(update={"proofs": False})
    seeds = list(range(len(prompts)))
    eng.generate(prompts[:2], on.model_copy(update={"max_tokens": 4}), seeds[:2])
    on_t = off_t = float("inf")
    for _ in range(args.reps):
        on_t = min(on_t, best_time(lambda: eng.generate(prompts, on, seeds), 1))
        off_t = min(off_t, best_time(lambda: eng.generate(prompts, off, seeds), 1))
        log(f"vllm: proofs {on_t:.2f}s no-proofs {off_t:.2f}s")
    eng.close()
    return {"vllm_tok_s": len(prompts) * args.max_tokens / on_t, "vllm_proof_overhead": on_t / off_t - 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("INTELLECT_MODEL_CACHE", "~/.cache/intellect-node/models")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout; keep the JSON line last

    from intellect.protocol.model import default_model_dir

    model_dir = default_model_dir(args.cache_dir.expanduser())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
               for q in (QUESTIONS * (args.batch // len(QUESTIONS) + 1))[: args.batch]]
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "dtype": args.dtype, "batch": args.batch,
              "max_tokens": args.max_tokens, "threads": args.threads}
    # torch first: vLLM lowers torch's thread count for the whole process when it starts.
    result.update(bench_torch(model_dir, prompts, args))
    if not args.no_vllm:
        try:
            result.update(bench_vllm(model_dir, prompts, args))
        except ImportError as e:
            log(f"vllm skipped: {e}")
            result.update({"vllm_tok_s": None, "vllm_proof_overhead": None})
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
