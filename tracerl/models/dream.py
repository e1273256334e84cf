"""Dream (Dream-org/Dream-v0-Base-7B, Dream-v0-Instruct-7B) on transformers' own Qwen2ForCausalLM.

The published checkpoint (`model_type: "Dream"`, remote code modeling_dream.py) is Qwen2.5-7B's network with the
causal mask removed: `model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj` (biases on q/k/v only),
`model.layers.N.mlp.{gate,up,down}_proj`, `model.norm`, `lm_head` — transformers' Qwen2 names, one for one.
Dream was initialised from an autoregressive model and keeps its output convention: the raw output at i predicts
token i + 1 (Dream's sampler shifts the logits right by one), hence FamilySpec(logit_shift=1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen2Config, Qwen2ForCausalLM

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.models.loading import FAMILY_SAVERS, register_family
from tracerl.models.native import (
    IDENTITY_RULES,
    build_backbone,
    device_and_dtype,
    load_tokenizer,
    qwen_config_kwargs,
    read_state,
    resolve_mask_id,
    updated_qwen_config,
    write_published,
)

MODEL_TYPE = "Dream"
MASK_TOKENS = ("<|mask|>",)  # id 151666 in Dream's tokenizer
# DreamConfig's defaults (configuration_dream.py) for keys a config.json leaves out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_dropout": 0.0,
    "pad_token_id": 151643,
}


def backbone_config(config: dict) -> Qwen2Config:
    """Published Dream config.json -> Qwen2Config of the same network."""
    return Qwen2Config(**qwen_config_kwargs("Dream", config, DEFAULTS))


@register_family(MODEL_TYPE)
def load_dream(path: Path, config: dict, overrides: dict) -> DiffusionLM:
    """Load a published Dream directory natively (no remote code)."""
    if overrides.get("block_size") is not None:
        raise UserError("Dream is a full-attention model: block_size does not apply (for semi-autoregressive "
                        "sampling set the rollout's block_length instead)")
    device, dtype = device_and_dtype(overrides)
    hf_config = backbone_config(config)
    state = read_state(path, IDENTITY_RULES, device, dtype)
    backbone = build_backbone(Qwen2ForCausalLM, hf_config, state, device, path)
    backbone.config.tracerl_published = dict(config)
    backbone.config.tracerl_source = str(path)
    tokenizer = load_tokenizer(path, bool(overrides.get("trust_remote_code")))
    mask_id = resolve_mask_id("Dream", overrides, config.get("mask_token_id"), tokenizer, MASK_TOKENS,
                              hf_config.vocab_size)
    return DiffusionLM(backbone, tokenizer, FamilySpec(MODEL_TYPE, mask_id, block_size=None, logit_shift=1))


def save_dream(model: DiffusionLM, path: Path, **kwargs: Any) -> None:
    """Write the published Dream layout (Qwen2 tensor names, DreamConfig keys, model_type "Dream")."""
    base = {"architectures": ["DreamModel"], "use_sliding_window": False}
    config = updated_qwen_config(getattr(model.backbone.config, "tracerl_published", None),
                                 model.backbone.config, base)
    config.update(model_type=MODEL_TYPE, mask_token_id=model.mask_token_id)
    write_published(model, path, config, IDENTITY_RULES, **kwargs)


FAMILY_SAVERS[MODEL_TYPE] = save_dream
