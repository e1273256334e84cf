"""The finish every benchmark figure shares: one title per panel, a common x label, grid, legend, saved to a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def finish_figure(fig: Any, axes: Sequence[Any], titles: Sequence[str], xlabel: str, suptitle: str,
                  path: Path) -> None:
    """Label the panels (legend on the first), title the figure and save it at 120 dpi."""
    for ax, title in zip(axes, titles):
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
