"""Credit assignment: every formula against hand-worked numbers or a slow per-row reference."""

from __future__ import annotations

import math
import time

import pytest
import torch

from tracerl.credit import (
    broadcast_to_tokens,
    group_advantages,
    grpo_advantages,
    keep_mask,
    pass_rate_mask,
    place_rewards,
    process_advantages,
    shrink_steps,
    step_gae,
    whiten,
)

NAN = float("nan")
EPS = 1e-4


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ---- group advantages ----------------------------------------------------------------------------------------

# rows interleave two groups with arbitrary ids: group 10 = [1, 2, 3], group -3 = [0, 4]
REWARDS = torch.tensor([1.0, 0.0, 2.0, 4.0, 3.0])
GROUPS = torch.tensor([10, -3, 10, -3, 10])


def test_group_scale():
    # group 10: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1;  group -3: mean 2, std sqrt((4 + 4) / 1) = sqrt(8)
    adv, zero = group_advantages(REWARDS, GROUPS, "group")
    s8 = math.sqrt(8) + EPS
    close(adv, [-1 / (1 + EPS), -2 / s8, 0.0, 2 / s8, 1 / (1 + EPS)])
    assert not zero.any()


def test_batch_scale():
    # deviations from group means [-1, -2, 0, 2, 1]; batch std over [1, 0, 2, 4, 3]: mean 2, var (1+4+0+4+1)/4 = 2.5
    adv, _ = group_advantages(REWARDS, GROUPS, "batch")
    close(adv, torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0]) / (math.sqrt(2.5) + EPS))


def test_no_scale():
    adv, _ = group_advantages(REWARDS, GROUPS, "none")
    close(adv, [-1.0, -2.0, 0.0, 2.0, 1.0])


def test_group_population_scale_is_dllm_rls_z_score():
    # dLLM-RL reward/rl_reward.py z_score_normalize: (x - mean) / population std, no eps, all 0 when std == 0.
    # [1, 0, 0, 0]: mean 1/4, population std sqrt(3/16) = sqrt(3)/4 -> [sqrt(3), -1/sqrt(3) x 3]
    r3 = math.sqrt(3)
    adv, zero = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                                 "group-population")
    close(adv, [r3, -1 / r3, -1 / r3, -1 / r3, 0, 0, 0, 0])
    assert zero.tolist() == [False] * 4 + [True] * 4
    # TRL's "group" is smaller by sqrt(3/4) (unbiased std) and the eps: 1.4997 vs 1.7321 here
    trl, _ = group_advantages(torch.tensor([1.0, 0, 0, 0]), torch.zeros(4, dtype=torch.long), "group")
    assert float(trl[0]) == pytest.approx(0.75 / (math.sqrt(0.25) + EPS))


def test_group_population_scale_of_process_rewards():
    # one group of two rows, step rewards [[1, 3], [2, NaN]]: mean 2, population std sqrt(2/3)
    out = process_advantages(torch.tensor([[1.0, 3.0], [2.0, NAN]]), torch.tensor([0, 0]),
                             torch.tensor([[0, 1], [0, 0]]), torch.ones(2, 2, dtype=torch.bool), "group-population")
    s = math.sqrt(2 / 3)
    close(out, [[0.0, 1 / s], [0.0, 0.0]])  # row 0: step 0 gets (-1 + 1)/s, step 1 gets 1/s; row 1: 0


def test_pass_rate_filter_keeps_dllm_rls_band():
    # dLLM-RL drops a group when its share of correct answers is > 0.8 or < 0.2 (both ends kept)
    rewards = torch.tensor([1.0, 0, 0, 0, 0,   1, 1, 1, 1, 0,   1, 1, 1, 1, 1,   0, 0, 0, 0, 0,   1, NAN, 0, 0, 0])
    groups = torch.arange(5).repeat_interleave(5)
    keep = pass_rate_mask(rewards, groups, 0.2, 0.8)
    assert keep.view(5, 5)[:, 0].tolist() == [True, True, False, False, True]  # 0.2, 0.8, 1.0, 0.0, 1/4
    assert not pass_rate_mask(torch.full((2,), NAN), torch.zeros(2, dtype=torch.long), 0.0, 1.0).any()


def test_bad_scale_mode():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, GROUPS, "row")


def test_nan_rewards_left_out():
    # group 0 = [1, NaN, 3]: statistics over {1, 3}: mean 2, std sqrt(2); the NaN row gets 0
    adv, zero = group_advantages(torch.tensor([1.0, NAN, 3.0]), torch.tensor([0, 0, 0]))
    close(adv, [-1 / (math.sqrt(2) + EPS), 0.0, 1 / (math.sqrt(2) + EPS)])
    assert not zero.any()
    out = grpo_advantages(torch.tensor([1.0, NAN, 3.0]), torch.tensor([0, 0, 0]), torch.ones(3, 2, dtype=torch.bool))
    assert out.token_mask.tolist() == [[True, True], [False, False], [True, True]]
    assert out.advantages[1].eq(0).all() and torch.isfinite(out.advantages).all()
    assert out.metrics["trajectory/rows_kept"] == 2


def test_group_of_one_and_single_scored_row_have_zero_spread():
    adv, zero = group_advantages(torch.tensor([5.0, 2.0, NAN]), torch.tensor([0, 1, 1]))
    close(adv, [0.0, 0.0, 0.0])
    assert zero.tolist() == [True, True, True]


def test_zero_std_counting():
    # groups [1, 1] and [0.1, 0.1, 0.1] have no spread ([0.1]*3: float mean != 0.1, still exactly zero advantage)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.1, 0.1, 0.1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    for mode in ("group", "batch", "none"):
        adv, zero = group_advantages(rewards, groups, mode)
        assert zero.tolist() == [True, True, False, False, True, True, True]
        assert adv[zero].eq(0).all()
    out = grpo_advantages(rewards, groups, torch.ones(7, 3, dtype=torch.bool))
    assert out.metrics["frac_reward_zero_std"] == pytest.approx(5 / 7)
    assert out.metrics["trajectory/rows_kept"] == 7


def test_drop_zero_std_and_broadcast():
    rewards, groups = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    action = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert keep_mask(torch.tensor([True, False]), False).tolist() == [True, True]
    assert keep_mask(torch.tensor([True, False]), True).tolist() == [False, True]
    out = grpo_advantages(rewards, groups, action, drop_zero_std=True)
    a = 0.5 / (math.sqrt(0.5) + EPS)  # group 1: mean 0.5, std sqrt(0.5)
    close(out.advantages, [[0, 0, 0], [0, 0, 0], [-a, -a, -a], [a, a, 0]])
    assert out.token_mask.tolist() == [[False] * 3, [False] * 3, [True] * 3, [True, True, False]]
    assert out.returns is None and out.advantages.dtype == torch.float32
    assert out.metrics["trajectory/rows_kept"] == 2
    close(broadcast_to_tokens(torch.tensor([2.0, -1.0]), action[:2]), [[2, 2, 0], [-1, 0, 0]])


# ---- shrinkage -----------------------------------------------------------------------------------------------


def _slow_shrink(steps, mask, s, blocks):
    out = steps.clone()
    for n in range(steps.shape[0]):
        for b in set(blocks[n].tolist()):
            cols = [j for j in range(steps.shape[1]) if mask[n, j] and blocks[n, j] == b]
            distinct = sorted({int(steps[n, j]) for j in cols})
            first = {t: distinct[(i // s) * s] for i, t in enumerate(distinct)}
            for j in cols:
                out[n, j] = first[int(steps[n, j])]
    return out


def test_shrink_example_s2_s3():
    steps = torch.tensor([[0, 0, 1, 2, 2, 3, 5]])
    mask = torch.ones_like(steps, dtype=torch.bool)
    # distinct 0 1 2 3 5 -> s=2: {0,1} {2,3} {5};  s=3: {0,1,2} {3,5}
    assert shrink_steps(steps, mask, 2).tolist() == [[0, 0, 0, 2, 2, 2, 5]]
    assert shrink_steps(steps, mask, 3).tolist() == [[0, 0, 0, 0, 0, 3, 3]]
    assert shrink_steps(steps, mask, 1).tolist() == steps.tolist()


def test_shrink_rows_independent_and_context_positions_untouched():
    steps = torch.tensor([[0, 1, 2, 3], [4, 6, 6, 9]])
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    # row 0: action steps {0, 2, 3} -> {0,2} {3}; position 1 (context, step 1) keeps 1 and is not counted
    # row 1: {4, 6, 9} -> {4, 6} {9}
    assert shrink_steps(steps, mask, 2).tolist() == [[0, 1, 0, 3], [4, 4, 4, 9]]


def test_shrink_restarts_per_block():
    steps = torch.tensor([[0, 1, 2, 3, 4, 5]])
    mask = torch.ones_like(steps, dtype=torch.bool)
    blocks = torch.tensor([0, 0, 0, 1, 1, 1])
    # without blocks {0,1} {2,3} {4,5}; with blocks {0,1} {2} | {3,4} {5}
    assert shrink_steps(steps, mask, 2).tolist() == [[0, 0, 2, 2, 4, 4]]
    assert shrink_steps(steps, mask, 2, blocks).tolist() == [[0, 0, 2, 3, 3, 5]]
    assert shrink_steps(steps, mask, 2, blocks[None]).tolist() == [[0, 0, 2, 3, 3, 5]]


def test_shrink_rejects_s_below_one():
    with pytest.raises(ValueError):
        shrink_steps(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), 0)


def test_shrink_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(0, 12, (6, 20), generator=g)
    mask = torch.rand(6, 20, generator=g) > 0.3
    blocks = torch.randint(0, 3, (6, 20), generator=g).sort(-1).values
    for s in (1, 2, 3, 5):
        assert torch.equal(shrink_steps(steps, mask, s), _slow_shrink(steps, mask, s, torch.zeros_like(steps)))
        assert torch.equal(shrink_steps(steps, mask, s, blocks), _slow_shrink(steps, mask, s, blocks))


# ---- reward placement ----------------------------------------------------------------------------------------


def test_outcome_on_last_action_step():
    steps = torch.tensor([[0, 0, 1, 2, 2], [0, 0, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    r = place_rewards(torch.tensor([2.0, -1.0]), steps, mask)
    close(r, [[0, 0, 0, 2, 2], [0, 0, 0, -1, 0]])  # row 1: last ACTION step is 2, the pad at step 3 gets nothing


def test_process_rewards_per_step():
    # steps 0, 0, 1, 3: step 2 has no token of this row, so its 0.3 has nowhere to go
    steps, mask = torch.tensor([[0, 0, 1, 3]]), torch.ones(1, 4, dtype=torch.bool)
    r = place_rewards(torch.tensor([1.0]), steps, mask, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    close(r, [[0.1, 0.1, 0.2, 1.4]])


def test_process_rewards_on_merged_groups():
    steps, mask = torch.tensor([[0, 0, 1, 2, 3, 5]]), torch.ones(1, 6, dtype=torch.bool)
    train = shrink_steps(steps, mask, 2)  # groups {0,1} {2,3} {5}
    assert train.tolist() == [[0, 0, 0, 2, 2, 5]]
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    r = place_rewards(torch.tensor([1.0]), steps, mask, p, train)
    # group 0: 0.1 + 0.2;  group 2: 0.3 + 0.4;  group 5: 0.6 + outcome 1 (step 4 has no token of the row)
    close(r, [[0.3, 0.3, 0.3, 0.7, 0.7, 1.6]])
    close(place_rewards(torch.tensor([1.0]), steps, mask, None, train), [[0, 0, 0, 0, 0, 1]])


def test_process_rewards_too_short():
    with pytest.raises(ValueError):
        place_rewards(torch.ones(1), torch.tensor([[0, 3]]), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 3))


# ---- step-level GAE ------------------------------------------------------------------------------------------


def _slow_gae(values, rewards, steps, mask, gamma, lam):
    """Per-row reference written straight from the formulas, in float64 Python."""
    adv = torch.zeros_like(values, dtype=torch.float64)
    ret = torch.zeros_like(adv)
    for n in range(values.shape[0]):
        order = sorted({int(steps[n, j]) for j in range(values.shape[1]) if mask[n, j]})
        tau = {t: [j for j in range(values.shape[1]) if mask[n, j] and steps[n, j] == t] for t in order}
        r_star = [sum(float(rewards[n, j]) for j in tau[t]) / len(tau[t]) for t in order] + [0.0]
        v_star = [sum(float(values[n, j]) for j in tau[t]) / len(tau[t]) for t in order] + [0.0]
        a_star, ret_star = [0.0] * (len(order) + 1), [0.0] * (len(order) + 1)
        for k in reversed(range(len(order))):
            a_star[k] = r_star[k] - v_star[k] + gamma * v_star[k + 1] + gamma * lam * a_star[k + 1]
            ret_star[k] = r_star[k] + gamma * ret_star[k + 1]
        for k, t in enumerate(order):
            for j in tau[t]:
                r_j, v_j = float(rewards[n, j]), float(values[n, j])
                adv[n, j] = r_j - v_j + gamma * v_star[k + 1] + gamma * lam * a_star[k + 1]
                ret[n, j] = r_j + gamma * ret_star[k + 1]
    return adv, ret


def test_gae_reduces_to_return_minus_value():
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(0, 9, (5, 16), generator=g)
    mask = torch.rand(5, 16, generator=g) > 0.2
    values = torch.rand(5, 16, generator=g)
    outcome = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    out = step_gae(values, place_rewards(outcome, steps, mask), steps, mask)
    expected = torch.where(mask, outcome[:, None] - values, 0.0)
    close(out.advantages, expected, atol=1e-5)
    close(out.returns, torch.where(mask, outcome[:, None].expand(5, 16), 0.0), atol=1e-6)
    assert torch.equal(out.token_mask, mask)


def test_gae_hand_worked_three_steps():
    # one row, positions shuffled, global steps 3 -> 7 -> 9 (the row's steps k = 0, 1, 2), one padding position
    steps = torch.tensor([[7, 9, 3, 9, 3, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    values = torch.tensor([[0.5, 0.6, 0.2, 1.0, 0.4, NAN]])  # NaN at padding must not leak
    rewards = torch.tensor([[0.5, 1.0, 0.0, 1.0, 0.0, NAN]])  # process 0.5 at step 7, outcome 1 at step 9
    out = step_gae(values, rewards, steps, mask, gamma=0.9, lam=0.8)
    # r* = [0, 0.5, 1];  V* = [(0.2+0.4)/2, 0.5, (0.6+1.0)/2] = [0.3, 0.5, 0.8]
    # delta_2 = 1 - 0.8 + 0 = 0.2;                A*_2 = 0.2
    # delta_1 = 0.5 - 0.5 + 0.9*0.8 = 0.72;       A*_1 = 0.72 + 0.72*0.2 = 0.864
    # delta_0 = 0 - 0.3 + 0.9*0.5 = 0.15;         A*_0 = 0.15 + 0.72*0.864 = 0.77208
    # tokens at step 3: (0 - V_j) + 0.9*0.5 + 0.72*0.864 = -V_j + 1.07208 -> 0.87208 (V=0.2), 0.67208 (V=0.4)
    # token at step 7:  (0.5 - 0.5) + 0.9*0.8 + 0.72*0.2 = 0.864
    # tokens at step 9: (1 - V_j) -> 0.4 (V=0.6), 0.0 (V=1.0)
    close(out.advantages, [[0.864, 0.4, 0.87208, 0.0, 0.67208, 0.0]], atol=1e-6)
    # R*_2 = 1;  R*_1 = 0.5 + 0.9*1 = 1.4;  R*_0 = 0 + 0.9*1.4 = 1.26;  R_j = r_j + 0.9 R*_{next}
    close(out.returns, [[1.4, 1.0, 1.26, 1.0, 1.26, 0.0]], atol=1e-6)
    m = out.metrics
    assert m["trajectory/train_steps_mean"] == 3
    assert m["value/advantages_mean"] == pytest.approx((0.864 + 0.4 + 0.87208 + 0.67208) / 5, abs=1e-6)
    assert m["value/returns_mean"] == pytest.approx((1.4 + 1 + 1.26 + 1 + 1.26) / 5, abs=1e-6)
    assert m["value/values_mean"] == pytest.approx(0.54, abs=1e-6)
    ret, val = torch.tensor([1.4, 1.0, 1.26, 1.0, 1.26]), torch.tensor([0.5, 0.6, 0.2, 1.0, 0.4])
    ev = 1 - (ret - val).var() / ret.var()
    assert m["value/explained_variance"] == pytest.approx(float(ev), abs=1e-5)


def test_gae_matches_slow_reference():
    g = torch.Generator().manual_seed(2)
    n, length = 7, 24
    steps = torch.randint(0, 15, (n, length), generator=g)
    mask = torch.rand(n, length, generator=g) > 0.25
    mask[3] = False  # a row with no action at all
    values = torch.randn(n, length, generator=g, dtype=torch.float64)
    rewards = torch.randn(n, length, generator=g, dtype=torch.float64)
    for gamma, lam in ((1.0, 1.0), (0.9, 0.8), (0.5, 0.0)):
        out = step_gae(values, rewards, steps, mask, gamma, lam)
        adv, ret = _slow_gae(values, rewards, steps, mask, gamma, lam)
        close(out.advantages, adv, atol=1e-12)
        close(out.returns, ret, atol=1e-12)


def test_gae_is_fast():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(3)
        steps = torch.randint(0, 64, (64, 256), generator=g)
        mask = torch.rand(64, 256, generator=g) > 0.1
        values, rewards = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
        step_gae(values, rewards, steps, mask, 0.9, 0.8)  # warm-up
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            step_gae(values, rewards, steps, mask, 0.9, 0.8)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.050, f"step_gae took {best * 1e3:.1f} ms"


# ---- whitening -----------------------------------------------------------------------------------------------


def test_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, NAN])
    mask = torch.tensor([True, True, True, False])
    close(whiten(x, mask), [-1.0, 0.0, 1.0, 0.0], atol=1e-6)  # mean 2, unbiased var 1
    close(whiten(x, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0], atol=1e-6)


def test_gae_with_no_trained_token_at_all():
    # every group dropped (pass_rate_filter): nothing to assign, and no index error
    adv = step_gae(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long),
                   torch.zeros(2, 3, dtype=torch.bool), 1.0, 1.0)
    assert not adv.advantages.any() and not adv.returns.any()
