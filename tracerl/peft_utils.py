"""LoRA through peft, for every family: the adapter wraps `DiffusionLM.backbone` (a transformers *ForCausalLM), so
the diffusion interface (masks, logit alignment, the sampler) is untouched.

    model = apply_lora(load_model(path), config.peft)    # before RLTrainer; the reference = adapter disabled
    merged = merge_lora(model)                           # plain weights again, for `tracerl export`

A checkpoint's `model/` directory then holds the adapter (adapter_config.json + adapter_model.safetensors, plus the
value model's adapter under value/ when there is one); its base_model_name_or_path names the base model directory.
`load_adapter(adapter_dir)` loads base + adapter (export, eval, continued training); `load_lora(model, dir)` puts
an adapter on a model already loaded.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from tracerl.config import PeftSection
from tracerl.errors import UserError

if TYPE_CHECKING:
    from peft import LoraConfig
from tracerl.models.base import DiffusionLM
from tracerl.models.loading import save_tokenizer

ADAPTER_CONFIG = "adapter_config.json"


def is_lora(model: DiffusionLM) -> bool:
    return hasattr(model.backbone, "peft_config")


def _output_layer_names(backbone: nn.Module) -> set[str]:
    """Full names of the LM head: the output embedding when the model names one, else any module called lm_head."""
    head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    return {n for n, m in backbone.named_modules() if (head is not None and m is head) or n.split(".")[-1] == "lm_head"}


def resolve_targets(backbone: nn.Module, target_modules: list[str] | str) -> list[str] | str:
    """"all-linear" -> every nn.Linear but the LM head (LoRA on the vocabulary projection would be a huge, rarely
    wanted adapter). Short suffix names (q_proj, ...) when no suffix is shared with the head, full names otherwise
    (LLaDA's published tree calls both its head and its MLP output `ff_out`)."""
    if not (isinstance(target_modules, str) and target_modules.lower() == "all-linear"):
        return target_modules
    head = _output_layer_names(backbone)
    linear = {n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and n not in head}
    if not linear:
        raise UserError("peft.target_modules=all-linear: the model has no linear layers besides its LM head")
    suffixes = {n.split(".")[-1] for n in linear}
    if suffixes & {n.split(".")[-1] for n in head}:
        return sorted(linear)
    return sorted(suffixes)


def apply_lora(model: DiffusionLM, peft_section: PeftSection, seed: int = 0) -> DiffusionLM:
    """Wrap the backbone in a LoRA peft model (in place; returns `model`). Only adapter weights are trainable."""
    from peft import LoraConfig

    if peft_section.r is None:
        return model
    return apply_lora_config(model, LoraConfig(r=peft_section.r, lora_alpha=peft_section.lora_alpha,
                                               lora_dropout=peft_section.lora_dropout,
                                               target_modules=peft_section.target_modules), seed=seed)


def apply_lora_config(model: DiffusionLM, config: "LoraConfig", seed: int = 0) -> DiffusionLM:
    """Wrap the backbone with a user's peft.LoraConfig (the Python API's peft_config); "all-linear" targets every
    linear layer but the LM head, for every family. The adapter's random initialisation draws from `seed` alone
    (the global generator is left as it was), so one seed gives one run."""
    from peft import get_peft_model

    if is_lora(model):  # an SFT adapter to start RL from: as TRL does, merged first, so the new adapter trains on
        # top of it and the reference (the new adapter disabled) is the SFT model, not the base before SFT
        merge_into_base(model)
        print("[peft] the model's LoRA adapter was merged into its weights; a new adapter is trained on top",
              flush=True)
    config = copy.copy(config)
    config.target_modules = resolve_targets(model.backbone, sorted(config.target_modules)
                                            if isinstance(config.target_modules, set) else config.target_modules)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []  # this rank's GPU only
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.backbone = get_peft_model(model.backbone, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"peft.target_modules: {exc}") from exc
    base = _base_path(model.backbone.get_base_model())
    if base:  # recorded in adapter_config.json, so a checkpoint's adapter finds its base model again
        config.base_model_name_or_path = base
    return model


def _base_path(backbone: nn.Module) -> str | None:
    """Where the base weights were read from: the family loaders record `tracerl_source`, from_pretrained
    `_name_or_path`."""
    config = getattr(backbone, "config", None)
    path = getattr(config, "tracerl_source", None) or getattr(config, "_name_or_path", None)
    # absolute: a relative path recorded in adapter_config.json would only resolve from the directory of the run
    return str(Path(str(path)).resolve()) if path and Path(str(path)).is_dir() else None


def merge_lora(model: DiffusionLM) -> DiffusionLM:
    """Fold the policy adapter into the base weights and drop every adapter (the value adapter included)."""
    if not is_lora(model):
        return model
    backbone = model.backbone
    backbone.set_adapter(_policy_adapter(backbone))  # merge_and_unload merges the *active* adapter
    return DiffusionLM(backbone.merge_and_unload(), model.tokenizer, model.spec)


# beside an adapter trained on top of merged ones (RL from an SFT adapter): the adapters, in order, that were merged
# into the base first; load_adapter merges them again before putting this one on
MERGED_ADAPTERS = "tracerl_merged_adapters.json"


def _base_module(backbone: nn.Module) -> nn.Module:
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def merge_into_base(model: DiffusionLM) -> None:
    """Fold the model's adapter into its weights (in place), remembering where it came from, so adapters trained on
    top of the result are saved with the list of what to merge first (MERGED_ADAPTERS)."""
    backbone = model.backbone
    chain = list(getattr(_base_module(backbone), "_tracerl_merged_adapters", []))
    source = getattr(backbone, "_tracerl_adapter_source", None)
    if source is None:
        raise UserError("the model's LoRA adapter was not loaded from a directory, so an adapter trained on top of "
                        "it could not be loaded again; merge it first (tracerl export) and start from the result")
    model.backbone = backbone.merge_and_unload()
    model.backbone._tracerl_merged_adapters = chain + [{"path": source, "sha256": _weights_digest(Path(source))}]


def _weights_digest(adapter_dir: Path) -> str:
    """SHA-256 of an adapter's weights file: an adapter trained on top of it checks it is still the same one (a
    later run writing its final/ in the same place would otherwise be merged in its stead, silently)."""
    import hashlib

    files = sorted(adapter_dir.glob("adapter_model.*"))
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def save_lora(model: DiffusionLM, path: str | Path) -> None:
    """The adapter(s) and the tokenizer; the base weights stay where model.path points (a family's published
    layout cannot hold an adapter, so this bypasses the family savers)."""
    # never the embedding matrices (LoRA does not train them; peft would add them, ~1 GB for LLaDA-8B, when the
    # published config's vocab_size differs from its embedding rows); modules_to_save are saved regardless
    model.backbone.save_pretrained(str(path), save_embedding_layers=False)
    merged = getattr(_base_module(model.backbone), "_tracerl_merged_adapters", None)
    if merged:
        (Path(path) / MERGED_ADAPTERS).write_text(json.dumps({"merge_into_base_first": merged}, indent=2))
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, path)


def load_lora(model: DiffusionLM, adapter_dir: str | Path, trainable: bool = False) -> DiffusionLM:
    """Put a saved adapter (a checkpoint's model/ directory) on a base model. Every saved adapter weight must land
    on a module of the model: peft alone drops the ones it cannot place with a warning, leaving the base model."""
    import tempfile

    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(f"{str(adapter_dir)!r} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        saved = load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as exc:  # noqa: BLE001 - missing, truncated or foreign weights file
        raise UserError(f"{adapter_dir}: could not read the adapter's weights ({type(exc).__name__}: {exc})") from None
    with tempfile.TemporaryDirectory() as converted:
        source = adapter_dir
        if model.family == "llada":
            from tracerl.models import llada

            if llada.is_published_adapter(list(saved)):  # trained with peft on the published LLaDA code
                from safetensors.torch import save_file

                saved, config = llada.adapter_onto_llama(saved, json.loads((adapter_dir / ADAPTER_CONFIG).read_text()))
                save_file({k: v.contiguous() for k, v in saved.items()}, str(Path(converted) / "adapter_model.safetensors"))
                (Path(converted) / ADAPTER_CONFIG).write_text(json.dumps(config))
                source = Path(converted)
        try:
            model.backbone = PeftModel.from_pretrained(model.backbone, str(source), is_trainable=trainable)
        except (ValueError, RuntimeError, KeyError) as exc:  # target modules not found, shapes that differ
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]  # torch's header line
            raise UserError(f"{adapter_dir}: the adapter does not fit the {model.family} model at "
                            f"{_base_path(model.backbone) or 'its base'} ({detail[:300]})") from None
    placed = set(get_peft_model_state_dict(model.backbone))
    lost = sorted(k for k in saved if k not in placed)
    if lost:
        raise UserError(f"{adapter_dir}: {len(lost)} of the adapter's {len(saved)} weights fit no module of the "
                        f"{model.family} model (e.g. {lost[0]}); was it trained on another model or module layout?")
    model.backbone._tracerl_adapter_source = str(adapter_dir.resolve())
    return model


def _merge_earlier_adapters(model: DiffusionLM, adapter_dir: Path) -> None:
    """The adapters `adapter_dir`'s adapter was trained on top of (MERGED_ADAPTERS), merged into the base in order."""
    listing = adapter_dir / MERGED_ADAPTERS
    if not listing.is_file():
        return
    for earlier in json.loads(listing.read_text())["merge_into_base_first"]:
        path, digest = earlier["path"], earlier["sha256"]
        if not (Path(path) / ADAPTER_CONFIG).is_file():
            raise UserError(f"{adapter_dir}: the adapter was trained on top of the LoRA adapter {path!r} "
                            f"({MERGED_ADAPTERS}), which is no longer there; without it the adapter would be "
                            "applied to the wrong weights")
        if _weights_digest(Path(path)) != digest:
            raise UserError(f"{adapter_dir}: the adapter was trained on top of the LoRA adapter in {path!r}, whose "
                            f"weights have changed since (another run wrote there? {MERGED_ADAPTERS} holds the "
                            "SHA-256 it had); put that adapter back, or point the file at where it is now")
        load_lora(model, path)
        merge_into_base(model)


def load_adapter(adapter_dir: str | Path, base_path: str | None = None, **load_options: Any) -> DiffusionLM:
    """Base model (adapter_config.json's base_model_name_or_path, or `base_path`) + the saved adapter, trainable.
    load_options: as for tracerl.models.load_model (dtype, device, block_size, ...)."""
    from tracerl.models import load_model

    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise UserError(f"{str(adapter_dir)!r} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    base = base_path or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise UserError(f"{adapter_dir}: the adapter's base model {base!r} is not a local directory; point "
                        f"base_model_name_or_path in its {ADAPTER_CONFIG} at the local copy of the base (tracerl "
                        "export also takes --base DIR)")
    if load_options.get("tokenizer") is None and _has_tokenizer(Path(adapter_dir)) and not _has_tokenizer(Path(base)):
        # a base published without a tokenizer (MDLM, SEDD): the run saved the one it trained with beside the adapter
        load_options = {**load_options, "tokenizer": str(adapter_dir)}
    model = load_model(str(base), **load_options)
    _merge_earlier_adapters(model, Path(adapter_dir))
    return load_lora(model, adapter_dir, trainable=True)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def load_adapter_weights(model: DiffusionLM, adapter_dir: Path) -> None:
    """Resume: copy a saved policy adapter into the model's existing adapter of the same name."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if not is_lora(model):
        raise UserError(f"{adapter_dir} holds a LoRA adapter but the model has none (set peft.r as in the run)")
    backbone = model.backbone
    result = set_peft_model_state_dict(backbone, load_peft_weights(str(adapter_dir), device="cpu"),
                                       adapter_name=_policy_adapter(backbone))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{adapter_dir}: adapter does not fit the model (e.g. {unexpected[0]}); same peft.r and "
                        "peft.target_modules as the run that wrote it?")


def _policy_adapter(backbone: nn.Module) -> str:
    """The policy's adapter: the first one added ("default"); a value adapter is added after it."""
    return next(iter(backbone.peft_config))


@contextmanager
def keep_requires_grad(module: nn.Module) -> Iterator[None]:
    """peft's set_adapter / disable_adapter flip `requires_grad` on adapter weights as a side effect. Under ZeRO
    the optimizer registered its gradient hooks on exactly the parameters that were trainable when the engine was
    built, so adapter switching must not change which ones are: restore every flag on exit."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
