"""GRPO loss (spec B.9): the worked table, clip metric, aggregation weights, log-probs at temperature;
the importance ratio against the behaviour policy mu, the token mask, the mismatch KL; chunked
log-probs and entropy equal to the dense ones, gradients included."""

import math

import pytest
import torch

from intellect.coordinator.trainer.config import LossConfig
from intellect.coordinator.trainer.lm_head import chunked_logprobs
from intellect.coordinator.trainer.loss import (
    aggregation_weights,
    grpo_clip_loss,
    grpo_two_sided_loss,
    policy_loss,
    token_logprobs,
    token_mask_loss,
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


def _one_token_each(p_theta, p_old, p_mu, advantages):
    """Row of tokens with the given probabilities under pi_theta, pi_old (step start) and mu."""
    logprobs = torch.log(torch.tensor([p_theta], dtype=torch.float64)).requires_grad_(True)
    old = torch.log(torch.tensor([p_old], dtype=torch.float64))
    mu = torch.log(torch.tensor([p_mu], dtype=torch.float64))
    adv = torch.tensor([advantages], dtype=torch.float64)
    weights = torch.ones_like(adv)  # plain sum: each token's loss reads directly
    return logprobs, old, mu, adv, weights


def test_ratio_is_taken_against_behaviour_logprobs():
    # pi_theta = pi_old = 0.5 (first optimizer step), mu = 0.25 (sampled by an older policy): rho = 2.
    logprobs, old, mu, adv, weights = _one_token_each([0.5, 0.5], [0.5, 0.5], [0.25, 0.25], [1.0, -1.0])
    entropy = torch.zeros_like(adv)
    cfg = LossConfig(entropy_coef=0.0)
    out = policy_loss(logprobs, entropy, old, adv, weights, cfg, behaviour_logprobs=mu)
    # A = +1: rho 2 clipped to 1.2 -> -1.2 (no gradient); A = -1: max(2, 1.2) = 2 with d/dlogp = rho = 2
    assert out.loss.item() == pytest.approx(-1.2 + 2.0)
    assert out.num_clipped.item() == 1 and out.num_behaviour.item() == 2
    out.loss.backward()
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, 2.0])
    # KL(mu || pi_old) by k3 with r = pi_old / mu = 2: 2 - ln 2 - 1 per token
    assert out.mismatch_kl_sum.item() == pytest.approx(2 * (1 - math.log(2)))
    # the recomputed denominator (INTELLECT-2's B.9) sees rho = 1: nothing clips, the old behaviour
    step_start = policy_loss(logprobs, entropy, old, adv, weights, LossConfig(entropy_coef=0.0,
                             ratio_against="step_start"), behaviour_logprobs=mu)
    assert step_start.loss.item() == pytest.approx(0.0) and step_start.num_clipped.item() == 0


def test_decoupled_weights_the_step_start_loss_by_the_truncated_behaviour_ratio():
    # pi_theta = pi_old = 0.5; mu = 0.25, 0.125 and unknown: weights pi_old / mu = 2, 4 -> cap 2, and 1.
    # The ratio against pi_old is 1, so nothing clips and each token's loss is -w A with d/dlogp = -w A.
    logprobs, old, mu, adv, weights = _one_token_each([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.25, 0.125, 0.5],
                                                      [1.0, -1.0, 1.0])
    mu[0, 2] = float("nan")  # the third sample brought no log-probs
    cfg = LossConfig(entropy_coef=0.0, ratio_against="decoupled", behaviour_weight_cap=2.0)
    out = policy_loss(logprobs, torch.zeros_like(adv), old, adv, weights, cfg, behaviour_logprobs=mu)
    assert out.loss.item() == pytest.approx(-2.0 + 2.0 - 1.0)
    assert out.num_truncated.item() == 1 and out.num_clipped.item() == 0 and out.num_behaviour.item() == 2
    out.loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-2.0, 2.0, -1.0])
    # the other ratios leave num_truncated at 0
    plain = policy_loss(logprobs.detach(), torch.zeros_like(adv), old, adv, weights, LossConfig(entropy_coef=0.0),
                        behaviour_logprobs=mu)
    assert plain.num_truncated.item() == 0


def test_unknown_behaviour_falls_back_to_pi_old_without_nan():
    logprobs, old, mu, adv, weights = _one_token_each([0.5, 0.5], [0.4, 0.4], [0.25, 0.25], [1.0, 1.0])
    mu[0, 1] = float("nan")  # the second sample brought no log-probs
    out = policy_loss(logprobs, torch.zeros_like(adv), old, adv, weights, LossConfig(entropy_coef=0.0),
                      behaviour_logprobs=mu)
    out.loss.backward()
    # token 0: rho = 0.5 / 0.25 = 2 -> clipped at 1.2; token 1: rho = 0.5 / 0.4 = 1.25 -> clipped at 1.2
    assert out.loss.item() == pytest.approx(-2.4)
    assert out.num_behaviour.item() == 1 and torch.isfinite(logprobs.grad).all()
    assert out.mismatch_kl_sum.item() == pytest.approx(1.6 - math.log(1.6) - 1)  # r = 0.4 / 0.25


def test_token_mask_drops_tokens_that_moved_too_far():
    # (p_theta, p_mu, A): rose 0.3 with A > 0 -> masked; rose 0.1 -> kept, l = -rho A = -4/3;
    # fell 0.3 with A < 0 -> masked; rose 0.2 with A < 0 (only a fall is masked) -> l = 5/3
    p_theta, p_mu, advantages = [0.6, 0.4, 0.1, 0.5], [0.3, 0.3, 0.4, 0.3], [1.0, 1.0, -1.0, -1.0]
    logprobs, _, mu, adv, _ = _one_token_each(p_theta, p_theta, p_mu, advantages)
    token = token_mask_loss(logprobs, mu, adv, LossConfig(type="token_mask", mask_high=0.2, mask_low=0.2))
    assert token.masked.tolist() == [[True, False, True, False]]
    assert token.loss.tolist()[0] == pytest.approx([0.0, -4 / 3, 0.0, 5 / 3])
    token.loss.sum().backward()
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, -4 / 3, 0.0, 5 / 3])  # d(-rho A)/dlogp = -rho A
    weights = torch.ones_like(adv)
    out = policy_loss(logprobs.detach(), torch.zeros_like(adv), logprobs.detach(), adv, weights,
                      LossConfig(type="token_mask", entropy_coef=0.0), behaviour_logprobs=mu)
    assert out.num_masked.item() == 2 and out.num_clipped.item() == 0
    assert out.loss.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_logprobs_equal_dense_with_gradients(entropy_grad):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    upstream = torch.randn(3, 7), torch.randn(3, 7)

    def objective(logprobs, entropy):
        total = (logprobs * upstream[0]).sum()
        return total + (entropy * upstream[1]).sum() if entropy_grad else total

    logits = hidden @ weight.t()
    dense_lp, dense_h = token_logprobs(torch.cat([logits, logits[:, :1]], 1), torch.cat(
        [targets[:, :1], targets], 1), temperature=0.6)
    dense_lp, dense_h = dense_lp[:, 1:], dense_h[:, 1:]  # token_logprobs shifts by one: undo it
    dense = torch.autograd.grad(objective(dense_lp, dense_h), (hidden, weight))
    chunk_lp, chunk_h = chunked_logprobs(hidden, weight, targets, temperature=0.6, chunk_tokens=4)
    if not entropy_grad:
        chunk_h = chunk_h.detach()
    chunked = torch.autograd.grad(objective(chunk_lp, chunk_h), (hidden, weight))
    assert torch.allclose(chunk_lp, dense_lp, atol=1e-5)
    assert torch.allclose(chunk_h, dense_h, atol=1e-5)
    for got, expected in zip(chunked, dense):
        assert torch.allclose(got, expected, atol=1e-5)
