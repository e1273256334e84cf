"""The recipe schema: typed sections of dataclasses. Field names follow TRL's GRPOConfig where the meaning is the
same; diffusion fields are named as the field names them. Every field's comment is its help text.

Closed choices are Literal types (tracerl/choices.py), checked as the recipe is read; every section checks its own
values (`validate`, raising UserError with the key path), and RLConfig.validate the combinations across sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from reward_models.loader import RewardSpec
from tracerl.choices import (Aggregation, DType, KLAgainst, KLKind, LossType, OldLogprobs, OnError, RolloutCorrection,
                             ScaleRewards, ValueOutcome)
from tracerl.errors import UserError
from tracerl.rollout.config import RolloutConfig

__all__ = ["AlgorithmConfig", "DataConfig", "DistributedConfig", "EvalConfig", "LoggingConfig", "ModelConfig",
           "OptimizerConfig", "PeftSection", "RLConfig", "RewardSpec", "SFTConfig", "SFTSection",
           "SFTTrainerConfig", "TrainerConfig"]


def _positive(section: str, **values: float | int | None) -> None:
    for key, value in values.items():
        if value is not None and not value > 0:  # `not >` also refuses NaN
            raise UserError(f"{_key(section, key)}: must be > 0, got {value}")


def _non_negative(section: str, **values: float | None) -> None:
    for key, value in values.items():
        if value is not None and not value >= 0:
            raise UserError(f"{_key(section, key)}: must be >= 0, got {value}")


def _key(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _check_scheduler(name: str) -> None:
    """optimizer.lr_scheduler_type must be a transformers schedule that needs no further options (the recipe has
    none to give): probed on a throwaway optimizer, so a typo fails here and not after the model has loaded."""
    import torch
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        schedule = get_scheduler(name, probe, num_warmup_steps=0, num_training_steps=1)
    except (ValueError, TypeError, KeyError) as exc:  # transformers' message lists the names
        raise UserError(f"optimizer.lr_scheduler_type={name!r} is not usable here: {exc}") from None
    probe.step()
    try:  # stepped as the training loops step it: once per optimizer step, with no metric
        schedule.step()
    except TypeError:
        raise UserError(f"optimizer.lr_scheduler_type={name!r} steps on a validation metric, which the training "
                        "loop does not give it; use a schedule over the steps (linear, cosine, constant, ...)") from None


MAX_SEED = 2**32 - 1


def _check_output_dir(output_dir: object) -> None:
    """An empty output_dir would write checkpoints and metrics.jsonl into the current directory, where the next
    fresh run would set them aside as another run's."""
    if not isinstance(output_dir, str) or not output_dir.strip():
        raise UserError(f"trainer.output_dir: {output_dir!r} is empty; name the directory the run writes to")


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:  # the prompt order's generator takes seed * 1_000_003 + epoch as a 64-bit int
        raise UserError(f"trainer.seed: must lie in [0, {MAX_SEED}], got {seed}")


@dataclass
class ModelConfig:
    path: str = ""  # local checkpoint directory (Hugging Face layout)
    dtype: DType = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    block_size: int | None = None  # block-diffusion families: override the checkpoint's block size
    mask_token_id: int | None = None  # override the checkpoint's [MASK] id
    trust_remote_code: bool = False  # families TraceRL has no native loader for
    tokenizer: str | None = None  # a tokenizer directory, for checkpoints published without one (MDLM, SEDD: GPT-2's)
    use_chat_template: bool = False  # format string prompts with the tokenizer's chat template (instruct models;
    #   prompts given as chat messages always are, as in TRL)
    system_prompt: str | None = None  # prepended as a system message when use_chat_template is on

    def validate(self) -> None:
        _positive("model", block_size=self.block_size)
        _non_negative("model", mask_token_id=self.mask_token_id)
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as exc:
                raise UserError(f"model.device: {self.device!r} is not a device (auto | cpu | cuda | cuda:N): "
                                f"{exc}") from None


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # local jsonl / json / parquet / csv files
    dataset_name: str | None = None  # a Hugging Face dataset name or local dataset directory (instead of files)
    dataset_config: str | None = None  # the dataset's configuration name (e.g. "main" for gsm8k)
    split: str = "train"  # split to train on
    eval_files: list[str] = field(default_factory=list)  # held-out files for `tracerl eval` (default: eval_split)
    eval_split: str = "test"  # split used by `tracerl eval` when no eval_files are given
    prompt_column: str = "prompt"  # a string, or chat messages ([{role, content}, ...])
    prompt_template: str | None = None  # build the prompt from other columns, e.g. "Solve: {puzzle}"
    max_eval_samples: int | None = None  # evaluate at most this many rows

    def validate(self) -> None:
        _positive("data", max_eval_samples=self.max_eval_samples)
        # a split that would be silently ignored: it selects from data.dataset_name only
        if self.train_files and self.split != "train":
            raise UserError(f"data.split={self.split!r} selects a split of data.dataset_name, but the training data "
                            "is data.train_files; drop one of them")


@dataclass
class PeftSection:
    r: int | None = None  # LoRA rank; null = full fine-tuning
    lora_alpha: int = 16  # LoRA scaling numerator (scale = lora_alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    target_modules: list[str] | str = "all-linear"  # module names, or "all-linear"

    def validate(self) -> None:
        if self.r is not None and self.r <= 0:  # r: 0 would otherwise mean full fine-tuning, silently
            raise UserError(f"peft.r: must be > 0 (the LoRA rank), or null for full fine-tuning; got {self.r}")
        _positive("peft", lora_alpha=self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"peft.lora_dropout: must lie in [0, 1), got {self.lora_dropout}")


@dataclass
class DistributedConfig:
    deepspeed: str | None = None  # DeepSpeed JSON config (recipes/deepspeed/zero2.json ...); null = plain torch


@dataclass
class EvalConfig:
    temperature: float = 0.0  # evaluation sampling temperature (0 = greedy)
    batch_size: int = 32  # prompts per rollout batch
    num_generations: int = 1  # completions per prompt
    success_threshold: float = 1.0  # a sample counts as solved (accuracy) when its total reward reaches this
    output_file: str | None = None  # JSONL of prompts, completions, rewards, trajectories (default: in output_dir)


@dataclass
class AlgorithmConfig:
    estimator: str = "trace"  # trace (TraceRL) | d1 (diffu-GRPO) | coupled (coupled-GRPO) | wd1 (tracerl/estimators.py)
    shrink: int = 1  # TraceRL step shrinkage s: merge every s consecutive trace steps into one training state
    p_mask_prompt: float | None = None  # d1 / wd1: probability of masking each prompt token (unset: 0.15 as
    #   published; 0 for trace and coupled)
    loss_type: LossType | None = None  # ppo (clipped ratio) | reinforce (no ratio); unset: the estimator's (wd1: its
    #   own)
    epsilon: float = 0.2  # PPO clip: ratio kept in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher); None = epsilon
    log_ratio_clamp: float = 20.0  # |log ratio| is clamped before exp for stability
    beta: float = 0.0  # KL coefficient (0 = no KL term, and no reference model)
    kl_estimator: KLKind = "k3"  # k1 | k2 | k3
    kl_against: KLAgainst = "reference"  # reference (the frozen start policy: TRL, d1) | old (the policy before
    #   this RL step's update, dLLM-RL's: no reference model; nonzero only once the policy has stepped, i.e. with
    #   trainer.steps_per_generation or num_iterations > 1)
    loss_aggregation: Aggregation | None = None  # token-mean | step-mean | sequence-mean | sequence-sum (Dr. GRPO) |
    #   state-sum (dLLM-RL's block diffusion: each training state's sum / L, averaged over the states; trace only) |
    #   microbatch-token-mean (d1, coupled: sum(m l) / sum(m) per micro-batch) | microbatch-sum (wd1); unset: the
    #   estimator's (trace: token-mean)
    scale_rewards: ScaleRewards | None = None  # group | group-population | batch | none: divide the group-relative
    #   advantage by which std (group: unbiased + 1e-4, TRL's; group-population: population std, no eps, dLLM-RL's
    #   z-score); unset: the estimator's (trace: group, as TRL; d1, coupled, wd1: none, as published)
    drop_zero_std_groups: bool = False  # groups whose rewards are all equal carry no signal: drop their rows
    pass_rate_filter: list[float] | None = None  # [low, high]: train only on groups whose mean reward (pass rate)
    #   lies in [low, high]; dLLM-RL: [0.2, 0.8]; None = every group
    trained_pad_tokens: int | None = None  # train on only the first N pad tokens of each completion (the rest stay
    #   masked in the replay's input but are not scored); dLLM-RL's post_num: 0; None = every committed token
    old_logprobs: OldLogprobs = "recompute"  # recompute (pre-update weights) | rollout (behaviour log-probs, trace only)
    entropy_coef: float = 0.0  # entropy bonus coefficient
    num_iterations: int = 1  # PPO epochs over each rollout batch (TRL's num_iterations)
    use_value_model: bool = False  # TraceRL's diffusion value model with step-level GAE
    gamma: float = 1.0  # GAE discount over trace steps
    lam: float = 1.0  # GAE lambda
    value_clip: float | None = 0.2  # clipped value loss range (None = unclipped)
    value_learning_rate: float | None = None  # None = optimizer.learning_rate
    whiten_advantages: bool = True  # normalise GAE advantages over the batch (value-model path; as PPO and verl do)
    value_outcome: ValueOutcome = "raw"  # the outcome reward the value path's GAE sees: raw, or group (its
    #   group-relative advantage under scale_rewards: dLLM-RL feeds the z-score, scale_rewards group-population,
    #   with whiten_advantages false)
    process_reward_coef: float = 1.0  # weight of process (per-step / per-token) rewards against the outcome, after
    #   each is normalised (group baselines) or in the GAE rewards (value model); 0 = ignore them
    rollout_correction: RolloutCorrection = "none"  # none | tis: weight each token's policy loss by
    #   min(pi_old / pi_sampler, tis_cap), the truncated importance weight of a sampler that is not the model
    #   (rollout.cache's approximate forwards); trace estimator, shrink 1, old_logprobs recompute
    tis_cap: float = 2.0  # C of the truncated importance weight (verl's recipe value)

    def validate(self) -> None:
        from tracerl.estimators import spec

        spec(self.estimator)  # names the estimators (and a renamed one's new name)
        _positive("algorithm", shrink=self.shrink, num_iterations=self.num_iterations)
        for key in ("epsilon", "beta", "entropy_coef", "log_ratio_clamp"):
            if getattr(self, key) < 0:
                raise UserError(f"algorithm.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"algorithm.{key}: must lie in [0, 1], got {getattr(self, key)}")
        if self.num_iterations > 1 and self.loss_type == "reinforce":
            raise UserError("algorithm.num_iterations > 1 needs algorithm.loss_type=ppo (REINFORCE has no ratio to "
                            "clip a stale policy with)")
        if self.old_logprobs == "rollout" and self.estimator != "trace":
            raise UserError("algorithm.old_logprobs=rollout needs algorithm.estimator=trace: the behaviour log-probs "
                            f"were taken on the rollout's own states, not on {self.estimator}'s random masks")
        if self.old_logprobs == "rollout" and self.shrink != 1:
            raise UserError("algorithm.old_logprobs=rollout needs algorithm.shrink=1: a merged step is replayed from "
                            "the state before its first step, not the states the behaviour log-probs were taken on")
        if self.rollout_correction == "tis" and (self.estimator != "trace" or self.shrink != 1
                                                  or self.old_logprobs != "recompute"):
            raise UserError("algorithm.rollout_correction=tis needs algorithm.estimator=trace, algorithm.shrink=1 and "
                            "algorithm.old_logprobs=recompute: it weighs the replay's old log-prob against the "
                            "sampler's, token by token on the states the sampler visited")
        if self.loss_aggregation == "state-sum" and self.estimator != "trace":
            raise UserError(f"algorithm.loss_aggregation=state-sum needs algorithm.estimator=trace: it counts the "
                            f"trajectory states the replay trains on, and {self.estimator} trains on random masks "
                            f"(sequence-sum is its per-response counterpart)")
        if self.kl_against == "old" and self.beta > 0 and self.estimator == "wd1":
            raise UserError("algorithm.kl_against=old does not go with algorithm.estimator=wd1: wd1 keeps no old "
                            "log-probs (its objective has no ratio)")
        if self.pass_rate_filter is not None:
            band = self.pass_rate_filter
            if len(band) != 2 or not all(math.isfinite(v) for v in band) or band[0] > band[1]:
                raise UserError(f"algorithm.pass_rate_filter: expected [low, high] with low <= high (dLLM-RL: "
                                f"[0.2, 0.8]), got {band}")
        if self.trained_pad_tokens is not None and self.trained_pad_tokens < 0:
            raise UserError(f"algorithm.trained_pad_tokens: must be >= 0 (or null: train every token), got "
                            f"{self.trained_pad_tokens}")
        _positive("algorithm", tis_cap=self.tis_cap, value_clip=self.value_clip,
                  value_learning_rate=self.value_learning_rate)
        _non_negative("algorithm", epsilon_high=self.epsilon_high)
        if self.value_outcome != "raw" and not self.use_value_model:
            raise UserError(f"algorithm.value_outcome={self.value_outcome} needs algorithm.use_value_model: true (it "
                            "is the reward the value model's GAE sees)")
        if self.use_value_model and self.estimator != "trace":
            raise UserError("algorithm.use_value_model needs algorithm.estimator=trace (values live on trace steps)")


@dataclass
class OptimizerConfig:
    learning_rate: float = 1e-6  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float | None = 1.0  # gradient clipping (None = off)
    lr_scheduler_type: str = "constant"  # any transformers scheduler name: constant | linear | cosine | ...
    warmup_ratio: float = 0.0  # share of the optimizer steps spent warming the learning rate up

    def validate(self) -> None:
        _positive("optimizer", learning_rate=self.learning_rate, max_grad_norm=self.max_grad_norm)
        _non_negative("optimizer", weight_decay=self.weight_decay, adam_epsilon=self.adam_epsilon)
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"optimizer.{key}: must lie in [0, 1), got {getattr(self, key)}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UserError(f"optimizer.warmup_ratio: must lie in [0, 1], got {self.warmup_ratio}")
        _check_scheduler(self.lr_scheduler_type)


@dataclass
class TrainerConfig:
    max_steps: int = 100  # RL steps (one rollout batch each)
    num_generations: int = 8  # G completions per prompt (a group)
    per_device_train_batch_size: int = 8  # completions per device per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step; completions per device per RL step =
    #   per_device_train_batch_size * gradient_accumulation_steps (a multiple of num_generations)
    steps_per_generation: int | None = None  # TRL's: micro-batches per RL step; completions per device per RL
    #   step = per_device_train_batch_size * steps_per_generation, an optimizer step every
    #   gradient_accumulation_steps of them (steps_per_generation / gradient_accumulation_steps optimizer steps per
    #   PPO epoch, each normalising its own loss); None = gradient_accumulation_steps (one step per epoch)
    replay_batch_size: int = 0  # training rows per forward inside a micro-batch (0 = all at once; a memory knob)
    seed: int = 0  # seeds prompt order, rollouts and random masks (each rank offsets it)
    output_dir: str = "outputs/run"  # checkpoints, metrics.jsonl and W&B files go here
    save_steps: int = 0  # checkpoint every N steps (0 = only at the end)
    save_total_limit: int | None = None  # keep at most N checkpoints (oldest deleted first)
    logging_steps: int = 1  # print a metrics line every N steps (metrics.jsonl gets every step)
    eval_steps: int = 0  # evaluate the eval data every N steps, and before the first and after the last (0 = off)
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in output_dir

    def validate(self) -> None:
        _positive("trainer", max_steps=self.max_steps, num_generations=self.num_generations,
                  per_device_train_batch_size=self.per_device_train_batch_size,
                  gradient_accumulation_steps=self.gradient_accumulation_steps, logging_steps=self.logging_steps,
                  save_total_limit=self.save_total_limit)  # a limit <= 0 would delete the checkpoint just written
        _non_negative("trainer", replay_batch_size=self.replay_batch_size, save_steps=self.save_steps,
                      eval_steps=self.eval_steps)
        _check_seed(self.seed)
        _check_output_dir(self.output_dir)
        _positive("trainer", steps_per_generation=self.steps_per_generation)
        if self.steps_per_generation is not None and self.steps_per_generation % self.gradient_accumulation_steps:
            raise UserError(f"trainer.steps_per_generation={self.steps_per_generation} is not a multiple of "
                            f"trainer.gradient_accumulation_steps={self.gradient_accumulation_steps} (an optimizer "
                            "step takes gradient_accumulation_steps micro-batches)")
        micro = "steps_per_generation" if self.steps_per_generation else "gradient_accumulation_steps"
        per_step = self.per_device_train_batch_size * self.micro_batches_per_step
        if per_step % self.num_generations:
            raise UserError(
                f"trainer.per_device_train_batch_size x trainer.{micro} = {per_step} completions "
                f"per step is not a multiple of trainer.num_generations={self.num_generations}")

    @property
    def micro_batches_per_step(self) -> int:
        return self.steps_per_generation or self.gradient_accumulation_steps

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return self.micro_batches_per_step // self.gradient_accumulation_steps


@dataclass
class SFTTrainerConfig:
    max_steps: int = 100  # optimizer steps
    per_device_train_batch_size: int = 8  # rows per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    seed: int = 0  # seeds the row order and the masks
    output_dir: str = "outputs/sft"  # metrics.jsonl, W&B files, checkpoints and the final model (output_dir/final)
    logging_steps: int = 1  # print a metrics line every N steps (metrics.jsonl gets every step)
    save_steps: int = 0  # checkpoint every N steps, and at the end (0 = only the final model)
    save_total_limit: int | None = None  # keep at most N checkpoints (oldest deleted first)
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in output_dir: continue exactly

    def validate(self) -> None:
        _positive("trainer", max_steps=self.max_steps, per_device_train_batch_size=self.per_device_train_batch_size,
                  gradient_accumulation_steps=self.gradient_accumulation_steps, logging_steps=self.logging_steps,
                  save_total_limit=self.save_total_limit)
        _non_negative("trainer", save_steps=self.save_steps)
        _check_seed(self.seed)
        _check_output_dir(self.output_dir)


@dataclass
class LoggingConfig:
    report_to: list[str] = field(default_factory=list)  # [] | [wandb]
    project: str | None = None  # W&B project (default: $WANDB_PROJECT or "tracerl")
    run_name: str | None = None  # W&B run name (default: W&B's own)

    def validate(self) -> None:
        unknown = [name for name in self.report_to if name not in ("wandb", "none")]
        if unknown:  # a typo (wandbb) or another tracker would otherwise log nothing, silently
            raise UserError(f"logging.report_to: {unknown[0]!r} is not a tracker TraceRL reports to (wandb, or none; "
                            "metrics.jsonl in trainer.output_dir is always written)")


@dataclass
class RLConfig:
    """Everything one RL run needs, section by section (the YAML recipe's top level)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rewards: list[RewardSpec] = field(default_factory=list)  # reward functions, summed with their weights
    reward_on_error: OnError = "raise"  # raise | zero: a reward that fails is an error, or scores 0 and is counted
    reward_timeout_s: float | None = None  # a reward call taking longer is an error (or 0 with on_error: zero)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Every section's own checks, then the combinations across sections (before any model loads)."""
        try:
            self.rollout.validate()
            if self.rollout.block_length is not None:  # else the model's block size decides, checked at load
                self.rollout.resolve_block_length(None)
        except UserError as exc:
            raise UserError(f"rollout.{exc}") from None
        for section in (self.model, self.data, self.algorithm, self.optimizer, self.trainer, self.peft, self.logging):
            section.validate()
        if self.eval.batch_size <= 0 or self.eval.num_generations <= 0:
            raise UserError("eval.batch_size and eval.num_generations must be > 0")
        _non_negative("eval", temperature=self.eval.temperature)  # else it fails in the first held-out rollout
        _positive("", reward_timeout_s=self.reward_timeout_s)
        if self.distributed.deepspeed:  # read now (JSON, sections, ZeRO stage), so `validate` catches what `train` would
            from tracerl.ds_config import read_config

            read_config(self.distributed.deepspeed)
        for i, spec in enumerate(self.rewards):
            if not spec.fn:
                raise UserError(f"rewards[{i}].fn: every reward needs fn (a built-in name, module:function, "
                                "file.py:function or a reward-model directory)")
        alg, steps = self.algorithm, self.trainer.optimizer_steps_per_epoch
        if self.trainer.num_generations < 2 and not alg.use_value_model:  # TRL refuses it too
            raise UserError("trainer.num_generations=1: the group baseline subtracts each completion's own reward, so "
                            "every advantage would be 0 and nothing would train; use >= 2 completions per prompt, or "
                            "algorithm.use_value_model: true (a learned baseline)")
        if steps > 1 and alg.loss_type == "reinforce":
            raise UserError("trainer.steps_per_generation > trainer.gradient_accumulation_steps needs "
                            "algorithm.loss_type=ppo: the later optimizer steps train on samples of an older policy, "
                            "which REINFORCE has no ratio to correct")
        if alg.kl_against == "old" and alg.beta > 0 and steps == 1 and alg.num_iterations == 1:
            raise UserError("algorithm.kl_against=old with one optimizer step per rollout batch is always 0: the "
                            "policy has not moved from the old one when the loss is taken; set "
                            "trainer.steps_per_generation (several steps per batch) or algorithm.num_iterations > 1, "
                            "or measure the KL against the reference (kl_against: reference)")


@dataclass
class SFTSection:
    completion_column: str = "completion"  # the target text of each row
    max_completion_length: int = 64  # responses are cut / padded with EOS to this many tokens (the model learns to
    #   end: LLaDA's recipe trains on the EOS padding)
    mask_eps: float = 1e-3  # mask ratio t ~ U(mask_eps, 1); the loss is weighted by 1 / t

    def validate(self) -> None:
        _positive("sft", max_completion_length=self.max_completion_length)
        if not 0.0 < self.mask_eps < 1.0:
            raise UserError(f"sft.mask_eps: must lie in (0, 1), got {self.mask_eps}")


@dataclass
class SFTConfig:
    """A masked-diffusion supervised fine-tuning run (warm starts, the demo model). Single process: RL-only keys
    (a DeepSpeed config, num_generations, eval settings, ...) are unknown or refused keys here, not silently
    ignored ones."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        for section in (self.model, self.data, self.sft, self.optimizer, self.trainer, self.peft, self.logging):
            section.validate()
        unused = [f"data.{k}" for k, default in (("eval_files", []), ("eval_split", "test"), ("max_eval_samples", None))
                  if getattr(self.data, k) != default]
        if unused:  # SFT has no evaluation: these would be read by nothing
            raise UserError(f"{', '.join(unused)}: `tracerl sft` runs no evaluation, so nothing would read "
                            f"{'it' if len(unused) == 1 else 'them'}; remove {'it' if len(unused) == 1 else 'them'} "
                            "(evaluate the result with `tracerl eval`)")
