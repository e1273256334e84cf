"""The RL loop: rollout -> reward -> credit -> replay -> update, with checkpoints and exact resume.

    trainer = RLTrainer(config, model, reward_fn, train_rows)                     # one process
    trainer = RLTrainer(config, model, reward_fn, train_rows,                     # under the deepspeed launcher
                        backend=make_backend(config.distributed, local_rank))
    trainer.train()

Every arrow of one step is one call in `train_step` (docs/architecture.md maps them); the math lives in credit.py
and losses.py, the training rows in replay.py, what each estimator fixes in estimators.py.

Data parallel (tracerl.distributed): every rank draws the same global prompt order and takes its slice; groups stay
on one rank, so group advantages are local, while everything that normalises over the batch (the loss weights'
token / step / sequence counts, scale_rewards=batch, whitened GAE advantages) and every logged metric is computed
over all ranks. Each rank runs the same number of training forwards (padding with zero-weight chunks) because
ZeRO communicates inside them.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from tracerl import credit, losses
from tracerl import data_parallel as dp
from tracerl.callbacks import Callbacks
from tracerl.config import RLConfig, TrainerConfig
from tracerl.data import PromptSampler, uniform_columns
from tracerl.distributed import Backend, LocalBackend
from tracerl.ds_config import EngineSpec
from tracerl.errors import UserError
from tracerl.estimators import resolve as resolve_estimator
from tracerl.estimators import spec as estimator_spec
from tracerl.models.base import DiffusionLM
from tracerl.peft_utils import keep_requires_grad
from tracerl.replay import ReplayBatch, TokenScores, build_replay, token_logprobs
from tracerl.rollout import Trajectory
from tracerl.rollout.config import derive_seed
from tracerl.scoring import ScoredBatch, check_prompts, sample_and_score
from tracerl.tracking import MetricsLogger
from tracerl.update import (UpdateState, accumulate, fidelity, finish, has_dropout, make_scheduler,
                            mean_over_rows, resume_schedule)
from tracerl.value import Critic, ValueModel

REPLAY_STREAM = 0x5E9  # keeps the replay's random masks apart from the rollouts' seeds
T = TypeVar("T")


class RLTrainer:
    def __init__(
        self,
        config: RLConfig,
        model: DiffusionLM,
        reward_fn: Callable[..., Any],
        train_rows: Sequence[dict[str, Any]],
        backend: Backend | None = None,
        eval_rows: Sequence[dict[str, Any]] | None = None,
        callbacks: Sequence[Any] | Callbacks | None = None,
    ):
        config = replace(config, algorithm=resolve_estimator(config.algorithm))  # unset estimator settings filled
        self.config, self.model, self.reward_fn = config, model, as_reward_set(reward_fn)
        self.rows = uniform_columns(train_rows)  # every batch passes the rewards the same columns
        # held-out rows evaluated every trainer.eval_steps (metrics eval/*)
        self.eval_rows = None if eval_rows is None else uniform_columns(eval_rows)
        self.backend = backend or LocalBackend()
        self.resumed_elsewhere = False  # set by resume_if_asked: the checkpoint lies outside trainer.output_dir
        alg, tr = config.algorithm, config.trainer
        config.validate()  # impossible combinations fail before any model work, naming the keys
        config.rollout.check_family(model.family, model.block_size)  # a sampler or cache the model cannot take
        # the global generators (dropout, LoRA dropout) from the run's seed, as HF's Trainer does: one seed, one
        # run (rollouts and replay masks draw from their own per-row generators regardless)
        set_seed(tr.seed)
        model.eval()  # train mode only inside the gradient pass: a model handed over in train mode would run the
        # first step's old-log-prob pass with dropout on, and a resumed process would not repeat the straight run
        for what, rows in (("training", train_rows), ("eval", eval_rows or [])):  # too long, or not a prompt
            check_prompts(model, rows, config.rollout.max_completion_length, config.model.use_chat_template,
                          config.model.system_prompt, what)
        # model copies (value body, reference) are made before any engine partitions the policy's parameters
        self.value_model = ValueModel.from_policy(model) if alg.use_value_model else None
        spec = EngineSpec(tr.per_device_train_batch_size * tr.gradient_accumulation_steps,  # per optimizer step
                          config.optimizer.max_grad_norm,
                          getattr(model.config, "hidden_size", None))
        ref = self._reference_model() if alg.beta > 0 and alg.kl_against == "reference" else None
        if ref is None and alg.beta > 0 and alg.kl_against == "reference" and _adapter_already_trained(model):
            warnings.warn("the LoRA adapter starts trained (model.path is an adapter and peft.r is unset), and the KL "
                          "reference is the model with its adapter disabled: the base before that training, which "
                          "the KL term then pulls the policy back to. Set peft.r to merge the adapter and train a "
                          "new one on top (the reference is then the adapter's model), as TRL does", stacklevel=2)
        self.ref_model = None if ref is None else self.backend.prepare_frozen(ref, spec)
        self._prepare_trainables(spec)
        self.sampler = PromptSampler(len(train_rows), seed=tr.seed)
        self.step = 0
        # transformers TrainerCallbacks (tracerl/callbacks.py), given as a list (their `args`: this config) or as
        # a Callbacks (the API's, whose args are its TraceRLConfig)
        self.callbacks = callbacks if isinstance(callbacks, Callbacks) else Callbacks(callbacks, config)
        self.callbacks.all_reduce = self.all_reduce  # a callback failing on one rank stops every rank
        self.callbacks.state.is_world_process_zero = self.backend.is_main
        self.callbacks.state.is_local_process_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0
        self.callbacks.context = dict(model=model, processing_class=model.tokenizer, optimizer=self.optimizer,
                                      lr_scheduler=self.scheduler)
        self.callbacks.event("on_init_end")

    def all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (the identity on one process): the hook every batch-wide statistic in
        credit.py and losses.py takes, so the math never branches on the world size."""
        return self.backend.all_reduce(value)

    # ---- set-up helpers -----------------------------------------------------------------------------------
    def _prepare_trainables(self, spec: EngineSpec) -> None:
        """Optimizers (engines under DeepSpeed) for the policy and the value model, and the lr schedule.

        A LoRA value adapter shares the policy's base; under DeepSpeed both then live in ONE engine (two engines
        must not hook the same partitioned modules) with one optimizer of two parameter groups, stepped together:
        `self.joint`. Everywhere else the value model has its own optimizer.
        """
        o, alg, tr = self.config.optimizer, self.config.algorithm, self.config.trainer
        adamw = {"betas": (o.adam_beta1, o.adam_beta2), "eps": o.adam_epsilon, "weight_decay": o.weight_decay}
        vm = self.value_model
        value_lr = alg.value_learning_rate or o.learning_rate
        self.joint = vm is not None and vm.adapter is not None and self.backend.shared_base_in_one_engine
        modules: dict[str, torch.nn.Module] = {"policy": self.model}
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad and not _is_value(p, self)],
                   "lr": o.learning_rate}]
        if self.joint:
            modules["value_head"] = vm.head  # the rest of the value model is the policy's own modules
            groups.append({"params": vm.trainable_parameters(), "lr": value_lr})
        self.policy = self.backend.prepare(modules, groups, spec, adamw)
        self.optimizer = self.policy.optimizer
        if self.joint and o.max_grad_norm is not None:
            warnings.warn(f"optimizer.max_grad_norm={o.max_grad_norm}: the LoRA value adapter shares the policy's "
                          "DeepSpeed engine, whose clipping scales the policy and value gradients by their JOINT norm "
                          "(and grad_norm logs that norm); one process clips each by its own. Set "
                          "optimizer.max_grad_norm: null to train both unclipped",
                          stacklevel=2)
        # the value lr stays constant (group 1 of the joint engine), as with its own optimizer
        self.scheduler = make_scheduler(self.optimizer, o.lr_scheduler_type, o.warmup_ratio,
                                        tr.max_steps * alg.num_iterations * tr.optimizer_steps_per_epoch,
                                        constant_groups=(1,) if self.joint else ())
        self.value, self.critic = None, None
        if vm is not None:
            self.value = self.policy if self.joint else self.backend.prepare(
                {"value": vm}, [{"params": vm.trainable_parameters(), "lr": value_lr}], spec, adamw)
            self.critic = Critic(vm, self.value, shared=self.joint)
        # (optimizer, the losses it steps on): what one PPO epoch runs, in order
        self.objectives: list[tuple[Any, tuple[str, ...]]] = (
            [(self.policy, ("policy", "value"))] if self.joint else
            [(self.policy, ("policy",))] + ([(self.value, ("value",))] if vm is not None else []))

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
            with keep_requires_grad(self.model), self.model.backbone.disable_adapter():
                yield self.model

    # ---- state (checkpoints: tracerl/checkpoint.py) --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the weights: step, data position, lr schedule, RNG and (single
        process; under DeepSpeed they live in the engine checkpoints) the optimizer and the critic."""
        from tracerl.checkpoint import rng_state

        state = {"step": self.step, "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "schedule": self._schedule_shape(), "rng": rng_state(),
                 "log_history": list(self.callbacks.state.log_history)}  # (TrainerState's, for callbacks)
        if not self.backend.engine_checkpoints:
            state["optimizer"] = self.optimizer.state_dict()
            if self.critic is not None:
                state["critic"] = self.critic.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from tracerl.checkpoint import set_rng_state

        if "masks" in state:  # tracerl.sft.SFTRun's
            raise UserError("the checkpoint is an SFT run's, not an RL run's; start RL from its model/ directory "
                            "(model.path) instead")
        saved = state.get("schedule")  # (checkpoints before it was stored: not checked)
        if saved is not None and saved != self._schedule_shape():
            changed = ", ".join(f"{key}: {saved.get(key)} -> {value}" for key, value in self._schedule_shape().items()
                                if saved.get(key) != value)
            raise UserError(f"the checkpoint was written with a different number of optimizer steps per RL step "
                            f"({changed}); the lr schedule it holds counts optimizer steps, so resume with the "
                            "settings that wrote it")
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.callbacks.state.log_history = list(state.get("log_history", []))
        if not self.backend.engine_checkpoints:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.critic is not None:
                if "critic" not in state:
                    raise UserError("the checkpoint has no value model but algorithm.use_value_model is on")
                self.critic.load_state_dict(state["critic"])
            set_rng_state(state["rng"])
        resume_schedule(self.scheduler, state["scheduler"])  # after the optimizer's state, whose rates it sets

    def _schedule_shape(self) -> dict[str, int]:
        """The settings that fix how many optimizer (and scheduler) steps one RL step takes."""
        tr = self.config.trainer
        return {"algorithm.num_iterations": self.config.algorithm.num_iterations,
                "trainer.steps_per_generation / trainer.gradient_accumulation_steps": tr.optimizer_steps_per_epoch}

    def engines(self) -> dict[str, Any]:
        """DeepSpeed engines by checkpoint name (the critic's own only when it has one)."""
        out = {"policy": self.policy}
        if self.critic is not None and not self.critic.shared:
            out["value"] = self.critic.trainable
        return out

    # ---- the loop -----------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        from tracerl.checkpoint import already_finished, resume_if_asked, set_aside_previous_run

        tr, log = self.config.trainer, self.config.logging
        self.callbacks.new_run()  # a fresh TrainerState and control, as every transformers train() starts with
        resume_if_asked(self)
        if already_finished(self):
            return []
        set_aside_previous_run(self)
        logger = MetricsLogger(tr.output_dir, log.report_to, config=asdict(self.config), project=log.project,
                               run_name=log.run_name, is_main=self.backend.is_main, logging_steps=tr.logging_steps,
                               start_step=self.step, resumed_elsewhere=self.resumed_elsewhere)
        bar = tqdm(total=tr.max_steps, initial=self.step, desc="RL steps", unit="step", dynamic_ncols=True,
                   disable=not self.backend.is_main)
        history = []
        hooks, state = self.callbacks, self.callbacks.state
        state.max_steps, state.logging_steps = tr.max_steps, tr.logging_steps
        state.eval_steps, state.save_steps = tr.eval_steps, tr.save_steps
        state.global_step, state.epoch = self.step, self._epoch_progress()
        try:
            hooks.event("on_train_begin")
            if self._eval_due(at_start=True):
                metrics = self._evaluate_with_callbacks()
                logger.log(self.step, metrics)
                self._log_with_callbacks(metrics)
            while self.step < tr.max_steps:
                hooks.event("on_step_begin")
                metrics = self.train_step()
                state.global_step, state.epoch = self.step, self._epoch_progress()
                hooks.event("on_step_end")
                hooks.agree(self.all_reduce)  # a flag a callback set on any rank holds on every rank
                asked = hooks.take("should_evaluate")
                if self._eval_due() or (asked and self.eval_rows):
                    metrics.update(self._evaluate_with_callbacks())
                history.append(metrics)
                logger.log(self.step, metrics)
                self._log_with_callbacks(metrics)
                if self.step % max(tr.logging_steps, 1) == 0:
                    logger.log_table("completions", *self._sample_table(), step=self.step)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", step_s=f"{metrics['perf/step_seconds']:.1f}")
                hooks.agree(self.all_reduce)  # (on_evaluate / on_log may have set flags too)
                stop = hooks.control.should_training_stop
                due = tr.save_steps and self.step % tr.save_steps == 0
                if (hooks.take("should_save") or due) and self.step < tr.max_steps and not stop:
                    self._save_with_callbacks()
                if stop:
                    break
            self._save_with_callbacks()
            hooks.event("on_train_end")
        finally:
            bar.close()
            logger.finish()
        return history

    def _evaluate_with_callbacks(self) -> dict[str, float]:
        metrics = self.evaluate_held_out()
        self.callbacks.event("on_evaluate", metrics=metrics)
        return metrics

    def _log_with_callbacks(self, metrics: dict[str, float]) -> None:
        self.callbacks.state.log_history.append({**metrics, "step": self.step})
        self.callbacks.event("on_log", logs=metrics)

    def _epoch_progress(self) -> float:
        """Passes over the training prompts so far, fractional (TrainerState.epoch)."""
        return self.sampler.epoch + self.sampler.cursor / max(self.sampler.num_rows, 1)

    def _save_with_callbacks(self) -> None:
        from tracerl.checkpoint import save_checkpoint

        save_checkpoint(self)
        self.callbacks.event("on_save")

    def _eval_due(self, at_start: bool = False) -> bool:
        every = self.config.trainer.eval_steps
        if not (self.eval_rows and every):
            return False
        return self.step == 0 if at_start else self.step % every == 0 or self.step == self.config.trainer.max_steps

    def evaluate_held_out(self) -> dict[str, float]:
        """Held-out reward and accuracy of the current policy (greedy by default: config.eval), as eval/*. Each
        rank decodes and scores its share of the prompts (paid rewards run once per prompt); the summary is over
        every rank's samples, the same as one process's."""
        from tracerl.evaluate import evaluate, summarize

        state = dict(step=self.step, epoch=self.sampler.epoch, max_steps=self.config.trainer.max_steps)
        shard = (self.backend.rank, self.backend.world_size)

        def this_ranks_share() -> tuple[list[dict[str, Any]], float]:
            with self.backend.generation(self.policy):
                summary, records = evaluate(self.model, list(self.eval_rows), self.reward_fn, self.config,
                                            trainer_state=state, shard=shard)
            # what the summary reads (the token ids stay on their rank)
            return [{k: r[k] for k in ("index", "reward", "rewards", "steps")} for r in records], summary["seconds"]

        mine = self._on_every_rank(this_ranks_share, f"evaluation at step {self.step}")
        if self.backend.world_size == 1:
            records, seconds = mine
        else:
            parts = self.backend.all_gather_object(mine)
            records = sorted((r for part, _ in parts for r in part), key=lambda r: r["index"])
            seconds = max(s for _, s in parts)
        summary = summarize(records, self.config.eval.success_threshold, seconds)
        return {f"eval/{k}": v for k, v in summary.items()}

    def _sample_table(self) -> tuple[list[str], list[list[Any]]]:
        """A few of the last step's completions with their reward, unmask order and the rewards' log_extra
        columns, for W&B."""
        return getattr(self, "_last_samples", None) or (list(SAMPLE_COLUMNS), [])

    def train_step(self) -> dict[str, float]:
        """One RL step: rollout -> score -> credit -> replay -> update; returns its metrics over all ranks (TRL's
        names where they exist)."""
        t0 = time.perf_counter()
        batch = self._scored_on_every_rank()  # rollout + rewards: tracerl/scoring.py
        t_rollout = time.perf_counter() - t0
        learned = self.learn(batch.traj, batch.rewards, batch.process)  # credit -> replay -> update
        self._last_samples = sample_rows(batch, limit=4)
        traj, steps = batch.traj, batch.traj.steps_per_sequence().float()
        metrics = keep_reward_metrics(batch.metrics, {
            **dp.reward_stats(self.backend, batch.rewards),
            **learned,
            "completions/mean_length": traj.completion_lengths().float().mean().item(),
            "trajectory/steps_per_sequence": steps.mean().item(),
            "trajectory/tokens_per_step": float(traj.action_mask.sum()) / max(steps.sum().item(), 1.0),
            "trajectory/rollout_forwards": float(traj.num_forwards),
            "perf/rollout_seconds": t_rollout,
            "perf/train_seconds": time.perf_counter() - t0 - t_rollout,
            "perf/step_seconds": time.perf_counter() - t0,
            "perf/rollout_tokens_per_second": traj.num_sequences * traj.response_length / max(t_rollout, 1e-9),
            "learning_rate": self.scheduler.get_last_lr()[0],
        })
        metrics.update(dp.per_function_stats(self.backend, batch.per_function))  # (more than one process)
        return dp.across_ranks(self.backend, metrics)

    def _scored_on_every_rank(self) -> ScoredBatch:
        """This rank's scored batch."""
        return self._on_every_rank(lambda: self.sample_and_score(*self._step_draw()), f"step {self.step}")

    def _on_every_rank(self, work: Callable[[], T], what: str) -> T:
        """work()'s result; when a reward fails on some rank (an error its run may not go past), every rank stops
        here with exit code 2, instead of the others dying in their next collective with a traceback about a
        closed connection (or, over NCCL, waiting for it)."""
        from reward_models import RewardError

        failure: Exception | None = None
        try:
            result = work()
        except (RewardError, UserError) as exc:
            failure = exc
        dp.stop_together(self.all_reduce, failure, f"{what}: the rewards")
        return result

    def learn(self, traj: Trajectory, rewards: torch.Tensor, process: torch.Tensor | None = None
              ) -> dict[str, float]:
        """Everything after scoring, on this rank's trajectories (rewards [N], process rewards [N, T] or None)."""
        alg = self.config.algorithm
        block = traj.block_of_position() if traj.block_size is not None else None  # [N, L]
        train_step = credit.shrink_steps(traj.unmask_step, traj.action_mask, alg.shrink, block)  # TraceRL's s
        replay = self._replay(traj, train_step, iteration=0)  # training rows: tracerl/replay.py
        adv, old_values = self.assign_credit(traj, rewards, train_step, replay, process)  # tracerl/credit.py
        update_metrics = self.update(traj, train_step, replay, adv, old_values)  # PPO epochs: tracerl/losses.py
        self.step += 1
        return {**adv.metrics, **update_metrics,
                "trajectory/replay_forwards_per_response": replay.forwards_per_response}

    def _step_draw(self) -> tuple[list[int], list[int]]:
        """This rank's prompts (dataset indices), and for each how many times the step drew it before: every rank
        draws the same global order and takes its slice (a step that crosses an epoch boundary, or a dataset
        smaller than a step, draws some prompts twice)."""
        tr, rank = self.config.trainer, self.backend.rank
        k = completions_per_step(tr) // tr.num_generations  # prompts per rank
        picked = [int(i) for i in self.sampler.next(k * self.backend.world_size)]
        repeats = [picked[:j].count(i) for j, i in enumerate(picked)]
        return picked[rank * k:(rank + 1) * k], repeats[rank * k:(rank + 1) * k]

    def _step_indices(self) -> list[int]:
        return self._step_draw()[0]

    def sample_and_score(self, indices: list[int], repeats: list[int] | None = None) -> ScoredBatch:
        """G completions for the prompts of dataset rows `indices`, scored. Completion g of prompt i samples from
        its own seed (run seed, step, i, g; and r when the step drew prompt i for the r-th time before, so a prompt
        drawn twice gets two different groups), so what a prompt gets depends on the policy and that seed only."""
        tr, m = self.config.trainer, self.config.model
        if repeats is None:
            repeats = [indices[:j].count(i) for j, i in enumerate(indices)]
        seeds = [[derive_seed(tr.seed, self.step, i, g, *([r] if r else [])) for g in range(tr.num_generations)]
                 for i, r in zip(indices, repeats)]
        with self.backend.generation(self.policy):  # ZeRO-3: full parameters for the rollout's forwards
            return sample_and_score(self.model, [self.rows[i] for i in indices], self.config.rollout, self.reward_fn,
                                    tr.num_generations, seeds, m.use_chat_template, m.system_prompt,
                                    group_offset=self.backend.rank * len(indices),
                                    trainer_state=dict(step=self.step, epoch=self.sampler.epoch,
                                                       max_steps=tr.max_steps))

    # ---- credit ---------------------------------------------------------------------------------------------
    def assign_credit(self, traj: Trajectory, rewards: torch.Tensor, train_step: torch.Tensor, replay: ReplayBatch,
                      process: torch.Tensor | None = None) -> tuple[credit.Advantages, torch.Tensor | None]:
        """Group-relative advantages, or step-level GAE from the value model read on the replay rows.

        Process rewards (per own step, NaN = none), scaled by algorithm.process_reward_coef, add DeepSeekMath's
        group-normalised return-to-go to the group advantages, or sit on their steps in the GAE recursion."""
        alg = self.config.algorithm
        # every rank takes the same path, since the process statistics all-reduce: a rank whose rewards gave no
        # step rewards this time takes part with an all-NaN table (no reward on any step)
        anywhere = self.all_reduce(torch.tensor([float(process is not None)], dtype=torch.float64)).item() > 0
        if anywhere and process is None:
            process = torch.full((traj.num_sequences, int(traj.unmask_step.max()) + 1), float("nan"))
        coef = alg.process_reward_coef if process is not None else 0.0
        trained, kept, in_band = self._trained_tokens(traj, rewards)  # [N, L] the action tokens the loss may score
        if self.value_model is None:
            est = estimator_spec(alg.estimator)
            adv = credit.grpo_advantages(rewards, traj.group_id, trained, alg.scale_rewards,
                                         drop_zero_std=alg.drop_zero_std_groups, baseline=est.baseline,
                                         wd1=alg.loss_type == "wd1", all_reduce=self.all_reduce)
            if coef:
                extra = credit.process_advantages(process, traj.group_id, train_step, trained,
                                                  alg.scale_rewards, all_reduce=self.all_reduce)
                # a row with process rewards takes part even when its outcome carries no signal
                adv.token_mask = adv.token_mask | (trained & torch.isfinite(process).any(1)[:, None])
                adv.advantages = torch.where(adv.token_mask, adv.advantages + coef * extra, 0.0)
            adv.metrics.update(kept)
            adv.counted = in_band
            return adv, None
        values = self._token_pass(replay, traj.num_sequences, lambda b, sl: self.value_model(b))  # [N, L]
        scorable = torch.isfinite(rewards)
        outcome = torch.where(scorable, rewards, torch.zeros_like(rewards))
        if alg.value_outcome == "group":  # dLLM-RL: the group z-score is the reward the value model learns
            outcome, _ = credit.group_advantages(rewards, traj.group_id, alg.scale_rewards,
                                                 all_reduce=self.all_reduce)
        steps = None if not coef else coef * torch.nan_to_num(process, nan=0.0)
        if steps is not None:
            scorable = scorable | torch.isfinite(process).any(1)
        # the outcome sits on the last step that has trained tokens (dLLM-RL: the last trainable trace step)
        r = credit.place_rewards(outcome, traj.unmask_step, trained, steps, train_step)
        adv = credit.step_gae(values, r, train_step, trained & scorable[:, None], alg.gamma, alg.lam)
        if alg.whiten_advantages:
            adv.advantages = credit.whiten(adv.advantages, adv.token_mask, all_reduce=self.all_reduce)
        adv.metrics.update(kept)
        adv.counted = in_band
        return adv, values

    def _trained_tokens(self, traj: Trajectory, rewards: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
        """[N, L] bool: the policy's action tokens, less the rows of groups outside algorithm.pass_rate_filter and
        the pad tokens past algorithm.trained_pad_tokens (dLLM-RL's post_num: counted in position order, the
        first N pad tokens of a completion stay trained). The replay still masks the dropped tokens in its input
        states; they are only not scored. Also returns the share of rows the pass-rate filter kept (a metric) and
        those rows [N] (None without the filter)."""
        alg = self.config.algorithm
        trained, metrics, in_band = traj.action_mask, {}, None
        if alg.pass_rate_filter is not None:
            low, high = alg.pass_rate_filter
            in_band = credit.pass_rate_mask(rewards, traj.group_id, low, high)  # [N]
            trained = trained & in_band[:, None]
            metrics["trajectory/pass_rate_kept"] = in_band.float().mean().item()
        if alg.trained_pad_tokens is not None:
            is_pad = traj.response_ids == self.model.pad_token_id  # [N, L]
            trained = trained & ~(is_pad & (is_pad.long().cumsum(1) > alg.trained_pad_tokens))
        return trained, metrics, in_band

    # ---- update ---------------------------------------------------------------------------------------------
    def _micro_slices(self, replay: ReplayBatch) -> list[slice]:
        """Forward-sized row ranges: the rows of each micro-batch of `per_device_train_batch_size` completions,
        cut into pieces of at most `replay_batch_size` rows (never inside a sequence when a token's score needs
        several rows). Gradients accumulate over all of them."""
        tr = self.config.trainer
        firsts = torch.arange(0, int(replay.source_row.max()) + 1, tr.per_device_train_batch_size)
        starts = torch.searchsorted(replay.source_row, firsts).tolist() + [replay.num_rows]
        size = tr.replay_batch_size or replay.num_rows
        if not replay.whole_sequences:
            return [slice(a, min(a + size, b)) for s, b in zip(starts[:-1], starts[1:]) for a in range(s, b, size)]
        seq_starts = torch.searchsorted(replay.source_row, torch.unique(replay.source_row)).tolist()
        out = []
        for s, b in zip(starts[:-1], starts[1:]):
            cuts = [c for c in seq_starts if s <= c < b] + [b]
            first = cuts[0]
            for c, nxt in zip(cuts[:-1], cuts[1:]):
                if nxt - first > size and c > first:  # the next sequence would not fit: close the piece
                    out.append(slice(first, c))
                    first = c
            out.append(slice(first, b))
        return out

    def _slices(self, replay: ReplayBatch) -> list[list[tuple[slice, bool]]]:
        """Per optimizer step of an epoch, (slice, is_padding) pairs: the micro slices of its micro-batches,
        padded with repeats up to the largest count over ranks. Under ZeRO every forward (stage 3) and backward
        (stages 2-3) communicates, so all ranks must run the same number; a padding chunk is run with zero loss
        weight and its outputs are dropped."""
        tr = self.config.trainer
        micro = self._micro_slices(replay)
        per_step = tr.per_device_train_batch_size * tr.gradient_accumulation_steps  # completions per optimizer step
        owner = [int(replay.source_row[sl.start]) // per_step for sl in micro]  # the optimizer step of each slice
        return [dp.pad_to_largest(self.backend, [sl for sl, o in zip(micro, owner) if o == m], filler=micro[0])
                for m in range(tr.optimizer_steps_per_epoch)]

    def _token_pass(self, replay: ReplayBatch, num_sequences: int,
                    fn: Callable[[ReplayBatch, slice], torch.Tensor]) -> torch.Tensor:
        """A no-grad pass `fn(rows, slice) -> [r, T]` over the replay, in token space: [N, L] scores (CPU)."""
        out = torch.zeros(num_sequences, replay.response_length)
        with torch.no_grad():
            for sl, pad in (chunk for step in self._slices(replay) for chunk in step):
                batch = replay.slice(sl)
                values = fn(batch, sl)
                if not pad:
                    seqs, scores, _ = batch.to_tokens(values.float(), num_sequences)
                    out.index_add_(0, seqs.cpu(), scores.detach().cpu())
        return out

    def _replay(self, traj: Trajectory, train_step: torch.Tensor, iteration: int) -> ReplayBatch:
        """The training rows of PPO iteration `iteration` (the published estimators draw fresh masks each time)."""
        alg, tr = self.config.algorithm, self.config.trainer
        seed = derive_seed(tr.seed, REPLAY_STREAM, self.step, iteration, self.backend.rank)
        return build_replay(traj, train_step, alg.estimator, alg.p_mask_prompt, torch.Generator().manual_seed(seed))

    def update(self, traj: Trajectory, train_step: torch.Tensor, replay: ReplayBatch, adv: credit.Advantages,
               old_values: torch.Tensor | None) -> dict[str, float]:
        """`num_iterations` PPO epochs (policy, then value model), every loss term in token space [N, L]."""
        alg, tr = self.config.algorithm, self.config.trainer
        est = estimator_spec(alg.estimator)
        N = traj.num_sequences
        replays = [replay] + [self._replay(traj, train_step, j) if est.fresh_masks else replay
                              for j in range(1, alg.num_iterations)]
        loss_mask = traj.completion_mask() if est.completion_loss_mask else traj.action_mask
        mask = loss_mask & adv.token_mask  # [N, L]
        microbatch = torch.arange(N) // tr.per_device_train_batch_size  # [N]
        minibatch = microbatch // tr.gradient_accumulation_steps  # [N] the optimizer step that trains the row
        # step-mean groups tokens by step; state-sum counts the training states (replay rows) that score them
        states = replay.token_rows(mask.shape) if alg.loss_aggregation == "state-sum" else train_step
        step_ids = torch.where(mask, states, -1)
        # weights over each optimizer step's WHOLE batch (every micro-batch and rank): its micro-batches then sum
        # to exactly that step's loss; one step per epoch unless trainer.steps_per_generation asks for more
        weights = torch.zeros(mask.shape, dtype=torch.float32)
        counted = adv.counted if adv.counted is not None else torch.ones(N, dtype=torch.bool)
        steps = tr.optimizer_steps_per_epoch
        for m in range(steps):  # the same count on every rank (the counts all-reduce)
            rows = (minibatch == m) & counted  # pass_rate_filter's dropped groups: as if never batched
            weights[rows] = losses.token_weights(mask[rows], alg.loss_aggregation, step_ids[rows],
                                                 microbatch=microbatch[rows], all_reduce=self.all_reduce)
        # an optimizer step with no token to train anywhere is skipped (Adam's momentum would still move the weights)
        per_step = torch.zeros(steps, dtype=torch.float64).index_add(0, minibatch.clamp(max=steps - 1),
                                                                      (mask & counted[:, None]).sum(1).double())
        state = UpdateState(mask=mask, advantages=adv.advantages, weights=weights, returns=adv.returns,
                             old_values=old_values, step_has_tokens=(self.all_reduce(per_step) > 0).tolist())
        state.ref = self._reference_scores(traj, replays) if alg.beta > 0 and alg.kl_against == "reference" else None
        state.old = self._old_scores(traj, replays)
        if alg.estimator == "trace" and alg.shrink == 1:  # trace rows replay the sampler's own states
            state.behaviour, state.top1 = traj.behaviour_logprob, traj.behaviour_top1
        metrics: dict[str, float] = {}
        for epoch, rows in enumerate(replays):
            state.epoch = epoch
            for trainable, objectives in self.objectives:  # (policy) [+ (value)], or (policy + LoRA value) at once
                metrics.update(self._epoch(trainable, objectives, rows, state))
            if epoch == 0:
                first = {k: v for k, v in metrics.items() if k.startswith("rollout/")}
        return {**metrics, **first}

    def _reference_scores(self, traj: Trajectory, replays: list[ReplayBatch]) -> list[torch.Tensor]:
        """The reference policy's token scores [N, L] for each epoch's rows (one pass per distinct replay)."""
        out: dict[int, torch.Tensor] = {}
        with self._reference() as ref:
            for rows in replays:
                if id(rows) not in out:
                    out[id(rows)] = self._token_pass(rows, traj.num_sequences, lambda b, sl: self._token_logprobs(
                        ref, b, b.target_ids)[0])
        return [out[id(rows)] for rows in replays]

    def _old_scores(self, traj: Trajectory, replays: list[ReplayBatch]) -> list[torch.Tensor | None]:
        """The scores the PPO ratio divides by, per epoch: the sampler's own log-probs (`rollout`), or the
        pre-update policy's (`recompute`). None = take them from the first epoch's gradient pass, which runs the
        pre-update weights on the same rows: a separate no-grad forward would only reproduce them (TRL does the
        same). Later epochs on fresh masks (d1, coupled) get theirs now, before any update, as published; a model
        with active dropout gets a separate eval-mode forward for the first epoch too. wd1 has no ratio."""
        alg = self.config.algorithm
        if alg.loss_type == "wd1":
            return [None] * len(replays)
        if alg.old_logprobs == "rollout":
            return [traj.behaviour_logprob] * len(replays)
        out: list[torch.Tensor | None] = []
        self.model.eval()  # (the docstring's eval-mode pass, whatever mode the model was left in)
        # the first epoch's gradient pass runs the pre-update weights only while nothing has stepped: with several
        # optimizer steps per epoch, or dropout, the old scores get their own eval-mode pass
        own_pass = has_dropout(self.model) or self.config.trainer.optimizer_steps_per_epoch > 1
        for epoch, rows in enumerate(replays):
            if rows is replays[0] and not (epoch == 0 and own_pass):
                out.append(out[0] if epoch else None)  # the first epoch's (filled in by its gradient pass)
                continue
            out.append(self._token_pass(rows, traj.num_sequences, lambda b, sl: self._token_logprobs(
                self.model, b, b.target_ids)[0]))
        return out

    def _epoch(self, trainable: Any, objectives: tuple[str, ...], replay: ReplayBatch, state: UpdateState
               ) -> dict[str, float]:
        """One pass over the replay rows for one optimizer: per forward chunk, the objectives' losses (policy,
        value, or both) summed into ONE backward, then one step. Under ZeRO every backward must touch every trained
        parameter of the engine (stage 3 overwrites its gradient buffers on the first backward of a step and, with
        offload, hands them to the optimizer on the last), hence one summed backward when the LoRA value adapter
        shares the policy's engine."""
        sums: dict[str, dict[str, float]] = {name: {} for name in objectives}
        norms = []
        for chunks, has_tokens in zip(self._slices(replay), state.step_has_tokens):  # one optimizer step each
            if not has_tokens:  # (trainer.steps_per_generation); every rank agrees (the counts were all-reduced)
                continue
            trainable.zero_grad()
            for i, (sl, pad) in enumerate(chunks):
                batch = replay.slice(sl)
                outputs = trainable.run(lambda: [self._forward(name, batch) for name in objectives])
                parts = [self._loss(name, state, batch, pad, out) for name, out in zip(objectives, outputs)]
                loss = parts[0][0].loss
                for out, _ in parts[1:]:
                    loss = loss + out.loss.to(loss.device)
                trainable.backward(loss, boundary=i == len(chunks) - 1)
                if not pad:
                    for name, (out, tokens) in zip(objectives, parts):
                        accumulate(sums[name], out.metrics, tokens, out.loss.item() if name == "policy" else None)
            norms.append(trainable.step(self.config.optimizer.max_grad_norm))
            if trainable is self.policy:
                self.scheduler.step()
            state.stepped = state.stepped or "policy" in objectives
        if "policy" in objectives:
            state.first_epoch_done()
        self.model.eval()
        metrics = {k: v for name in objectives for k, v in self._finish(sums[name], max(len(norms), 1)).items()}
        grad_norm = sum(norms) / len(norms) if norms else 0.0
        return {**metrics, "grad_norm": grad_norm} if "policy" in objectives else metrics

    def _forward(self, objective: str, batch: ReplayBatch) -> Any:
        """The policy's (log-probs, entropy) in train mode, or the value model's values [r, T]; the value model
        reads the policy's modules (LoRA value adapter) in eval mode, so both run in the mode they are meant to."""
        if objective == "policy":
            self.model.train()
            return self._token_logprobs(self.model, batch, batch.target_ids, with_entropy=True)
        self.model.eval()
        return self.value_model(batch)

    def _loss(self, objective: str, state: UpdateState, batch: ReplayBatch, pad: bool, out: Any
              ) -> tuple[losses.LossOutput, float]:
        return self._policy_loss(state, batch, pad, out) if objective == "policy" else (
            self._value_loss(state, batch, pad, out))

    def _token_logprobs(self, model: DiffusionLM, batch: ReplayBatch, targets: torch.Tensor, with_entropy=False):
        """Replay log-probs under the rollout's sampling distribution (temperature, top-k, top-p)."""
        r = self.config.rollout
        return token_logprobs(model, batch, targets, r.temperature, with_entropy, top_k=r.top_k, top_p=r.top_p)

    def _policy_loss(self, state: UpdateState, batch: ReplayBatch, pad: bool, scores: TokenScores
                     ) -> tuple[losses.LossOutput, float]:
        """This chunk's share of the policy loss, in token space (a padding chunk weighs nothing), and the number
        of tokens it scored. The first epoch also measures how far the replay is from the sampler (`rollout/*`,
        trace rows: they replay the sampler's own states) and, when the old scores come from this pass, stores
        them for the later epochs."""
        alg = self.config.algorithm
        N = state.mask.shape[0]
        seqs, lp_tok, touched = batch.to_tokens(scores.logprob, N)  # [k], [k, L], [k, L]
        dev, idx = lp_tok.device, seqs.cpu()
        ent_tok = mean_over_rows(batch, scores.entropy, N)
        m = state.mask[idx].to(dev) & touched
        old = state.old[state.epoch]
        if old is None and alg.loss_type != "wd1":  # the first epoch's own scores (see _old_scores)
            old = state.fill_old(idx, lp_tok.detach(), touched)
        old_tok = None if old is None else old[idx].to(dev)
        behaviour = None if state.behaviour is None else state.behaviour[idx].to(dev)
        is_weights = None
        if alg.rollout_correction == "tis":  # truncated importance sampling: min(pi_old / pi_sampler, C)
            is_weights = torch.exp(old_tok - behaviour).clamp(max=alg.tis_cap)
        w = state.weights[idx].to(dev)
        ref = None if state.ref is None else state.ref[state.epoch][idx].to(dev)
        if alg.beta > 0 and alg.kl_against == "old":  # dLLM-RL: the KL to the policy that started this RL step
            ref = old_tok
        out = losses.policy_loss(
            lp_tok, old_tok, state.advantages[idx].to(dev), m,
            kind="reinforce" if alg.loss_type in ("reinforce", "wd1") else "ppo",
            epsilon_low=alg.epsilon, epsilon_high=alg.epsilon_high, log_ratio_clamp=alg.log_ratio_clamp,
            weights=torch.zeros_like(w) if pad else w, ref_logprob=ref, beta=alg.beta, kl_kind=alg.kl_estimator,
            entropy=ent_tok if alg.entropy_coef else ent_tok.detach(), entropy_coef=alg.entropy_coef,
            is_weights=is_weights,
        )
        # how far the sampler was from the model it ran: measured before the policy's first step has moved it
        if state.epoch == 0 and not state.stepped and behaviour is not None and m.any():
            out.metrics.update(fidelity(lp_tok.detach(), behaviour, m, is_weights, batch, scores.top1,
                                         None if state.top1 is None else state.top1[idx].to(dev), N))
        return out, float(m.sum())

    def _value_loss(self, state: UpdateState, batch: ReplayBatch, pad: bool, values: torch.Tensor
                    ) -> tuple[losses.LossOutput, float]:
        N = state.mask.shape[0]
        seqs, v_tok, touched = batch.to_tokens(values.float(), N)
        dev, idx = v_tok.device, seqs.cpu()
        m = state.mask[idx].to(dev) & touched
        w = state.weights[idx].to(dev)
        out = losses.value_loss(v_tok, state.old_values[idx].to(dev), state.returns[idx].to(dev), m,
                                self.config.algorithm.value_clip, weights=torch.zeros_like(w) if pad else w)
        return out, float(m.sum())

    def _finish(self, sums: dict[str, float], optimizer_steps: int) -> dict[str, float]:
        """Token-weighted means over every rank's chunks (the loss: the sum of the ranks' shares, per step)."""
        return finish(dp.sum_over_ranks(self.backend, sums), optimizer_steps)


# ---- small helpers --------------------------------------------------------------------------------------------
def _adapter_already_trained(model: DiffusionLM) -> bool:
    """A LoRA adapter whose B matrices are not all zero (a fresh one starts at B = 0: disabled == enabled)."""
    return any(p.detach().abs().sum().item() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def _is_value(p: torch.nn.Parameter, trainer: RLTrainer) -> bool:
    """A LoRA value adapter lives inside the policy's peft model; the policy optimizer must not own it."""
    vm = trainer.value_model
    return vm is not None and vm.adapter is not None and any(p is q for q in vm.trainable_parameters())


def as_reward_set(reward_fn: Callable[..., Any]) -> Any:
    """A bare TRL-style callable becomes a one-reward RewardSet, so its values are checked like every other
    reward's (the count, finite numbers, not text), and an error names it and the sample."""
    from reward_models.combine import RewardSet

    if isinstance(reward_fn, RewardSet):
        return reward_fn
    if not callable(reward_fn):
        raise UserError(f"reward_fn: expected a reward function or a RewardSet, got {type(reward_fn).__name__}")
    return RewardSet([reward_fn])


def completions_per_step(tr: TrainerConfig) -> int:
    """Completions per device per RL step (TRL: per_device_train_batch_size x steps_per_generation)."""
    return tr.per_device_train_batch_size * tr.micro_batches_per_step


SAMPLE_COLUMNS = ("prompt", "completion", "reward", "unmask_order")  # W&B's "completions" table, then log_extra's


def sample_rows(batch: ScoredBatch, limit: int) -> tuple[list[str], list[list[Any]]]:
    """The first `limit` completions of a step as W&B table rows: SAMPLE_COLUMNS, then every column the rewards
    gave to `log_extra` (TRL adds them to its completions table too); a column a reward logged fewer values for
    than there are completions is None where it has none."""
    extra = sorted(batch.extra)
    rows = []
    for i in range(min(limit, len(batch.completions))):
        own = [str(batch.prompts[i]), batch.completions[i], float(batch.rewards[i]), batch.traj.unmask_step[i].tolist()]
        rows.append(own + [batch.extra[c][i] if i < len(batch.extra[c]) else None for c in extra])
    return [*SAMPLE_COLUMNS, *extra], rows


def keep_reward_metrics(reward_metrics: dict[str, float], trainer_metrics: dict[str, float]) -> dict[str, float]:
    """The step's metrics: the trainer's, plus the rewards' (rewards/<name>/..., and what they gave `log_metric`).
    A reward metric named like one of the trainer's (`loss`, `kl`, `learning_rate`, ...) is kept as
    `reward_log/<name>` rather than being overwritten by the trainer's value, or overwriting it."""
    merged = dict(trainer_metrics)
    for name, value in reward_metrics.items():
        merged[f"reward_log/{name}" if name in trainer_metrics else name] = value
    return merged
