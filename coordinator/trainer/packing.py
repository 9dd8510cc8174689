"""Training samples and their layout into fixed-length rows (spec B.11).

`pack` puts samples into rows of `seq_len` tokens by first-fit decreasing; position ids restart at 0
for each sample and every token carries the index of its sample, from which `segment_mask` builds the
block-diagonal causal mask that keeps packed samples from attending to each other. A sample's
behaviour log-probs (what the node sampled with) land on its completion tokens, NaN elsewhere. `pad_each` is the
naive layout (one sample per row, right-padded) used as the baseline and as the reference in tests.
This module knows token ids and advantages only: no model, no tokenizer, no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor


class TrainSample(NamedTuple):
    """One completion as the trainer consumes it (a plain tuple of these fields works too)."""

    input_tokens: Sequence[int]
    output_tokens: Sequence[int]
    advantage: float
    reward: float | None = None
    behaviour_logprobs: Sequence[float] | None = None  # log mu(output_tokens[i]), at the loss's tau
    policy_step: int | None = None  # the policy version that generated it


@dataclass
class PackedBatch:
    """Rows of tokens ready for the model; every tensor is [R, S]."""

    input_ids: Tensor  # long
    position_ids: Tensor  # long, restart at 0 per sample (and in the padded tail)
    loss_mask: Tensor  # bool, True on completion tokens
    advantages: Tensor  # float32, the sample's advantage on each of its tokens, 0 on padding
    sample_ids: Tensor  # long, index into the packed samples, -1 on padding
    behaviour_logprobs: Tensor  # float32, mu of each completion token, NaN where unknown

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_real_tokens(self) -> int:
        return int((self.sample_ids >= 0).sum())

    @property
    def efficiency(self) -> float:
        """Non-pad tokens / all tokens."""
        return self.num_real_tokens / max(self.input_ids.numel(), 1)

    @property
    def used_width(self) -> int:
        """Columns up to the last non-pad token of any row."""
        used = (self.sample_ids >= 0).any(0).nonzero()
        return int(used[-1]) + 1 if len(used) else 0

    def rows(self, start: int, stop: int) -> PackedBatch:
        """The micro-batch made of rows [start, stop)."""
        return PackedBatch(*(t[start:stop] for t in self._tensors()))

    def columns(self, stop: int) -> PackedBatch:
        """The first `stop` columns of every row."""
        return PackedBatch(*(t[:, :stop] for t in self._tensors()))

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(*(t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, ...]:
        return (
            self.input_ids,
            self.position_ids,
            self.loss_mask,
            self.advantages,
            self.sample_ids,
            self.behaviour_logprobs,
        )


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices: longest first, each into the first bin it fits (B.11).

    Lengths above capacity get a bin of their own (the row truncates them).
    """
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable for equal lengths
        size = min(lengths[index], capacity)
        target = next((b for b, load in enumerate(loads) if load + size <= capacity), None)
        if target is None:
            bins.append([])
            loads.append(0)
            target = len(bins) - 1
        bins[target].append(index)
        loads[target] += size
    return bins


def pack(samples: Sequence[Sequence[Any]], seq_len: int, pad_token_id: int) -> PackedBatch:
    """First-fit-decreasing packing of `samples` into rows of exactly `seq_len` tokens."""
    samples = _checked(samples)
    lengths = [len(s.input_tokens) + len(s.output_tokens) for s in samples]
    return _layout(samples, first_fit_decreasing(lengths, seq_len), seq_len, pad_token_id)


def pad_each(samples: Sequence[Sequence[Any]], pad_token_id: int, max_len: int | None = None) -> PackedBatch:
    """One sample per row, right-padded to the longest sample (truncated to `max_len` if given)."""
    samples = _checked(samples)
    longest = max(len(s.input_tokens) + len(s.output_tokens) for s in samples)
    width = longest if max_len is None else min(longest, max_len)
    return _layout(samples, [[i] for i in range(len(samples))], width, pad_token_id)


def segment_mask(sample_ids: Tensor) -> Tensor:
    """Block-diagonal causal mask [R, 1, S, S] bool (True = may attend) from sample ids [R, S].

    Query q sees key k iff k <= q and both belong to the same sample; the padded tail (-1) forms one
    more block, so no query row is empty.
    """
    seq_len = sample_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=sample_ids.device).tril()
    same = sample_ids[:, :, None] == sample_ids[:, None, :]  # [R, S(q), S(k)]
    return (same & causal)[:, None]


def _checked(samples: Sequence[Sequence[Any]]) -> list[TrainSample]:
    """Samples as TrainSample (plain tuples accepted), each with a prompt token."""
    if not samples:
        raise ValueError("no samples to lay out")
    samples = [TrainSample(*sample) for sample in samples]
    for sample in samples:
        # A packed sample's first token is predicted from the previous sample's last token; it is
        # harmless only because it is a prompt token and carries no loss.
        if len(sample.input_tokens) == 0:
            raise ValueError("every sample needs at least one input (prompt) token")
        if sample.behaviour_logprobs is not None and len(sample.behaviour_logprobs) != len(
            sample.output_tokens
        ):
            raise ValueError(
                f"{len(sample.behaviour_logprobs)} behaviour log-probs for "
                f"{len(sample.output_tokens)} output tokens"
            )
    return samples


def _layout(
    samples: Sequence[TrainSample], bins: list[list[int]], seq_len: int, pad_token_id: int
) -> PackedBatch:
    shape = (len(bins), seq_len)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    advantages = torch.zeros(shape, dtype=torch.float32)
    sample_ids = torch.full(shape, -1, dtype=torch.long)
    behaviour = torch.full(shape, float("nan"), dtype=torch.float32)
    for row, members in enumerate(bins):
        cursor = 0
        for index in members:
            sample = samples[index]
            ids = list(sample.input_tokens) + list(sample.output_tokens)
            size = min(len(ids), seq_len - cursor)  # truncates only a sample longer than the row
            span = slice(cursor, cursor + size)
            input_ids[row, span] = torch.tensor(ids[:size], dtype=torch.long)
            position_ids[row, span] = torch.arange(size)
            loss_mask[row, cursor + len(sample.input_tokens) : cursor + size] = True
            advantages[row, span] = float(sample.advantage)
            sample_ids[row, span] = index
            num_out = size - len(sample.input_tokens)
            if sample.behaviour_logprobs is not None and num_out > 0:
                start = cursor + len(sample.input_tokens)
                behaviour[row, start : start + num_out] = torch.tensor(
                    list(sample.behaviour_logprobs[:num_out]), dtype=torch.float32
                )
            cursor += size
        position_ids[row, cursor:] = torch.arange(seq_len - cursor)  # B.11: pad positions 0..pad-1
    return PackedBatch(input_ids, position_ids, loss_mask, advantages, sample_ids, behaviour)
