"""MDLM (kuleshov-group/mdlm-owt) on TraceRL's native DiT (dit.py); no remote code, no flash-attn.

The published directory holds config.json (`model_type: "mdlm"`, MDLMConfig keys: vocab_size, model_length,
hidden_dim, cond_dim, n_blocks, n_heads, dropout, time_conditioning), model.safetensors with the `MDLM` wrapper's
names (`backbone.` + the DIT module tree, table below), and remote code configuration_mdlm.py / modeling_mdlm.py
(flash-attn only). It ships no tokenizer: MDLM was trained with GPT-2's, whose 50257 tokens have no mask token, so
MDLM appended one: mask id = vocab_size - 1 = 50257 (diffusion.py: `mask_index = tokenizer.vocab_size`). A
tokenizer that has its own mask token and covers the whole vocabulary (BERT's, for LM1B models) supplies it instead.

SUBS parameterisation (diffusion.py `_subs_parameterization`): at a masked position the clean-token distribution is
log_softmax(logits with the mask column at -inf); an unmasked position is carried over (log-prob 0 on its own
token). DiffusionLM.logits returns the raw network output, and the sampler's log_softmax with [MASK] excluded is
exactly SUBS at masked positions (`subs_log_probs` below writes the full published form). With
`time_conditioning: false` (mdlm-owt) the network is fed sigma = 0 whatever the noise level.

The published layout helpers shared with SEDD (same DIT tree, different prefix) live here too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.models.dit import PUBLISHED_CONFIG_READERS, DiTConfig, DiTForDiffusionLM, rotary_inv_freq
from tracerl.models.loading import FAMILY_SAVERS, TOKENIZER_FAMILIES, register_family
from tracerl.models.native import (
    _copy_sidecars,
    build_backbone,
    compile_rules,
    device_and_dtype,
    load_tokenizer,
    published_state,
    read_state,
    write_state,
)

MODEL_TYPE = "mdlm"
# MDLMConfig's defaults (configuration_mdlm.py) for keys a config.json leaves out.
DEFAULTS: dict[str, Any] = {"vocab_size": 50258, "model_length": 1024, "hidden_dim": 768, "cond_dim": 128,
                            "n_blocks": 12, "n_heads": 12, "dropout": 0.1, "time_conditioning": False}
# Keys of MDLM-derived configs that would change the computation; absent from the published mdlm-owt config.
REQUIRED: dict[str, Any] = {"parameterization": "subs", "diffusion": "absorbing_state", "cross_attn": False,
                            "cfg": False, "causal": False, "adaln": True}
# config.json keys of a model not loaded from a published directory (e.g. `tracerl tiny --arch mdlm`); the remote
# code's auto_map is left out because no remote code travels with such a model.
PUBLISHED_BASE: dict[str, Any] = {"architectures": ["MDLM"], "model_type": MODEL_TYPE, "return_dict": False}
MASK_TOKEN_NAMES = ("[MASK]", "<|mdlm_mask|>", "<|diffusion_mask|>")
INV_FREQ = "rotary_emb.inv_freq"  # published persistent buffer; ours is computed (DiTRotary)

# ---- the DIT tree: published name (after the family's prefix) <-> DiTForDiffusionLM name; {n} = block index -----
_BLOCK = [("norm1.weight", "norm1.weight"), ("attn_qkv.weight", "attn_qkv.weight"),
          ("attn_out.weight", "attn_out.weight"), ("norm2.weight", "norm2.weight"),
          ("mlp.0.weight", "mlp_in.weight"), ("mlp.0.bias", "mlp_in.bias"),  # nn.Sequential(Linear, GELU, Linear)
          ("mlp.2.weight", "mlp_out.weight"), ("mlp.2.bias", "mlp_out.bias"),
          ("adaLN_modulation.weight", "adaLN_modulation.weight"), ("adaLN_modulation.bias", "adaLN_modulation.bias")]
DIT_NAMES: list[tuple[str, str]] = [
    ("vocab_embed.embedding", "dit.vocab_embed.weight"),
    ("sigma_map.mlp.0.weight", "dit.sigma_map.fc1.weight"), ("sigma_map.mlp.0.bias", "dit.sigma_map.fc1.bias"),
    ("sigma_map.mlp.2.weight", "dit.sigma_map.fc2.weight"), ("sigma_map.mlp.2.bias", "dit.sigma_map.fc2.bias"),
    *[(f"blocks.{{n}}.{src}", f"dit.blocks.{{n}}.{dst}") for src, dst in _BLOCK],
    *[(f"output_layer.{name}", f"output_layer.{name}") for name in (
        "norm_final.weight", "linear.weight", "linear.bias", "adaLN_modulation.weight", "adaLN_modulation.bias")],
]


def _rule(source: str, target: str) -> tuple[str, str]:
    return re.escape(source).replace(re.escape("{n}"), r"(\d+)"), target.replace("{n}", r"\1")


def dit_rules(prefix: str) -> tuple[list, list]:
    """(load rules, save rules) between the published DIT names under `prefix` and DiTForDiffusionLM's names.
    The published rotary buffer loads as `rotary_inv_freq`, which load_dit checks and drops."""
    load = [_rule(prefix + pub, ours) for pub, ours in DIT_NAMES] + [(re.escape(prefix + INV_FREQ), "rotary_inv_freq")]
    save = [_rule(ours, prefix + pub) for pub, ours in DIT_NAMES]
    return compile_rules(load), compile_rules(save)


# ---- loading ----------------------------------------------------------------------------------------------------
def load_dit(path: Path, load_rules: list, config: DiTConfig, overrides: dict) -> DiTForDiffusionLM:
    """Read the published tensors onto a DiTForDiffusionLM built without a random init; check the rotary buffer."""
    device, dtype = device_and_dtype(overrides)
    state = read_state(path, load_rules, device, dtype)
    inv_freq = state.pop("rotary_inv_freq", None)
    if inv_freq is not None:
        expected = rotary_inv_freq(config).to(inv_freq.device)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.float(), expected, rtol=tolerance):
            raise UserError(f"{path}: {INV_FREQ} is not base-10000 RoPE over head_dim {config.head_dim}; this "
                            "checkpoint's rotary embedding differs from the published DiT")
    try:
        backbone = build_backbone(DiTForDiffusionLM, config, state, device, path)
    except RuntimeError as exc:  # load_state_dict's size mismatch: weights and config.json disagree
        raise UserError(f"{path}: checkpoint does not match its config.json: {str(exc).splitlines()[-1]}") from exc
    backbone.config.tracerl_source = str(path)
    return backbone


def resolve_tokenizer(family: str, path: Path, overrides: dict) -> PreTrainedTokenizerBase:
    """The tokenizer from the `tokenizer` option (a directory), else from the checkpoint directory."""
    source = overrides.get("tokenizer")
    if source is not None:
        tok_path = Path(str(source)).expanduser()
        if not tok_path.is_dir():
            raise UserError(f"tokenizer {str(source)!r} is not a directory (give a local tokenizer directory, e.g. "
                            "a download of openai-community/gpt2)")
        return load_tokenizer(tok_path)
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if not has_files:
        raise UserError(
            f"{path}: the published {family} checkpoint ships no tokenizer (it was trained with GPT-2's). Put the "
            "tokenizer files in the directory, or name a tokenizer directory: load_model(..., tokenizer=DIR) "
            "(recipe: model.tokenizer)")
    return load_tokenizer(path)


def attach_mask_token(tokenizer: PreTrainedTokenizerBase, mask_id: int) -> None:
    """A mask id one past the tokenizer (MDLM's / SEDD's appended mask) gets a token string, so decoding and
    display of partly masked text work; the tokenizer saved beside the model then carries it."""
    if mask_id != len(tokenizer):
        return
    vocab = tokenizer.get_vocab()
    name = next(n for n in MASK_TOKEN_NAMES if n not in vocab)
    tokenizer.add_special_tokens({"mask_token": name})


def mdlm_mask_id(path: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int, overrides: dict) -> int:
    """MDLM's rule (diffusion.py): the tokenizer's mask token when it has one and covers the vocabulary, else the
    appended last index vocab_size - 1; the load_model option `mask_token_id` wins."""
    n = len(tokenizer)
    if overrides.get("mask_token_id") is not None:
        mask_id = int(overrides["mask_token_id"])
    elif n == vocab_size - 1:
        mask_id = vocab_size - 1
    elif n == vocab_size and tokenizer.mask_token_id is not None:
        mask_id = int(tokenizer.mask_token_id)
    else:
        has = "a" if tokenizer.mask_token_id is not None else "no"
        raise UserError(
            f"{path}: the tokenizer has {n} tokens and {has} mask token, but config.json's vocab_size is "
            f"{vocab_size}: MDLM needs its training tokenizer ({vocab_size - 1} tokens without a mask token, or "
            f"{vocab_size} with one); pass the right `tokenizer` or mask_token_id")
    if not 0 <= mask_id < vocab_size:
        raise UserError(f"mdlm: mask_token_id {mask_id} is outside the model's vocabulary of {vocab_size}")
    return mask_id


# ---- MDLM -------------------------------------------------------------------------------------------------------
LOAD_RULES, SAVE_RULES = dit_rules("backbone.")


def check_supported(path: Path, config: dict) -> None:
    """Refuse (naming the key) MDLM-derived variants the DiT mapping would compute differently."""
    wrong = {k: config[k] for k, v in REQUIRED.items() if k in config and config[k] != v}
    if config.get("backbone", "dit") not in ("dit", "hf_dit"):
        wrong["backbone"] = config["backbone"]
    noise = config.get("noise")  # absent from MDLM's HF config; a training config nests it as noise.type
    noise_type = config.get("noise_type") or (noise.get("type") if isinstance(noise, dict) else noise)
    if noise_type not in (None, "loglinear"):
        wrong["noise.type"] = noise_type
    block = config.get("block_size")
    if block is not None and block != config.get("model_length", DEFAULTS["model_length"]):
        wrong["block_size"] = block
    if wrong:
        raise UserError(f"{path}/config.json: MDLM variant with {wrong} is not supported natively (TraceRL runs "
                        f"MDLM's DiT with the SUBS absorbing-state parameterisation and loglinear noise: {REQUIRED})")
    s = {**DEFAULTS, **config}
    if int(s["hidden_dim"]) % int(s["n_heads"]):
        raise UserError(f"{path}/config.json: hidden_dim {s['hidden_dim']} is not a multiple of n_heads {s['n_heads']}")


def backbone_config(config: dict, mask_id: int) -> DiTConfig:
    """Published MDLM config.json -> DiTConfig of the same network."""
    s = {**DEFAULTS, **config}
    return DiTConfig(vocab_size=int(s["vocab_size"]), hidden_size=int(s["hidden_dim"]),
                     num_hidden_layers=int(s["n_blocks"]), num_attention_heads=int(s["n_heads"]),
                     cond_dim=int(s["cond_dim"]), max_position_embeddings=int(s["model_length"]),
                     dropout=float(s["dropout"]), time_conditioning=bool(s["time_conditioning"]),
                     mask_token_id=mask_id)


@register_family(MODEL_TYPE)
def load_mdlm(path: Path, config: dict, overrides: dict) -> DiffusionLM:
    """Load a published MDLM directory natively (no remote code, no flash-attn)."""
    check_supported(path, config)
    if overrides.get("block_size") is not None:
        raise UserError("MDLM is a full-attention model: block_size does not apply (for semi-autoregressive "
                        "sampling set the rollout's block_length instead)")
    tokenizer = resolve_tokenizer("MDLM", path, overrides)
    mask_id = mdlm_mask_id(path, tokenizer, int(config.get("vocab_size", DEFAULTS["vocab_size"])), overrides)
    hf_config = backbone_config(config, mask_id)
    backbone = load_dit(path, LOAD_RULES, hf_config, overrides)
    backbone.config.tracerl_published = dict(config)
    attach_mask_token(tokenizer, mask_id)
    spec = FamilySpec(MODEL_TYPE, mask_id, time_conditioned=hf_config.time_conditioning)
    return DiffusionLM(backbone, tokenizer, spec)


def published_config(model: DiffusionLM) -> dict:
    """config.json in MDLMConfig's keys, reflecting the model as it is now."""
    c = model.backbone.config
    out = dict(getattr(c, "tracerl_published", None) or PUBLISHED_BASE)
    out.update(model_type=MODEL_TYPE, vocab_size=c.vocab_size, model_length=c.max_position_embeddings,
               hidden_dim=c.hidden_size, cond_dim=c.cond_dim, n_blocks=c.num_hidden_layers,
               n_heads=c.num_attention_heads, dropout=c.dropout, time_conditioning=bool(c.time_conditioning))
    out["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    return out


def save_dit(model: DiffusionLM, path: Path, config: dict, save_rules: list, prefix: str) -> None:
    """Weights under the published names (+ the rotary buffer the published module stores), config, tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    state = published_state(model.backbone, save_rules)
    state[prefix + INV_FREQ] = rotary_inv_freq(model.backbone.config)
    write_state(state, path)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)
    _copy_sidecars(getattr(model.backbone.config, "tracerl_source", None), path)


def save_mdlm(model: DiffusionLM, path: Path, **kwargs: Any) -> None:
    """Write the published MDLM layout (backbone.* tensor names, MDLMConfig keys, the tokenizer beside it)."""
    save_dit(model, path, published_config(model), SAVE_RULES, "backbone.")


FAMILY_SAVERS[MODEL_TYPE] = save_mdlm
TOKENIZER_FAMILIES.add(MODEL_TYPE)
PUBLISHED_CONFIG_READERS.append(lambda config: backbone_config(config, int(config["vocab_size"]) - 1)
                                if config.get("model_type") == MODEL_TYPE else None)


# ---- the published denoising distribution -----------------------------------------------------------------------
def subs_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """MDLM's SUBS parameterisation: [B, L, V] network output -> [B, L, V] log p_theta(x_0 | x_t).

    Masked positions: log_softmax with the mask column at -inf (the model never predicts [MASK]). Unmasked
    positions: carried over, log-prob 0 on the input token and -inf elsewhere (MDLM writes -1e6 for -inf).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 kept
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1)
    carried = torch.full_like(log_probs, float("-inf")).scatter(-1, input_ids[..., None], 0.0)
    return torch.where((input_ids == mask_id)[..., None], log_probs, carried)
