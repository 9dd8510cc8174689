"""TOPLOC cost and accuracy on CPU.

SmolLM2-135M-Instruct (bf16): the same completions are generated one at a time (the baseline,
gen_s), proved (proof_s: building every 32-row proof) and verified by batched prefill (verify_s).
Rates over many completions use the tiny random Llama, where generation is cheap: false rejections
of honest completions, and detections of a different init and of proofs swapped between
completions. Prints one JSON object as the last line.

    .venv/bin/python bench/toploc.py [--cache DIR] [--n 8] [--max-new 64] [--n-rates 200]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from intellect.protocol import toploc
from intellect.protocol.model import default_model_dir, load_model, tiny_model_dir
from intellect.protocol.toploc_torch import generate_with_proofs, prefill_final_norm, verify_completions

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis briefly.",
    "List three prime numbers.",
    "What is 12 times 7?",
    "Name a famous painter.",
    "Why is the sky blue?",
    "Give me a tip for learning Python.",
]


def smollm2_costs(cache: Path, n: int, max_new: int) -> dict:
    model, tok = load_model(default_model_dir(cache))
    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True)["input_ids"]) for c in chats]
    t = time.perf_counter()
    comps = [
        generate_with_proofs(model, [p], max_new, temperature=1.0, seed=i)[0] for i, p in enumerate(prompts)
    ]
    gen_s = time.perf_counter() - t
    rows = [prefill_final_norm(model, p, c.output_ids) for p, c in zip(prompts, comps)]
    t = time.perf_counter()
    rebuilt = [b"".join(toploc.build_proofs(r)) for r in rows if r.shape[0]]
    proof_s = time.perf_counter() - t
    # (prefill rows differ from the decode rows by kernel noise, so these bytes need not equal c.proofs)
    t = time.perf_counter()
    checks = verify_completions(
        model, prompts, [c.output_ids for c in comps], [c.proofs for c in comps], batch_size=8
    )
    verify_s = time.perf_counter() - t
    tokens = sum(len(c.output_ids) for c in comps)
    proof_bytes = sum(len(c.proofs) for c in comps)
    return {
        "completions": n,
        "output_tokens": tokens,
        "gen_s": round(gen_s, 3),
        "proof_s": round(proof_s, 4),
        "verify_s": round(verify_s, 3),
        "proof_overhead": round(proof_s / gen_s, 5),
        "verify_speedup": round(gen_s / verify_s, 2),
        "bytes_per_32_tokens": len(rebuilt[0]) // toploc.num_proofs(len(comps[0].output_ids))
        if rebuilt
        else None,
        "proof_bytes_total": proof_bytes,
        "smollm2_honest_accepted": sum(c.accepted for c in checks),
        "smollm2_max_exp_mismatches": max(ch.exp_mismatches for c in checks for ch in c.chunks),
        "smollm2_max_mant_err_mean": round(max(ch.mant_err_mean for c in checks for ch in c.chunks), 3),
    }


def tiny_rates(cache: Path, n: int) -> dict:
    model, _ = load_model(tiny_model_dir(cache, seed=0))
    other, _ = load_model(tiny_model_dir(cache, seed=1))
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 49152, (int(k),), generator=gen).tolist()
        for k in torch.randint(4, 20, (n,), generator=gen)
    ]

    def sample(m):  # 40 tokens: 39 rows = a full chunk + a 7-row tail
        return [
            c
            for s in range(0, n, 50)
            for c in generate_with_proofs(m, prompts[s : s + 50], 40, seed=s, eos_token_id=-1)
        ]

    def accepted(comps, proofs=None):
        proofs = proofs or [c.proofs for c in comps]
        return sum(
            c.accepted for c in verify_completions(model, prompts, [c.output_ids for c in comps], proofs)
        )

    honest, forged = sample(model), sample(other)
    swapped = [c.proofs for c in honest[1:] + honest[:1]]
    return {
        "rate_completions": n,
        "false_rejection_rate": round(1 - accepted(honest) / n, 4),
        "detection_rate_other_init": round(1 - accepted(forged) / n, 4),
        "detection_rate_swapped_proofs": round(1 - accepted(honest, swapped) / n, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=None, help="model cache dir (default: a temp dir)")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--n-rates", type=int, default=200)
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="toploc-bench-"))
    result = {
        "bench": "toploc",
        "model": "SmolLM2-135M-Instruct bf16 cpu",
        "torch_threads": torch.get_num_threads(),
    }
    result |= smollm2_costs(cache, args.n, args.max_new)
    if args.n_rates:
        result |= tiny_rates(cache, args.n_rates)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
