"""Run tracking: metrics.jsonl always, Weights & Biases when asked, a one-line progress print on rank 0."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | Path,
        report_to: list[str] | None = None,
        config: dict[str, Any] | None = None,
        project: str | None = None,
        run_name: str | None = None,
        is_main: bool = True,
        logging_steps: int = 1,
        start_step: int = 0,
        resumed_elsewhere: bool = False,
    ):
        """start_step: the step the run starts from (a resumed run's checkpoint step; 0 = a fresh run);
        resumed_elsewhere: the checkpoint lies outside output_dir, so a metrics file there is another run's."""
        self.is_main = is_main
        self.logging_steps = max(1, logging_steps)
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a run resumed from another directory's checkpoint: this file is another run's
            self._adopt_existing(0 if resumed_elsewhere else start_step)
        if "wandb" in (report_to or []):
            import wandb

            self.wandb_run = wandb.init(
                project=project or os.environ.get("WANDB_PROJECT", "tracerl"),
                name=run_name,
                config=config or {},
                dir=str(Path(output_dir)),
            )

    def _adopt_existing(self, start_step: int) -> None:
        """metrics.jsonl is appended to. A fresh run moves an old file aside (metrics.prev-N.jsonl), so two runs never
        mix in one file; a resumed run keeps the rows up to its checkpoint and drops the later ones it will redo."""
        if start_step == 0:
            n = 1
            while (aside := self.path.with_name(f"metrics.prev-{n}.jsonl")).exists():
                n += 1
            self.path.rename(aside)
            print(f"[metrics] a new run: the previous {self.path.name} moved to {aside.name}", flush=True)
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if step % self.logging_steps == 0:
            keys = ("reward", "reward_std", "loss", "kl", "clip_ratio", "completions/mean_length", "perf/step_seconds")
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
            tqdm.write(f"[step {step}] {shown}", file=sys.stderr)  # keeps the progress bar intact

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.is_main and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
