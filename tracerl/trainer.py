"""The RL loop: rollout -> reward -> credit -> replay -> update, with checkpoints and exact resume.

    trainer = RLTrainer(config, model, reward_fn, train_rows)
    trainer.train()

Every arrow of one step is one call in `train_step` (see DESIGN.md); the math lives in credit.py and losses.py.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import get_scheduler

from tracerl import credit, losses
from tracerl.config import RLConfig, TrainerConfig
from tracerl.data import PromptSampler, columns_of
from tracerl.distributed import LocalBackend
from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM
from tracerl.replay import ReplayBatch, build_replay, token_logprobs
from tracerl.rollout import Trajectory, generate
from tracerl.rollout.display import completions as decode_completions
from tracerl.tracking import MetricsLogger
from tracerl.value import ValueModel


class RLTrainer:
    def __init__(
        self,
        config: RLConfig,
        model: DiffusionLM,
        reward_fn: Callable[..., Any],
        train_rows: Sequence[dict[str, Any]],
        backend: LocalBackend | None = None,
    ):
        self.config, self.model, self.reward_fn, self.rows = config, model, reward_fn, train_rows
        self.backend = backend or LocalBackend()
        alg, tr = config.algorithm, config.trainer
        check_combination(config)
        self.value_model = ValueModel.from_policy(model) if alg.use_value_model else None
        self.ref_model = self._reference_model() if alg.beta > 0 else None
        self.optimizer = self._adamw([p for p in model.parameters() if p.requires_grad and not _is_value(p, self)],
                                     config.optimizer.learning_rate)
        self.scheduler = get_scheduler(
            config.optimizer.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=int(config.optimizer.warmup_ratio * tr.max_steps * alg.num_iterations),
            num_training_steps=tr.max_steps * alg.num_iterations,
        )
        self.value_optimizer = None
        if self.value_model is not None:
            lr = alg.value_learning_rate or config.optimizer.learning_rate
            self.value_optimizer = self._adamw(self.value_model.trainable_parameters(), lr)
        self.sampler = PromptSampler(len(train_rows), seed=tr.seed)
        self.step = 0

    # ---- set-up helpers -----------------------------------------------------------------------------------
    def _adamw(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        o = self.config.optimizer
        return torch.optim.AdamW(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                 weight_decay=o.weight_decay)

    def _reference_model(self) -> DiffusionLM | None:
        """A frozen copy of the starting policy; with LoRA none is made: the reference is the adapter disabled."""
        if hasattr(self.model.backbone, "peft_config"):
            return None
        ref = DiffusionLM(copy.deepcopy(self.model.backbone), self.model.tokenizer, self.model.spec)
        ref.requires_grad_(False).eval()
        return ref

    @contextmanager
    def _reference(self) -> Iterator[DiffusionLM]:
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.backbone.disable_adapter():
                yield self.model

    # ---- the loop -----------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        from tracerl.checkpoint import resume_if_asked, save_checkpoint

        tr, log = self.config.trainer, self.config.logging
        resume_if_asked(self)
        logger = MetricsLogger(tr.output_dir, log.report_to, config=asdict(self.config), project=log.project,
                               run_name=log.run_name, is_main=self.backend.is_main, logging_steps=tr.logging_steps)
        history = []
        try:
            while self.step < tr.max_steps:
                metrics = self.train_step()
                history.append(metrics)
                logger.log(self.step, metrics)
                if tr.save_steps and self.step % tr.save_steps == 0 and self.step < tr.max_steps:
                    save_checkpoint(self)
            save_checkpoint(self)
        finally:
            logger.finish()
        return history

    def train_step(self) -> dict[str, float]:
        """One RL step; returns its metrics (TRL's names where they exist)."""
        tr, alg = self.config.trainer, self.config.algorithm
        t0 = time.perf_counter()
        rows = [self.rows[i] for i in self.sampler.next(completions_per_step(tr) // tr.num_generations)]
        traj, prompts, texts, columns = self.rollout(rows)
        t_rollout = time.perf_counter() - t0
        rewards, reward_metrics = self.score(prompts, texts, columns, traj)
        block = traj.block_of_position() if traj.block_size is not None else None
        train_step = credit.shrink_steps(traj.unmask_step, traj.action_mask, alg.shrink, block)
        gen = torch.Generator().manual_seed(tr.seed * 7919 + self.step)
        replay = build_replay(traj, train_step, alg.estimator, alg.p_mask_prompt, gen)
        adv, old_values = self.assign_credit(traj, rewards, train_step, replay)
        t1 = time.perf_counter()
        update_metrics = self.update(traj, replay, adv, old_values)
        self.step += 1
        finite = rewards[torch.isfinite(rewards)]
        steps = traj.steps_per_sequence().float()
        return {
            "reward": finite.mean().item() if finite.numel() else float("nan"),
            "reward_std": finite.std().item() if finite.numel() > 1 else 0.0,
            **reward_metrics,
            **adv.metrics,
            **update_metrics,
            "completions/mean_length": traj.completion_lengths().float().mean().item(),
            "trajectory/steps_per_sequence": steps.mean().item(),
            "trajectory/tokens_per_step": float(traj.action_mask.sum()) / max(steps.sum().item(), 1.0),
            "trajectory/rollout_forwards": float(traj.num_forwards),
            "trajectory/replay_forwards_per_response": replay.forwards_per_response,
            "perf/rollout_seconds": t_rollout,
            "perf/train_seconds": time.perf_counter() - t1,
            "perf/step_seconds": time.perf_counter() - t0,
            "perf/rollout_tokens_per_second": traj.num_sequences * traj.response_length / max(t_rollout, 1e-9),
            "learning_rate": self.scheduler.get_last_lr()[0],
        }

    # ---- rollout and reward ---------------------------------------------------------------------------------
    def rollout(self, rows: list[dict[str, Any]]) -> tuple[Trajectory, list[Any], list[str], dict[str, list]]:
        """G completions for each row's prompt; returns (trajectory, prompts, completion texts, other columns)."""
        from tracerl.models.prompting import format_prompt

        G, m = self.config.trainer.num_generations, self.config.model
        tok = self.model.tokenizer
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        texts = [format_prompt(tok, p, m.use_chat_template, m.system_prompt) for p in prompts]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        group_id = torch.arange(len(rows)).repeat_interleave(G) + self.backend.rank * len(rows)
        seed = self.config.trainer.seed * 1_000_003 + self.step * 101 + self.backend.rank
        traj = generate(self.model, ids, replace(self.config.rollout, seed=seed), group_id=group_id)
        columns = {k: [v for v in vals for _ in range(G)] for k, vals in columns_of(rows).items()}
        return traj, prompts, decode_completions(traj, tok), columns

    def score(self, prompts: list[Any], texts: list[str], columns: dict[str, list], traj: Trajectory
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """Rewards [N] float (NaN = no reward function applied) and per-function metrics."""
        state = {"step": self.step, "epoch": self.sampler.epoch}
        result = self.reward_fn(prompts, texts, trajectory=traj, trainer_state=state, **columns)
        if hasattr(result, "total"):  # a reward_models.RewardSet result
            return torch.as_tensor(result.total, dtype=torch.float32), dict(result.metrics)
        values = torch.tensor([float("nan") if v is None else float(v) for v in result], dtype=torch.float32)
        return values, {}

    # ---- credit ---------------------------------------------------------------------------------------------
    def assign_credit(self, traj: Trajectory, rewards: torch.Tensor, train_step: torch.Tensor, replay: ReplayBatch
                      ) -> tuple[credit.Advantages, torch.Tensor | None]:
        """Group-relative advantages, or step-level GAE from the value model read on the replay rows."""
        alg = self.config.algorithm
        if self.value_model is None:
            adv = credit.grpo_advantages(rewards, traj.group_id, traj.action_mask, alg.scale_rewards,
                                         drop_zero_std=alg.drop_zero_std_groups)
            return adv, None
        with torch.no_grad():
            old_values = self._chunked(replay, lambda b, sl: self.value_model(b).float().cpu())  # [R, T]
        values = replay.scatter(old_values, traj.response_ids.shape)  # [N, L]
        scorable = torch.isfinite(rewards)
        outcome = torch.where(scorable, rewards, torch.zeros_like(rewards))
        r = credit.place_rewards(outcome, traj.unmask_step, traj.action_mask, None, train_step)
        adv = credit.step_gae(values, r, train_step, traj.action_mask & scorable[:, None], alg.gamma, alg.lam)
        if alg.whiten_advantages:
            adv.advantages = credit.whiten(adv.advantages, adv.token_mask)
        return adv, old_values

    # ---- update ---------------------------------------------------------------------------------------------
    def _micro_slices(self, replay: ReplayBatch) -> list[slice]:
        """Forward-sized row ranges: the rows of each micro-batch of `per_device_train_batch_size` completions,
        cut into pieces of at most `replay_batch_size` rows. Gradients accumulate over all of them."""
        tr = self.config.trainer
        firsts = torch.arange(0, int(replay.source_row.max()) + 1, tr.per_device_train_batch_size)
        starts = torch.searchsorted(replay.source_row, firsts).tolist() + [replay.num_rows]
        size = tr.replay_batch_size or replay.num_rows
        return [slice(a, min(a + size, b)) for s, b in zip(starts[:-1], starts[1:]) for a in range(s, b, size)]

    def _chunked(self, replay: ReplayBatch, fn: Callable[[ReplayBatch, slice], torch.Tensor]) -> torch.Tensor:
        """Run `fn(rows, slice)` over the micro-batches and concatenate: [R, T]."""
        return torch.cat([fn(replay.slice(sl), sl) for sl in self._micro_slices(replay)], dim=0)

    def update(self, traj: Trajectory, replay: ReplayBatch, adv: credit.Advantages,
               old_values: torch.Tensor | None) -> dict[str, float]:
        """`num_iterations` PPO epochs over the replay rows (policy, then value model)."""
        alg, temp = self.config.algorithm, self.config.rollout.temperature
        targets = replay.targets(traj)
        advantages = replay.gather(adv.advantages)
        mask = replay.loss_mask & replay.gather(adv.token_mask.float()).bool()
        # weights over the WHOLE batch: micro-batches then sum to exactly the full-batch loss
        weights = losses.token_weights(mask, alg.loss_aggregation, replay.step_id, replay.source_row,
                                       constant=float(traj.response_length * traj.num_sequences))
        old_lp = self._old_logprobs(traj, replay, targets)
        ref_lp = None
        if alg.beta > 0:
            with torch.no_grad(), self._reference() as ref:
                ref_lp = self._chunked(replay, lambda b, sl: token_logprobs(ref, b, targets[sl], temp)[0].cpu())
        metrics: dict[str, float] = {}
        for _ in range(alg.num_iterations):
            metrics = self._policy_epoch(replay, targets, advantages, mask, weights, old_lp, ref_lp)
            if self.value_model is not None:
                metrics.update(self._value_epoch(replay, replay.gather(adv.returns), old_values, mask, weights))
        return metrics

    def _old_logprobs(self, traj: Trajectory, replay: ReplayBatch, targets: torch.Tensor) -> torch.Tensor:
        if self.config.algorithm.old_logprobs == "rollout":
            return replay.gather(traj.behaviour_logprob)
        temp = self.config.rollout.temperature
        with torch.no_grad():
            return self._chunked(replay, lambda b, sl: token_logprobs(self.model, b, targets[sl], temp)[0].cpu())

    def _policy_epoch(self, replay, targets, advantages, mask, weights, old_lp, ref_lp) -> dict[str, float]:
        alg, temp = self.config.algorithm, self.config.rollout.temperature
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for sl in self._micro_slices(replay):
            lp, ent = token_logprobs(self.model, replay.slice(sl), targets[sl], temp, with_entropy=True)
            dev = lp.device
            out = losses.policy_loss(
                lp, old_lp[sl].to(dev), advantages[sl].to(dev), mask[sl].to(dev), kind=alg.loss_type,
                epsilon_low=alg.epsilon, epsilon_high=alg.epsilon_high, log_ratio_clamp=alg.log_ratio_clamp,
                weights=weights[sl].to(dev), ref_logprob=None if ref_lp is None else ref_lp[sl].to(dev),
                beta=alg.beta, kl_kind=alg.kl_estimator, entropy=ent if alg.entropy_coef else ent.detach(),
                entropy_coef=alg.entropy_coef,
            )
            out.loss.backward()
            _accumulate(sums, out.metrics, float(mask[sl].sum()), out.loss.item())
        grad_norm = self._clip(self.optimizer)
        self.optimizer.step()
        self.scheduler.step()
        self.model.eval()
        return {**_finish(sums), "grad_norm": grad_norm}

    def _value_epoch(self, replay, returns, old_values, mask, weights) -> dict[str, float]:
        alg = self.config.algorithm
        self.value_optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for sl in self._micro_slices(replay):
            values = self.value_model(replay.slice(sl))
            dev = values.device
            out = losses.value_loss(values, old_values[sl].to(dev), returns[sl].to(dev), mask[sl].to(dev),
                                    alg.value_clip, weights=weights[sl].to(dev))
            out.loss.backward()
            _accumulate(sums, out.metrics, float(mask[sl].sum()), None)
        self._clip(self.value_optimizer)
        self.value_optimizer.step()
        return _finish(sums)

    def _clip(self, optimizer: torch.optim.Optimizer) -> float:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.config.optimizer.max_grad_norm
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf")))


# ---- small helpers --------------------------------------------------------------------------------------------
def _is_value(p: torch.nn.Parameter, trainer: RLTrainer) -> bool:
    """A LoRA value adapter lives inside the policy's peft model; the policy optimizer must not own it."""
    vm = trainer.value_model
    return vm is not None and vm.adapter is not None and any(p is q for q in vm.trainable_parameters())


def _accumulate(sums: dict[str, float], metrics: dict[str, float], tokens: float, loss: float | None) -> None:
    """Token-weighted running sums of per-chunk metric means."""
    sums["__tokens"] = sums.get("__tokens", 0.0) + tokens
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v * tokens
    if loss is not None:
        sums["__loss"] = sums.get("__loss", 0.0) + loss


def _finish(sums: dict[str, float]) -> dict[str, float]:
    tokens = max(sums.pop("__tokens", 0.0), 1.0)
    loss = sums.pop("__loss", None)
    out = {k: v / tokens for k, v in sums.items()}
    if loss is not None:
        out["loss"] = loss
    return out


def completions_per_step(tr: TrainerConfig) -> int:
    return tr.per_device_train_batch_size * tr.gradient_accumulation_steps


def check_combination(config: RLConfig) -> None:
    """Impossible combinations fail before any model work, naming the keys."""
    alg, tr = config.algorithm, config.trainer
    if completions_per_step(tr) % tr.num_generations:
        raise UserError(
            f"trainer.per_device_train_batch_size x trainer.gradient_accumulation_steps = {completions_per_step(tr)}"
            f" completions per step is not a multiple of trainer.num_generations={tr.num_generations}")
    if alg.old_logprobs == "rollout" and alg.estimator != "trace":
        raise UserError("algorithm.old_logprobs=rollout needs algorithm.estimator=trace: the behaviour log-probs "
                        f"were taken on the rollout's own states, not on {alg.estimator}'s random masks")
    if alg.old_logprobs == "rollout" and alg.shrink != 1:
        raise UserError("algorithm.old_logprobs=rollout needs algorithm.shrink=1: a merged step is replayed from the "
                        "state before its first step, not the states the behaviour log-probs were taken on")
    if alg.use_value_model and alg.estimator != "trace":
        raise UserError("algorithm.use_value_model needs algorithm.estimator=trace (values live on trace steps)")
