"""SDAR (JetLM/SDAR-1.7B/4B/8B/30B-Chat) and TraDo (Gen-Verse/TraDo-4B/8B) on transformers' own Qwen3ForCausalLM.

The published checkpoint (`model_type: "sdar"`, remote code modeling_sdar.py) is Qwen3's network — per-head
q_norm / k_norm, no biases — under Qwen3's tensor names. What makes it a block-diffusion model is the attention:
the sequence is cut into blocks of `block_size` (config.json key `block_size`, 4 in the published models); a
query sees its own block bidirectionally and every earlier block, never a later one. Committed blocks can then be
served from a KV cache (DiffusionLM.logits_cached). Logits are position-aligned (logit_shift 0).

The dense checkpoints are covered; SDAR-30B-A3B (Qwen3-MoE) is not (its loader would need Qwen3MoeForCausalLM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen3Config, Qwen3ForCausalLM

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

MODEL_TYPE = "sdar"
MASK_TOKENS = ("<|MASK|>",)  # id 151669 in SDAR's / TraDo's tokenizer (tokenizer.mask_token)
DEFAULT_BLOCK_SIZE = 4  # the block size SDAR and TraDo were trained with
# SDARConfig's defaults (a Qwen3Config copy) for keys a config.json leaves out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_dropout": 0.0,
    "attention_bias": False,
}


def backbone_config(config: dict, head_dim: int | None = None) -> Qwen3Config:
    """Published SDAR config.json -> Qwen3Config of the same network (head_dim from the weights if absent)."""
    if config.get("num_experts"):
        raise UserError("sdar: MoE checkpoints (SDAR-30B-A3B) are not supported natively; only dense SDAR/TraDo")
    kwargs = qwen_config_kwargs("sdar", config, DEFAULTS)
    fallback = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    kwargs["head_dim"] = int(config.get("head_dim") or head_dim or fallback)
    return Qwen3Config(**kwargs, attention_bias=bool(config.get("attention_bias", False)))


def resolve_block_size(config: dict, overrides: dict) -> int:
    """load_model(block_size=N) wins over config.json's `block_size`, which wins over the published default 4."""
    value = overrides.get("block_size") or config.get("block_size") or DEFAULT_BLOCK_SIZE
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"sdar: block_size must be a positive integer, got {value!r}")
    return value


@register_family(MODEL_TYPE)
def load_sdar(path: Path, config: dict, overrides: dict) -> DiffusionLM:
    """Load a published SDAR / TraDo directory natively (no remote code, no flash_attn)."""
    block_size = resolve_block_size(config, overrides)
    device, dtype = device_and_dtype(overrides)
    state = read_state(path, IDENTITY_RULES, device, dtype)
    q_norm = state.get("model.layers.0.self_attn.q_norm.weight")
    hf_config = backbone_config(config, head_dim=q_norm.shape[0] if q_norm is not None else None)
    backbone = build_backbone(Qwen3ForCausalLM, hf_config, state, device, path)
    backbone.config.tracerl_published = dict(config)
    backbone.config.tracerl_source = str(path)
    tokenizer = load_tokenizer(path, bool(overrides.get("trust_remote_code")))
    mask_id = resolve_mask_id("sdar", overrides, config.get("mask_token_id"), tokenizer, MASK_TOKENS,
                              hf_config.vocab_size)
    return DiffusionLM(backbone, tokenizer, FamilySpec(MODEL_TYPE, mask_id, block_size=block_size, logit_shift=0))


def save_sdar(model: DiffusionLM, path: Path, **kwargs: Any) -> None:
    """Write the published SDAR layout (Qwen3 tensor names, SDARConfig keys incl. block_size and mask_token_id)."""
    c = model.backbone.config
    base = {"architectures": ["SDARForCausalLM"], "use_sliding_window": False}
    config = updated_qwen_config(getattr(c, "tracerl_published", None), c, base)
    config.update(model_type=MODEL_TYPE, head_dim=c.head_dim, attention_bias=bool(c.attention_bias),
                  mask_token_id=model.mask_token_id, block_size=model.block_size)
    write_published(model, path, config, IDENTITY_RULES, **kwargs)


FAMILY_SAVERS[MODEL_TYPE] = save_sdar
