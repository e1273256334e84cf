"""Pictures of a trajectory: which position was unmasked at which step, with the token written in each cell."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tracerl.rollout.trajectory import Trajectory


def plot_unmask_order(traj: Trajectory, tokenizer: PreTrainedTokenizerBase, path: str | Path, row: int = 0,
                      title: str | None = None) -> Path:
    """A step x position heatmap of one row: cell (t, j) is filled from the step position j was committed at
    onward, darker = committed earlier, with the committed token printed where it first appears."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    steps = traj.unmask_step[row]  # [L]
    keep = traj.completion_mask()[row]  # hide EOS padding after the first EOS
    L = int(keep.sum())
    used = sorted(set(steps[:L].tolist()))
    rank = {s: i for i, s in enumerate(used)}  # global step ids -> 0..T-1 for this row
    T = len(used)
    grid = torch.full((T, L), float("nan"))
    for j in range(L):
        grid[rank[int(steps[j])]:, j] = rank[int(steps[j])]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * L), max(3, 0.35 * T)))
    ax.imshow(grid.numpy(), aspect="auto", cmap="viridis_r", interpolation="nearest")
    for j in range(L):
        token = tokenizer.decode([int(traj.response_ids[row, j])])
        r = rank[int(steps[j])]
        ax.text(j, r, token.replace("\n", "\\n"), ha="center", va="center", fontsize=9,
                color="black" if r < T / 2 else "white")  # early cells are light in viridis_r
    ax.set_xlabel("response position")
    ax.set_ylabel("denoising step")
    ax.set_title(title or f"unmask order ({T} steps, {L} tokens)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
