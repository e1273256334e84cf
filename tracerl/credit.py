"""Credit assignment: from rewards to per-token advantages (pure functions over tensors, no model).

Notation (TraceRL): response token j of a row was committed at step t_j; trace step t covers tau_t = {j : t_j = t}.
G responses per prompt form a group (equal `group_id`).

Two estimators:

- GRPO (no value model): A_i = (R_i - mean_group R) / (std + eps), broadcast to every action token of row i.
- Step-level GAE (value model): per-step means r*_t, V*_t over tau_t and the recursion
      delta_t = r*_t - V*_t + gamma V*_{t+1},   A*_t = delta_t + gamma lam A*_{t+1},
  with token advantages A_j = (r_j - V_j) + gamma V*_{t+1} + gamma lam A*_{t+1}.

`shrink_steps` merges every s consecutive steps of a row into one training step (TraceRL shrinkage), and
`place_rewards` writes outcome / process rewards onto the tokens of the (merged) steps.

Dtypes: results are float32, or float64 when the inputs are float64 (tests check formulas in float64).
Everything here is bookkeeping, not differentiated: inputs are detached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from tracerl.choices import ScaleRewards, options
from tracerl.steps import dense_rank as _dense_rank
from tracerl.steps import step_rank  # noqa: F401  (re-exported: credit.step_rank)

SCALES = options(ScaleRewards)
AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over the data-parallel ranks (the identity on one process)


def no_reduce(t: Tensor) -> Tensor:
    return t


def masked_mean_var(x: Tensor, mask: Tensor, all_reduce: AllReduce = no_reduce) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, unbiased variance, count) of x[mask] over every rank, in two passes (the rule every batch-wide
    normalisation uses: batch-scaled advantages, whitened GAE advantages, batch-scaled process rewards)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    sums = all_reduce(torch.stack([torch.where(mask, x, zero).sum(), mask.sum().to(x.dtype)]))
    n = sums[1]
    mean = sums[0] / n.clamp(min=1)
    var = all_reduce(torch.where(mask, (x - mean) ** 2, zero).sum()) / (n - 1).clamp(min=1)
    return mean, var, n


@dataclass
class Advantages:
    advantages: Tensor  # [N, L] float32, 0 outside token_mask
    returns: Tensor | None  # [N, L] float32 value targets (value-model path only), 0 outside token_mask
    token_mask: Tensor  # [N, L] bool, tokens that take part in the update
    metrics: dict[str, float] = field(default_factory=dict)
    counted: Tensor | None = None  # [N] bool, rows the loss normalisers count (None: all); the groups outside
    #   algorithm.pass_rate_filter are not, as dLLM-RL removes them before batching


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, promoted to float64 when an input is float64 (never lower than float32: bf16 values are upcast)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype) if t.is_floating_point() else dtype
    return dtype


# ---- GRPO: group-relative outcome advantages ----------------------------------------------------------------


def group_advantages(
    rewards: Tensor,
    group_id: Tensor,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
    baseline: str = "mean",
    all_reduce: AllReduce = no_reduce,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages, TRL GRPO semantics -> (advantages [N], zero_std_mask [N] bool).

    A_i = R_i - mean_{g(i)} R  (baseline "leave_one_out", coupled-GRPO's: R_i - mean of the OTHER rows of the
    group = n / (n - 1) (R_i - mean), n = scored rows of the group), then
      "group": A_i / (std_{g(i)} R + eps);  "batch": A_i / (std_batch R + eps);  "none": A_i (Dr. GRPO);
      "group-population": A_i / pstd_{g(i)} R, the population std and no eps (dLLM-RL's z_score_normalize).
    std is unbiased (torch.std); the batch std is over every rank's rewards (`all_reduce`, groups themselves never
    straddle ranks). NaN rewards (unscorable) are left out of every statistic and get A = 0.
    A group with fewer than two scored rows has zero spread. zero_std_mask marks rows whose group has zero spread
    (max == min, exact, so float noise in the mean cannot hide it); their advantage is exactly 0 in every mode.
    """
    if scale_rewards not in SCALES:
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale_rewards!r}")
    dtype = _float_dtype(rewards)
    r = rewards.detach().to(dtype)  # [N]
    finite = torch.isfinite(r)  # [N]
    r0 = torch.where(finite, r, torch.zeros_like(r))  # NaN-free copy for the sums
    uniq, inv = torch.unique(group_id, return_inverse=True)  # [N] dense group index: ids may be any values
    num_groups = uniq.numel()
    zeros = torch.zeros(num_groups, dtype=dtype, device=r.device)  # [G]
    count = zeros.index_add(0, inv, finite.to(dtype))  # [G] scored rows per group
    mean = zeros.index_add(0, inv, r0) / count.clamp(min=1)  # [G]
    dev = torch.where(finite, r0 - mean[inv], torch.zeros_like(r0))  # [N]
    squares = zeros.index_add(0, inv, dev * dev)  # [G]
    hi = torch.full_like(zeros, -torch.inf).scatter_reduce(0, inv, torch.where(finite, r0, -torch.inf), "amax")
    lo = torch.full_like(zeros, torch.inf).scatter_reduce(0, inv, torch.where(finite, r0, torch.inf), "amin")
    zero_std = ((count < 2) | (hi == lo))[inv]  # [N]
    if baseline == "leave_one_out":
        dev = dev * (count / (count - 1).clamp(min=1))[inv]
    elif baseline != "mean":
        raise ValueError(f"baseline must be 'mean' or 'leave_one_out', got {baseline!r}")
    if scale_rewards == "group":
        dev = dev / ((squares / (count - 1).clamp(min=1)).sqrt()[inv] + eps)  # unbiased std + eps (TRL)
    elif scale_rewards == "group-population":  # dLLM-RL's z-score: population std, no eps (zero spread: A = 0)
        dev = dev / (squares / count.clamp(min=1)).sqrt()[inv].clamp(min=torch.finfo(dtype).tiny)
    elif scale_rewards == "batch":
        _, batch_var, _ = masked_mean_var(r0, finite, all_reduce)
        dev = dev / (batch_var.sqrt() + eps)
    adv = torch.where(finite & ~zero_std, dev, torch.zeros_like(dev))  # [N]
    return adv, zero_std


def keep_mask(zero_std_mask: Tensor, drop_zero_std: bool) -> Tensor:
    """[N] bool rows to train on: all of them, or (drop_zero_std) only rows whose group has reward spread."""
    return ~zero_std_mask if drop_zero_std else torch.ones_like(zero_std_mask, dtype=torch.bool)


def pass_rate_mask(rewards: Tensor, group_id: Tensor, low: float, high: float) -> Tensor:
    """[N] bool: rows whose group's mean reward (its pass rate, for a 0/1 reward) lies in [low, high].

    dLLM-RL (reward/rl_reward.py) trains only on prompts its policy solves sometimes but not always: a group whose
    share of correct answers is above 0.8 or below 0.2 is dropped before training. Unscored (NaN) rewards are left
    out of the mean; a group with none is dropped."""
    finite = torch.isfinite(rewards)
    r0 = torch.where(finite, rewards.double(), 0.0)
    _, inv = torch.unique(group_id, return_inverse=True)
    zeros = torch.zeros(int(inv.max()) + 1 if inv.numel() else 0, dtype=torch.float64, device=rewards.device)
    count = zeros.index_add(0, inv, finite.double())
    rate = zeros.index_add(0, inv, r0) / count.clamp(min=1)  # [G]
    keep = (count > 0) & (rate >= low) & (rate <= high)
    return keep[inv]


def broadcast_to_tokens(advantages: Tensor, token_mask: Tensor) -> Tensor:
    """[N] -> [N, L]: every token of row i gets A_i; 0 outside token_mask."""
    a = advantages[:, None].expand(token_mask.shape)
    return torch.where(token_mask, a, torch.zeros_like(a))


def wd1_weights(advantages: Tensor, group_id: Tensor, valid: Tensor | None = None) -> Tensor:
    """wd1's sequence weights [N]: softmax over the group of A minus softmax over the group of -A.

    wd1 (Tang et al. 2025; xiaohangt/wd1, rev_grpo_trainer.py) minimises sum_i (w-_i - w+_i) S_i with
    w+ = softmax_group(A), w- = softmax_group(-A) and S_i the sequence log-likelihood, i.e. it ascends
    sum_i (w+_i - w-_i) S_i: these weights play the advantage's part in a REINFORCE-form loss.
    Rows outside `valid` [N] (unscored) take no part in their group's softmax and get 0.
    """
    a = advantages.detach().double()
    valid = torch.ones_like(a, dtype=torch.bool) if valid is None else valid
    _, inv = torch.unique(group_id, return_inverse=True)
    num = int(inv.max()) + 1 if inv.numel() else 0

    def group_softmax(x: Tensor) -> Tensor:
        x = torch.where(valid, x, -torch.inf)
        top = torch.full((num,), -torch.inf, dtype=x.dtype).scatter_reduce(0, inv, x, "amax")
        e = torch.where(valid, torch.exp(x - top[inv]), 0.0)
        return e / torch.zeros(num, dtype=x.dtype).index_add(0, inv, e)[inv].clamp(min=1e-300)

    return (group_softmax(a) - group_softmax(-a)).to(_float_dtype(advantages))


def grpo_advantages(
    rewards: Tensor,
    group_id: Tensor,
    action_mask: Tensor,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
    drop_zero_std: bool = False,
    baseline: str = "mean",
    wd1: bool = False,
    all_reduce: AllReduce = no_reduce,
) -> Advantages:
    """GRPO token advantages [N, L] = group advantage of the row on each of its action tokens (returns None).

    token_mask = action_mask & keep_mask & finite reward. wd1: the group advantages become wd1_weights.
    """
    adv, zero_std = group_advantages(rewards, group_id, scale_rewards, eps, baseline, all_reduce)
    if wd1:
        scored = torch.isfinite(rewards)
        adv = wd1_weights(torch.where(scored, adv, 0.0), group_id, scored)
    keep = keep_mask(zero_std, drop_zero_std) & torch.isfinite(rewards)  # [N]
    token_mask = action_mask & keep[:, None]  # [N, L]
    stats = torch.stack([zero_std.float().mean(), keep.float().sum()]).tolist()  # one device sync
    metrics = {"frac_reward_zero_std": stats[0], "trajectory/rows_kept": stats[1]}
    return Advantages(broadcast_to_tokens(adv, token_mask), None, token_mask, metrics)


def process_table(
    step_rewards: Tensor | None, token_rewards: Tensor | None, unmask_step: Tensor, action_mask: Tensor
) -> Tensor | None:
    """Per-step process rewards [N, T] (T = the longest row's steps; NaN = no reward for that step), or None.

    step_rewards [N, S] (NaN = none) are indexed by each row's own step; token_rewards [N, L'] (NaN = none, L' <= L)
    land on the step that committed the token, summed per step. Rewards on non-action tokens (EOS padding) are
    dropped: no decision of the policy made them.
    """
    if step_rewards is None and token_rewards is None:
        return None
    n, length = unmask_step.shape
    steps = torch.where(action_mask, unmask_step.long(), torch.full_like(unmask_step.long(), -1))
    num_t = int(steps.max()) + 1 if steps.numel() else 0
    out = torch.full((n, num_t), float("nan"), dtype=torch.float32)
    if step_rewards is not None:
        width = min(step_rewards.shape[1], num_t)
        out[:, :width] = step_rewards[:, :width].float()
    if token_rewards is not None:
        tok = torch.full((n, length), float("nan"), dtype=torch.float32)
        tok[:, :token_rewards.shape[1]] = token_rewards.float()
        hit = torch.isfinite(tok) & action_mask  # [N, L]
        index = torch.where(hit, steps, 0)
        sums = torch.zeros(n, num_t).scatter_add(1, index, torch.where(hit, tok, 0.0))
        counts = torch.zeros(n, num_t).scatter_add(1, index, hit.float())
        out = torch.where(counts > 0, torch.nan_to_num(out, nan=0.0) + sums, out)
    return out if torch.isfinite(out).any() else None


def process_advantages(
    process: Tensor,
    group_id: Tensor,
    train_step: Tensor,
    action_mask: Tensor,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
    all_reduce: AllReduce = no_reduce,
) -> Tensor:
    """Group-relative advantages from per-step (process) rewards -> [N, L] (0 off the action tokens).

    DeepSeekMath's process supervision (Shao et al. 2024, sec. 4.1.3) over denoising steps: every step reward of
    a group is normalised by the mean and std of ALL step rewards given in that group,
        r~_{i,t} = (r_{i,t} - mean_group) / (std_group + eps),
    and a token committed at (training) step t gets the sum over its row's steps from t on:
        A_j = sum_{u >= t_j} r~_{i,u}.
    process [N, T]: reward of each row's own step u (NaN = none given for that step; entries past a row's last step
    must be NaN). scale_rewards as in group_advantages ("batch": the std of every given reward on every rank;
    "none": no division). train_step [N, L]: a merged (shrunk) group starts at its first step, so its tokens
    get the rewards of every step it merges.
    """
    dtype = _float_dtype(process)
    p = process.detach().to(dtype)  # [N, T]
    given = torch.isfinite(p)
    p0 = torch.where(given, p, torch.zeros_like(p))
    _, inv = torch.unique(group_id, return_inverse=True)  # [N]
    zeros = torch.zeros(int(inv.max()) + 1 if inv.numel() else 0, dtype=dtype, device=p.device)  # [G]
    count = zeros.index_add(0, inv, given.sum(1).to(dtype))  # [G] rewards given per group
    mean = zeros.index_add(0, inv, p0.sum(1)) / count.clamp(min=1)  # [G]
    dev = torch.where(given, p0 - mean[inv][:, None], torch.zeros_like(p0))  # [N, T]
    if scale_rewards in ("group", "group-population"):
        divisor = (count - 1).clamp(min=1) if scale_rewards == "group" else count.clamp(min=1)
        std = (zeros.index_add(0, inv, (dev * dev).sum(1)) / divisor).sqrt()[inv][:, None]
        std = std + eps if scale_rewards == "group" else std
        dev = torch.where(std > 0, dev / std.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(dev))  # no spread: no signal
    elif scale_rewards == "batch":
        batch_std = masked_mean_var(p0, given, all_reduce)[1].sqrt()
        dev = torch.where(batch_std > 0, dev / (batch_std + eps), torch.zeros_like(dev))
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale_rewards!r}")
    # return-to-go over steps; column T (past every step) is 0
    to_go = torch.cat([dev.flip(1).cumsum(1).flip(1), torch.zeros_like(dev[:, :1])], dim=1)  # [N, T + 1]
    index = train_step.long().clamp(0, p.shape[1])  # [N, L]
    return torch.where(action_mask, to_go.gather(1, index), torch.zeros((), dtype=dtype, device=p.device))


# ---- step ranks and shrinkage ---------------------------------------------------------------------------------


def shrink_steps(
    unmask_step: Tensor,
    action_mask: Tensor,
    s: int,
    block_of_position: Tensor | None = None,
) -> Tensor:
    """TraceRL shrinkage -> train_step [N, L] int64.

    Per row (and per block when block_of_position [L] or [N, L] is given: counting restarts in each block, a
    group never straddles two blocks), sort the distinct steps of the row's actions t_1 < t_2 < ... and merge
    every s consecutive ones into a group {t_1..t_s}, {t_{s+1}..t_{2s}}, ...; each action gets the FIRST step
    of its group, because a merged group is trained from the state before its first step.
    Non-action positions keep their own unmask_step.
    Example: steps [0, 0, 1, 2, 2, 3, 5], s=2 -> groups {0,1} {2,3} {5} -> [0, 0, 0, 2, 2, 2, 5].
    """
    if s < 1:
        raise ValueError(f"shrink s must be >= 1, got {s}")
    n, length = unmask_step.shape
    rows = torch.arange(n, device=unmask_step.device)[:, None]  # [N, 1]
    if block_of_position is None:
        segment = rows.expand(n, length)  # [N, L]
    else:
        blocks = block_of_position.to(unmask_step.device).long().expand(n, length)  # [N, L]
        segment = rows * (blocks.amax() + 1) + blocks  # one bucket per (row, block)
    uniq, inv, rank, start, span = _dense_rank(unmask_step, action_mask, segment)
    first = start + torch.div(rank, s, rounding_mode="floor") * s  # [U] key index of the group's first step
    first_step = uniq[first] % span  # [U]
    return torch.where(action_mask, first_step[inv], unmask_step.long())


# ---- reward placement ----------------------------------------------------------------------------------------


def place_rewards(
    outcome: Tensor,
    unmask_step: Tensor,
    action_mask: Tensor,
    process_rewards: Tensor | None = None,
    train_step: Tensor | None = None,
) -> Tensor:
    """Per-token rewards r [N, L] for step-level GAE.

    A reward for step t is written on EVERY action token of tau_t, so the per-step mean r*_t equals it.
    outcome [N] goes to the row's last (training) step. process_rewards [N, T] (T > max step) gives a reward per
    global step. With train_step [N, L] (from shrink_steps) rewards sit on merged groups: a group's reward is the
    SUM of the process rewards of the raw steps it merges (+ the outcome for the row's last group). Only steps in
    which the row committed an action are counted: a step with no token of the row has nowhere to be written.
    """
    dtype = _float_dtype(outcome, *([process_rewards] if process_rewards is not None else []))
    ts = (unmask_step if train_step is None else train_step).long()  # [N, L] training step of each token
    zero = torch.zeros((), dtype=dtype, device=outcome.device)
    last = torch.where(action_mask, ts, torch.full_like(ts, -1)).amax(-1, keepdim=True)  # [N, 1]
    r = torch.where(action_mask & (ts == last), outcome.detach().to(dtype)[:, None], zero)  # [N, L]
    if process_rewards is None:
        return r
    p = process_rewards.detach().to(dtype)  # [N, T]
    num_t = p.shape[1]
    raw = torch.where(action_mask, unmask_step.long(), torch.zeros_like(ts))  # [N, L]
    if bool((raw >= num_t).any()):
        raise ValueError(f"process_rewards has {num_t} steps but an action was committed at step {int(raw.max())}")
    # group (training step) of every raw step the row acted in; amin makes each raw step count once
    group_of = torch.full_like(p, num_t, dtype=torch.long).scatter_reduce(
        1, raw, torch.where(action_mask, ts, num_t), "amin"
    )  # [N, T], num_t where the row did not act
    acted = group_of < num_t
    group_reward = torch.zeros_like(p).scatter_add(
        1, torch.where(acted, group_of, 0), torch.where(acted, p, zero)
    )  # [N, T] indexed by a group's first step
    placed = group_reward.gather(1, torch.where(action_mask, ts, 0))  # [N, L]
    return r + torch.where(action_mask, placed, zero)


# ---- step-level GAE ------------------------------------------------------------------------------------------


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def _gae_metrics(adv: Tensor, ret: Tensor, v: Tensor, mask: Tensor, steps_per_row: Tensor) -> dict[str, float]:
    """Masked means and explained variance 1 - Var(R - V) / Var(R) (NaN when the returns have no spread)."""
    n = mask.sum().clamp(min=1)
    ret_mean = _masked_mean(ret, mask)
    err = ret - v
    err_mean = _masked_mean(err, mask)
    var_ret = torch.where(mask, (ret - ret_mean) ** 2, 0.0).sum() / n
    var_err = torch.where(mask, (err - err_mean) ** 2, 0.0).sum() / n
    ev = torch.where(var_ret > 0, 1 - var_err / var_ret, torch.nan)
    acted = steps_per_row > 0
    steps_mean = _masked_mean(steps_per_row.to(adv.dtype), acted)
    vals = torch.stack([_masked_mean(adv, mask), ret_mean, _masked_mean(v, mask), ev, steps_mean]).tolist()
    names = ["value/advantages_mean", "value/returns_mean", "value/values_mean", "value/explained_variance",
             "trajectory/train_steps_mean"]
    return dict(zip(names, vals))


def step_gae(
    values: Tensor,
    rewards: Tensor,
    train_step: Tensor,
    action_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> Advantages:
    """Step-level GAE over each row's own steps -> Advantages with returns.

    Per row, its distinct action steps t_1 < ... < t_T; "t+1" is the row's next step; quantities at T+1 are 0.
      r*_t, V*_t = means of r_j, V_j over tau_t
      delta_t = r*_t - V*_t + gamma V*_{t+1};        A*_t = delta_t + gamma lam A*_{t+1}
      A_j = (r_j - V_j) + gamma V*_{t+1} + gamma lam A*_{t+1}
      R*_t = r*_t + gamma R*_{t+1};                  R_j = r_j + gamma R*_{t+1}
    With gamma = lam = 1 and only an outcome R on the last step, A_j = R - V_j and R_j = R.
    Vectorised over rows; the loop runs over step ranks only.
    """
    dtype = _float_dtype(values, rewards)
    m = action_mask  # [N, L]
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = torch.where(m, values.detach().to(dtype), zero)  # [N, L]; NaN at padding must not reach the sums
    r = torch.where(m, rewards.detach().to(dtype), zero)  # [N, L]
    n = m.shape[0]
    rows = torch.arange(n, device=m.device)[:, None].expand(m.shape)
    _, inv, rank_u, _, _ = _dense_rank(train_step, m, rows)
    rank = torch.where(m, rank_u[inv], 0)  # [N, L] rank k of the token's step within its row
    steps_per_row = torch.where(m, rank + 1, 0).amax(-1) if m.shape[1] else torch.zeros(n, dtype=torch.long)
    num_t = int(steps_per_row.max()) if n else 0  # device sync: the loop length
    count = torch.zeros(n, num_t + 1, dtype=dtype, device=m.device).scatter_add(1, rank, m.to(dtype))
    r_star = torch.zeros_like(count).scatter_add(1, rank, r) / count.clamp(min=1)  # [N, T+1], col T = 0
    v_star = torch.zeros_like(count).scatter_add(1, rank, v) / count.clamp(min=1)  # [N, T+1]
    a_star = torch.zeros_like(count)  # [N, T+1]; ranks past a row's last step stay 0 (all inputs there are 0)
    ret_star = torch.zeros_like(count)  # [N, T+1]
    for k in range(num_t - 1, -1, -1):
        delta = r_star[:, k] - v_star[:, k] + gamma * v_star[:, k + 1]  # [N]
        a_star[:, k] = delta + gamma * lam * a_star[:, k + 1]
        ret_star[:, k] = r_star[:, k] + gamma * ret_star[:, k + 1]
    nxt = (rank + 1).clamp(max=num_t)  # [N, L] rank of the row's next step (the clamp: rows with no token at all)
    adv = r - v + gamma * v_star.gather(1, nxt) + gamma * lam * a_star.gather(1, nxt)
    ret = r + gamma * ret_star.gather(1, nxt)
    adv, ret = torch.where(m, adv, zero), torch.where(m, ret, zero)
    return Advantages(adv, ret, m.clone(), _gae_metrics(adv, ret, v, m, steps_per_row))


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
           all_reduce: AllReduce = no_reduce) -> Tensor:
    """Masked normalisation: (x - mean) / sqrt(var + eps) over mask (unbiased var, over every rank); + mean back if
    not shift_mean. 0 outside mask. Fewer than two masked entries: var = 0.
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    x = torch.where(mask, values, zero)
    mean, var, _ = masked_mean_var(x, mask, all_reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, zero)
