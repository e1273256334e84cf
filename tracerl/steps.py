"""Denoising-step ranks, the one bookkeeping the trajectory, credit assignment and the replay share.

A row's steps are its own forwards (0 = its first); a position's step rank is the rank of its step among the
distinct steps of its segment (a row, or a (row, block) pair): step shrinkage, step-level GAE, the packed replay's
rounds and the per-row step count are all ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_rank(steps: Tensor, mask: Tensor, segment: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rank the distinct masked steps inside each segment (vectorised: one sort over composite keys).

    steps, mask, segment: [N, L]; segment >= 0 is the bucket whose steps are ranked together (a row, or a
    (row, block) pair). Returns (uniq [U] sorted keys, inv [N, L] index into uniq, rank [U] rank of each key in
    its segment, start [U] index of the segment's first key, span scalar) with key = segment * span + step.
    Unmasked positions all share one sentinel key past every real one; their entries are meaningless.
    """
    steps = steps.long()
    if bool((mask & (steps < 0)).any()):  # a negative step would fall into the previous segment's keys
        raise ValueError("action positions must have non-negative steps")
    span = torch.where(mask, steps, torch.zeros_like(steps)).amax() + 1  # scalar, > every masked step
    sentinel = (segment.amax() + 1) * span
    key = torch.where(mask, segment * span + steps, sentinel)  # [N, L]
    uniq, inv = torch.unique(key.flatten(), sorted=True, return_inverse=True)  # [U], [N*L]
    seg = uniq // span  # [U]
    pos = torch.arange(uniq.numel(), device=uniq.device)  # [U]
    is_start = torch.ones_like(seg, dtype=torch.bool)
    is_start[1:] = seg[1:] != seg[:-1]
    # index of the segment's first key, carried forward: cummax of (pos where a segment starts, else 0)
    start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(0).values  # [U]
    return uniq, inv.view(steps.shape), pos - start, start, span


def step_rank(steps: Tensor, mask: Tensor, segment: Tensor | None = None) -> Tensor:
    """[N, L] dense rank of each masked position's step among the distinct steps of its segment; -1 elsewhere.

    segment [N, L] (default: the row) groups positions whose steps are ranked together, e.g. (row, block) pairs.
    Example: steps [3, 3, 5, 9] in one segment -> ranks [0, 0, 1, 2].
    """
    if segment is None:
        segment = torch.arange(steps.shape[0], device=steps.device)[:, None].expand(steps.shape)
    _, inv, rank, _, _ = dense_rank(steps, mask, segment)
    return torch.where(mask, rank[inv], torch.full_like(inv, -1))


def distinct_steps(steps: Tensor, mask: Tensor) -> Tensor:
    """[N] number of distinct steps among each row's masked positions (0 for a row with none)."""
    rank = step_rank(steps, mask)
    return (rank.amax(-1) + 1).clamp(min=0) if rank.numel() else torch.zeros(steps.shape[0], dtype=torch.long)
