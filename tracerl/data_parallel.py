"""What data parallelism changes in the math: statistics that the single-process trainer takes over its batch are
taken over the union of every rank's batch, so N ranks with 1/N of the completions each compute the same update
as one process with all of them. Pure functions of (backend, tensors); with one process every one of them is the
identity of its single-process counterpart.

Groups never straddle ranks (a rank generates whole groups), so group statistics stay local. The math itself
(losses.token_weights' counts, credit's batch std and whitening) takes an all-reduce hook and lives in losses.py
and credit.py; what is left here is bookkeeping around it:
  metrics         means over ranks (equal completions per rank), sums for counts (reward errors included), the
                  slowest rank's times, and each reward function's mean / std over the gathered values
  forwards        every rank runs the same number of forward chunks (ZeRO communicates inside them)
"""

from __future__ import annotations

from typing import Any

import torch

from tracerl.errors import UserError

SUMMED_METRICS = ("trajectory/rows_kept", "perf/rollout_tokens_per_second")
SUMMED_PREFIXES = ("reward_errors/",)  # a count of failed samples: the job's is the sum
SLOWEST_METRICS = ("perf/rollout_seconds", "perf/train_seconds", "perf/step_seconds")


def _scored_rewards(backend: Any, rewards: torch.Tensor) -> torch.Tensor:
    """Every rank's finite rewards (NaN = unscored), rank order."""
    every = torch.cat(backend.all_gather_object(rewards))
    return every[torch.isfinite(every)]


def reward_stats(backend: Any, rewards: torch.Tensor) -> dict[str, float]:
    finite = _scored_rewards(backend, rewards)
    return {"reward": finite.mean().item() if finite.numel() else float("nan"),
            "reward_std": finite.std().item() if finite.numel() > 1 else 0.0}


def per_function_stats(backend: Any, per_function: dict[str, list[float]]) -> dict[str, float]:
    """rewards/<name>/mean and /std over every rank's values of each reward function (NaN = it gave none), as one
    process with all the completions computes them (a mean of per-rank stds is not the std). {} on one process:
    the reward set's own metrics are already that."""
    if backend.world_size == 1:
        return {}
    out = {}
    for name in per_function:
        values = torch.tensor([v for part in backend.all_gather_object(per_function[name]) for v in part],
                              dtype=torch.float64)
        valid = values[torch.isfinite(values)]
        out[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else float("nan")
        out[f"rewards/{name}/std"] = (valid.std().item() if valid.numel() > 1 else 0.0) if valid.numel() else float("nan")
    return out


def pad_to_largest(backend: Any, slices: list[slice], filler: slice | None = None) -> list[tuple[slice, bool]]:
    """(slice, is_padding): `slices` plus repeats of the last one (of `filler` when there is none) up to the
    largest count over ranks."""
    count = int(backend.all_reduce(torch.tensor(len(slices)), op="max"))
    pad = slices[-1] if slices else filler
    return [(sl, False) for sl in slices] + [(pad, True)] * (count - len(slices))


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
    # the union of the ranks' keys: a reward's log_metric, or a reward that failed on one rank only, may give a
    # key on some ranks and not others (averaged over the ranks that have it)
    for key in sorted({k for m in every for k in m}, key=lambda k: (k not in metrics, k)):
        values = [float(m[key]) for m in every if key in m]
        summed = key in SUMMED_METRICS or key.startswith(SUMMED_PREFIXES)
        out[key] = sum(values) if summed else max(values) if key in SLOWEST_METRICS else sum(values) / len(values)
    return out


def stop_together(all_reduce: Any, failure: Exception | None, what: str) -> None:
    """Every rank calls this at the same point: the rank that failed raises its own error, the others a UserError
    saying `what` failed elsewhere (instead of waiting in their next collective). all_reduce: a sum over ranks."""
    failed = all_reduce(torch.tensor([float(failure is not None)], dtype=torch.float64)).item()
    if failure is not None:
        raise failure
    if failed:
        raise UserError(f"{what} failed on {failed:.0f} other rank(s), whose error is printed above; every rank "
                        "stops")
