"""GRPO policy losses, token aggregation and the per-token log-prob/entropy they read (spec B.9).

One function per loss type (`grpo_two_sided_loss`, `grpo_clip_loss`, `token_mask_loss`), picked by
`LossConfig.type`. The ratio's denominator is the behaviour policy mu (the log-probs the rollout was
sampled with) where the sample carries them and `ratio_against` is "behaviour", else pi_old as the
trainer recomputed it at the start of the step; "decoupled" takes the ratio against pi_old and weights
each token by the truncated importance weight pi_old / mu instead (the clip then bounds the update, not
the staleness). The mismatch KL between mu and pi_old is a metric.
Aggregation is expressed as per-token weights computed once for a whole optimizer batch
(`aggregation_weights`), so a loss summed over micro-batches does not depend on how the batch was
split or packed. This module sees tensors only: no model, no packing, no optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from intellect.coordinator.trainer.config import LossConfig


@dataclass
class TokenLoss:
    """Per-token policy-gradient loss and whether the clipped branch was taken."""

    loss: Tensor  # [R, S] float
    clipped: Tensor  # [R, S] bool: -rho_bar*A < -c*A (B.9 clip_ratio)
    masked: Tensor | None = None  # [R, S] bool: dropped by the token mask (token_mask only)


@dataclass
class LossOutput:
    """Micro-batch loss (already weighted, sum over micro-batches = step loss) and metric sums."""

    loss: Tensor  # [] float, differentiable
    num_clipped: Tensor  # [] masked tokens on the clipped branch
    num_masked: Tensor  # [] completion tokens the token mask dropped (token_mask only)
    num_truncated: Tensor  # [] tokens whose behaviour weight was truncated (decoupled only)
    mismatch_kl_sum: Tensor  # [] sum over tokens with a known mu of KL(mu || pi_old), k3 estimate
    num_behaviour: Tensor  # [] completion tokens whose behaviour log-prob mu is known
    entropy_sum: Tensor  # [] sum of H_t over masked tokens
    kl_sum: Tensor  # [] sum of the KL estimate over masked tokens (0 without a reference)
    num_tokens: Tensor  # [] masked (completion) tokens


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-prob of each token given its prefix, and the entropy of that prediction, at logits / tau.

    logits: [R, S, V], input_ids: [R, S] -> (logprobs [R, S], entropy [R, S]). Column 0 has no prefix
    and is 0 in both (the shift drops a row's first token; it is always a prompt token, mask 0).
    """
    z = logits[:, :-1].float() / temperature  # [R, S-1, V] predicts input_ids[:, 1:]
    logp_all = torch.log_softmax(z, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    # H = logsumexp(z) - sum softmax(z) z  ==  -sum p log p
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = logprobs.new_zeros(logprobs.shape[0], 1)
    return torch.cat([zero, logprobs], dim=1), torch.cat([zero, entropy], dim=1)


def grpo_two_sided_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, cfg: LossConfig
) -> TokenLoss:
    """INTELLECT-2 loss: l = max(-rho_bar A, -c A), rho_bar = clamp(rho, 0, delta), c = clip(rho_bar).

    All inputs [R, S]. The cap delta bounds the objective for negative advantages at delta*A and
    gives no gradient where rho > delta.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    capped = torch.clamp(ratio, 0.0, cfg.delta)
    clipped_ratio = torch.clamp(capped, 1 - cfg.eps_low, 1 + cfg.eps_high)
    unclipped_loss, clipped_loss = -capped * advantages, -clipped_ratio * advantages
    return TokenLoss(torch.maximum(unclipped_loss, clipped_loss), unclipped_loss < clipped_loss)


def grpo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, cfg: LossConfig) -> TokenLoss:
    """Standard PPO/GRPO clip: l = max(-rho A, -clip(rho, 1-eps_low, 1+eps_high) A); no cap."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
    unclipped_loss, clipped_loss = -ratio * advantages, -clipped_ratio * advantages
    return TokenLoss(torch.maximum(unclipped_loss, clipped_loss), unclipped_loss < clipped_loss)


def token_mask_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, cfg: LossConfig) -> TokenLoss:
    """prime-rl's DPPO mask: l = -rho A, except tokens that left the trust region carry no loss.

    A token with A > 0 is dropped when p_theta - p_old > mask_high (pushed up far enough already), one
    with A < 0 when p_theta - p_old < -mask_low. Measured in probability, not ratio, so rare tokens
    (tiny p, huge ratio swings) still train while a confident token cannot be moved far.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    moved = torch.exp(logprobs.detach()) - torch.exp(old_logprobs)
    masked = torch.where(advantages > 0, moved > cfg.mask_high, moved < -cfg.mask_low)
    loss = torch.where(masked, torch.zeros_like(ratio), -ratio * advantages)
    return TokenLoss(loss, torch.zeros_like(masked), masked)


def mismatch_kl(old_logprobs: Tensor, behaviour_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(mu || pi_old) on tokens sampled from mu: r - log r - 1, r = pi_old/mu."""
    log_ratio = old_logprobs - behaviour_logprobs
    return torch.exp(log_ratio) - log_ratio - 1


LOSS_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor, LossConfig], TokenLoss]] = {
    "grpo_two_sided": grpo_two_sided_loss,
    "grpo_clip": grpo_clip_loss,
    "token_mask": token_mask_loss,
}


def aggregation_weights(loss_mask: Tensor, sample_ids: Tensor, aggregation: str, seq_len: int) -> Tensor:
    """Weight of each token in the loss of a whole optimizer batch: [R, S] -> [R, S] float.

    constant: m / (seq_len * R), INTELLECT-2's sum / N per row averaged over micro_bs=1 micro-batches;
    token_mean: m / sum(m); sequence_mean: m / (|o_i| * G) with G the samples that have completion
    tokens. sample_ids: [R, S] long, index of the sample each token belongs to, -1 on padding.
    """
    mask = loss_mask.float()
    if aggregation == "constant":
        return mask / (seq_len * mask.shape[0])
    if aggregation == "token_mean":
        return mask / mask.sum().clamp(min=1)
    if aggregation == "sequence_mean":
        ids = sample_ids.clamp(min=0).flatten()
        lengths = torch.zeros(int(ids.max()) + 1).index_add_(0, ids, mask.flatten())  # [num_samples]
        num_groups = (lengths > 0).sum().clamp(min=1)
        return mask / (lengths[ids].view_as(mask).clamp(min=1) * num_groups)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def policy_loss(
    logprobs: Tensor,
    entropy: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    cfg: LossConfig,
    ref_logprobs: Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
) -> LossOutput:
    """Weighted micro-batch loss: sum_t w_t (l_t - entropy_coef H_t + kl_coef KL_t); all inputs [R, S].

    weights come from `aggregation_weights` and are zero off the completion tokens. old_logprobs is
    pi_old at the start of the step (detached); behaviour_logprobs is mu, NaN where unknown.
    """
    mask = weights > 0
    if behaviour_logprobs is None:
        known = torch.zeros_like(mask)
        behaviour_logprobs = old_logprobs
    else:
        known = mask & ~torch.isnan(behaviour_logprobs)
        behaviour_logprobs = torch.where(known, behaviour_logprobs, old_logprobs)  # no NaN reaches autograd
    denominator = behaviour_logprobs if cfg.ratio_against == "behaviour" else old_logprobs
    token = LOSS_FUNCTIONS[cfg.type](logprobs, denominator, advantages, cfg)
    policy_term, truncated = token.loss, torch.zeros_like(mask)
    if cfg.ratio_against == "decoupled":
        behaviour_weight = torch.exp(old_logprobs - behaviour_logprobs).detach()  # 1 where mu is unknown
        truncated = known & (behaviour_weight > cfg.behaviour_weight_cap)
        policy_term = behaviour_weight.clamp(max=cfg.behaviour_weight_cap) * token.loss
    per_token = policy_term - cfg.entropy_coef * entropy
    kl = torch.zeros_like(logprobs)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs reference log-probs")
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3 estimator: unbiased, always >= 0
        per_token = per_token + cfg.kl_coef * kl
    return LossOutput(
        loss=(weights * per_token).sum(),
        num_clipped=(token.clipped & mask).sum().detach(),
        num_masked=(token.masked & mask).sum() if token.masked is not None else mask.new_zeros(()).sum(),
        num_truncated=truncated.sum(),
        mismatch_kl_sum=(mismatch_kl(old_logprobs, behaviour_logprobs).detach() * known).sum(),
        num_behaviour=known.sum(),
        entropy_sum=(entropy * mask).sum().detach(),
        kl_sum=(kl * mask).sum().detach(),
        num_tokens=mask.sum(),
    )
