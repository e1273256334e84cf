"""Evaluation: generate on held-out prompts, score with the recipe's rewards, summarise, keep every trajectory."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from tracerl.config import RLConfig
from tracerl.models.base import DiffusionLM
from tracerl.rollout.config import derive_seed
from tracerl.scoring import sample_and_score


EVAL_STREAM = 0xE7A1  # keeps evaluation seeds apart from the training rollouts' (seed, step, prompt, g)


def evaluate(
    model: DiffusionLM, rows: Sequence[dict[str, Any]], reward_fn: Callable[..., Any], config: RLConfig,
    progress: bool = False, trainer_state: Any = None, shard: tuple[int, int] = (0, 1),
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Returns (summary metrics, one record per completion). accuracy = share of samples whose total reward
    reaches eval.success_threshold. trainer_state: what the rewards get as trainer_state during training (the
    current step, as TRL passes its live state); None outside training (global_step -1). shard = (rank, ranks):
    only rows rank, rank + ranks, ... (data-parallel eval); each keeps its global index and seeds, so the ranks'
    records together are the one-process records."""
    ev, m = config.eval, config.model
    rollout = replace(config.rollout, temperature=ev.temperature)
    rank, ranks = shard
    mine = list(range(rank, len(rows), ranks))  # global row indices
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for first in range(0, len(mine), ev.batch_size):
        index = mine[first:first + ev.batch_size]
        # sample g of row i draws from its own seed: the scores cannot depend on eval.batch_size or the shard
        seeds = [[derive_seed(config.trainer.seed, EVAL_STREAM, i, g) for g in range(ev.num_generations)]
                 for i in index]
        scored = sample_and_score(model, [rows[i] for i in index], rollout, reward_fn, ev.num_generations, seeds,
                                  m.use_chat_template, m.system_prompt, trainer_state=trainer_state)
        traj, steps = scored.traj, scored.traj.steps_per_sequence()
        for i, prompt in enumerate(scored.prompts):
            records.append({
                "index": index[i // ev.num_generations], "prompt": prompt, "completion": scored.completions[i],
                "reward": float(scored.rewards[i]), "rewards": {k: v[i] for k, v in scored.per_function.items()},
                "steps": int(steps[i]), "response_ids": traj.response_ids[i].tolist(),
                "unmask_step": traj.unmask_step[i].tolist(),
            })
        if progress:
            print(f"[eval] {len(records)}/{len(mine) * ev.num_generations} samples", flush=True)
    return summarize(records, ev.success_threshold, time.perf_counter() - start), records


def summarize(records: list[dict[str, Any]], threshold: float, seconds: float) -> dict[str, float]:
    rewards = torch.tensor([r["reward"] for r in records], dtype=torch.float64)
    finite = rewards[torch.isfinite(rewards)]
    out = {
        "samples": float(len(records)),
        "reward": finite.mean().item() if finite.numel() else float("nan"),
        "accuracy": (finite >= threshold - 1e-9).double().sum().item() / max(len(records), 1),
        "mean_steps": sum(r["steps"] for r in records) / max(len(records), 1),
        "seconds": seconds,
    }
    for name in records[0]["rewards"] if records else []:
        vals = torch.tensor([r["rewards"][name] for r in records], dtype=torch.float64)
        vals = vals[torch.isfinite(vals)]
        out[f"rewards/{name}/mean"] = vals.mean().item() if vals.numel() else float("nan")
    return out
