"""Losses: hand-worked values and gradients, KL estimators, aggregation, micro-batch invariance, NaN safety."""

from __future__ import annotations

import math

import pytest
import torch

from tracerl.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss, token_weights, value_loss

NAN, INF = float("nan"), float("inf")
AGGS = ("token-mean", "step-mean", "sequence-mean", "sequence-sum", "state-sum", "constant")


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def leaf(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


# ---- token weights -------------------------------------------------------------------------------------------

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
STEPS = torch.tensor([[0, 0, 1, -1], [2, -1, -1, -1]])


def test_token_weights_by_hand():
    close(token_weights(MASK), [[1 / 4, 1 / 4, 1 / 4, 0], [1 / 4, 0, 0, 0]])
    close(token_weights(MASK, "sequence-mean"), [[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]])
    # Dr. GRPO constant: L * #sequences = 4 * 2
    close(token_weights(MASK, "sequence-sum"), [[1 / 8, 1 / 8, 1 / 8, 0], [1 / 8, 0, 0, 0]])
    close(token_weights(MASK, "constant", constant=5.0), [[0.2, 0.2, 0.2, 0], [0.2, 0, 0, 0]])
    # step-mean: groups (seq 0, step 0) = 2 tokens, (0, 1) = 1, (1, 2) = 1 -> each gets 1/3
    close(token_weights(MASK, "step-mean", STEPS), [[1 / 6, 1 / 6, 1 / 3, 0], [1 / 3, 0, 0, 0]])
    # state-sum: 3 states with a token ((0, 0), (0, 1), (1, 2)), each state's sum over L = 4, then their mean
    close(token_weights(MASK, "state-sum", STEPS), [[1 / 12, 1 / 12, 1 / 12, 0], [1 / 12, 0, 0, 0]])
    assert token_weights(MASK, dtype=torch.float64).dtype == torch.float64


def test_step_mean_skips_unscored_tokens():
    steps = torch.tensor([[0, -1, 1, -1], [2, -1, -1, -1]])  # position (0, 1) is in the mask but unscored
    close(token_weights(MASK, "step-mean", steps), [[1 / 3, 0, 1 / 3, 0], [1 / 3, 0, 0, 0]])


def test_step_mean_groups_span_rows():
    # rows 0 and 1 are the same sequence 0; its step 1 has tokens in both rows
    mask = torch.ones(3, 3, dtype=torch.bool)
    steps = torch.tensor([[0, 0, 1], [1, 1, 2], [5, 5, 5]])
    seq = torch.tensor([0, 0, 1])
    w = token_weights(mask, "step-mean", steps, seq, dtype=torch.float64)
    # groups: (0, 0) 2 tokens, (0, 1) 3 tokens across rows, (0, 2) 1 token, (1, 5) 3 tokens -> 1/4 each
    for s, t in ((0, 0), (0, 1), (0, 2), (1, 5)):
        in_group = (seq[:, None] == s) & (steps == t)
        assert float(w[in_group].sum()) == pytest.approx(0.25, abs=1e-12)
    close(w[0], [1 / 8, 1 / 8, 1 / 12], atol=1e-12)
    # sequence-mean with repeated seq ids: sequence 0 has 6 tokens, sequence 1 has 3
    close(token_weights(mask, "sequence-mean", None, seq), [[1 / 12] * 3, [1 / 12] * 3, [1 / 6] * 3])
    close(token_weights(mask, "sequence-sum", None, seq), torch.full((3, 3), 1 / 6))  # L * #sequences = 3 * 2


def test_token_weights_errors():
    for agg in ("step-mean", "state-sum"):
        with pytest.raises(ValueError, match=f"agg='{agg}' needs step_ids"):
            token_weights(MASK, agg)
    with pytest.raises(ValueError):
        token_weights(MASK, "sum")


def test_aggregate_ignores_nan_at_zero_weight():
    x = leaf([1.0, NAN, INF, 3.0])
    w = torch.tensor([0.5, 0.0, 0.0, 0.25], dtype=torch.float64)
    loss = aggregate(x, w)
    loss.backward()
    assert loss.item() == pytest.approx(1.25)
    close(x.grad, [0.5, 0.0, 0.0, 0.25])


# ---- KL and entropy ------------------------------------------------------------------------------------------


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    d = lp - ref  # [0.5, -1.0, 0.0]
    close(kl_penalty(lp, ref, "k1"), d)
    close(kl_penalty(lp, ref, "k2"), 0.5 * d**2)
    close(kl_penalty(lp, ref, "k3"), torch.exp(-d) + d - 1)
    close(kl_penalty(lp, ref), [math.exp(-0.5) + 0.5 - 1, math.e - 2, 0.0])
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


def test_k3_non_negative_and_clamped():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(10000, generator=g)
    ref = lp + torch.randn(10000, generator=g) * torch.logspace(-9, 1, 10000)  # down to tiny differences
    assert (kl_penalty(lp, ref) >= 0).all()
    # ref - logp = 50 is clamped to 20 before exp
    k3 = kl_penalty(torch.tensor([0.0], dtype=torch.float64), torch.tensor([50.0], dtype=torch.float64))
    close(k3, [math.exp(20) - 20 - 1], atol=1e-3)
    k3 = kl_penalty(torch.tensor([0.0]), torch.tensor([50.0]), log_ratio_clamp=5.0)
    close(k3, [math.exp(5) - 5 - 1], atol=1e-4)


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    h = entropy_from_logits(logits)
    assert h.shape == (3, 5) and h.dtype == torch.float32
    close(h, expected, atol=1e-5)
    close(entropy_from_logits(logits, chunk_size=4), expected, atol=1e-5)


def test_entropy_with_minus_inf_logits_is_safe():
    z = torch.tensor([[0.0, 0.0, -INF], [1.0, -INF, -INF]], requires_grad=True)
    h = entropy_from_logits(z)
    close(h, [math.log(2), 0.0])
    h.sum().backward()
    assert torch.isfinite(z.grad).all()


# ---- policy loss ---------------------------------------------------------------------------------------------


def test_ppo_at_ratio_one_is_minus_weighted_mean_advantage():
    lp = leaf([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    out = policy_loss(lp, lp.detach(), adv, mask)
    assert out.loss.item() == pytest.approx(-(1 - 2 + 0.5 + 3 + 0) / 5)
    out.loss.backward()
    close(lp.grad, torch.where(mask, -adv / 5, 0.0))  # d rho / d logp = rho = 1
    assert out.metrics["clip_ratio"] == 0 and out.metrics["policy/ratio_mean"] == pytest.approx(1)
    assert out.metrics["policy/approx_kl"] == 0 and out.metrics["policy/ratio_max"] == pytest.approx(1)


def test_ppo_clipped_case_by_hand():
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = leaf([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)]])
    adv = torch.tensor([[2.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    out = policy_loss(lp, old, adv, torch.ones(1, 4, dtype=torch.bool), epsilon_low=0.2)
    # token 0: rho 1.5, A 2  -> -min(3.0, 1.2*2) = -2.4    clipped (high), grad 0
    # token 1: rho 0.5, A 1  -> -min(0.5, 0.8*1) = -0.5    unclipped, dl/dlogp = -A rho = -0.5
    # token 2: rho 0.5, A -1 -> -min(-0.5, -0.8) = 0.8     clipped (low), grad 0
    # token 3: rho 1.5, A -1 -> -min(-1.5, -1.2) = 1.5     unclipped, dl/dlogp = -A rho = 1.5
    assert out.loss.item() == pytest.approx((-2.4 - 0.5 + 0.8 + 1.5) / 4)
    out.loss.backward()
    close(lp.grad, [[0.0, -0.5 / 4, 0.0, 1.5 / 4]])
    m = out.metrics
    assert m["clip_ratio/low_mean"] == 0.25 and m["clip_ratio/high_mean"] == 0.25
    assert m["clip_ratio/region_mean"] == 0.5 and m["clip_ratio"] == 0.5
    assert m["policy/ratio_mean"] == pytest.approx(1.0) and m["policy/ratio_max"] == pytest.approx(1.5)
    assert m["policy/approx_kl"] == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(2) ** 2) / 2)


def test_ppo_asymmetric_clip():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = leaf([[math.log(1.25), math.log(1.3)]])
    adv = torch.ones(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = policy_loss(lp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    # rho 1.25 < 1.28: unclipped -1.25, grad -1.25;  rho 1.3 > 1.28: -1.28, grad 0
    assert out.loss.item() == pytest.approx((-1.25 - 1.28) / 2)
    out.loss.backward()
    close(lp.grad, [[-1.25 / 2, 0.0]])
    assert out.metrics["clip_ratio/high_mean"] == 0.5
    sym = policy_loss(lp, old, adv, mask, epsilon_low=0.2)  # epsilon_high None = epsilon_low
    assert sym.loss.item() == pytest.approx(-1.2)


def test_ppo_log_ratio_clamp():
    lp = leaf([[30.0]])
    out = policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), -torch.ones(1, 1, dtype=torch.float64),
                      torch.ones(1, 1, dtype=torch.bool))
    # log-ratio 30 is clamped to 20: -min(-e^20, -1.2) = e^20; the clamp stops the gradient
    assert out.loss.item() == pytest.approx(math.exp(20))
    out.loss.backward()
    assert float(lp.grad) == 0.0
    out = policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), -torch.ones(1, 1, dtype=torch.float64),
                      torch.ones(1, 1, dtype=torch.bool), log_ratio_clamp=5.0)
    assert out.loss.item() == pytest.approx(math.exp(5))


def test_reinforce_gradient():
    lp = leaf([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    out = policy_loss(lp, None, adv, mask, kind="reinforce")
    assert out.loss.item() == pytest.approx(-(0.5 * -1 + -1 * -2) / 2)
    out.loss.backward()
    close(lp.grad, [[-0.5 / 2, 1.0 / 2, 0.0]])  # -A * grad logp, weighted
    assert "policy/ratio_mean" not in out.metrics and out.metrics["clip_ratio"] == 0
    with_old = policy_loss(lp, lp.detach() - 0.1, adv, mask, kind="reinforce")
    assert with_old.metrics["policy/ratio_mean"] == pytest.approx(math.exp(0.1))
    with pytest.raises(ValueError):
        policy_loss(lp, None, adv, mask, kind="ppo")


def test_kl_and_entropy_terms():
    lp = leaf([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    ent = torch.tensor([[2.0, 4.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = policy_loss(lp, lp.detach(), adv, mask, ref_logprob=ref, beta=0.1, entropy=ent, entropy_coef=0.01)
    k3 = torch.exp(ref - lp.detach()) - (ref - lp.detach()) - 1
    expected = (-adv + 0.1 * k3 - 0.01 * ent).mean()
    assert out.loss.item() == pytest.approx(float(expected))
    out.loss.backward()
    close(lp.grad, (-adv + 0.1 * (1 - torch.exp(ref - lp.detach()))) / 2)  # d k3 / d logp = 1 - exp(ref - logp)
    assert out.metrics["kl"] == pytest.approx(float(k3.mean())) and out.metrics["entropy"] == pytest.approx(3.0)
    no_beta = policy_loss(lp, lp.detach(), adv, mask, ref_logprob=ref)  # kl reported, not in the loss
    assert no_beta.loss.item() == pytest.approx(0.0) and no_beta.metrics["kl"] == out.metrics["kl"]
    with pytest.raises(ValueError):
        policy_loss(lp, lp.detach(), adv, mask, beta=0.1)


# ---- value loss ----------------------------------------------------------------------------------------------


def test_value_loss_clip_case_by_hand():
    v = leaf([[0.5, 0.1, 0.5]])
    old = torch.zeros(1, 3, dtype=torch.float64)
    ret = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    out = value_loss(v, old, ret, torch.ones(1, 3, dtype=torch.bool), clip_range=0.2)
    # token 0: V_clip 0.2: max(0.25, 0.64) -> 0.32, clipped branch, grad 0
    # token 1: V_clip 0.1 = V: 0.5 * 0.81 = 0.405, grad V - R = -0.9
    # token 2: V_clip 0.2: max(0.25, 0.04) -> 0.125, grad V - R = 0.5
    assert out.loss.item() == pytest.approx((0.32 + 0.405 + 0.125) / 3)
    out.loss.backward()
    close(v.grad, [[0.0, -0.9 / 3, 0.5 / 3]])
    m = out.metrics
    assert m["value/clipfrac"] == pytest.approx(1 / 3) and m["value/loss"] == pytest.approx(0.85 / 3)
    assert m["value/mse"] == pytest.approx((0.25 + 0.81 + 0.25) / 3)
    assert m["value/values_mean"] == pytest.approx(1.1 / 3) and m["value/returns_mean"] == pytest.approx(2 / 3)
    plain = value_loss(v, old, ret, torch.ones(1, 3, dtype=torch.bool), clip_range=None)
    assert plain.loss.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.25) / 3) and plain.metrics["value/clipfrac"] == 0


# ---- micro-batch invariance and NaN safety -------------------------------------------------------------------


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows, length = 9, 7
    mask = torch.rand(rows, length, generator=g) > 0.3
    steps = torch.where(mask, torch.randint(0, 4, (rows, length), generator=g), -1)
    seq = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])  # sequences spread over several training rows

    def rand(scale=1.0):
        return torch.randn(rows, length, generator=g, dtype=torch.float64) * scale

    return mask, steps, seq, rand


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batch_invariance(agg):
    mask, steps, seq, rand = _batch()
    lp_full = rand(0.5) - 1
    old, adv, ref, ent = lp_full + rand(0.3), rand(), lp_full + rand(0.2), rand().abs()
    vals, old_v, ret = rand(), rand(), rand()
    w = token_weights(mask, agg, steps, seq, dtype=torch.float64)  # once, over the whole batch

    def losses(idx):
        lp, v = lp_full[idx].clone().requires_grad_(), vals[idx].clone().requires_grad_()
        pol = policy_loss(lp, old[idx], adv[idx], mask[idx], weights=w[idx], ref_logprob=ref[idx], beta=0.05,
                          entropy=ent[idx], entropy_coef=0.01, epsilon_high=0.28)
        val = value_loss(v, old_v[idx], ret[idx], mask[idx], 0.2, weights=w[idx])
        (pol.loss + val.loss).backward()
        return pol.loss.detach() + val.loss.detach(), lp.grad, v.grad

    full_loss, full_glp, full_gv = losses(torch.arange(9))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    total = torch.zeros((), dtype=torch.float64)
    glp, gv = torch.zeros_like(full_glp), torch.zeros_like(full_gv)
    for idx in (perm[:4], perm[4:5], perm[5:]):  # uneven, shuffled micro-batches
        part, g_lp, g_v = losses(idx)
        total, glp[idx], gv[idx] = total + part, g_lp, g_v
    torch.testing.assert_close(total, full_loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(glp, full_glp, atol=1e-12, rtol=0)
    torch.testing.assert_close(gv, full_gv, atol=1e-12, rtol=0)
    if agg in ("token-mean", "step-mean", "sequence-mean"):
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)


def test_nan_at_masked_positions_never_leaks():
    mask, steps, seq, rand = _batch(2)
    which = torch.randint(0, 3, mask.shape, generator=torch.Generator().manual_seed(3))
    bad = torch.tensor([NAN, INF, -INF], dtype=torch.float64)[which]  # [R, L] garbage at masked positions

    def poison(x):
        return torch.where(mask, x, bad)

    lp = poison(rand(0.5) - 1).requires_grad_()
    v = poison(rand()).requires_grad_()
    for agg in AGGS:
        w = token_weights(mask, agg, steps, seq, dtype=torch.float64)
        pol = policy_loss(lp, poison(rand()), poison(rand()), mask, weights=w, ref_logprob=poison(rand()), beta=0.1,
                          entropy=poison(rand()), entropy_coef=0.01)
        val = value_loss(v, poison(rand()), poison(rand()), mask, weights=w)
        lp.grad = v.grad = None
        (pol.loss + val.loss).backward()
        assert torch.isfinite(pol.loss) and torch.isfinite(val.loss)
        assert torch.isfinite(lp.grad).all() and lp.grad[~mask].eq(0).all()
        assert torch.isfinite(v.grad).all() and v.grad[~mask].eq(0).all()
        assert all(math.isfinite(x) for x in [*pol.metrics.values(), *val.metrics.values()])
    # also through the default (weights=None) path with step-mean
    out = policy_loss(lp, poison(rand()), poison(rand()), mask, agg="step-mean", step_ids=steps)
    assert torch.isfinite(out.loss)
