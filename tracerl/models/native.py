"""Shared machinery for loading published checkpoints natively onto transformers' own architecture classes.

A family module (llada.py, dream.py, sdar.py) supplies three things: a translation of its published config.json
into a transformers config, a renaming of its published tensor names onto that class's names, and the family spec
(mask id, attention policy, logit alignment). Everything else — reading (sharded) safetensors, building the model
without a random initialisation, writing the published layout back, finding the tokenizer — lives here.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from tracerl.errors import UserError
from tracerl.models.loading import resolve_dtype, save_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size for 7-8B checkpoints
RenameRules = list[tuple[re.Pattern, str]]


# ---- options ------------------------------------------------------------------------------------------------------
def device_and_dtype(overrides: dict) -> tuple[torch.device, torch.dtype]:
    """The `device` / `dtype` load_model options ('auto' dtype: bf16 on GPU, fp32 on CPU)."""
    device = torch.device(overrides.get("device") or "cpu")
    return device, resolve_dtype(overrides.get("dtype"), device)


# ---- reading weights ----------------------------------------------------------------------------------------------
def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, else the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index} names shard(s) that are not in the directory: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {', '.join(others)}: convert them to safetensors first)" if others else ""
    raise UserError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} in the directory{hint}")


def read_state(path: Path, rules: RenameRules, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, renamed by `rules`, cast to `dtype`, placed on `device`.

    Tensors are read one at a time straight from the memory-mapped files, so the peak host memory stays at one
    tensor (an 8B model loads onto a GPU without a CPU copy of the whole state).
    """
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for file in checkpoint_files(path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except SafetensorError as exc:  # truncated or not a safetensors file (an interrupted download)
            raise UserError(f"{file}: not a readable safetensors file ({exc})") from None
        with handle:
            for name in handle.keys():
                target = rename(name, rules)
                if target is None:
                    unknown.append(name)
                    continue
                tensor = handle.get_tensor(name)
                state[target] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    if unknown:
        raise UserError(
            f"{path}: {len(unknown)} tensor name(s) do not belong to the published layout this family loader "
            f"knows, e.g. {unknown[:4]}; is config.json's model_type right?"
        )
    return state


def rename(name: str, rules: RenameRules) -> str | None:
    """Apply the first matching (pattern, replacement) rule; None when no rule matches."""
    for pattern, replacement in rules:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    return None


def compile_rules(pairs: Iterable[tuple[str, str]]) -> RenameRules:
    return [(re.compile(src), dst) for src, dst in pairs]


# ---- building the transformers model ------------------------------------------------------------------------------
def build_backbone(model_cls: type[PreTrainedModel], config: Any, state: dict[str, torch.Tensor],
                   device: torch.device, source: Path) -> PreTrainedModel:
    """Instantiate `model_cls(config)` on the meta device and adopt the loaded tensors as its parameters.

    Building on meta skips the random initialisation (seconds for 8B parameters) and never holds two copies.
    Non-persistent buffers (the rotary inverse frequencies) are rebuilt on the real device afterwards.
    """
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = model_cls(config)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor whose shape config.json contradicts (heads, vocabulary, widths)
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise UserError(f"{source}: checkpoint does not match its config.json: "
                        f"{lines[0] if lines else str(exc).splitlines()[0]}") from None
    missing = set(result.missing_keys)
    if getattr(config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    if missing or result.unexpected_keys:
        raise UserError(
            f"{source}: checkpoint does not match its config.json: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(result.unexpected_keys)[:4]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_meta_buffers(model, device)
    return model.eval()


def _rebuild_meta_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Re-create every submodule whose buffers are still on meta (rotary embeddings compute them from config)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            fresh = type(module)(config=module.config).to(device)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left uninitialised after loading: {leftover[:4]}")


# ---- writing weights ----------------------------------------------------------------------------------------------
def write_state(state: dict[str, torch.Tensor], path: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write `state` as model.safetensors, or as numbered shards + model.safetensors.index.json when it is big.

    Earlier weight files in `path` are removed first so a stale single file never shadows a new index.
    """
    for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        sizes[-1] += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))


def published_state(backbone: PreTrainedModel, rules: RenameRules) -> dict[str, torch.Tensor]:
    """The backbone's parameters under their published names (tied copies written once, as published)."""
    if hasattr(backbone, "peft_config"):
        raise UserError("merge the LoRA adapters (merge_and_unload) before saving in the published layout")
    state = {}
    seen: set[tuple] = set()
    for name, tensor in backbone.state_dict().items():
        target = rename(name, rules)
        if target is None:
            raise RuntimeError(f"no published name for parameter {name!r}")
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if storage in seen:
            continue  # a tied output head shares the embedding's storage: published once, as the embedding
        seen.add(storage)
        state[target] = tensor
    return state


def write_published(model: Any, path: Path, config: dict, rules: RenameRules, **kwargs: Any) -> None:
    """Save a DiffusionLM in its family's published layout: config.json, safetensors, tokenizer, remote code."""
    path.mkdir(parents=True, exist_ok=True)
    state = published_state(model.backbone, rules)
    write_state(state, path, int(kwargs.get("max_shard_bytes", DEFAULT_SHARD_BYTES)))
    config = dict(config)
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, path)
    _copy_sidecars(getattr(model.backbone.config, "tracerl_source", None), path)


def _copy_sidecars(source: str | None, path: Path) -> None:
    """Carry over the published remote code and generation config, so tools that still run the original
    modeling files (older transformers) keep working on the saved directory."""
    if not source or not Path(source).is_dir() or Path(source).resolve() == path.resolve():
        return
    for file in [*Path(source).glob("*.py"), Path(source) / "generation_config.json"]:
        if file.is_file() and not (path / file.name).exists():
            shutil.copy2(file, path / file.name)


# ---- tokenizer and mask id ----------------------------------------------------------------------------------------
def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer (and its chat template) shipped in the checkpoint directory.

    Some published tokenizers name their own Python class (Dream's DreamTokenizer via `auto_map`); asking
    AutoTokenizer for those without trust_remote_code would stop at an interactive prompt. Their vocabulary is a
    standard Hugging Face one, so we read it with transformers' own fast tokenizer instead.
    """
    tok_config_file = path / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text()) if tok_config_file.is_file() else {}
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model"))
    if not has_files and not tok_config:
        raise UserError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json) in the directory")
    try:
        if "auto_map" in tok_config and not trust_remote_code:
            return _load_without_remote_code(path)
        if trust_remote_code:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        # A neutral config keeps AutoTokenizer from parsing the family's config.json (model_type "llada" is
        # unknown to transformers); the class then comes from tokenizer_config.json, as published.
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, config=PretrainedConfig())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: could not load the tokenizer: {exc}") from exc


def _load_without_remote_code(path: Path) -> PreTrainedTokenizerBase:
    from transformers import Qwen2Tokenizer, TokenizersBackend

    if (path / "tokenizer.json").is_file():
        return TokenizersBackend.from_pretrained(path)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return Qwen2Tokenizer.from_pretrained(path)  # Dream / SDAR ship Qwen's byte-level BPE files
    raise UserError(
        f"{path}: the tokenizer is custom code (auto_map in tokenizer_config.json) and has no tokenizer.json; "
        "pass trust_remote_code: true to run it"
    )


def resolve_mask_id(
    family: str,
    overrides: dict,
    config_value: int | None,
    tokenizer: PreTrainedTokenizerBase | None,
    token_strings: tuple[str, ...],
    vocab_size: int,
) -> int:
    """Mask id: the load_model override, else config.json's `mask_token_id`, else the family's mask token string
    in the tokenizer, else the tokenizer's declared mask token."""
    mask_id = overrides.get("mask_token_id")
    if mask_id is None:
        mask_id = config_value
    if mask_id is None and tokenizer is not None:
        vocab = tokenizer.get_vocab()
        found = [vocab[s] for s in token_strings if s in vocab]
        mask_id = found[0] if found else tokenizer.mask_token_id
    if mask_id is None:
        raise UserError(
            f"{family}: no mask token: config.json has no mask_token_id and the tokenizer has none of "
            f"{list(token_strings)}; set it (recipe: model.mask_token_id; Python: load_model(..., mask_token_id=ID))"
        )
    if not 0 <= int(mask_id) < vocab_size:
        raise UserError(f"{family}: mask_token_id {mask_id} is outside the model's vocabulary of {vocab_size}")
    return int(mask_id)


def rope_parameters(config: dict, default_theta: float) -> dict:
    """transformers 5's `rope_parameters` from the legacy `rope_theta` / `rope_scaling` keys of a published config."""
    params = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", default_theta))}
    scaling = config.get("rope_scaling")
    if scaling:
        params.update(scaling)
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return params


def reject_sliding_window(family: str, config: dict) -> None:
    if config.get("use_sliding_window"):
        raise UserError(
            f"{family}: config.json sets use_sliding_window: true; TraceRL's diffusion attention masks are full "
            "or block-causal only, so this checkpoint would be run with a different attention than it was trained"
        )


def warn_unused(family: str, config: dict, keys: dict[str, Any]) -> None:
    """Warn about published options that do not change inference but are not reproduced (training dropouts)."""
    for key, neutral in keys.items():
        if config.get(key, neutral) != neutral:
            warnings.warn(f"{family}: config.json {key}={config[key]!r} is not applied by the native loader",
                          stacklevel=3)


# ---- Qwen-layout families (Dream, SDAR) ---------------------------------------------------------------------------
# Their published tensor names are already transformers' Qwen2/Qwen3 names; unknown names fail at load_state_dict.
IDENTITY_RULES = compile_rules([(r"(model\..+|lm_head\.weight)", r"\1")])
QWEN_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
             "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id")


def qwen_config_kwargs(family: str, config: dict, defaults: dict) -> dict:
    """Keyword arguments for Qwen2Config / Qwen3Config from a published Qwen-style config.json."""
    reject_sliding_window(family, config)
    s = {**defaults, **config}
    kwargs = {key: s.get(key) for key in QWEN_KEYS}
    if kwargs["num_key_value_heads"] is None:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(rope_parameters=rope_parameters(s, float(defaults.get("rope_theta", 10000.0))),
                  use_sliding_window=False, use_cache=False, attn_implementation="sdpa")
    return kwargs


def updated_qwen_config(original: dict | None, backbone_config: Any, base: dict) -> dict:
    """A published Qwen-style config.json reflecting the backbone as it is now, over the loaded original."""
    out = dict(original or base)
    for key in QWEN_KEYS:
        value = getattr(backbone_config, key, None)
        if value is not None:
            out[key] = value
    rope = dict(backbone_config.rope_parameters)
    out["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = rope
    return out
