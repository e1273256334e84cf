"""Opt-in loading of a diffusion LM through its own modeling code (`trust_remote_code: true`).

For a `model_type` TraceRL has no native loader for, `load_model(path, trust_remote_code=True)` lands here (it is
registered as the "remote" fallback, which load_model only consults when trust_remote_code is set). Running a
checkpoint's Python code is the user's explicit decision, so it is off by default.

What the adapter assumes about the remote model (document it before relying on it):
  * it is loadable with AutoModelForCausalLM (or AutoModel, `auto_class="model"`) and returns `.logits` (or a
    tuple whose first element is the logits) of shape [B, L, V];
  * it takes the attention pattern in one of these forms (`RemoteAdapter.attention`):
      "bias"    a 4D additive float mask [B, 1, Q, K] (0 = attend, dtype-min = blocked) — what transformers'
                own models and most remote code written on them accept;
      "bool"    a 4D boolean mask [B, 1, Q, K] (True = attend);
      "padding" only the 2D key-padding mask [B, K]; the model applies its own (full) attention, so block
                diffusion is impossible in this mode;
      "none"    no mask at all (LLaDA's original code ignores masks): batches must then carry no padding;
  * `position_ids` are passed when its forward accepts them; a KV cache is never used (logits_cached raises).
Mask id, logit alignment and block size come from a RemoteAdapter registered for the model_type, the load_model
overrides, config.json (`mask_token_id`, `block_size`) and the tokenizer, in that order.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.models.loading import FAMILY_SAVERS, register_family, save_tokenizer
from tracerl.models.native import device_and_dtype, load_tokenizer, resolve_mask_id

FAMILY = "remote"  # DiffusionLM.family of every remote-code model
ATTENTION_MODES = ("bias", "bool", "padding", "none")


@dataclass
class RemoteAdapter:
    """How TraceRL drives a remote-code model it knows nothing else about."""

    mask_token_id: int | None = None  # None: load_model override, config.json, then the tokenizer's mask token
    logit_shift: int = 0  # 1 when the raw output at i predicts token i + 1 (Dream-style models)
    block_size: int | None = None  # None: load_model override or config.json `block_size`, else full attention
    attention: str = "bias"  # how the attention pattern is handed over; see the module docstring
    auto_class: str = "causal_lm"  # "causal_lm" (AutoModelForCausalLM) or "model" (AutoModel)


REMOTE_ADAPTERS: dict[str, RemoteAdapter] = {}


def register_remote_adapter(model_type: str, adapter: RemoteAdapter) -> None:
    """Declare how a remote-code family is driven: `register_remote_adapter("mdm", RemoteAdapter(logit_shift=1))`."""
    if adapter.attention not in ATTENTION_MODES:
        raise ValueError(f"RemoteAdapter.attention must be one of {ATTENTION_MODES}, got {adapter.attention!r}")
    REMOTE_ADAPTERS[model_type] = adapter


class RemoteBackbone(nn.Module):
    """Presents a remote model with the call signature DiffusionLM uses for transformers' own classes."""

    def __init__(self, model: nn.Module, adapter: RemoteAdapter):
        super().__init__()
        self.model = model
        self.adapter = adapter
        params = inspect.signature(model.forward).parameters
        self._takes_positions = "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any = None, use_cache: bool = False, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool = False) -> SimpleNamespace:
        """attention_mask: the additive bias [B, 1, Q, K] DiffusionLM builds; returns .logits [B, Q', V]."""
        if use_cache or cache is not None:
            raise ValueError("remote-code models run without a KV cache (sample with use_kv_cache: false)")
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        mask = self._convert_mask(attention_mask)
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self._takes_positions:
            kwargs["position_ids"] = position_ids
        if output_hidden_states:
            kwargs["output_hidden_states"] = True
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        elif logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        hidden = getattr(out, "hidden_states", None)
        return SimpleNamespace(logits=logits, last_hidden_state=hidden[-1] if hidden else None)

    def get_decoder(self) -> Any:
        """DiffusionLM.hidden_states runs the decoder stack: answer with the remote model's last hidden layer."""
        return lambda **kw: self.forward(**{k: v for k, v in kw.items() if k != "use_cache"}, output_hidden_states=True)

    def _convert_mask(self, bias: torch.Tensor) -> torch.Tensor | None:
        mode = self.adapter.attention
        if mode == "bias":
            return bias
        visible = bias[:, 0] == 0  # [B, Q, K]
        if mode == "bool":
            return visible[:, None]
        if mode == "padding":
            return visible[:, -1].long()  # the last query is a real token and sees every real key
        if not bool(visible.all()):
            raise ValueError("this remote model takes no attention mask: batch prompts of equal length (no padding)")
        return None


@register_family(FAMILY)
def load_remote(path: Path, config: dict, overrides: dict) -> DiffusionLM:
    """Load through the checkpoint's own code; only reached with trust_remote_code=True."""
    if not overrides.get("trust_remote_code"):
        raise UserError(f"{path}: loading this model runs its own Python code; set trust_remote_code: true")
    adapter = REMOTE_ADAPTERS.get(config.get("model_type"), RemoteAdapter())
    block_size = overrides.get("block_size") or adapter.block_size or config.get("block_size")
    if block_size is not None and adapter.attention in ("padding", "none"):
        raise UserError(f"{path}: block_size={block_size} needs a model that takes a 4D attention mask "
                        f"(RemoteAdapter.attention='bias' or 'bool'), not {adapter.attention!r}")
    device, dtype = device_and_dtype(overrides)
    auto = AutoModelForCausalLM if adapter.auto_class == "causal_lm" else AutoModel
    try:
        model = auto.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    except Exception as exc:  # remote code fails in arbitrary ways on a newer transformers; report it as such
        raise UserError(
            f"{path}: the checkpoint's own modeling code failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    model.to(device).eval()
    tokenizer = load_tokenizer(path, trust_remote_code=True)
    mask_overrides = {"mask_token_id": overrides.get("mask_token_id", adapter.mask_token_id)}
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else 1 << 62
    mask_id = resolve_mask_id(str(config.get("model_type")), mask_overrides, config.get("mask_token_id"), tokenizer,
                              ("[MASK]", "<mask>", "<|mask|>"), vocab)
    spec = FamilySpec(FAMILY, mask_id, block_size=block_size, logit_shift=adapter.logit_shift)
    return DiffusionLM(RemoteBackbone(model, adapter), tokenizer, spec)


def save_remote(model: DiffusionLM, path: Path, **kwargs: Any) -> None:
    """Save through the remote model's own save_pretrained (which copies its code), recording mask / block size."""
    path.mkdir(parents=True, exist_ok=True)
    model.backbone.model.save_pretrained(path, **kwargs)
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, path)
    config = json.loads((path / "config.json").read_text())
    config["mask_token_id"] = model.mask_token_id
    if model.block_size is not None:
        config["block_size"] = model.block_size
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


FAMILY_SAVERS[FAMILY] = save_remote
