"""The one module that knows about process groups. The trainer talks to a `Backend`; a single process uses
`LocalBackend`, the deepspeed launcher a DeepSpeed-backed one (same methods)."""

from __future__ import annotations

from typing import Any

import torch


class LocalBackend:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass
