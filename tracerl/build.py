"""From a validated recipe to live objects: the model (+ LoRA), the rewards, the data, the backend.

The CLI and the demo call these; tests call them too, so what a user launches is what is tested.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tracerl.config import ModelConfig, PeftSection, RLConfig
from tracerl.errors import UserError
from tracerl.models import DiffusionLM, load_model


def build_model(model_cfg: ModelConfig, peft: PeftSection | None = None, path: str | None = None,
                seed: int = 0) -> DiffusionLM:
    """Load `path` (default model.path): a model directory, a TraceRL checkpoint, or a LoRA adapter directory;
    a new LoRA adapter (peft) is initialised from `seed` (the run's trainer.seed)."""
    source = resolve_checkpoint(path or model_cfg.path, key="model.path")
    options = dict(dtype=model_cfg.dtype, device=model_cfg.device, block_size=model_cfg.block_size,
                   mask_token_id=model_cfg.mask_token_id, trust_remote_code=model_cfg.trust_remote_code,
                   tokenizer=model_cfg.tokenizer)
    if (source / "adapter_config.json").is_file():  # with peft set, merged and given a new adapter (apply_lora)
        from tracerl.peft_utils import load_adapter

        model = load_adapter(source, **options)
    else:
        model = load_model(str(source), **options)
    if peft is not None and peft.r:
        from tracerl.peft_utils import apply_lora

        model = apply_lora(model, peft, seed=seed)
    return model


def resolve_checkpoint(path: str, key: str) -> Path:
    """A TraceRL checkpoint directory holds the model under model/; anything else is taken as the model itself."""
    if not path:
        raise UserError(f"{key}: no model directory given")
    p = Path(path).expanduser()
    if (p / "trainer_state.json").is_file() and (p / "model").is_dir():
        return p / "model"
    if (p / "final").is_dir() and not (p / "config.json").is_file():
        return p / "final"  # an SFT output_dir
    return p


def build_rewards(config: RLConfig) -> Any:
    """The recipe's rewards as one RewardSet (weights, names, on_error)."""
    from reward_models import RewardSet, RewardSpecError

    if not config.rewards:
        raise UserError("rewards: the recipe names no reward function (add e.g. rewards: [{fn: math}])")
    specs = [{"fn": r.fn, "name": r.name, "weight": r.weight, "kwargs": dict(r.kwargs)} for r in config.rewards]
    sys.path.insert(0, str(Path.cwd()))  # "my_rewards:fn" resolves from where the user launched, like TRL scripts
    try:
        return RewardSet(specs, on_error=config.reward_on_error, timeout_s=config.reward_timeout_s)
    except RewardSpecError as exc:
        raise UserError(f"rewards: {exc}") from None


def check_reward_columns(rewards: Any, rows: list[dict[str, Any]], source: str) -> None:
    """Every reward finds the dataset columns it reads, checked before the model loads rather than at the first
    step (where with reward_on_error: zero a missing column would score 0 all run): the built-ins declare theirs
    (`required_columns`, alternatives per entry), a user function's are its parameters without a default."""
    import inspect

    from tracerl.data import REWARD_ARGUMENTS

    present = {name for r in rows for name in r} | REWARD_ARGUMENTS
    for name, fn in zip(rewards.names, rewards.fns):
        needs = getattr(fn, "required_columns", None)
        if needs is None:
            try:
                params = inspect.signature(fn).parameters.values()
            except (TypeError, ValueError):
                continue
            needs = [[p.name] for p in params  # rewards are called by keyword, as TRL calls them
                     if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for alternatives in needs:
            if not present & set(alternatives):
                wanted = " or ".join(repr(c) for c in alternatives)
                raise UserError(f"rewards: {name!r} reads column {wanted}, which {source} lacks (columns: "
                                f"{sorted({c for r in rows for c in r})})")


def make_backend(config: Any, local_rank: int | None) -> Any:
    from tracerl import distributed

    factory = getattr(distributed, "make_backend", None)
    if factory is None:
        return distributed.LocalBackend()
    return factory(config.distributed, local_rank)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line. A non-finite number (a reward that does not apply is NaN) is written as null:
    Python's json would write a bare NaN, which strict JSON readers (jq, pandas' ujson, JavaScript) reject."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(_finite_or_null(row), default=str, allow_nan=False) + "\n")


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value
