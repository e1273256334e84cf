"""The recipe schema: typed sections of dataclasses. Field names follow TRL's GRPOConfig where the meaning is the
same; diffusion fields are named as the field names them. Every field's comment is its help text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tracerl.rollout.config import RolloutConfig


@dataclass
class ModelConfig:
    path: str = ""  # local checkpoint directory (Hugging Face layout)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    block_size: int | None = None  # block-diffusion families: override the checkpoint's block size
    mask_token_id: int | None = None  # override the checkpoint's [MASK] id
    trust_remote_code: bool = False  # families TraceRL has no native loader for
    tokenizer: str | None = None  # a tokenizer directory, for checkpoints published without one (MDLM, SEDD: GPT-2's)
    use_chat_template: bool = False  # format prompts with the tokenizer's chat template (instruct models)
    system_prompt: str | None = None  # prepended as a system message when use_chat_template is on


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


@dataclass
class PeftSection:
    r: int | None = None  # LoRA rank; null = full fine-tuning
    lora_alpha: int = 16  # LoRA scaling numerator (scale = lora_alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    target_modules: list[str] | str = "all-linear"  # module names, or "all-linear"


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
    loss_type: str | None = None  # ppo (clipped ratio) | reinforce (no ratio); unset: the estimator's (wd1: its own)
    epsilon: float = 0.2  # PPO clip: ratio kept in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher); None = epsilon
    log_ratio_clamp: float = 20.0  # |log ratio| is clamped before exp for stability
    beta: float = 0.0  # KL coefficient against the frozen reference policy (0 = no reference model)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    loss_aggregation: str | None = None  # token-mean | step-mean | sequence-mean | sequence-sum (Dr. GRPO) |
    #   microbatch-token-mean (d1, coupled: sum(m l) / sum(m) per micro-batch) | microbatch-sum (wd1); unset: the
    #   estimator's (trace: token-mean)
    scale_rewards: str | None = None  # group | batch | none: divide the group-relative advantage by which std;
    #   unset: the estimator's (trace: group, as TRL; d1, coupled, wd1: none, as published)
    drop_zero_std_groups: bool = False  # groups whose rewards are all equal carry no signal: drop their rows
    old_logprobs: str = "recompute"  # recompute (pre-update weights) | rollout (behaviour log-probs, trace only)
    entropy_coef: float = 0.0  # entropy bonus coefficient
    num_iterations: int = 1  # PPO epochs over each rollout batch (TRL's num_iterations)
    use_value_model: bool = False  # TraceRL's diffusion value model with step-level GAE
    gamma: float = 1.0  # GAE discount over trace steps
    lam: float = 1.0  # GAE lambda
    value_clip: float | None = 0.2  # clipped value loss range (None = unclipped)
    value_learning_rate: float | None = None  # None = optimizer.learning_rate
    whiten_advantages: bool = True  # normalise GAE advantages over the batch (value-model path; as PPO and verl do)
    process_reward_coef: float = 1.0  # weight of process (per-step / per-token) rewards against the outcome, after
    #   each is normalised (group baselines) or in the GAE rewards (value model); 0 = ignore them


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


@dataclass
class TrainerConfig:
    max_steps: int = 100  # RL steps (one rollout batch each)
    num_generations: int = 8  # G completions per prompt (a group)
    per_device_train_batch_size: int = 8  # completions per device per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step; completions per device per RL step =
    #   per_device_train_batch_size * gradient_accumulation_steps (a multiple of num_generations)
    replay_batch_size: int = 0  # training rows per forward inside a micro-batch (0 = all at once; a memory knob)
    seed: int = 0  # seeds prompt order, rollouts and random masks (each rank offsets it)
    output_dir: str = "outputs/run"  # checkpoints, metrics.jsonl and W&B files go here
    save_steps: int = 0  # checkpoint every N steps (0 = only at the end)
    save_total_limit: int | None = None  # keep at most N checkpoints (oldest deleted first)
    logging_steps: int = 1  # print a metrics line every N steps (metrics.jsonl gets every step)
    eval_steps: int = 0  # evaluate the eval data every N steps, and before the first and after the last (0 = off)
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in output_dir


@dataclass
class LoggingConfig:
    report_to: list[str] = field(default_factory=list)  # [] | [wandb]
    project: str | None = None  # W&B project (default: $WANDB_PROJECT or "tracerl")
    run_name: str | None = None  # W&B run name (default: W&B's own)


@dataclass
class RewardSpec:
    fn: str = ""  # built-in name | pkg.module:function | path/file.py:function | reward-model directory
    name: str | None = None  # metric name (rewards/<name>/mean); default: derived from fn
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # options passed to the built-in / factory


@dataclass
class RLConfig:
    """Everything one RL run needs, section by section (the YAML recipe's top level)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rewards: list[RewardSpec] = field(default_factory=list)  # reward functions, summed with their weights
    reward_on_error: str = "raise"  # raise | zero: a reward that fails is an error, or scores 0 and is counted
    reward_timeout_s: float | None = None  # a reward call taking longer is an error (or 0 with on_error: zero)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SFTSection:
    completion_column: str = "completion"  # the target text of each row
    max_completion_length: int = 64  # responses are cut / padded with EOS to this many tokens (the model learns to
    #   end: LLaDA's recipe trains on the EOS padding)
    mask_eps: float = 1e-3  # mask ratio t ~ U(mask_eps, 1); the loss is weighted by 1 / t


@dataclass
class SFTConfig:
    """A masked-diffusion supervised fine-tuning run (warm starts, the demo model)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
