"""Benchmark: policy updates as shard deltas, on real GRPO steps of SmolLM2-135M-Instruct.

The coordinator's GRPOTrainer trains every weight (fp32 master weights, AdamW at --lr, a real GRPO loss
over a few tokenised question/answer pairs with +-1 advantages, `--optimizer-steps` optimizer steps
per policy step, no warm-up), and each policy step is exported as the bf16 policy the coordinator
publishes and cut into shards like a published checkpoint (`--shard-mb`). For every step s >= 1:
  full_share    bytes a node fetches today (every changed shard, whole) / checkpoint bytes: the baseline
  delta_share   bytes with deltas (protocol/delta.py's xor-zstd for each changed shard that has one, the
                whole shard for the others) / checkpoint bytes
  sparse_share  the candidate the protocol did not take: changed bf16 words as gap-coded uint32 indices
                plus uint16 values, zstd at the same level
  exact         every delta shard rebuilt by a node's code path (protocol.manifest.rebuild_shard into a
                store holding only step s - 1) matches the manifest, and so does the assembled folder
  changed_weight_share  bf16 words of model.safetensors that differ from step s - 1
Shares are means over the measured steps (`*_max`: the worst step). One JSON line per --lr.

Usage: python bench/delta.py --lr 1e-6 --lr 3e-7 --policy-steps 3
(also reached as `python bench/distribution.py --delta ...`)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

QA = [  # short real text: the loss is over real tokens, as in a GRPO batch
    ("What is 12 + 30?", "12 + 30 = 42. The answer is 42."),
    ("Name the capital of France.", "The capital of France is Paris."),
    ("Is 17 a prime number?", "Yes, 17 is prime: no number from 2 to 4 divides it."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Spell 'cat' backwards.", "Backwards, 'cat' is 'tac'."),
    ("What is 7 times 6?", "7 times 6 is 42."),
    ("Which is larger, 9 or 11?", "11 is larger than 9."),
]


def make_samples(tokenizer, step: int) -> list[tuple[list[int], list[int], float]]:
    samples = []
    for i, (question, answer) in enumerate(QA):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        completion = tokenizer.encode(answer, add_special_tokens=False)
        samples.append((prompt, completion, 1.0 if (i + step) % 2 else -1.0))
    return samples


def sparse_size(base: bytes, target: bytes) -> int:
    """The sparse candidate's size: gap-coded indices of changed uint16 words + their new values, zstd."""
    import numpy as np
    import zstandard

    from intellect.protocol.delta import ZSTD_LEVEL

    even = len(base) - len(base) % 2
    a, b = np.frombuffer(base[:even], "<u2"), np.frombuffer(target[:even], "<u2")
    idx = np.flatnonzero(a != b)
    gaps = np.diff(idx, prepend=0).astype("<u4")
    tail = target[even:] if base[even:] != target[even:] else b""
    payload = gaps.tobytes() + b[idx].tobytes() + tail
    return len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(payload))


def changed_words(old: Path, new: Path) -> tuple[int, int]:
    import numpy as np

    a = np.fromfile(old, dtype=np.uint8)
    b = np.fromfile(new, dtype=np.uint8)
    even = min(len(a), len(b)) // 2 * 2
    return int(np.count_nonzero(a[:even].view("<u2") != b[:even].view("<u2"))), even // 2


def measure_lr(model, tokenizer, snapshot, lr: float, args, work: Path) -> dict:
    import torch

    from intellect.coordinator.trainer.checkpoint import export_policy
    from intellect.coordinator.trainer.config import LossConfig, TrainerConfig
    from intellect.coordinator.trainer.trainer import GRPOTrainer
    from intellect.protocol.manifest import (
        ShardStore,
        add_deltas,
        assemble,
        delta_entry,
        rebuild_shard,
        shard_checkpoint,
        verify_folder,
    )

    model.load_state_dict(snapshot)
    config = TrainerConfig(lr=lr, warmup_steps=0, trainable="all", device="cpu", seq_len=256,
                           optimizer_steps_per_policy_step=args.optimizer_steps,
                           loss=LossConfig(aggregation="token_mean"))
    trainer = GRPOTrainer(model, config)
    shard_size = int(args.shard_mb * 1_000_000)
    origin = ShardStore(work / "origin")
    hash0 = "0" * 64

    def publish(step: int):
        folder = work / f"policy{step}"
        with torch.no_grad():
            export_policy(folder, model)
        return folder, shard_checkpoint(folder, origin, run_id="bench", policy_step=step, model_config_hash=hash0,
                                        shard_size=shard_size)

    prev_folder, prev = publish(0)
    rows = []
    for step in range(1, args.policy_steps + 1):
        metrics = trainer.train_step(make_samples(tokenizer, step))
        folder, manifest = publish(step)
        started = time.perf_counter()
        manifest = add_deltas(manifest, prev, origin)
        encode_s = time.perf_counter() - started
        total = manifest.total_size
        old = {s.sha256 for s in prev.shards}
        changed = [s for s in manifest.shards if s.sha256 not in old]
        full = sum(s.size for s in changed)
        with_delta = sum(s.delta.size if s.delta else s.size for s in changed)
        sparse = sum(sparse_size(origin.get(s.delta.base_sha256), origin.get(s.sha256)) if s.delta else s.size
                     for s in changed)
        # a node holding step - 1 only: its shards, then the deltas, rebuilt and checked
        node = ShardStore(work / f"node{step}")
        for s in prev.shards:
            node.put(s, origin.get(s.sha256))
        started = time.perf_counter()
        for s in changed:
            if s.delta is not None:
                node.put(delta_entry(s.delta), origin.get(s.delta.sha256))
                rebuild_shard(s, node)
        decode_s = time.perf_counter() - started
        exact = all(node.has(s.sha256) for s in changed if s.delta is not None)
        rebuilt = assemble(manifest, lambda sha, node=node: node.path(sha) if node.has(sha) else origin.path(sha),
                           work / f"rebuilt{step}")
        exact = exact and verify_folder(manifest, rebuilt) and _same_files(rebuilt, folder)
        words, num_words = changed_words(prev_folder / "model.safetensors", folder / "model.safetensors")
        rows.append({"full": full / total, "delta": with_delta / total, "sparse": sparse / total, "exact": exact,
                     "changed_words": words / num_words, "encode_s": encode_s, "decode_s": decode_s,
                     "total": total, "shards": len(manifest.shards), "loss": metrics.get("loss")})
        for path in (prev_folder, rebuilt, work / f"node{step}"):
            shutil.rmtree(path, ignore_errors=True)
        for s in prev.shards:
            if s.sha256 not in {e.sha256 for e in manifest.shards}:
                origin.remove(s.sha256)
        prev_folder, prev = folder, manifest

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "bench": "delta",
        "model": "SmolLM2-135M-Instruct (bf16 policy from fp32 AdamW master weights, cpu)",
        "lr": lr,
        "policy_steps": args.policy_steps,
        "optimizer_steps_per_policy_step": args.optimizer_steps,
        "checkpoint_bytes": rows[-1]["total"],
        "shard_mb": args.shard_mb,
        "num_shards": rows[-1]["shards"],
        "full_share": round(mean("full"), 4),
        "delta_share": round(mean("delta"), 4),
        "delta_share_max": round(max(r["delta"] for r in rows), 4),
        "sparse_share": round(mean("sparse"), 4),
        "changed_weight_share": round(mean("changed_words"), 4),
        "exact": all(r["exact"] for r in rows),
        "encode_s_per_step": round(mean("encode_s"), 2),
        "decode_s_per_step": round(mean("decode_s"), 2),
        "target_delta_share": 0.05,
    }


def _same_files(a: Path, b: Path) -> bool:
    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    return all(digest(a / p.name) == digest(p) for p in b.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lr", type=float, action="append", help="AdamW learning rate (repeat; default 1e-6 and 3e-7)")
    p.add_argument("--policy-steps", type=int, default=3, help="policy steps measured per learning rate")
    p.add_argument("--optimizer-steps", type=int, default=8, help="optimizer steps per policy step "
                                                                  "(the trainer's default, INTELLECT-2's)")
    p.add_argument("--shard-mb", type=float, default=50.0, help="shard size (the coordinator's default: 50 MB)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache (default: the project's)")
    args = p.parse_args(argv)
    args.lr = args.lr or [1e-6, 3e-7]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from intellect.protocol.model import default_model_dir, load_model, model_cache_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(default_model_dir(args.cache_dir or model_cache_dir()), dtype=torch.float32)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    for lr in args.lr:
        with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
            print(json.dumps(measure_lr(model, tokenizer, snapshot, lr, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
