"""Prompt rows for RL: a seeded, resumable sampler over a dataset of rows (dicts with a prompt + other columns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class PromptSampler:
    """Walks a fresh seeded permutation each epoch; (epoch, cursor) is the whole state, so a resumed run
    continues with exactly the prompts the uninterrupted run would have drawn."""

    num_rows: int
    seed: int = 0
    epoch: int = 0
    cursor: int = 0

    def _order(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_rows, generator=gen)

    def next(self, k: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < k:
            order = self._order()
            take = min(k - len(picked), self.num_rows - self.cursor)
            picked += order[self.cursor:self.cursor + take].tolist()
            self.cursor += take
            if self.cursor >= self.num_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def columns_of(rows: Sequence[dict[str, Any]], exclude: tuple[str, ...] = ("prompt",)) -> dict[str, list[Any]]:
    """Row dicts -> {column: [values]} for every column but `exclude` (what reward functions get as kwargs)."""
    names = [k for k in rows[0] if k not in exclude] if rows else []
    return {k: [r.get(k) for r in rows] for k in names}
