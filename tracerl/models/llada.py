"""LLaDA (GSAI-ML/LLaDA-8B-Base, LLaDA-8B-Instruct, LLaDA 1.5) on transformers' own LlamaForCausalLM.

The published checkpoint (`model_type: "llada"`, remote code modeling_llada.py) is an OLMo-style module tree around
Llama blocks (`LLaDALlamaBlock`): pre-norm RMSNorm, full-head-dim RoPE with rotate-half, grouped-query attention,
a SwiGLU MLP `ff_out(silu(ff_proj(x)) * up_proj(x))`, no biases, and *no causal mask*. That is exactly Llama's
computation, so we rename the tensors onto LlamaForCausalLM and let DiffusionLM supply the bidirectional mask.
The logits are position-aligned (logit_shift 0): the output at i is the distribution of token i.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.models.loading import FAMILY_SAVERS, register_family
from tracerl.models.native import (
    build_backbone,
    compile_rules,
    device_and_dtype,
    load_tokenizer,
    read_state,
    resolve_mask_id,
    warn_unused,
    write_published,
)

MODEL_TYPE = "llada"
MASK_TOKENS = ("<|mdm_mask|>",)  # id 126336 in LLaDA's tokenizer; not registered as tokenizer.mask_token

# LLaDA's own defaults (configuration_llada.ModelConfig) for keys a config.json leaves out: the remote code would
# use these, so a missing key means the same here.
DEFAULTS: dict[str, Any] = {
    "n_kv_heads": None, "multi_query_attention": None, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1, "alibi": False,
    "rope": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "layer_norm_type": "default",
    "layer_norm_with_affine": True, "bias_for_layer_norm": None, "attention_layer_norm": False,
    "include_bias": False, "include_qkv_bias": False, "scale_logits": False, "input_emb_norm": False,
    "weight_tying": True, "max_sequence_length": 1024, "attention_dropout": 0.1, "residual_dropout": 0.1,
    "embedding_dropout": 0.1, "embedding_size": 50304, "vocab_size": 50257,
}

# Settings the Llama mapping reproduces exactly; anything else is a different architecture.
REQUIRED = {
    "block_type": "llama",  # separate q/k/v and the gated MLP; 'sequential' fuses them (att_proj)
    "rope": True, "alibi": False,
    "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "activation_type": "silu",  # LLaDALlamaBlock computes silu(ff_proj(x)) * up_proj(x) with 'silu'
    "attention_layer_norm": False, "include_bias": False, "scale_logits": False, "input_emb_norm": False,
    "block_group_size": 1,
}

# Published block parameter -> transformers Llama parameter (per layer).
BLOCK_NAMES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",  # the SiLU-gated branch
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}
TOP_NAMES = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",  # absent when weight_tying
}
_BLOCK = r"model\.transformer\.blocks\.(\d+)\."
_LAYER = r"model\.layers\.(\d+)\."
LOAD_RULES = compile_rules(
    [(re.escape(src), dst) for src, dst in TOP_NAMES.items()]
    + [(_BLOCK + re.escape(src) + r"\.(weight|bias)", rf"model.layers.\1.{dst}.\2") for src, dst in BLOCK_NAMES.items()]
)
SAVE_RULES = compile_rules(
    [(re.escape(dst), src) for src, dst in TOP_NAMES.items()]
    + [(_LAYER + re.escape(dst) + r"\.(weight|bias)", rf"model.transformer.blocks.\1.{src}.\2")
       for src, dst in BLOCK_NAMES.items()]
)


def check_supported(path: Path, settings: dict) -> None:
    """Refuse (with the key that differs) any LLaDA variant the Llama mapping would compute differently."""
    wrong = {k: settings[k] for k, v in REQUIRED.items() if settings[k] != v}
    if settings["bias_for_layer_norm"]:
        wrong["bias_for_layer_norm"] = settings["bias_for_layer_norm"]
    if wrong:
        raise UserError(
            f"{path}/config.json: LLaDA variant with {wrong} is not supported natively (TraceRL maps LLaDA onto "
            f"transformers' Llama, which needs {REQUIRED}); pass trust_remote_code: true to run its own code"
        )


def num_kv_heads(settings: dict) -> int:
    """LLaDA's `effective_n_kv_heads`: n_kv_heads, else 1 for multi-query attention, else n_heads."""
    if settings["n_kv_heads"] is not None:
        return int(settings["n_kv_heads"])
    return 1 if settings["multi_query_attention"] else int(settings["n_heads"])


def backbone_config(config: dict) -> LlamaConfig | Qwen2Config:
    """Published LLaDA config.json -> the transformers config of the same network.

    `embedding_size` (the padded row count of wte / ff_out, e.g. 126464) is the logit width, not `vocab_size`.
    q/k/v biases (include_qkv_bias) without an output bias are Qwen2's attention, so such variants map there.
    """
    s = {**DEFAULTS, **config}
    common = dict(
        vocab_size=int(s["embedding_size"] or s["vocab_size"]),
        hidden_size=int(s["d_model"]),
        intermediate_size=int(s["mlp_hidden_size"] or s["mlp_ratio"] * s["d_model"]),
        num_hidden_layers=int(s["n_layers"]),
        num_attention_heads=int(s["n_heads"]),
        num_key_value_heads=num_kv_heads(s),
        hidden_act="silu",
        max_position_embeddings=int(s["max_sequence_length"]),
        rms_norm_eps=float(s["rms_norm_eps"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
        tie_word_embeddings=bool(s["weight_tying"]),
        attention_dropout=float(s["attention_dropout"]),
        pad_token_id=s.get("pad_token_id"),
        bos_token_id=s.get("bos_token_id"),
        eos_token_id=s.get("eos_token_id"),
        use_cache=False,
        attn_implementation="sdpa",
    )
    if s["include_qkv_bias"]:
        return Qwen2Config(**common, use_sliding_window=False)
    return LlamaConfig(**common, head_dim=int(s["d_model"]) // int(s["n_heads"]), attention_bias=False,
                       mlp_bias=False)


def _is_moe(config: dict) -> bool:
    archs = " ".join(config.get("architectures") or [])
    return "num_experts" in config or "MoE" in archs or config.get("model_type") == "lladamoe"


@register_family(MODEL_TYPE)
def load_llada(path: Path, config: dict, overrides: dict) -> DiffusionLM:
    """Load a published LLaDA directory natively (no remote code)."""
    if _is_moe(config):
        return _moe_fallback(path, config, overrides)
    settings = {**DEFAULTS, **config}
    check_supported(path, settings)
    warn_unused("llada", config, {"residual_dropout": 0.0, "embedding_dropout": 0.0})
    if overrides.get("block_size") is not None:
        raise UserError("LLaDA is a full-attention model: block_size does not apply (for semi-autoregressive "
                        "sampling set the rollout's block_length instead)")
    device, dtype = device_and_dtype(overrides)
    hf_config = backbone_config(config)
    state = read_state(path, LOAD_RULES, device, dtype)
    model_cls = Qwen2ForCausalLM if settings["include_qkv_bias"] else LlamaForCausalLM
    backbone = build_backbone(model_cls, hf_config, state, device, path)
    backbone.config.tracerl_published = dict(config)  # kept so a save writes the same config.json back
    backbone.config.tracerl_source = str(path)
    tokenizer = load_tokenizer(path, bool(overrides.get("trust_remote_code")))
    mask_id = resolve_mask_id("LLaDA", overrides, config.get("mask_token_id"), tokenizer, MASK_TOKENS,
                              hf_config.vocab_size)
    return DiffusionLM(backbone, tokenizer, FamilySpec(MODEL_TYPE, mask_id, block_size=None, logit_shift=0))


def _moe_fallback(path: Path, config: dict, overrides: dict) -> DiffusionLM:
    """LLaDA-MoE has no exact transformers class (see docs/families.md); run its own code when allowed."""
    if overrides.get("trust_remote_code"):
        from tracerl.models.remote import load_remote

        return load_remote(path, config, overrides)
    raise UserError(
        f"{path}: LLaDA-MoE checkpoints are not loaded natively: their layers (per-head QK-norm, softmax top-k "
        "routing without renormalisation, an ungated shared expert, per-layer dense/MoE mix) match no single "
        "transformers class. Pass trust_remote_code: true to run the checkpoint's own modeling code"
    )


def published_config(model: DiffusionLM) -> dict:
    """config.json in LLaDA's published keys, reflecting the model as it is now (e.g. after a resize)."""
    c = model.backbone.config
    out = dict(getattr(c, "tracerl_published", None) or {"architectures": ["LLaDAModelLM"], **REQUIRED})
    out.update(
        model_type=MODEL_TYPE, d_model=c.hidden_size, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, n_layers=c.num_hidden_layers, mlp_hidden_size=c.intermediate_size,
        embedding_size=c.vocab_size, max_sequence_length=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_parameters["rope_theta"], weight_tying=bool(c.tie_word_embeddings),
        include_qkv_bias=isinstance(c, Qwen2Config), mask_token_id=model.mask_token_id,
    )
    out["vocab_size"] = min(int(out.get("vocab_size") or c.vocab_size), c.vocab_size)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(c, key, None) is not None:
            out[key] = getattr(c, key)
    return out


def save_llada(model: DiffusionLM, path: Path, **kwargs: Any) -> None:
    """Write the published LLaDA layout (model.transformer.* tensor names, LLaDA config keys)."""
    write_published(model, path, published_config(model), SAVE_RULES, **kwargs)


FAMILY_SAVERS[MODEL_TYPE] = save_llada


# ---- LoRA adapters trained on the published code -------------------------------------------------------------
_PUBLISHED_LORA_KEY = re.compile(r"(.*?)model\.transformer\.(?:blocks\.(\d+)\.)?(\w+)\.(lora_\w+)(.*)")
_TOP_MODULES = {"wte": "model.embed_tokens", "ff_out": "lm_head"}


def is_published_adapter(keys: list[str]) -> bool:
    """An adapter saved by peft on the published LLaDA code (its module names: model.transformer.blocks.N.q_proj)."""
    return any(".transformer.blocks." in k for k in keys)


def adapter_onto_llama(weights: dict[str, Any], config: dict) -> tuple[dict[str, Any], dict]:
    """A published-code LLaDA adapter renamed onto the Llama modules TraceRL loads LLaDA into: the weights'
    names (model.transformer.blocks.N.attn_out.lora_A.weight -> model.layers.N.self_attn.o_proj.lora_A.weight)
    and adapter_config.json's target_modules (attn_out -> o_proj, ff_proj -> gate_proj, ff_out -> down_proj)."""
    renamed = {}
    top_level = False
    for key, value in weights.items():
        match = _PUBLISHED_LORA_KEY.fullmatch(key)
        if match is None:
            renamed[key] = value
            continue
        prefix, layer, module, lora, rest = match.groups()
        if layer is None:
            if module not in _TOP_MODULES:
                raise UserError(f"LLaDA adapter: no Llama module for the published module model.transformer.{module}")
            target, top_level = _TOP_MODULES[module], top_level or module == "ff_out"
        elif module in BLOCK_NAMES:
            target = f"model.layers.{layer}.{BLOCK_NAMES[module]}"
        else:
            raise UserError(f"LLaDA adapter: no Llama module for the published module {module!r} ({key})")
        renamed[f"{prefix}{target}.{lora}{rest}"] = value
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise UserError(f"LLaDA adapter: target_modules {targets!r} is a pattern over the published module names; "
                        "give a list of module names instead")
    if isinstance(targets, list):
        leaves = {BLOCK_NAMES[t].rsplit(".", 1)[-1] if t in BLOCK_NAMES else t for t in targets}
        if top_level:
            leaves.add("lm_head")
        config = {**config, "target_modules": sorted(leaves)}
    return renamed, config
