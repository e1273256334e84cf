"""What data parallelism changes in the math: statistics that the single-process trainer takes over its batch are
taken over the union of every rank's batch, so N ranks with 1/N of the completions each compute the same update
as one process with all of them. Pure functions of (backend, tensors); with one process every one of them is the
identity of its single-process counterpart.

Groups never straddle ranks (a rank generates whole groups), so group statistics stay local. Global:
  loss weights    losses.token_weights divides by a count (tokens, sequences, (sequence, step) groups): the
                  count is summed over ranks; each rank's loss is then its share of the global loss
  batch std       scale_rewards=batch divides by the std of all rewards
  whitening       GAE advantages are whitened with the mean / variance over all ranks' tokens
  metrics         means over ranks (equal completions per rank), sums for counts, the slowest rank's times
"""

from __future__ import annotations

from typing import Any

import torch


SUMMED_METRICS = ("trajectory/rows_kept", "perf/rollout_tokens_per_second")
SLOWEST_METRICS = ("perf/rollout_seconds", "perf/train_seconds", "perf/step_seconds")
BATCH_STD_EPS = 1e-4  # credit.grpo_advantages' eps


def _scored_rewards(backend: Any, rewards: torch.Tensor) -> torch.Tensor:
    """Every rank's finite rewards (NaN = unscored), rank order."""
    every = torch.cat(backend.all_gather_object(rewards))
    return every[torch.isfinite(every)]


def reward_stats(backend: Any, rewards: torch.Tensor) -> dict[str, float]:
    finite = _scored_rewards(backend, rewards)
    return {"reward": finite.mean().item() if finite.numel() else float("nan"),
            "reward_std": finite.std().item() if finite.numel() > 1 else 0.0}


def global_std(backend: Any, rewards: torch.Tensor) -> float:
    """Unbiased std of every rank's scored rewards (0 with fewer than two)."""
    finite = _scored_rewards(backend, rewards)
    return finite.std().item() if finite.numel() > 1 else 0.0


def whiten(backend: Any, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """credit.whiten with the mean and unbiased variance over every rank's masked entries; 0 outside mask."""
    total = backend.all_reduce(torch.stack([torch.where(mask, x, 0.0).sum().double(), mask.sum().double()]))
    n = total[1]
    mean = total[0] / n.clamp(min=1)
    sq = backend.all_reduce(torch.where(mask, (x.double() - mean) ** 2, 0.0).sum())
    out = (x.double() - mean) * torch.rsqrt(sq / (n - 1).clamp(min=1) + eps)
    return torch.where(mask, out.to(x.dtype), torch.zeros((), dtype=x.dtype))


def normaliser_count(mask: torch.Tensor, agg: str, step: torch.Tensor, num_sequences: int) -> int:
    """What losses.token_weights divides by on this rank, in token space (mask, step [N, L]): tokens (token-mean),
    sequences with tokens (sequence-mean), (sequence, step) groups (step-mean), sequences (sequence-sum /
    constant = L x #sequences)."""
    if agg == "token-mean":
        return int(mask.sum())
    if agg == "sequence-mean":
        return int(mask.any(1).sum())
    if agg == "step-mean":
        rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
        return int(torch.unique(torch.stack([rows, step[mask]]), dim=1).shape[1])
    return num_sequences


def global_weights(backend: Any, weights: torch.Tensor, mask: torch.Tensor, agg: str, step: torch.Tensor,
                   num_sequences: int) -> torch.Tensor:
    """Rescale this rank's token weights [N, L] from its own normaliser to the global one (every mode's weight is
    1 / count x a rank-local factor, so the rescale is local count / global count)."""
    local = torch.tensor(float(normaliser_count(mask, agg, step, num_sequences)), dtype=torch.float64)
    return weights * (local / backend.all_reduce(local).clamp(min=1)).to(weights.dtype)


def pad_to_largest(backend: Any, slices: list[slice]) -> list[tuple[slice, bool]]:
    """(slice, is_padding): `slices` plus repeats of the last one up to the largest count over ranks."""
    count = len(slices)
    if backend.world_size > 1:
        count = int(backend.all_reduce(torch.tensor(count), op="max"))
    return [(sl, False) for sl in slices] + [(slices[-1], True)] * (count - len(slices))


def sum_over_ranks(backend: Any, sums: dict[str, float]) -> dict[str, float]:
    if backend.world_size == 1:
        return sums
    every = backend.all_gather_object(sums)
    return {k: sum(s.get(k, 0.0) for s in every) for k in dict.fromkeys(k for s in every for k in s)}


def across_ranks(backend: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Per-rank step metrics -> the job's."""
    if backend.world_size == 1:
        return metrics
    every = backend.all_gather_object(metrics)
    out = {}
    for key in metrics:
        values = [float(m[key]) for m in every]
        out[key] = (sum(values) if key in SUMMED_METRICS else max(values) if key in SLOWEST_METRICS
                    else sum(values) / len(values))
    return out
