"""The reference engine: a transformers causal LM driven by our own batched sampling loop.

One prefill over the batch's distinct prompts (left-padded; a prompt sampled n times is prefilled
once and its cache rows copied), then one decode forward per step through the KV cache (`DynamicCache`). The LM head runs on the last position only; rows that finished are dropped
from the batch and the cache, so they cost nothing afterwards. The final-norm output of every
decode step (the LM-head input, spec A.2) is kept in bf16 and turned into TOPLOC proofs 32 rows
at a time on a background thread while generation goes on. (This is what
`toploc_torch.ProofRecorder` does, with the same `build_chunk_proofs`; it is not reused because it
builds on the sampling thread and expects the full batch every step, while this loop shrinks it.)

Sampling is `protocol.sampling.sample`: seeded Gumbel-max whose noise depends only on (seed, output
position, token id), so the tokens do not depend on the batch a sequence ran in, and the validator's
prefill can recompute every one of them (up to ties of near-equal noisy scores, see docs/protocol.md).

It does not know chat templates, tasks or rewards: token ids in, completions out.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from intellect.node.engine.base import Completion, Engine, SamplingParams
from intellect.protocol.constants import TOPLOC_CHUNK_SIZE, TOPLOC_TOPK
from intellect.protocol.model import eos_token_ids
from intellect.protocol.sampling import sample

CHUNK = TOPLOC_CHUNK_SIZE  # decode rows per TOPLOC proof
TOPK = TOPLOC_TOPK


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchEngine(Engine):
    """Batched generation with seeded, verifiable sampling and streamed TOPLOC proofs."""

    name = "torch"

    def __init__(self, config, model_dir: str | Path) -> None:
        super().__init__()
        from intellect.protocol.model import compute_dtype, load_model

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = str(_pick_device(config.device))
        self.dtype = compute_dtype(self.device) if config.dtype == "auto" else getattr(torch, config.dtype)
        self.model, self.tokenizer = load_model(Path(model_dir), self.dtype, self.device)
        self.model.eval()
        self.eos_ids = eos_token_ids(self.tokenizer, model_dir)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        self._prover = ThreadPoolExecutor(1, thread_name_prefix="toploc")

    def load_weights(self, checkpoint_dir: str | Path) -> None:
        """Copy the safetensors weights of `checkpoint_dir` into the live model."""
        from intellect.protocol.model import load_weights

        load_weights(self.model, checkpoint_dir)

    def close(self) -> None:
        self._prover.shutdown(wait=True)

    def _generate(self, prompts: list[list[int]], params: SamplingParams,
                  seeds: list[int]) -> list[Completion]:
        bs = self.config.max_batch_size
        out: list[Completion] = []
        for i in range(0, len(prompts), bs):
            out += self._generate_batch(prompts[i:i + bs], params, seeds[i:i + bs])
        return out

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> list[Completion]:
        dev, num = torch.device(self.device), len(prompts)
        limits = [min(params.max_tokens, self.config.max_model_len - len(p)) for p in prompts]
        if min(limits) < 1:
            raise ValueError(f"prompt of {max(map(len, prompts))} tokens leaves no room "
                             f"under max_model_len={self.config.max_model_len}")
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)

        # GRPO samples each prompt n times: prefill every distinct prompt once, then give each
        # sequence its prompt's cache rows (an 8-fold cut of the prefill at n = 8).
        distinct: dict[tuple[int, ...], int] = {}
        of_seq = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=dev)
        input_ids, mask = self._left_pad([list(p) for p in distinct])  # [U, L], [U, L]
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # [U, L]
        cache = self._new_cache()
        body = self.model.model
        hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # [U, H]
        cache.batch_select_indices(of_seq)
        hidden, mask, next_pos = hidden[of_seq], mask[of_seq], positions[of_seq, -1] + 1  # [B, H], [B, L], [B]

        rows = _RowBuffer(num, hidden.shape[-1], dev) if params.proofs else None
        proofs: list[list[tuple[Future, int]]] = [[] for _ in range(num)]  # (build, index in it)
        tokens: list[list[int]] = [[] for _ in range(num)]
        logps: list[list[float]] = [[] for _ in range(num)]
        reasons: list[str] = ["length"] * num
        active = list(range(num))  # original index of each live batch row
        for step in range(max(limits)):
            if step > 0 and rows is not None:  # the prefill row (step 0) is not proved (A.2)
                rows.put(active, step - 1, hidden)
                if step % CHUNK == 0:  # every live sequence just filled a chunk: one batched build
                    fut = self._prove([rows.chunk(i, step - CHUNK, step) for i in active])
                    for pos, i in enumerate(active):
                        proofs[i].append((fut, pos))
            logits = self.model.lm_head(hidden).float()  # [b, V]
            tok, lp = sample(logits, params.temperature, [seeds[i] for i in active], [step] * len(active))
            keep = []
            for row, (i, t, p) in enumerate(zip(active, tok.tolist(), lp.tolist())):
                tokens[i].append(t)
                logps[i].append(p)
                if t in stop or len(tokens[i]) >= limits[i]:
                    reasons[i] = "stop" if t in stop else "length"
                    if rows is not None and (n_rows := len(tokens[i]) - 1) % CHUNK:
                        fut = self._prove([rows.chunk(i, n_rows - n_rows % CHUNK, n_rows)])
                        proofs[i].append((fut, 0))
                else:
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, tok, next_pos = mask[sel], tok[sel], next_pos[sel]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            hidden = body(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                          past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            next_pos = next_pos + 1
        return [Completion(tokens[i], logps[i], reasons[i],  # type: ignore[arg-type]
                           b"".join(f.result()[pos] for f, pos in proofs[i]))
                for i in range(num)]

    def _prove(self, chunks: list[torch.Tensor]) -> Future:
        """Build one proof per chunk ([rows <= 32, H] bf16 each) off the generation thread, so
        top-k and interpolation overlap the next forward passes."""
        from intellect.protocol.toploc import build_chunk_proofs

        return self._prover.submit(build_chunk_proofs, chunks, TOPK)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(map(len, prompts))
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, length - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)


class _RowBuffer:
    """The current chunk of each sequence's decode hidden states, bf16: [num_seqs, CHUNK, H].
    A chunk is copied out for its proof when it is complete, before its slots are reused, so
    memory stays at 32 rows per sequence however long the completions get."""

    def __init__(self, num: int, hidden: int, device: torch.device) -> None:
        self.data = torch.empty((num, CHUNK, hidden), dtype=torch.bfloat16, device=device)

    def put(self, seq_ids: list[int], row: int, hidden: torch.Tensor) -> None:
        """hidden: [len(seq_ids), H], decode row `row` of each listed sequence."""
        self.data[seq_ids, row % CHUNK] = hidden.to(torch.bfloat16)

    def chunk(self, seq: int, start: int, end: int) -> torch.Tensor:
        """Decode rows [start, end) of one sequence (start a multiple of CHUNK), copied to CPU for
        the prover: [end - start, H]."""
        assert start % CHUNK == 0 and 0 < end - start <= CHUNK
        return self.data[seq, : end - start].to("cpu", copy=True)
