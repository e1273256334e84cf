"""`load_model(path)`: read a local Hugging Face directory and return the right family's DiffusionLM.

Dispatch is on config.json: a directory written by TraceRL itself carries a `tracerl_diffusion` entry (family
spec) beside a stock transformers config; a published checkpoint is recognised by its `model_type` and handed to
its family loader (registered in FAMILY_LOADERS by llada.py, dream.py, sdar.py, ...).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM, FamilySpec

hf_logging.disable_progress_bar()  # weight loading/saving bars drown TraceRL's own progress output

# model_type (as written in a published config.json) -> loader(path, config_dict, overrides) -> DiffusionLM
FAMILY_LOADERS: dict[str, Callable[[Path, dict, dict], DiffusionLM]] = {}
# family name -> saver(model, path) for families whose checkpoints must keep their published layout
FAMILY_SAVERS: dict[str, Callable[..., None]] = {}
# config.json layouts without a `model_type` (SEDD's hydra dump): detector(config) -> family name, or None
LAYOUT_DETECTORS: list[Callable[[dict], str | None]] = []
# families whose published checkpoints ship no tokenizer, so load_model(tokenizer=DIR) may name one (MDLM, SEDD)
TOKENIZER_FAMILIES: set[str] = set()

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
KNOWN_OVERRIDES = {"dtype", "device", "block_size", "mask_token_id", "trust_remote_code", "tokenizer"}


def register_family(model_type: str) -> Callable:
    """Decorator: `@register_family("llada")` makes `load_model` hand such directories to the function."""

    def wrap(fn: Callable[[Path, dict, dict], DiffusionLM]) -> Callable:
        FAMILY_LOADERS[model_type] = fn
        return fn

    return wrap


def supported_families() -> list[str]:
    _import_families()
    return sorted(FAMILY_LOADERS)


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' -> bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy for the 1e-5 replay checks)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA GPU is visible to torch here (device: auto uses the GPU when "
                        "there is one, else the CPU)")
    return name


def read_config(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"model directory {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{str(path)!r} is not a model directory: no config.json in it")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: a model config is a JSON object, got {type(config).__name__}")
    return config


def load_model(path_or_name: str, **overrides: Any) -> DiffusionLM:
    """Load a diffusion LM from a local directory.

    overrides: dtype ('auto' | 'bfloat16' | 'float32' | torch.dtype), device, block_size (block-diffusion families),
    mask_token_id, trust_remote_code (for families TraceRL has no native loader for), tokenizer (a tokenizer
    directory, for families whose published checkpoints ship none: MDLM, SEDD).
    """
    unknown = set(overrides) - KNOWN_OVERRIDES
    if unknown:
        raise UserError(f"load_model: unknown option(s) {sorted(unknown)}; known: {sorted(KNOWN_OVERRIDES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides["device"] = resolve_device(overrides.get("device"))
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise UserError(
            f"model directory {path_or_name!r} does not exist (TraceRL loads local checkpoint directories only; "
            "download the checkpoint first, e.g. with `huggingface-cli download`)"
        )
    config = read_config(path)
    _import_families()
    native = "tracerl_diffusion" in config  # a directory TraceRL wrote itself
    model_type = config.get("model_type") or _detect_layout(config)
    if overrides.get("tokenizer") is not None and (native or model_type not in TOKENIZER_FAMILIES):
        raise UserError(f"load_model: the `tokenizer` option is for checkpoints that ship no tokenizer "
                        f"({', '.join(sorted(TOKENIZER_FAMILIES))}); {path} (model_type={model_type!r}) reads the "
                        "tokenizer from its own directory")
    if native:
        return _load_native(path, config, overrides)
    loader = FAMILY_LOADERS.get(model_type)
    if loader is None and overrides.get("trust_remote_code") and "remote" in FAMILY_LOADERS:
        loader = FAMILY_LOADERS["remote"]
    if loader is None:
        raise UserError(
            f"{path}/config.json: unknown model family model_type={model_type!r}; supported: "
            f"{', '.join(f for f in supported_families() if f != 'remote')} (or set model.trust_remote_code: true "
            "for a model that ships its own modeling code)"
        )
    return loader(path, config, overrides)


def _detect_layout(config: dict) -> str | None:
    """The family of a config.json without `model_type`, by its published layout (see LAYOUT_DETECTORS)."""
    return next((family for detect in LAYOUT_DETECTORS if (family := detect(config))), None)


def _load_native(path: Path, config: dict, overrides: dict) -> DiffusionLM:
    """A directory TraceRL saved: stock transformers weights + the family spec in config.json."""
    try:
        spec_fields = dict(config["tracerl_diffusion"])
        for key in ("block_size", "mask_token_id"):
            if overrides.get(key) is not None:
                spec_fields[key] = overrides[key]
        spec = FamilySpec(**spec_fields)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}/config.json: 'tracerl_diffusion' is not a TraceRL family spec ({exc})") from None
    device = overrides["device"]
    dtype = resolve_dtype(overrides.get("dtype"), device)
    # a directory without weights or tokenizer files, or with a truncated weights file, is the user's to fix:
    # transformers says so in an OSError, the safetensors reader in its own error type
    try:
        backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"{path}: could not load the model weights ({type(exc).__name__}: {exc})") from None
    vocab = backbone.get_input_embeddings().num_embeddings
    if not 0 <= spec.mask_token_id < vocab:  # else an index error in the first forward
        raise UserError(f"{path}: mask_token_id {spec.mask_token_id} is outside the model's vocabulary of {vocab} "
                        "(model.mask_token_id?)")
    backbone.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: could not load the tokenizer ({type(exc).__name__}: {exc})") from None
    return DiffusionLM(backbone, tokenizer, spec)


def save_model(model: DiffusionLM, path: Path, **kwargs: Any) -> None:
    """Write model + tokenizer + family spec so `load_model(path)` rebuilds the same DiffusionLM."""
    path.mkdir(parents=True, exist_ok=True)
    _import_families()
    saver = FAMILY_SAVERS.get(model.family)
    if saver is not None:  # a published family saves in its own published layout
        saver(model, path, **kwargs)
        return
    model.backbone.config.tracerl_diffusion = asdict(model.spec)
    model.backbone.save_pretrained(path, **kwargs)
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, path)


# the files a Hugging Face tokenizer is read from (fast, slow BPE, sentencepiece, WordPiece; chat templates)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """The tokenizer beside a saved model. One read from a directory is saved as the files it was read from,
    verbatim: transformers 5's save_pretrained rewrites them in a form that older transformers and the published
    tokenizer code cannot read (Dream's DreamTokenizer and SDAR's Qwen2Tokenizer lose vocab.json / merges.txt, and
    the class becomes TokenizersBackend). A tokenizer built in memory is saved with save_pretrained."""
    path = Path(path)
    source = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()] if source.is_dir() else []
    if not files:
        tokenizer.save_pretrained(path)
        return
    path.mkdir(parents=True, exist_ok=True)
    if source.resolve() == path.resolve():
        return
    for file in files + _tokenizer_code(source):
        shutil.copy2(file, path / file.name)


def _tokenizer_code(source: Path) -> list[Path]:
    """The remote-code files tokenizer_config.json's auto_map names (Dream's tokenization_dream.py): without them
    the copied config points at code the directory does not hold."""
    import json

    try:
        auto_map = json.loads((source / "tokenizer_config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return []
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    modules = {r.split("--")[-1].rsplit(".", 1)[0] for r in refs if "." in r}  # "repo--module.Class" -> module
    return [source / f"{m}.py" for m in sorted(modules) if (source / f"{m}.py").is_file()]


def _import_families() -> None:
    """Family modules register themselves on import; importing here avoids an import cycle with base.py."""
    import importlib

    for module in ("llada", "dream", "sdar", "mdlm", "sedd", "remote"):
        try:
            importlib.import_module(f"tracerl.models.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tracerl.models.{module}":
                raise
