"""Rollout + scoring, the one path training and evaluation share: prompts -> G completions each -> rewards.

    batch = sample_and_score(model, rows, rollout_config, reward_fn, num_generations=G, seeds=...)
    batch.traj, batch.completions, batch.rewards [N], batch.process [N, T] | None, batch.metrics

Completion g of row i samples from its own seed (`seeds[i][g]`), so what a prompt gets depends on the policy and
that seed only: not on the batch, the rank or the evaluation batch size. A reward function is a RewardSet
(reward_models) or any TRL-signature callable; both may return process rewards (reward_models.ProcessReward).
It is called as TRL 1.16's GRPOTrainer calls its rewards (reward_models/protocol.py): completions as messages for
conversational prompts, completion_ids, a TrainerState as trainer_state, log_metric / log_extra, plus trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tracerl.credit import process_table
from tracerl.data import columns_of
from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM
from tracerl.models.prompting import format_prompt
from tracerl.rollout import RolloutConfig, Trajectory, generate
from tracerl.rollout.display import completions as decode_completions


@dataclass
class ScoredBatch:
    traj: Trajectory  # N = rows x G completions, rows in order, G consecutive completions per row
    prompts: list[Any]  # [N] each completion's prompt, as the dataset holds it
    completions: list[str]  # [N] decoded completion texts
    columns: dict[str, list[Any]]  # the rows' other columns, one value per completion (the rewards' kwargs)
    rewards: Tensor  # [N] float32 total reward; NaN = no reward function applied
    per_function: dict[str, list[float]]  # each reward function's values (NaN where it returned None)
    metrics: dict[str, float] = field(default_factory=dict)  # rewards/<name>/mean, reward_errors/<name>, ...
    process: Tensor | None = None  # [N, T] float32 per-step process rewards (NaN = none), or None
    extra: dict[str, list[Any]] = field(default_factory=dict)  # the rewards' log_extra columns (TRL's table columns)


def sample_and_score(
    model: DiffusionLM,
    rows: Sequence[dict[str, Any]],
    rollout: RolloutConfig,
    reward_fn: Callable[..., Any],
    num_generations: int,
    seeds: Sequence[Sequence[int]],
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    group_offset: int = 0,
    trainer_state: Any = None,
) -> ScoredBatch:
    """Generate `num_generations` completions for each row (seeds [rows][G]) and score them.

    group_offset numbers this batch's groups after other ranks' (group ids must not collide when gathered).
    trainer_state: a TrainerState, or {"step", "epoch", "max_steps"}, or None outside training (global_step -1);
    the rewards get it as a TrainerState (reward_models.protocol.trainer_state).
    """
    G, tok = num_generations, model.tokenizer
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    ids = [tok(format_prompt(tok, p, use_chat_template, system_prompt), add_special_tokens=False)["input_ids"]
           for p in prompts]
    group_id = torch.arange(len(rows)).repeat_interleave(G) + group_offset
    traj = generate(model, ids, rollout, group_id=group_id, row_seeds=[s for row in seeds for s in row])
    texts = decode_completions(traj, tok)
    columns = {k: [v for v in vals for _ in range(G)] for k, vals in columns_of(rows).items()}
    result, log = _call_rewards(reward_fn, prompts, texts, traj, trainer_state, columns)
    rewards, per_function, metrics, steps, tokens = _read_rewards(result)
    metrics.update(log.metrics())
    process = None if steps is None and tokens is None else process_table(steps, tokens, traj.unmask_step,
                                                                          traj.action_mask)
    if process is not None:
        given = process[torch.isfinite(process)]
        metrics["rewards/process/mean"] = given.mean().item()
        metrics["rewards/process/steps_per_sequence"] = given.numel() / max(len(texts), 1)
    return ScoredBatch(traj, prompts, texts, columns, rewards, per_function, metrics, process, log.extras())


def completion_ids(traj: Trajectory) -> list[list[int]]:
    """[N] each completion's token ids as TRL passes them: cut after the first EOS, the EOS kept (TRL's
    completion_mask, `position <= first EOS`); a completion without an EOS keeps all its L tokens."""
    keep = traj.completion_mask()
    return [row[m].tolist() for row, m in zip(traj.response_ids.cpu(), keep.cpu())]


def _call_rewards(reward_fn: Callable[..., Any], prompts: list, texts: list[str], traj: Trajectory,
                  trainer_state: Any, columns: dict[str, list]) -> tuple[Any, Any]:
    """Call the rewards as TRL does, by keyword, with TRL's arguments (reward_models/protocol.py); returns (their
    result, the RewardLog their log_metric / log_extra wrote to). A RewardSet gives each of its calls private
    copies of the arguments; any other callable gets them here, so no reward can edit the batch in place."""
    from reward_models.combine import RewardSet, private_copies
    from reward_models.protocol import RewardLog, as_trainer_state, trl_completions

    log = RewardLog()
    kwargs = {"prompts": prompts, "completions": trl_completions(prompts, texts), "trajectory": traj,
              "trainer_state": as_trainer_state(trainer_state), "completion_ids": completion_ids(traj),
              "log_metric": log.log_metric, "log_extra": log.log_extra}
    clash = sorted(set(kwargs) & set(columns))
    if clash:  # the data check refuses such datasets before the run; never let a column shadow an argument
        raise UserError(f"dataset column(s) {clash} have the names of reward arguments the trainer passes")
    kwargs.update(columns)
    if not isinstance(reward_fn, RewardSet):
        kwargs = private_copies(kwargs)
    return reward_fn(**kwargs), log


def check_prompts(model: DiffusionLM, rows: Sequence[dict[str, Any]], max_completion_length: int,
                  use_chat_template: bool, system_prompt: str | None, what: str,
                  length_key: str = "rollout.max_completion_length") -> None:
    """Every row's prompt formats and fits the model with its completion, checked once before the first RL step:
    a bad row then stops the run at its start, naming the row, instead of at whichever step first draws it."""
    tok, texts = model.tokenizer, []
    for i, row in enumerate(rows):
        try:
            texts.append(format_prompt(tok, row["prompt"], use_chat_template, system_prompt))
        except UserError as exc:
            raise UserError(f"{what} row {i}: {exc}") from None
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    for i, n in enumerate(lengths):
        if n == 0 and model.spec.logit_shift:
            raise UserError(f"{what} row {i}: the prompt is empty once formatted; this model ({model.family!r}) "
                            "predicts each token from the output before it, so it needs at least one prompt token")
        if n + max_completion_length > model.max_length:
            raise UserError(f"{what} row {i}: prompt of {n} tokens + {length_key} "
                            f"{max_completion_length} exceeds the model's maximum length {model.max_length} "
                            "(max_position_embeddings); shorten or drop the row")


def _read_rewards(result: Any) -> tuple[Tensor, dict[str, list[float]], dict[str, float], Tensor | None,
                                        Tensor | None]:
    """(total [N], per function, metrics, step rewards, token rewards) of a RewardSet result or a plain list."""
    from reward_models.protocol import split_reward

    if hasattr(result, "total"):  # a reward_models.RewardSet result
        per = torch.as_tensor(result.per_function)
        per_function = {name: per[:, j].tolist() for j, name in enumerate(result.names)}
        return (torch.as_tensor(result.total, dtype=torch.float32), per_function, dict(result.metrics),
                result.step_rewards, result.token_rewards)
    parts = [split_reward(v) for v in result]  # a bare TRL-style function
    totals = torch.tensor([float("nan") if o is None else float(o) for o, _, _ in parts], dtype=torch.float32)
    return totals, {"reward": totals.tolist()}, {}, nan_table([p[1] for p in parts]), nan_table([p[2] for p in parts])


def nan_table(rows: list[list | None]) -> Tensor | None:
    """Ragged lists of floats / None -> [N, width] float32 with NaN for None and missing entries (None: no rows)."""
    width = max((len(r) for r in rows if r is not None), default=0)
    if not width:
        return None
    out = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        for j, v in enumerate(r or []):
            if v is not None:
                out[i, j] = v
    return out
