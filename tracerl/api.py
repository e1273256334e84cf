"""The Python API, shaped like TRL's GRPOTrainer:

    from tracerl import TraceRLConfig, TraceRLTrainer

    trainer = TraceRLTrainer(
        model="outputs/sudoku/sft/final",            # a local checkpoint directory, or a DiffusionLM
        reward_funcs=[solved_reward, "sudoku"],      # TRL-signature callables and/or built-in reward specs
        args=TraceRLConfig(output_dir="outputs/rl", learning_rate=2e-4, max_steps=300, num_generations=8,
                           per_device_train_batch_size=256, max_completion_length=16, steps=4),
        train_dataset=train,                         # a datasets.Dataset (or list of dicts) with a "prompt" column
        eval_dataset=test,
        peft_config=None,                            # or a peft.LoraConfig
    )
    trainer.train()

`TraceRLConfig` is flat, like GRPOConfig, with GRPOConfig's field names where the meaning is the same
(output_dir, learning_rate, num_generations, per_device_train_batch_size, gradient_accumulation_steps,
steps_per_generation, max_completion_length, temperature, top_p, top_k, beta, epsilon, epsilon_high,
num_iterations, scale_rewards, loss_type, reward_weights, report_to, run_name, save_total_limit, deepspeed, ...)
and the diffusion / TraceRL names of the YAML recipes (steps, block_length, remasking, threshold, estimator,
shrink, use_value_model, ...). Where TRL differs:
  - max_steps, save_steps, logging_steps and eval_steps count RL steps (one generation of completions each, then
    num_iterations x steps_per_generation / gradient_accumulation_steps optimizer steps); TRL's count optimizer
    steps. The same numbers train num_iterations x ... times longer than in TRL when those are > 1 (a warning
    says how many optimizer steps the run takes).
  - defaults: lr_scheduler_type "constant" (TRL: "linear"), seed 0 (42), save_steps 0 = at the end only (500),
    logging_steps 1 (10), max_completion_length 64 (512).
  - train(resume_from_checkpoint=True) with no checkpoint in output_dir starts fresh (transformers raises), so one
    script both starts and resumes a job. Every flat field is one field of a recipe section (`FIELDS` says which), so a recipe
and a config convert both ways: `TraceRLConfig.from_recipe(rl_config)`, `config.to_recipe()`. The CLI's `train` is
this API over a recipe. Reward functions get the dataset's other columns as keyword arguments, as in TRL.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from tracerl import config as schema
from tracerl.errors import UserError

# flat name -> "section.field" of the recipe schema (tracerl/config.py); the flat field takes that field's type,
# default and documentation
FIELDS: dict[str, str] = {
    # model loading (TRL passes these through model_init_kwargs; named here as the recipe does)
    "use_chat_template": "model.use_chat_template", "system_prompt": "model.system_prompt",
    # rollout
    "max_completion_length": "rollout.max_completion_length", "steps": "rollout.steps",
    "block_length": "rollout.block_length", "remasking": "rollout.remasking", "threshold": "rollout.threshold",
    "temperature": "rollout.temperature", "top_p": "rollout.top_p", "top_k": "rollout.top_k",
    "use_kv_cache": "rollout.use_kv_cache", "cache": "rollout.cache", "cache_horizon": "rollout.cache_horizon",
    "cache_refresh": "rollout.cache_refresh", "cache_window": "rollout.cache_window", "cache_gamma": "rollout.cache_gamma",
    "cache_drift": "rollout.cache_drift", "after_eos": "rollout.after_eos",
    # algorithm
    "estimator": "algorithm.estimator", "shrink": "algorithm.shrink", "p_mask_prompt": "algorithm.p_mask_prompt",
    "policy_loss": "algorithm.loss_type", "epsilon": "algorithm.epsilon", "epsilon_high": "algorithm.epsilon_high",
    "log_ratio_clamp": "algorithm.log_ratio_clamp", "beta": "algorithm.beta", "kl_estimator": "algorithm.kl_estimator",
    "kl_against": "algorithm.kl_against",
    "loss_aggregation": "algorithm.loss_aggregation", "scale_rewards": "algorithm.scale_rewards",
    "drop_zero_std_groups": "algorithm.drop_zero_std_groups", "old_logprobs": "algorithm.old_logprobs",
    "pass_rate_filter": "algorithm.pass_rate_filter", "trained_pad_tokens": "algorithm.trained_pad_tokens",
    "value_outcome": "algorithm.value_outcome",
    "entropy_coef": "algorithm.entropy_coef", "num_iterations": "algorithm.num_iterations",
    "use_value_model": "algorithm.use_value_model", "gamma": "algorithm.gamma", "lam": "algorithm.lam",
    "value_clip": "algorithm.value_clip", "value_learning_rate": "algorithm.value_learning_rate",
    "whiten_advantages": "algorithm.whiten_advantages", "process_reward_coef": "algorithm.process_reward_coef",
    "rollout_correction": "algorithm.rollout_correction", "tis_cap": "algorithm.tis_cap",
    # rewards
    "reward_on_error": "reward_on_error", "reward_timeout_s": "reward_timeout_s",
    # optimizer
    "learning_rate": "optimizer.learning_rate", "weight_decay": "optimizer.weight_decay",
    "adam_beta1": "optimizer.adam_beta1", "adam_beta2": "optimizer.adam_beta2",
    "adam_epsilon": "optimizer.adam_epsilon", "max_grad_norm": "optimizer.max_grad_norm",
    "lr_scheduler_type": "optimizer.lr_scheduler_type", "warmup_ratio": "optimizer.warmup_ratio",
    # trainer
    "max_steps": "trainer.max_steps", "num_generations": "trainer.num_generations",
    "per_device_train_batch_size": "trainer.per_device_train_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "steps_per_generation": "trainer.steps_per_generation",
    "replay_batch_size": "trainer.replay_batch_size", "seed": "trainer.seed", "output_dir": "trainer.output_dir",
    "save_steps": "trainer.save_steps", "save_total_limit": "trainer.save_total_limit",
    "logging_steps": "trainer.logging_steps", "eval_steps": "trainer.eval_steps",
    "resume_from_checkpoint": "trainer.resume_from_checkpoint",
    # logging, evaluation, distributed
    "report_to": "logging.report_to", "project": "logging.project", "run_name": "logging.run_name",
    "per_device_eval_batch_size": "eval.batch_size", "eval_temperature": "eval.temperature",
    "eval_num_generations": "eval.num_generations", "eval_success_threshold": "eval.success_threshold",
    "deepspeed": "distributed.deepspeed",
}
# recipe fields with no flat counterpart: the trainer takes model, data, rewards and peft as arguments, and the
# rollout seed is derived from `seed` per prompt and step
NOT_FLAT = {"rollout.seed", "eval.output_file"}
# TRL's loss_type names the loss normalisation: the same choices under TraceRL's names
TRL_LOSS_TYPES = {"grpo": "sequence-mean", "bnpo": "microbatch-token-mean", "dapo": "token-mean",
                  "dr_grpo": "sequence-sum"}
# GRPOConfig / TrainingArguments fields TraceRL names differently or does not have: what to use instead
TRL_ONLY = {
    "num_generations_eval": "eval_num_generations",
    "warmup_steps": "warmup_ratio (a share of the optimizer steps)",
    "bf16": "model_init_kwargs={'dtype': 'bfloat16'} (the weights' dtype; DeepSpeed configs set their own)",
    "fp16": "model_init_kwargs={'dtype': 'float16'}",
    "torch_dtype": "model_init_kwargs={'dtype': ...}",
    "max_prompt_length": "nothing: prompts are never cut; a prompt too long for the model is refused by row",
    "generation_batch_size": "per_device_train_batch_size x steps_per_generation (completions per RL step)",
    "eval_strategy": "eval_steps (> 0 evaluates every eval_steps RL steps)",
    "save_strategy": "save_steps (0 = at the end only)",
    "logging_strategy": "logging_steps",
    "mask_truncated_completions": "nothing yet: a completion cut at max_completion_length is trained as it is",
}


def _schema_field(path: str) -> tuple[Any, Any]:
    """(type, default) of a recipe field, e.g. 'optimizer.learning_rate'."""
    kind: Any = schema.RLConfig
    *sections, name = path.split(".")
    for section in sections:
        kind = {f.name: f for f in dataclasses.fields(kind)}[section].default_factory
    field = {f.name: f for f in dataclasses.fields(kind)}[name]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return field.type, default


def _flat_fields() -> list[tuple[str, Any, Any]]:
    out = []
    for flat, path in FIELDS.items():
        kind, default = _schema_field(path)
        value = dataclasses.field(default_factory=lambda d=default: list(d)) if isinstance(default, list) else default
        out.append((flat, kind, value))
    out.append(("reward_weights", "list[float] | None", None))  # TRL's: one weight per reward function
    out.append(("loss_type", "str | None", None))  # TRL's normalisation names (grpo, bnpo, dapo, dr_grpo)
    out.append(("model_init_kwargs", "dict | None", None))  # load_model options: dtype, device, block_size, ...
    return out


def _to_recipe(self: Any) -> schema.RLConfig:
    """The nested recipe config (validated, with the estimator's settings resolved) for these flat settings."""
    import typing

    from tracerl.recipe import convert, validate

    config = schema.RLConfig()
    for flat, path in FIELDS.items():
        *sections, name = path.split(".")
        target = config
        for section in sections:
            target = getattr(target, section)
        # the recipe's type check (choices, whole numbers, finite floats), so the API refuses what a YAML would
        hint = typing.get_type_hints(type(target))[name]
        value = getattr(self, flat)
        if flat == "scale_rewards" and isinstance(value, bool):  # TRL's booleans: True = "group", False = "none"
            value = "group" if value else "none"
        setattr(target, name, convert(hint, value, f"{flat} ({path})"))
    if self.loss_type is not None:
        if self.loss_type not in TRL_LOSS_TYPES:
            raise UserError(f"loss_type: {self.loss_type!r} is not one of TRL's {', '.join(TRL_LOSS_TYPES)} (TraceRL "
                            "names the same choice loss_aggregation; policy_loss picks ppo / reinforce)")
        default = _schema_field("algorithm.loss_aggregation")[1]
        if self.loss_aggregation != default and self.loss_aggregation != TRL_LOSS_TYPES[self.loss_type]:
            raise UserError(f"loss_type={self.loss_type!r} (loss_aggregation {TRL_LOSS_TYPES[self.loss_type]!r}) and "
                            f"loss_aggregation={self.loss_aggregation!r} disagree; give one of them")
        config.algorithm.loss_aggregation = TRL_LOSS_TYPES[self.loss_type]
    from tracerl.estimators import resolve

    config.algorithm = resolve(config.algorithm)
    validate(config)
    per_step = config.algorithm.num_iterations * config.trainer.optimizer_steps_per_epoch
    if per_step > 1:
        import warnings

        warnings.warn(f"max_steps={config.trainer.max_steps} counts RL steps here (one generation each), each taking "
                      f"{per_step} optimizer steps (num_iterations x steps_per_generation / gradient_accumulation_"
                      f"steps): {config.trainer.max_steps * per_step} optimizer steps in all. TRL's max_steps counts "
                      f"optimizer steps; to match a TRL run, divide its max_steps (and save_steps, logging_steps, "
                      f"eval_steps) by {per_step}", UserWarning, stacklevel=3)
    return config


def _from_recipe(cls: type, config: schema.RLConfig, **overrides: Any) -> Any:
    """The flat config of a nested recipe config (its model, data, rewards and peft sections stay with the
    recipe: the trainer takes them as arguments, as GRPOTrainer does)."""
    values = {}
    for flat, path in FIELDS.items():
        value: Any = config
        for part in path.split("."):
            value = getattr(value, part)
        values[flat] = value
    values["reward_weights"] = [r.weight for r in config.rewards] or None
    return cls(**{**values, **overrides})


TraceRLConfig = dataclasses.make_dataclass(
    "TraceRLConfig", _flat_fields(),
    namespace={"to_recipe": _to_recipe, "from_recipe": classmethod(_from_recipe), "__module__": __name__},
)
TraceRLConfig.__doc__ = ("Flat training arguments, GRPOConfig-style; every field is one recipe field (tracerl.api."
                         "FIELDS), plus TRL's reward_weights, loss_type and model_init_kwargs.")
_dataclass_init = TraceRLConfig.__init__


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    """The dataclass's __init__, with GRPOConfig fields TraceRL lacks refused by name and with what to use."""
    known = {f.name for f in dataclasses.fields(TraceRLConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        hints = [f"{name} (use {TRL_ONLY[name]})" if name in TRL_ONLY else name for name in unknown]
        raise UserError(f"TraceRLConfig: no field {', '.join(hints)}; the fields are tracerl.api.FIELDS plus "
                        "reward_weights, loss_type and model_init_kwargs")
    _dataclass_init(self, *args, **kwargs)


TraceRLConfig.__init__ = _init


class TraceRLTrainer:
    """TRL-shaped trainer over TraceRL's RL loop (tracerl.trainer.RLTrainer).

    model: a local checkpoint directory (published layout, TraceRL checkpoint, SFT output or LoRA adapter) or a
    DiffusionLM. reward_funcs: one or a list of TRL-signature callables, built-in names ("math", "sudoku", ...),
    "module:function" / "file.py:function" specs or reward-model directories; weighted by args.reward_weights.
    train_dataset / eval_dataset: datasets.Dataset or a list of dicts with a "prompt" column (a string or chat
    messages); every other column reaches the reward functions. peft_config: a peft.LoraConfig.
    processing_class: a tokenizer to use instead of the checkpoint's. callbacks: transformers TrainerCallback
    instances or classes, called as a transformers Trainer calls them, one RL step per global_step
    (tracerl/callbacks.py: the events, and the control flags acted on). Under the `deepspeed` launcher the ranks
    come from the environment (LOCAL_RANK) and args.deepspeed names the DeepSpeed JSON config.
    """

    def __init__(self, model: Any, reward_funcs: Any, args: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, peft_config: Any = None, processing_class: Any = None,
                 callbacks: Any = None):
        from tracerl.build import make_backend
        from tracerl.callbacks import Callbacks
        from tracerl.trainer import RLTrainer

        self.args = args if args is not None else TraceRLConfig()
        if not isinstance(self.args, TraceRLConfig):
            raise UserError(f"args: expected a TraceRLConfig, got {type(self.args).__name__} (build one with "
                            "TraceRLConfig(**settings))")
        config = self.args.to_recipe()
        if peft_config is not None and not isinstance(peft_config, schema.PeftSection):
            from peft import PeftConfig

            if not isinstance(peft_config, PeftConfig):
                raise UserError(f"peft_config: expected a peft.LoraConfig (or None), got {type(peft_config).__name__}")
        if train_dataset is None:
            raise UserError("TraceRLTrainer: train_dataset is required (rows with a 'prompt' column)")
        rows = _rows(train_dataset, "train_dataset")
        eval_rows = _rows(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        rewards = _reward_set(reward_funcs, self.args, config)
        hooks = Callbacks(callbacks, self.args)  # checked before the model loads; `args` is this config, as in TRL
        from tracerl.build import check_reward_columns

        check_reward_columns(rewards, rows, "train_dataset")  # before the model loads
        if eval_rows is not None:
            check_reward_columns(rewards, eval_rows, "eval_dataset")
        local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
        backend = make_backend(config, local_rank)  # before the model loads: "cuda" then means this rank's GPU
        self.model = _model(model, self.args.model_init_kwargs, peft_config, self.args.seed)
        if processing_class is not None:
            self.model.tokenizer = processing_class
        self.config = config
        self.trainer = RLTrainer(config, self.model, rewards, rows, backend=backend, eval_rows=eval_rows,
                                 callbacks=hooks)

    @property
    def state(self) -> Any:
        """transformers' TrainerState: global_step (RL steps done), max_steps, epoch, log_history."""
        return self.trainer.callbacks.state

    def add_callback(self, callback: Any) -> None:
        self.trainer.callbacks.add(callback)

    def pop_callback(self, callback: Any) -> Any:
        return self.trainer.callbacks.pop(callback)

    def remove_callback(self, callback: Any) -> None:
        self.trainer.callbacks.pop(callback)

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict[str, float]]:
        """Run `max_steps` RL steps; resume_from_checkpoint: a checkpoint directory, or True for the latest one in
        output_dir. Returns the per-step metrics."""
        if resume_from_checkpoint is False:  # transformers: start fresh
            self.trainer.config.trainer.resume_from_checkpoint = None
        elif resume_from_checkpoint is not None:
            self.trainer.config.trainer.resume_from_checkpoint = ("latest" if resume_from_checkpoint is True
                                                                  else str(resume_from_checkpoint) or None)
        return self.trainer.train()

    def evaluate(self) -> dict[str, float]:
        """Held-out reward and accuracy on eval_dataset (greedy unless eval_temperature is set)."""
        if not self.trainer.eval_rows:
            raise UserError("TraceRLTrainer.evaluate: no eval_dataset was given")
        metrics = self.trainer.evaluate_held_out()
        self.trainer.callbacks.event("on_evaluate", metrics=metrics)
        return metrics

    def save_model(self, output_dir: str | None = None) -> None:
        """The policy (or its LoRA adapter) in Hugging Face layout."""
        from tracerl.checkpoint import save_weights

        save_weights(self.trainer, Path(output_dir or self.args.output_dir))


def _rows(dataset: Any, name: str) -> list[dict[str, Any]]:
    from tracerl.data import check_column_names

    if isinstance(dataset, (str, bytes, dict)) or not hasattr(dataset, "__iter__"):
        raise UserError(f"{name}: expected a datasets.Dataset or a list of row dicts, got {type(dataset).__name__}")
    rows = list(dataset)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise UserError(f"{name}: row {bad} is {type(rows[bad]).__name__} {rows[bad]!r:.80}, not a dict of columns")
    rows = [dict(r) for r in rows]
    if not rows:
        raise UserError(f"{name}: no rows")
    check_column_names(rows, name)
    missing = [i for i, r in enumerate(rows) if "prompt" not in r]
    if missing:
        raise UserError(f"{name}: row {missing[0]} has no 'prompt' column (columns: {sorted(rows[missing[0]])}); "
                        "TRL-style datasets carry the prompt in 'prompt'")
    from tracerl.data import prompt_problem

    for i, row in enumerate(rows):
        problem = prompt_problem(row["prompt"])
        if problem:
            raise UserError(f"{name}: row {i}: the prompt {problem}")
    return rows


def _reward_set(reward_funcs: Any, args: Any, config: schema.RLConfig) -> Any:
    from reward_models import RewardSet, RewardSpecError

    if hasattr(reward_funcs, "total") or type(reward_funcs).__name__ == "RewardSet":
        return reward_funcs  # already combined (the CLI builds one from the recipe)
    funcs: Sequence[Any] = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise UserError("reward_funcs: no reward function given")
    weights = args.reward_weights or [1.0] * len(funcs)
    if not isinstance(weights, (list, tuple)):
        raise UserError(f"reward_weights: expected a list of numbers, one per reward function, got {weights!r}")
    if len(weights) != len(funcs):
        raise UserError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions")
    try:
        return RewardSet([{"fn": f, "weight": w} for f, w in zip(funcs, weights)], on_error=config.reward_on_error,
                         timeout_s=config.reward_timeout_s)
    except RewardSpecError as exc:
        raise UserError(f"reward_funcs: {exc}") from None


def _model(model: Any, init_kwargs: dict | None, peft_config: Any, seed: int) -> Any:
    """A DiffusionLM from a path (or the recipe's model section), with LoRA from a peft.LoraConfig (or the recipe's
    peft section), initialised from the run's seed."""
    from tracerl.build import build_model
    from tracerl.models import DiffusionLM

    if isinstance(model, schema.ModelConfig):  # the CLI: the recipe's sections
        return build_model(model, peft_config if isinstance(peft_config, schema.PeftSection) else None, seed=seed)
    if not isinstance(model, (DiffusionLM, str, os.PathLike)):
        raise UserError(f"model: a {type(model).__name__} object; pass the directory it was loaded from (TraceRL "
                        "loads each family in its own layout, with its mask token and attention), or a "
                        "tracerl DiffusionLM (tracerl.models.load_model(dir))")
    if not isinstance(model, DiffusionLM):
        known = {"dtype", "device", "block_size", "mask_token_id", "trust_remote_code", "tokenizer"}
        kwargs = dict(init_kwargs or {})
        if "torch_dtype" in kwargs:  # TRL's spelling
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        unknown = set(kwargs) - known
        if unknown:
            raise UserError(f"model_init_kwargs: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        model = build_model(dataclasses.replace(schema.ModelConfig(path=str(model)), **kwargs))
    if peft_config is not None:
        from tracerl.peft_utils import apply_lora_config

        model = apply_lora_config(model, peft_config, seed=seed)
    return model


def train_from_recipe(config: schema.RLConfig, rewards: Any, rows: list, eval_rows: list | None
                      ) -> list[dict[str, float]]:
    """What `tracerl train` runs: the recipe's sections as TraceRLTrainer arguments."""
    trainer = TraceRLTrainer(model=config.model, reward_funcs=rewards, args=TraceRLConfig.from_recipe(config),
                             train_dataset=rows, eval_dataset=eval_rows, peft_config=config.peft)
    return trainer.train()


__all__ = ["FIELDS", "TraceRLConfig", "TraceRLTrainer", "train_from_recipe"]
