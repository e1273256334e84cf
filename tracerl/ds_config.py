"""DeepSpeed JSON configs: read one, and fill its "auto" fields from the recipe (dict work; deepspeed is imported
only to check the zero_optimization section against its own schema).

TraceRL owns the training loop, so some DeepSpeed fields are not the user's to choose freely:
  gradient_accumulation_steps     always 1: the trainer accumulates over replay chunks itself and steps once per
                                  PPO epoch (trainer.gradient_accumulation_steps is the recipe's knob)
  train_micro_batch_size_per_gpu  completions per rank per optimizer step (per_device x gradient_accumulation)
  train_batch_size                that x world size
  gradient_clipping               optimizer.max_grad_norm (0 = off)
  bf16.enabled                    on for a bf16-capable GPU, off on CPU (CPU bf16 matmuls are slow and lossy)
  zero_optimization.*bucket_size / stage3_param_persistence_threshold   from the model's hidden size (as HF does)
Each may be "auto" (filled here) or an explicit value that agrees with the recipe; a disagreement is a UserError
naming both keys, never a silent override. The optimizer comes from the recipe (torch AdamW), so a JSON
"optimizer" or "scheduler" section is refused.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracerl.errors import UserError

AUTO = "auto"
STEPS_PER_PRINT = 1 << 30  # DeepSpeed's own progress lines would duplicate TraceRL's metrics
DEFAULT_CONFIG: dict[str, Any] = {  # plain data parallel: what `deepspeed` launches without a JSON
    "train_batch_size": AUTO, "train_micro_batch_size_per_gpu": AUTO, "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO, "bf16": {"enabled": AUTO}, "zero_optimization": {"stage": 0},
}


@dataclass
class EngineSpec:
    """What the trainer tells the backend about one engine, to fill the "auto" fields."""

    micro_batch_size: int  # completions per rank per optimizer step
    max_grad_norm: float | None  # None / 0 = no clipping
    hidden_size: int | None = None  # model width, for the ZeRO bucket sizes


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse a DeepSpeed JSON config named by `distributed.deepspeed`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"distributed.deepspeed: {str(path)!r} does not exist (shipped configs: "
                        "recipes/deepspeed/zero2.json, zero3.json, zero3_offload.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"distributed.deepspeed: {file} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise UserError(f"distributed.deepspeed: {file} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserError(f"{file}: remove the {key!r} section; TraceRL builds the optimizer (torch AdamW) and "
                            "learning-rate schedule from the recipe's optimizer section")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"distributed.deepspeed: {file}: zero_optimization must be a JSON object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"distributed.deepspeed: {file}: zero_optimization.stage is {stage!r}; ZeRO has stages 0, "
                        "1, 2 and 3")
    _check_zero_section(zero, file)
    return config


def _check_zero_section(zero: dict[str, Any], file: Path) -> None:
    """DeepSpeed's own schema for zero_optimization (a misspelt key or a wrong type), checked now rather than when
    the engine starts after the model has loaded; "auto" fields are filled later and skipped here."""
    try:
        import pydantic
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # (deepspeed is a dependency; without it the launcher could not start either)
        return
    given = {k: v for k, v in zero.items() if v != AUTO}
    try:
        DeepSpeedZeroConfig(**given)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"distributed.deepspeed: {file}: zero_optimization.{where}: {first['msg']} (DeepSpeed "
                        f"{len(exc.errors())} problem(s) in this section)") from None


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(config: dict[str, Any]) -> bool:
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def _agree(config: dict[str, Any], key: str, value: Any, recipe_key: str) -> None:
    """Fill `key` when "auto" (or absent); an explicit value must equal the recipe's."""
    given = config.get(key, AUTO)
    if given == AUTO:
        config[key] = value
    elif given != value:
        raise UserError(f"DeepSpeed config {key}={given!r} disagrees with {recipe_key} (= {value!r}); set it to "
                        f'"auto" and choose the value in the recipe')


def fill_config(config: dict[str, Any], spec: EngineSpec, world_size: int, bf16_capable: bool,
                with_optimizer: bool = True) -> dict[str, Any]:
    """A copy of `config` with every "auto" resolved for this engine; any "auto" left over is a UserError."""
    out = copy.deepcopy(config)
    gas = out.get("gradient_accumulation_steps", AUTO)
    if gas not in (AUTO, 1):
        raise UserError(f"DeepSpeed config gradient_accumulation_steps={gas!r}: TraceRL accumulates gradients itself;"
                        ' set it to "auto" (or 1) and use trainer.gradient_accumulation_steps in the recipe')
    out["gradient_accumulation_steps"] = 1
    _agree(out, "train_micro_batch_size_per_gpu", spec.micro_batch_size,
           "trainer.per_device_train_batch_size x trainer.gradient_accumulation_steps")
    _agree(out, "train_batch_size", spec.micro_batch_size * world_size,
           "per-device completions per step x world size")
    _agree(out, "gradient_clipping", float(spec.max_grad_norm or 0.0), "optimizer.max_grad_norm")
    for section, default in (("bf16", bf16_capable), ("fp16", False)):
        if out.get(section, {}).get("enabled") == AUTO:
            out[section]["enabled"] = default
    zero = out.setdefault("zero_optimization", {})
    h = spec.hidden_size or 1024
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == AUTO:
            zero[key] = value
    if not with_optimizer:  # a frozen (reference) model: parameters only
        zero.pop("offload_optimizer", None)
        out["gradient_clipping"] = 0.0
    out.setdefault("steps_per_print", STEPS_PER_PRINT)
    left = _auto_paths(out)
    if left:
        raise UserError(f"DeepSpeed config: TraceRL cannot fill {', '.join(left)} = \"auto\"; give explicit values")
    return out


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == AUTO else []
