"""TOPLOC on a transformers causal LM: capture decode rows while sampling, verify by prefill.

The hashed tensor is the final-norm output (= LM-head input, `model.model(...).last_hidden_state`)
in bf16 (spec A.2). A completion of n_out tokens commits to its n_out - 1 decode rows: the hidden
states that predicted output tokens 1..n_out-1. The prefill row that predicted token 0 and the
never-fed last token are not committed.

- `ProofRecorder`: streaming prover for any sampling loop (the node's engines): one `add_step` per
  decode forward, a proof built as soon as a sequence's 32-row chunk is full.
- `generate_with_proofs`: a small reference sampler (batched, KV cache) built on it.
- `verify_completions`: the validator (A.10): one prefill (hidden states rounded to bf16) over prompt + output[:-1] per
  completion, many per forward (right padding), proofs checked, and from the same forward the
  log-probs of the output tokens, P(EOS) at the last position (termination check, A.12) and, given
  the completions' sampling seeds, every sampled token against the seeded sampler
  (`protocol.sampling.check_tokens`: exact / tie / mismatch).

Deliberately unknown here: rollout files, signatures, rewards, where the model came from, and
models whose logits are not `lm_head(final_norm)` (soft-capping, scaling): Llama-family only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from intellect.protocol import sampling, toploc
from intellect.protocol.constants import TOPLOC_CHUNK_SIZE, TOPLOC_TOPK
from intellect.protocol.toploc import DEFAULT_THRESHOLDS, ChunkCheck, ProofRejected, Thresholds


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The base model whose last_hidden_state is the final-norm output (`model.model` for Llama)."""
    return getattr(model, model.base_model_prefix)


def _head(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_output_embeddings()


class ProofRecorder:
    """Streaming proof builder for a batch of sequences sampled together.

    Call `add_step(hidden, active_mask)` after every DECODE forward (never the prefill), with the
    final-norm rows that will predict the next token, and `active_mask` True for the sequences that
    sample a token this step. A sequence that stopped (EOS or length) must be inactive from then on.
    Memory: one [batch, chunk_size, hidden] bf16 buffer on the hidden states' device.
    """

    def __init__(self, batch_size: int, hidden_size: int, chunk_size: int = TOPLOC_CHUNK_SIZE, topk: int = TOPLOC_TOPK):
        self.chunk_size, self.topk = chunk_size, topk
        self._buf: torch.Tensor | None = None  # [batch, chunk, hidden], allocated on first step
        self._shape = (batch_size, chunk_size, hidden_size)
        self._fill = torch.zeros(batch_size, dtype=torch.int64)
        self._proofs: list[list[bytes]] = [[] for _ in range(batch_size)]
        self.rows = [0] * batch_size  # decode rows committed per sequence (should be n_out - 1)
        self._done = False

    def add_step(self, hidden: torch.Tensor, active_mask: torch.Tensor | None = None) -> None:
        """hidden: [batch, hidden_size] final-norm rows of this decode step; active_mask: [batch]."""
        if self._done:
            raise RuntimeError("proofs() was already called")
        if tuple(hidden.shape) != (self._shape[0], self._shape[2]):
            raise ValueError(f"hidden must be {[self._shape[0], self._shape[2]]}, got {list(hidden.shape)}")
        if self._buf is None:
            self._buf = torch.empty(self._shape, dtype=torch.bfloat16, device=hidden.device)
        active = (
            torch.ones(self._shape[0], dtype=torch.bool)
            if active_mask is None
            else active_mask.detach().to("cpu", torch.bool)
        )
        seqs = active.nonzero().flatten()
        if seqs.numel() == 0:
            return
        rows, cols = seqs.to(hidden.device), self._fill[seqs].to(hidden.device)
        self._buf[rows, cols] = hidden.detach()[rows].to(torch.bfloat16)
        self._fill[seqs] += 1
        for s in seqs.tolist():
            self.rows[s] += 1
        self._flush(self._fill == self.chunk_size)

    def _flush(self, which: torch.Tensor) -> None:
        seqs = which.nonzero().flatten().tolist()
        if not seqs:
            return
        chunks = [self._buf[s, : int(self._fill[s])] for s in seqs]
        for s, proof in zip(seqs, toploc.build_chunk_proofs(chunks, self.topk)):
            self._proofs[s].append(proof)
            self._fill[s] = 0

    def proofs(self) -> list[bytes]:
        """Finish the partial chunks; per sequence the concatenated proofs (b"" if < 1 row)."""
        if not self._done:
            self._flush(self._fill > 0)
            self._done = True
        return [b"".join(p) for p in self._proofs]


@dataclass(frozen=True)
class Completion:
    output_ids: list[int]
    logprobs: list[float]  # of each sampled token under logits / temperature (T=1 when greedy)
    proofs: bytes
    stop: str  # "eos" or "length"


@torch.inference_mode()
def generate_with_proofs(
    model: torch.nn.Module,
    prompt_ids_list: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    chunk_size: int = TOPLOC_CHUNK_SIZE,
    topk: int = TOPLOC_TOPK,
) -> list[Completion]:
    """Reference sampler: the prompts as one left-padded batch with a KV cache, proofs streamed.
    Sequence i is sampled by `protocol.sampling` with seed `seed + i`."""
    if max_new_tokens < 1 or not prompt_ids_list or min(map(len, prompt_ids_list)) < 1:
        raise ValueError("need max_new_tokens >= 1 and non-empty prompts")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    batch, width = len(prompt_ids_list), max(map(len, prompt_ids_list))
    ids = torch.zeros(batch, width, dtype=torch.int64)
    mask = torch.zeros(batch, width, dtype=torch.int64)
    for i, p in enumerate(prompt_ids_list):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    seeds = [seed + i for i in range(batch)]
    decoder, head = _decoder(model), _head(model)
    recorder = ProofRecorder(batch, model.config.hidden_size, chunk_size, topk)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    hidden = out.last_hidden_state[:, -1]  # [B, H]
    active = torch.ones(batch, dtype=torch.bool)
    tokens_out: list[list[int]] = [[] for _ in range(batch)]
    logprobs_out: list[list[float]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        if step > 0:
            recorder.add_step(hidden, active)  # decode rows only (A.2)
        tokens, logprobs = sampling.sample(head(hidden), temperature, seeds, [step] * batch)
        for i in active.nonzero().flatten().tolist():
            tokens_out[i].append(int(tokens[i]))
            logprobs_out[i].append(float(logprobs[i]))
        active &= tokens != eos
        if step == max_new_tokens - 1 or not active.any():
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
        positions = positions[:, -1:] + 1
        out = decoder(
            input_ids=tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        hidden = out.last_hidden_state[:, -1]
    return [
        Completion(t, lp, p, "eos" if t[-1] == eos else "length")
        for t, lp, p in zip(tokens_out, logprobs_out, recorder.proofs())
    ]


@torch.inference_mode()
def prefill_final_norm(
    model: torch.nn.Module, prompt_tokens: list[int], output_tokens: list[int]
) -> torch.Tensor:
    """The n_out - 1 decode rows [n_out - 1, H] recomputed by one prefill (A.10 steps 2-3)."""
    seq = torch.tensor([list(prompt_tokens) + list(output_tokens[:-1])], dtype=torch.int64)
    hidden = _decoder(model)(input_ids=seq).last_hidden_state[0]
    return hidden[len(prompt_tokens) :].to(torch.bfloat16)


@dataclass(frozen=True)
class CompletionCheck:
    """Verdict material for one completion. `accepted` is the TOPLOC verdict alone; the sampling,
    termination and token-probability checks are the caller's, from the fields below."""

    accepted: bool
    chunks: list[ChunkCheck] = field(default_factory=list)
    rejection: str | None = None  # why the input was refused unevaluated (malformed proofs/tokens)
    token_logprobs: list[float] = field(default_factory=list)  # log p(output[t]) under logits / T
    eos_prob: float | None = None  # P(EOS) at the position that predicted output[-1]
    tokens: sampling.TokenCheck | None = None  # every sampled token re-drawn (None: no seed given)


@dataclass
class _Item:
    prompt: list[int]
    output: list[int]
    proofs: list[bytes] | None = None
    rejection: str | None = None


def _screen(
    model: torch.nn.Module, prompt: list[int], output: list[int], proofs: bytes, chunk_size: int, topk: int
) -> _Item:
    """Structural checks on untrusted input before any forward."""
    item = _Item(list(prompt), list(output))
    vocab, max_len = model.config.vocab_size, model.config.max_position_embeddings
    tokens = item.prompt + item.output
    if not item.prompt:
        item.rejection = "empty prompt"
    elif any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
        item.rejection = f"token id outside [0, {vocab})"
    elif len(tokens) - 1 > max_len:
        item.rejection = f"sequence of {len(tokens) - 1} tokens exceeds the model's {max_len}"
    elif len(proofs) != toploc.expected_proof_bytes(len(output), chunk_size, topk):
        item.rejection = (
            f"{len(proofs)} proof bytes, expected {toploc.expected_proof_bytes(len(output), chunk_size, topk)}"
            f" for {len(output)} output tokens"
        )
    else:
        try:
            item.proofs = toploc.split_proofs(proofs, topk)
            toploc.parse_proofs(item.proofs, topk)
        except ProofRejected as e:
            item.rejection = str(e)
    return item


def _eos_ids(model: torch.nn.Module, eos_token_id: int | list[int] | None) -> list[int]:
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.inference_mode()
def _prefill_group(
    model: torch.nn.Module, items: list[_Item], temperature: float, eos_ids: list[int],
    seeds: list[int | None], tie_tolerance: float,
) -> list[tuple[torch.Tensor, list[float], float | None, sampling.TokenCheck | None]]:
    """Completions of ONE prompt: the prompt is prefilled once and its KV cache shared by every
    completion's forward over output[:-1] (right-padded), so a GRPO group of n costs one prompt, not n.
    Per item: (decode rows [n-1, H] bf16, log-probs, P(EOS), the token check when its seed is given)."""
    from transformers import DynamicCache

    prompt, device = items[0].prompt, next(model.parameters()).device
    decoder, head = _decoder(model), _head(model)
    cache = DynamicCache(config=model.config)
    first = decoder(input_ids=torch.tensor([prompt], device=device), past_key_values=cache,
                    use_cache=True).last_hidden_state[:, -1]  # [1, H]: predicts output[0]
    width = max(len(it.output) for it in items) - 1
    rest = None
    if width > 0:
        ids = torch.zeros(len(items), width, dtype=torch.int64)
        mask = torch.zeros(len(items), len(prompt) + width, dtype=torch.int64)
        mask[:, : len(prompt)] = 1
        for i, it in enumerate(items):
            ids[i, : len(it.output) - 1] = torch.tensor(it.output[:-1])
            mask[i, len(prompt) : len(prompt) + len(it.output) - 1] = 1
        cache.batch_repeat_interleave(len(items))
        positions = torch.arange(len(prompt), len(prompt) + width)[None].expand(len(items), -1)
        rest = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       past_key_values=cache, use_cache=True).last_hidden_state  # [B, W, H]
    results = []
    for i, (it, seed) in enumerate(zip(items, seeds, strict=True)):
        n_out = len(it.output)
        rows = first if rest is None else torch.cat([first, rest[i, : n_out - 1]])  # [n_out, H]
        logits = head(rows).float()  # the node's sampler sees lm_head(hidden).float() too
        token_check = (None if seed is None
                       else sampling.check_tokens(logits, temperature, seed, it.output, tie_tolerance))
        logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)  # [n_out, V]
        token_lp = logp.gather(1, torch.tensor(it.output, device=device).unsqueeze(1)).squeeze(1).tolist()
        eos_prob = float(logp[-1, eos_ids].exp().sum()) if eos_ids else None
        results.append((rows[1:].to(torch.bfloat16), token_lp, eos_prob, token_check))
    return results


def verify_completions(
    model: torch.nn.Module,
    prompts: list[list[int]],
    outputs: list[list[int]],
    proofs: list[bytes],
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    batch_size: int = 8,
    temperature: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    chunk_size: int = TOPLOC_CHUNK_SIZE,
    topk: int = TOPLOC_TOPK,
    seeds: list[int] | None = None,
    tie_tolerance: float = sampling.DEFAULT_TIE_TOLERANCE,
) -> list[CompletionCheck]:
    """Validate completions by bf16 prefill (A.10); model should be the claimed policy.
    With `seeds` (each completion's sampling seed), every output token is also checked against the
    seeded sampler at `temperature` (`CompletionCheck.tokens`).

    Malformed input (bad proof bytes, token ids, lengths) is refused with `rejection` set and never
    evaluated. Completions of the same prompt are prefilled together, `batch_size` at a time, over one
    shared prefill of their prompt.
    """
    if not len(prompts) == len(outputs) == len(proofs) == len(seeds if seeds is not None else proofs):
        raise ValueError("prompts, outputs, proofs (and seeds) must have the same length")
    items = [_screen(model, p, o, pr, chunk_size, topk) for p, o, pr in zip(prompts, outputs, proofs)]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, it in enumerate(items):
        if it.rejection is None and it.output:
            by_prompt.setdefault(tuple(it.prompt), []).append(i)
    groups = [same[k : k + batch_size] for same in by_prompt.values() for k in range(0, len(same), batch_size)]
    eos_ids = _eos_ids(model, eos_token_id)
    checks: list[CompletionCheck] = [
        CompletionCheck(False, rejection=it.rejection) if it.rejection else CompletionCheck(True)
        for it in items
    ]
    for group in groups:
        group_seeds = [None if seeds is None else seeds[j] for j in group]
        for i, (rows, token_lp, eos_prob, token_check) in zip(
            group, _prefill_group(model, [items[j] for j in group], temperature, eos_ids, group_seeds, tie_tolerance)
        ):
            chunk_checks = (
                toploc.verify_proofs(rows, items[i].proofs, chunk_size, topk) if rows.shape[0] else []
            )
            checks[i] = CompletionCheck(
                toploc.passes(chunk_checks, thresholds),
                chunk_checks,
                None,
                token_lp,
                eos_prob,
                token_check,
            )
    return checks
