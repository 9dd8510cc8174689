"""GRPO loss (spec B.9): the worked table, clip metric, aggregation weights, log-probs at temperature."""

import math

import pytest
import torch

from intellect.coordinator.trainer.config import LossConfig
from intellect.coordinator.trainer.loss import (
    aggregation_weights,
    grpo_clip_loss,
    grpo_two_sided_loss,
    policy_loss,
    token_logprobs,
)

# B.9 worked example: (A, rho, rho_bar, c, loss, d loss / d rho)
TABLE = [
    (-1.5, 0.5, 0.5, 0.8, 1.2, 0.0),
    (-1.5, 2.0, 2.0, 1.2, 3.0, 1.5),
    (-1.5, 10.0, 4.0, 1.2, 6.0, 0.0),
    (1.0, 10.0, 4.0, 1.2, -1.2, 0.0),
]


def _table_loss(loss_fn):
    cfg = LossConfig()
    advantages = torch.tensor([[row[0] for row in TABLE]])
    ratio = torch.tensor([[row[1] for row in TABLE]], dtype=torch.float64, requires_grad=True)
    out = loss_fn(torch.log(ratio), torch.zeros_like(ratio), advantages, cfg)
    out.loss.sum().backward()
    return out, ratio.grad


def test_worked_table_values_and_gradients():
    out, grad = _table_loss(grpo_two_sided_loss)
    expected = torch.tensor([[row[4] for row in TABLE]], dtype=torch.float64)
    assert torch.allclose(out.loss, expected, atol=1e-12)
    assert grad.tolist() == [[row[5] for row in TABLE]]  # zero exactly on rows 1, 3, 4


def test_clip_metric_marks_clipped_branch():
    out, _ = _table_loss(grpo_two_sided_loss)
    # -rho_bar*A < -c*A: 0.75 < 1.2 yes; 3 < 1.8 no; 6 < 1.8 no; -4 < -1.2 yes
    assert out.clipped.tolist() == [[True, False, False, True]]


def test_standard_clip_has_no_cap_for_negative_advantages():
    out, grad = _table_loss(grpo_clip_loss)
    assert out.loss[0, 2].item() == pytest.approx(15.0)  # the row the cap changes: 15 with a gradient
    assert grad[0, 2].item() == pytest.approx(1.5)
    assert out.loss[0, 3].item() == pytest.approx(-1.2)


def test_delta_must_exceed_clip_ceiling():
    with pytest.raises(ValueError):
        LossConfig(delta=1.1, eps_high=0.2)


def test_token_logprobs_and_entropy_use_temperature():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    logprobs, entropy = token_logprobs(logits, ids, temperature=0.6)
    z = logits / 0.6
    expected_lp = torch.log_softmax(z, -1)[0, 2, ids[0, 3]]
    expected_h = torch.logsumexp(z[1, 3], -1) - (torch.softmax(z[1, 3], -1) * z[1, 3]).sum()
    assert logprobs.shape == entropy.shape == (2, 5)
    assert logprobs[:, 0].eq(0).all() and entropy[:, 0].eq(0).all()
    assert logprobs[0, 3].item() == pytest.approx(expected_lp.item(), abs=1e-6)
    assert entropy[1, 4].item() == pytest.approx(expected_h.item(), abs=1e-5)


def _two_samples():
    # row 0: sample 0 (3 completion tokens) then sample 1 (1 completion token); row 1: padding only
    mask = torch.tensor([[0, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    ids = torch.tensor([[0, 0, 0, 0, 1, 1], [-1, -1, -1, -1, -1, -1]])
    return mask, ids


def test_aggregation_weights():
    mask, ids = _two_samples()
    constant = aggregation_weights(mask, ids, "constant", seq_len=6)
    assert torch.allclose(constant, mask.float() / 12)  # token sum / (seq_len x rows)
    assert aggregation_weights(mask, ids, "token_mean", 6).sum().item() == pytest.approx(1.0)
    per_seq = aggregation_weights(mask, ids, "sequence_mean", 6)
    assert per_seq[0, :4].sum().item() == pytest.approx(0.5)  # each sample weighs 1/G
    assert per_seq[0, 5].item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        aggregation_weights(mask, ids, "nope", 6)


def test_policy_loss_entropy_bonus_and_kl():
    mask, ids = _two_samples()
    weights = aggregation_weights(mask, ids, "token_mean", 6)
    logprobs = torch.full((2, 6), -1.0)
    entropy = torch.full((2, 6), 2.0)
    advantages = torch.full((2, 6), 0.5)
    cfg = LossConfig(entropy_coef=1e-3, kl_coef=0.1)
    with pytest.raises(ValueError):
        policy_loss(logprobs, entropy, logprobs, advantages, weights, cfg)
    out = policy_loss(logprobs, entropy, logprobs, advantages, weights, cfg, ref_logprobs=logprobs)
    # ratio 1, KL 0: loss = -A - 0.001 H averaged over the 4 completion tokens
    assert out.loss.item() == pytest.approx(-0.5 - 0.002)
    assert out.num_tokens.item() == 4 and out.entropy_sum.item() == pytest.approx(8.0)
    ref = logprobs + math.log(2.0)
    shifted = policy_loss(logprobs, entropy, logprobs, advantages, weights, cfg, ref_logprobs=ref)
    assert shifted.kl_sum.item() == pytest.approx(4 * (2 - math.log(2) - 1), rel=1e-5)
