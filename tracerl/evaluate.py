"""Evaluation: generate on held-out prompts, score with the recipe's rewards, summarise, keep every trajectory."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from tracerl.config import RLConfig
from tracerl.data import columns_of
from tracerl.models.base import DiffusionLM
from tracerl.rollout import generate
from tracerl.rollout.config import derive_seed
from tracerl.rollout.display import completions


EVAL_STREAM = 0xE7A1  # keeps evaluation seeds apart from the training rollouts' (seed, step, prompt, g)


def evaluate(
    model: DiffusionLM, rows: Sequence[dict[str, Any]], reward_fn: Callable[..., Any], config: RLConfig,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Returns (summary metrics, one record per completion). accuracy = share of samples whose total reward
    reaches eval.success_threshold."""
    from tracerl.models.prompting import format_prompt

    ev, m = config.eval, config.model
    tok = model.tokenizer
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for first in range(0, len(rows), ev.batch_size):
        batch = [r for r in rows[first:first + ev.batch_size] for _ in range(ev.num_generations)]
        ids = [tok(format_prompt(tok, r["prompt"], m.use_chat_template, m.system_prompt),
                   add_special_tokens=False)["input_ids"] for r in batch]
        # sample g of row i draws from its own seed: the scores cannot depend on eval.batch_size
        seeds = [derive_seed(config.trainer.seed, EVAL_STREAM, first + i // ev.num_generations, i % ev.num_generations)
                 for i in range(len(batch))]
        traj = generate(model, ids, replace(config.rollout, temperature=ev.temperature), row_seeds=seeds)
        texts = completions(traj, tok)
        result = reward_fn([r["prompt"] for r in batch], texts, trajectory=traj,
                           trainer_state={"step": -1, "epoch": 0}, **columns_of(batch))
        totals, per_fn = _scores(result, len(batch))
        steps = traj.steps_per_sequence()
        for i, row in enumerate(batch):
            records.append({
                "index": first + i // ev.num_generations, "prompt": row["prompt"], "completion": texts[i],
                "reward": totals[i], "rewards": {k: v[i] for k, v in per_fn.items()},
                "steps": int(steps[i]), "response_ids": traj.response_ids[i].tolist(),
                "unmask_step": traj.unmask_step[i].tolist(),
            })
        if progress:
            print(f"[eval] {len(records)}/{len(rows) * ev.num_generations} samples", flush=True)
    return _summary(records, ev.success_threshold, time.perf_counter() - start), records


def _scores(result: Any, n: int) -> tuple[list[float], dict[str, list[float]]]:
    if hasattr(result, "total"):
        totals = [float(x) for x in torch.as_tensor(result.total).tolist()]
        per = torch.as_tensor(result.per_function)
        return totals, {name: per[:, j].tolist() for j, name in enumerate(result.names)}
    totals = [float("nan") if v is None else float(v) for v in result]
    return totals, {"reward": totals}


def _summary(records: list[dict[str, Any]], threshold: float, seconds: float) -> dict[str, float]:
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
