"""Policy / value losses and their aggregation (pure functions over per-token tensors, no model).

Every loss is sum_j w_j * l_j with token weights w [R, L] computed ONCE over the whole batch (`token_weights`):
a batch split into micro-batches (gradient accumulation) then sums to exactly the full-batch loss, whatever the
aggregation mode. Inputs at masked-out positions are replaced by 0 before any arithmetic, so a NaN or inf there
(padding logits, -inf log-probs) can reach neither the loss nor the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from tracerl.choices import Aggregation, KLKind

Agg = Aggregation


@dataclass
class LossOutput:
    loss: Tensor  # [] differentiable scalar
    metrics: dict[str, float] = field(default_factory=dict)  # masked means over this call's tokens


# ---- aggregation ---------------------------------------------------------------------------------------------


def _group_sizes(key: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """For integer keys [R, L]: (size of each position's key group [R, L], number of groups []) over `valid`."""
    sentinel = key.amax() + 1 if key.numel() else key.new_zeros(())
    key = torch.where(valid, key, sentinel)  # invalid positions share one extra group, subtracted below
    uniq, inv, counts = torch.unique(key.flatten(), return_inverse=True, return_counts=True)
    num_groups = uniq.numel() - int((~valid).any())
    return counts[inv].view(key.shape), torch.tensor(num_groups, device=key.device)


def token_weights(
    mask: Tensor,
    agg: Agg = "token-mean",
    step_ids: Tensor | None = None,
    seq_ids: Tensor | None = None,
    constant: float | None = None,
    dtype: torch.dtype = torch.float32,
    microbatch: Tensor | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Token weights w [R, L] over the WHOLE batch (every micro-batch and, through `all_reduce`, every rank);
    loss = sum_j w_j l_j. Zero outside mask.

    mask [R, L] bool; step_ids [R, L] int64 (-1 where nothing scored; needed for step-mean and state-sum); seq_ids [R] int64
    (sequence of each row: one sequence's tokens may spread over several rows; None = arange(R)); microbatch [R]
    the micro-batch of each row (the microbatch modes); all_reduce sums a count over the data-parallel ranks
    (None: one process). Counts are global, so each rank's loss is its share of the global loss:
      token-mean:     w = 1 / #tokens
      step-mean:      w = 1 / (#groups * |group|), group = (sequence, step), possibly spanning rows
      sequence-mean:  w = 1 / (#sequences * #tokens of the sequence)   (sequences with tokens)
      sequence-sum:   w = 1 / constant, constant = L * #sequences by default (Dr. GRPO); "constant" is an alias.
      state-sum:      w = 1 / (L * #states), state = (sequence, step_ids) with a token in mask: pass the training
                      state (replay row) that scores each token as step_ids (dLLM-RL's rl_sdar.py: every training
                      row's sum over the response length L, then the mean over the rows)
      microbatch-token-mean:  w = 1 / (max(#tokens of the row's micro-batch, 1) * #micro-batches)   (d1, coupled:
                      each micro-batch's loss is sum(m l) / sum(m), and gradient accumulation and data parallelism
                      average the micro-batches)
      microbatch-sum: w = 1 / #micro-batches   (wd1: each micro-batch's loss is a plain sum)
    """
    rows, length = mask.shape
    dev = mask.device

    def total(count: Tensor | int) -> Tensor:  # a count summed over every rank, float64
        count = torch.as_tensor(count, dtype=torch.float64, device=dev)
        return count if all_reduce is None else all_reduce(count)

    if seq_ids is None:
        seq_ids = torch.arange(rows, device=dev)
    _, seq = torch.unique(seq_ids, return_inverse=True)  # [R] dense sequence index
    seq_tok = seq[:, None].expand(rows, length)  # [R, L]
    if agg == "token-mean":
        w = 1.0 / total(mask.sum()).clamp(min=1)
        valid = mask
    elif agg == "sequence-mean":
        size, n = _group_sizes(seq_tok, mask)
        w, valid = 1.0 / (total(n) * size).clamp(min=1), mask
    elif agg == "step-mean":
        if step_ids is None:
            raise ValueError("agg='step-mean' needs step_ids")
        valid = mask & (step_ids >= 0)
        step = torch.where(valid, step_ids, 0)
        top = step.amax() + 1 if step.numel() else 1  # no rows at all (an empty mini-batch): nothing to weigh
        size, n = _group_sizes(seq_tok * top + step, valid)  # key = (sequence, step)
        w = 1.0 / (total(n) * size).clamp(min=1)
    elif agg == "state-sum":
        if step_ids is None:
            raise ValueError("agg='state-sum' needs step_ids (the state scoring each token)")
        valid = mask & (step_ids >= 0)
        top = step_ids.amax() + 1 if step_ids.numel() else 1
        _, n = _group_sizes(seq_tok * top + torch.where(valid, step_ids, 0), valid)  # key = (sequence, state)
        w = 1.0 / (length * total(n)).clamp(min=1)
    elif agg in ("microbatch-token-mean", "microbatch-sum"):
        if microbatch is None:
            raise ValueError(f"agg={agg!r} needs microbatch")
        mb = microbatch.to(dev)[:, None].expand(rows, length)  # [R, L]
        num_mb = total(torch.unique(microbatch).numel())
        if agg == "microbatch-sum":
            w = 1.0 / num_mb
        else:
            count = torch.zeros(int(mb.max()) + 1 if rows else 0, dtype=torch.float64, device=dev)
            count = count.index_add(0, mb[mask], torch.ones(int(mask.sum()), dtype=torch.float64, device=dev))
            w = 1.0 / (count.clamp(min=1)[mb] * num_mb)
        valid = mask
    elif agg in ("sequence-sum", "constant"):
        # an explicit constant is the global normaliser as given; by default L x every rank's sequences
        c = torch.tensor(float(constant), dtype=torch.float64) if constant is not None else (
            length * total(int(seq.amax() + 1) if rows else 0)).clamp(min=1)  # no sequence anywhere: no weight
        if c <= 0:
            raise ValueError(f"aggregation constant must be > 0, got {float(c)}")
        w, valid = 1.0 / c, mask
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}")
    w = torch.as_tensor(w).expand(rows, length)
    return torch.where(valid, w, torch.zeros((), dtype=w.dtype, device=w.device)).to(dtype)


def aggregate(per_token: Tensor, weights: Tensor) -> Tensor:
    """sum_j w_j l_j; positions with w_j = 0 are skipped even when l_j is NaN/inf (where, not 0 * NaN = NaN)."""
    w = weights.to(per_token.dtype)
    return torch.where(w != 0, w * per_token, torch.zeros((), dtype=per_token.dtype, device=w.device)).sum()


def _masked_metrics(
    named: dict[str, Tensor], mask: Tensor, scalars: dict[str, Tensor] | None = None
) -> dict[str, float]:
    """Masked means of detached per-token tensors (+ ready scalars), read back with a single device sync."""
    scalars = scalars or {}
    if not named and not scalars:
        return {}
    n = mask.sum().clamp(min=1)
    vals = [torch.where(mask, t.detach(), 0.0).sum() / n for t in named.values()] + list(scalars.values())
    return dict(zip([*named, *scalars], torch.stack([v.detach().double() for v in vals]).tolist()))


# ---- KL and entropy ------------------------------------------------------------------------------------------


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: KLKind = "k3", log_ratio_clamp: float = 20.0) -> Tensor:
    """Per-token KL(pi || ref) estimators (Schulman), d = logp - ref:
      k1 = d;   k2 = 0.5 d^2;   k3 = exp(-d) + d - 1 = exp(ref - logp) - (ref - logp) - 1 >= 0,
    with ref - logp clamped to +-log_ratio_clamp before exp. k3 uses expm1 so rounding never makes it negative.
    """
    d = logprob - ref_logprob
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        x = (-d).clamp(-log_ratio_clamp, log_ratio_clamp)
        return torch.expm1(x) - x
    raise ValueError(f"unknown KL estimator {kind!r}")


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy [...] float32 of softmax(logits [..., V]): H = logsumexp(z) - sum_v softmax(z)_v z_v.

    -inf logits (banned tokens) contribute 0 and no NaN gradient: they are zeroed before the product.
    chunk_size bounds how many positions are processed at once (peak memory ~ chunk_size x V floats).
    Every position needs at least one finite logit.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [P, V]
    step = chunk_size or max(flat.shape[0], 1)
    parts = []
    for i in range(0, flat.shape[0], step):
        z = flat[i : i + step].float()  # [C, V]
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [C, 1]
        p = torch.exp(z - lse)  # [C, V], exactly 0 where z = -inf
        z_safe = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
        parts.append(lse.squeeze(-1) - (p * z_safe).sum(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.view(logits.shape[:-1])


# ---- policy loss ---------------------------------------------------------------------------------------------


def _ppo_terms(
    lp: Tensor, old: Tensor, adv: Tensor, eps_low: float, eps_high: float, clamp: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip per-token loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(clamp(logp - old)).

    Clip counters follow TRL: low = rho < 1 - eps_low with A < 0, high = rho > 1 + eps_high with A > 0.
    """
    ratio = torch.exp((lp - old).clamp(-clamp, clamp))  # [R, L]
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    r, a = ratio.detach(), adv.detach()
    low = ((r < 1.0 - eps_low) & (a < 0)).to(r.dtype)
    high = ((r > 1.0 + eps_high) & (a > 0)).to(r.dtype)
    return loss, {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low + high}


def _ratio_metrics(lp: Tensor, old: Tensor, mask: Tensor, clamp: float) -> tuple[dict[str, Tensor], Tensor]:
    """Per-token ratio and approx-KL tensors for the masked means, and the masked max ratio []."""
    d = (lp - old).detach()
    ratio = torch.exp(d.clamp(-clamp, clamp))
    # masked max; 1.0 (not -inf) when there is no token, so the metric stays finite
    ratio_max = torch.where(mask, ratio, -torch.inf).amax() if ratio.numel() else ratio.new_ones(())
    ratio_max = torch.where(torch.isfinite(ratio_max), ratio_max, 1.0)
    return {"policy/ratio_mean": ratio, "policy/approx_kl": 0.5 * d * d}, ratio_max


def _regularisers(
    lp: Tensor,
    mask: Tensor,
    ref_logprob: Tensor | None,
    beta: float,
    kl_kind: KLKind,
    clamp: float,
    entropy: Tensor | None,
    entropy_coef: float,
    named: dict[str, Tensor],
) -> Tensor:
    """Per-token beta KL_j - entropy_coef H_j [R, L]; records `kl` / `entropy` in `named` whenever given."""
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    extra = torch.zeros_like(lp)
    if beta != 0.0 and ref_logprob is None:
        raise ValueError("beta != 0 needs ref_logprob")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if ref_logprob is not None:
        named["kl"] = kl_penalty(lp, torch.where(mask, ref_logprob.to(lp.dtype), zero), kl_kind, clamp)
        extra = extra + beta * named["kl"]
    if entropy is not None:
        named["entropy"] = torch.where(mask, entropy.to(lp.dtype), zero)
        extra = extra - entropy_coef * named["entropy"]
    return extra


def policy_loss(
    logprob: Tensor,
    old_logprob: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    kind: Literal["ppo", "reinforce"] = "ppo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    log_ratio_clamp: float = 20.0,
    *,
    weights: Tensor | None = None,
    agg: Agg = "token-mean",
    step_ids: Tensor | None = None,
    ref_logprob: Tensor | None = None,
    beta: float = 0.0,
    kl_kind: KLKind = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: Tensor | None = None,
) -> LossOutput:
    """loss = sum_j w_j [ l_j + beta KL_j - entropy_coef H_j ]   (all per-token tensors [R, L]).

    ppo:        l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A),  rho = exp(clamp(logp - old, +-clamp))
    reinforce:  l = -A logp   (old_logprob optional; only used for the ratio metrics)
    is_weights [R, L] (detached): multiply l before the regularisers are added, e.g. truncated importance
    sampling min(pi_old / pi_sampler, C) for a sampler that is not the trainer's model (Yao et al. 2025, verl's
    tis_imp_ratio_cap).
    weights: from token_weights over the whole batch (micro-batching); None = token_weights(mask, agg, step_ids)
    over this call. Metrics: clip_ratio (= clip_ratio/region_mean), clip_ratio/{low,high,region}_mean, kl,
    entropy, policy/ratio_mean, policy/ratio_max, policy/approx_kl = mean 0.5 (logp - old)^2.
    """
    zero = torch.zeros((), dtype=logprob.dtype, device=logprob.device)
    lp = torch.where(mask, logprob, zero)  # [R, L] masked inputs -> 0 before any arithmetic
    adv = torch.where(mask, advantages.to(lp.dtype), zero)
    old = None if old_logprob is None else torch.where(mask, old_logprob.to(lp.dtype), zero)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if kind == "ppo":
        if old is None:
            raise ValueError("kind='ppo' needs old_logprob")
        per_token, named = _ppo_terms(lp, old, adv, epsilon_low, eps_high, log_ratio_clamp)
    elif kind == "reinforce":
        # nothing is clipped; the counters are still reported so every run logs the same keys
        none = torch.zeros_like(adv)
        per_token, named = -adv * lp, {f"clip_ratio/{k}_mean": none for k in ("low", "high", "region")}
    else:
        raise ValueError(f"unknown policy loss {kind!r}")
    if is_weights is not None:
        per_token = per_token * torch.where(mask, is_weights.detach().to(lp.dtype), zero)
    per_token = per_token + _regularisers(lp, mask, ref_logprob, beta, kl_kind, log_ratio_clamp, entropy,
                                          entropy_coef, named)
    scalars = {}
    if old is not None:
        more, scalars["policy/ratio_max"] = _ratio_metrics(lp, old, mask, log_ratio_clamp)
        named.update(more)
    w = weights if weights is not None else token_weights(mask, agg, step_ids, dtype=lp.dtype)
    loss = aggregate(per_token, torch.where(mask, w.to(lp.dtype), zero))
    metrics = _masked_metrics(named, mask, scalars)
    if "clip_ratio/region_mean" in metrics:
        metrics["clip_ratio"] = metrics["clip_ratio/region_mean"]
    return LossOutput(loss, metrics)


# ---- value loss ----------------------------------------------------------------------------------------------


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = 0.2,
    *,
    weights: Tensor | None = None,
    agg: Agg = "token-mean",
    step_ids: Tensor | None = None,
) -> LossOutput:
    """Clipped value loss: l = 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = old + clamp(V - old, +-clip_range).

    clip_range None = unclipped 0.5 (V - R)^2. Metrics: value/loss (mean l), value/clipfrac (share of tokens
    where the clipped term is the larger), value/values_mean, value/returns_mean, value/mse (mean (V - R)^2).
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(mask, values, zero)  # [R, L]
    old = torch.where(mask, old_values.to(v.dtype), zero)
    ret = torch.where(mask, returns.to(v.dtype), zero)
    err = (v - ret) ** 2
    if clip_range is None:
        per_token, clipfrac = 0.5 * err, torch.zeros_like(err)
    else:
        v_clip = old + (v - old).clamp(-clip_range, clip_range)
        err_clip = (v_clip - ret) ** 2
        per_token = 0.5 * torch.maximum(err, err_clip)
        clipfrac = (err_clip > err).to(v.dtype)
    w = weights if weights is not None else token_weights(mask, agg, step_ids, dtype=v.dtype)
    loss = aggregate(per_token, torch.where(mask, w.to(v.dtype), zero))
    named = {"value/loss": per_token, "value/clipfrac": clipfrac, "value/values_mean": v,
             "value/returns_mean": ret, "value/mse": err}
    return LossOutput(loss, _masked_metrics(named, mask))
