"""The pieces of the PPO update that are not the trainer's state: the per-epoch tensors in token space, the
replay-to-sampler fidelity metrics, metric accumulation over forward chunks, and the learning-rate schedule.
(The update's control flow, `RLTrainer.update` / `_epoch`, reads top to bottom in trainer.py.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from tracerl.errors import UserError
from tracerl.replay import ReplayBatch


@dataclass
class UpdateState:
    """What the update epochs read, in token space [N, L] on the CPU (None where a path needs none)."""

    mask: torch.Tensor  # [N, L] bool, tokens in the loss
    advantages: torch.Tensor  # [N, L]
    weights: torch.Tensor  # [N, L] loss weights over the whole batch (losses.token_weights)
    returns: torch.Tensor | None = None  # [N, L] value targets
    old_values: torch.Tensor | None = None  # [N, L] values before the update
    old: list[torch.Tensor | None] | None = None  # per epoch [N, L]; None = from the first epoch's gradient pass
    ref: list[torch.Tensor] | None = None  # per epoch [N, L] reference scores
    behaviour: torch.Tensor | None = None  # [N, L] the sampler's log-probs, where the rows replay its states
    top1: torch.Tensor | None = None  # [N, L] the sampler's greedy choice at each committed position
    epoch: int = 0
    stepped: bool = False  # the policy has taken an optimizer step in this RL step (its scores moved)
    step_has_tokens: list[bool] | None = None  # per optimizer step of an epoch: any token to train on any rank

    pending: torch.Tensor | None = None  # [N, L] the first epoch's own scores, filled chunk by chunk

    def fill_old(self, seqs: torch.Tensor, scores: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
        """Record the first epoch's detached scores of these tokens as the old scores; returns the [N, L] table."""
        if self.pending is None:
            self.pending = torch.zeros_like(self.advantages, dtype=torch.float32)
        mask = touched.cpu()
        self.pending[seqs[:, None].expand_as(mask)[mask], mask.nonzero()[:, 1]] = scores.float().cpu()[mask]
        return self.pending

    def first_epoch_done(self) -> None:
        """Epochs that replay the first epoch's rows divide by the scores it recorded."""
        if self.pending is not None and self.old is not None:
            self.old = [self.pending if o is None else o for o in self.old]


def mean_over_rows(batch: ReplayBatch, per_row: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[r, T] per-row values -> [k, L] mean over the rows scoring each token (entropy of a coupled token)."""
    if batch.coef is None:
        return batch.to_tokens(per_row, num_sequences)[1]
    plain = ReplayBatch(**{**vars(batch), "coef": None})
    _, total, _ = plain.to_tokens(per_row, num_sequences)
    _, count, _ = plain.to_tokens(torch.ones_like(per_row), num_sequences)
    return total / count.clamp(min=1)


def fidelity(lp: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, is_weights: torch.Tensor | None,
              batch: ReplayBatch, top1_rows: torch.Tensor | None, sampler_top1: torch.Tensor | None, N: int
              ) -> dict[str, float]:
    """How far the sampler's distribution was from the model's on the states it visited (all [k, L] over mask):
    mean |log-prob gap|, mean |ratio - 1| (the ratio's spread), the share of positions whose greedy choice differs,
    and the mean truncated importance weight when it is applied."""
    gap = lp - behaviour
    out = {"rollout/logprob_gap_mean": gap.abs()[mask].mean().item(),
           "rollout/ratio_dev_mean": (torch.exp(gap) - 1).abs()[mask].mean().item()}
    if top1_rows is not None and sampler_top1 is not None:
        _, replay_top1, _ = batch.to_tokens(top1_rows.float(), N)  # [k, L] (one row scores each trace token)
        out["rollout/greedy_mismatch"] = (replay_top1.long() != sampler_top1)[mask].float().mean().item()
    if is_weights is not None:
        out["rollout/is_weight_mean"] = is_weights[mask].mean().item()
    return out


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a train-mode forward differs from an eval-mode one (then old log-probs need their own forward)."""
    cfg = getattr(model, "config", None)
    if any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout", "dropout")):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def make_scheduler(optimizer: Any, name: str, warmup_ratio: float, total_steps: int,
                   constant_groups: tuple[int, ...] = ()) -> LambdaLR:
    """transformers' schedule `name` over `total_steps` optimizer steps; parameter groups in `constant_groups`
    keep their base learning rate (the joint engine's value group)."""
    warmup = int(warmup_ratio * total_steps)
    if not constant_groups:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    probe = get_scheduler(name, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                          num_warmup_steps=warmup, num_training_steps=total_steps)
    if not isinstance(probe, LambdaLR):
        raise UserError(f"optimizer.lr_scheduler_type={name} is not a step schedule (LambdaLR)")
    schedule = probe.lr_lambdas[0]
    return LambdaLR(optimizer, [_constant if g in constant_groups else schedule
                                for g in range(len(optimizer.param_groups))])


def _constant(_: int) -> float:
    return 1.0


def resume_schedule(scheduler: Any, state: dict) -> None:
    """Load a checkpoint's scheduler state and set each group's learning rate to what the schedule gives at that
    step. The optimizer's state holds the rate the old run last used: resumed with a larger trainer.max_steps (the
    schedule now spans more steps), the first resumed step would otherwise train at the old schedule's end (0 for
    linear decay) instead of the new schedule's rate."""
    scheduler.load_state_dict(state)
    if isinstance(scheduler, LambdaLR):
        step = scheduler.last_epoch
        rates = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates  # what get_last_lr() reports


def accumulate(sums: dict[str, float], metrics: dict[str, float], tokens: float, loss: float | None) -> None:
    """Token-weighted running sums of per-chunk metric means, each over the tokens of the chunks that report it."""
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v * tokens
        sums[f"__tokens/{k}"] = sums.get(f"__tokens/{k}", 0.0) + tokens
    if loss is not None:
        sums["__loss"] = sums.get("__loss", 0.0) + loss


def finish(sums: dict[str, float], optimizer_steps: int = 1) -> dict[str, float]:
    """Means of the accumulated metrics; the loss is the mean over the optimizer steps of each step's loss (each
    step's chunks sum to that step's loss)."""
    loss = sums.pop("__loss", None)
    out = {k: v / max(sums.get(f"__tokens/{k}", 0.0), 1.0) for k, v in sums.items() if not k.startswith("__")}
    if loss is not None:
        out["loss"] = loss / optimizer_steps
    return out
