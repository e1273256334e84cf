"""SEDD (louaaron/sedd-small, sedd-medium) on TraceRL's native DiT (dit.py); no remote code, no flash-attn.

The published directory (huggingface_hub's PyTorchModelHubMixin) holds config.json = the training run's hydra
config, with no `model_type`: `tokens` (50257, GPT-2's vocabulary), `graph.type` ("absorb"), `noise.type`
("loglinear"), `model.{hidden_size, cond_dim, length, n_blocks, n_heads, scale_by_sigma, dropout}` among sections
the network does not read (training, data, optim, ...). model.safetensors holds the `SEDD` module's names, the DIT
tree of mdlm.py without MDLM's `backbone.` prefix. No tokenizer ships (SEDD loads GPT-2's). The absorbing state
is the extra last index: vocabulary = tokens + 1, absorbing id = tokens.

The network output is a log-score: log s(x_t, sigma)[i, y] ~ log p_t(x_t with token i -> y) / p_t(x_t). SEDD's
forward writes `log_score = raw - [scale_by_sigma] (log(e^sigma - 1) + log(V - 1))`, then sets the input token's
column to 0 (`sedd_log_score`). For the absorbing graph the exact score at a masked position i is
    s[i, y] = e^{-sigma} / (1 - e^{-sigma}) * p_0(x_0^i = y | unmasked tokens of x_t),   y != absorbing,
so the clean-token distribution is the normalised score over the non-absorbing tokens, which is what every SEDD
sampler draws a token from once it leaves the absorbing state (Euler: rate ~ score; analytic and the final
denoiser: probs ~ (e^{dsigma} - 1) score). Subtracting a constant per row changes no normalised value, so
log_softmax over the raw `logits` with the absorbing column excluded is exactly that distribution
(`sedd_denoising_log_probs` writes the published form). SEDD conditions on sigma always (no time_conditioning).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.models.dit import PUBLISHED_CONFIG_READERS, DiTConfig
from tracerl.models.loading import FAMILY_SAVERS, LAYOUT_DETECTORS, TOKENIZER_FAMILIES, register_family
from tracerl.models.mdlm import attach_mask_token, dit_rules, load_dit, resolve_tokenizer, save_dit

FAMILY = "sedd"
MODEL_KEYS = ("hidden_size", "cond_dim", "length", "n_blocks", "n_heads", "scale_by_sigma", "dropout")
SUPPORTED = {"graph.type": "absorb", "noise.type": "loglinear", "model.type": "ddit"}
LOAD_RULES, SAVE_RULES = dit_rules("")


def is_sedd_layout(config: dict) -> str | None:
    """SEDD's config.json: the hydra run config, recognised by its sections (no model_type in it)."""
    sections = all(isinstance(config.get(key), dict) for key in ("graph", "noise", "model"))
    return FAMILY if sections and "tokens" in config else None


LAYOUT_DETECTORS.append(is_sedd_layout)


def check_supported(path: Path, config: dict) -> None:
    """Refuse (naming the key) what the absorbing-state DiT mapping would compute differently, or cannot read."""
    wrong = {}
    for dotted, value in SUPPORTED.items():
        section, key = dotted.split(".")
        got = (config.get(section) or {}).get(key, value if dotted == "model.type" else None)
        if got != value:
            wrong[dotted] = got
    if wrong:
        raise UserError(f"{path}/config.json: SEDD variant with {wrong} is not supported natively (TraceRL runs the "
                        f"absorbing-state SEDD: {SUPPORTED}; a uniform graph has no [MASK] to denoise)")
    missing = [f"model.{k}" for k in MODEL_KEYS if k not in config["model"]]
    if missing or not isinstance(config.get("tokens"), int):
        raise UserError(f"{path}/config.json: SEDD config lacks {missing or ['tokens']}")
    if config["model"]["hidden_size"] % config["model"]["n_heads"]:
        raise UserError(f"{path}/config.json: model.hidden_size is not a multiple of model.n_heads")


def backbone_config(config: dict) -> DiTConfig:
    """Published SEDD config.json -> DiTConfig of the same network (vocabulary = tokens + the absorbing state)."""
    m, tokens = config["model"], int(config["tokens"])
    return DiTConfig(vocab_size=tokens + 1, hidden_size=int(m["hidden_size"]), num_hidden_layers=int(m["n_blocks"]),
                     num_attention_heads=int(m["n_heads"]), cond_dim=int(m["cond_dim"]),
                     max_position_embeddings=int(m["length"]), dropout=float(m["dropout"]), time_conditioning=True,
                     mask_token_id=tokens, scale_by_sigma=bool(m["scale_by_sigma"]))


def check_tokenizer(path: Path, tokenizer: PreTrainedTokenizerBase, tokens: int) -> None:
    n, mask = len(tokenizer), tokenizer.mask_token_id
    if n == tokens or (n == tokens + 1 and mask == tokens):
        return
    raise UserError(f"{path}: the tokenizer has {n} tokens but config.json's `tokens` is {tokens}: SEDD needs its "
                    f"training tokenizer ({tokens} tokens; the absorbing state {tokens} is appended); pass the right "
                    "`tokenizer`")


@register_family(FAMILY)
def load_sedd(path: Path, config: dict, overrides: dict) -> DiffusionLM:
    """Load a published SEDD directory natively (no remote code, no flash-attn)."""
    check_supported(path, config)
    if overrides.get("block_size") is not None:
        raise UserError("SEDD is a full-attention model: block_size does not apply (for semi-autoregressive "
                        "sampling set the rollout's block_length instead)")
    tokens = int(config["tokens"])
    if overrides.get("mask_token_id") not in (None, tokens):
        raise UserError(f"SEDD's absorbing state is fixed by the graph (id {tokens} = config.json's `tokens`); "
                        f"mask_token_id {overrides['mask_token_id']} does not apply")
    tokenizer = resolve_tokenizer("SEDD", path, overrides)
    check_tokenizer(path, tokenizer, tokens)
    hf_config = backbone_config(config)
    backbone = load_dit(path, LOAD_RULES, hf_config, overrides)
    backbone.config.tracerl_published = json.loads(json.dumps(config))  # a deep copy for the saver
    attach_mask_token(tokenizer, tokens)
    return DiffusionLM(backbone, tokenizer, FamilySpec(FAMILY, tokens, time_conditioned=True))


def published_config(model: DiffusionLM) -> dict:
    """SEDD's hydra config (as loaded), with the network's sections reflecting the model as it is now."""
    c = model.backbone.config
    out = json.loads(json.dumps(getattr(c, "tracerl_published", None) or {}))
    out["tokens"] = c.vocab_size - 1
    out.setdefault("graph", {})["type"] = "absorb"
    out.setdefault("noise", {"sigma_min": 1e-4, "sigma_max": 20})["type"] = "loglinear"  # sigmas: unused by loglinear
    model_section = out.setdefault("model", {"name": "tiny", "type": "ddit"})
    model_section.update(hidden_size=c.hidden_size, cond_dim=c.cond_dim, length=c.max_position_embeddings,
                         n_blocks=c.num_hidden_layers, n_heads=c.num_attention_heads,
                         scale_by_sigma=bool(c.scale_by_sigma), dropout=c.dropout)
    return out


def save_sedd(model: DiffusionLM, path: Path, **kwargs: Any) -> None:
    """Write the published SEDD layout (the SEDD module's tensor names, the hydra config, the tokenizer)."""
    save_dit(model, path, published_config(model), SAVE_RULES, "")


FAMILY_SAVERS[FAMILY] = save_sedd
TOKENIZER_FAMILIES.add(FAMILY)
PUBLISHED_CONFIG_READERS.append(lambda config: backbone_config(config) if is_sedd_layout(config) else None)


# ---- the published score and denoising distribution -----------------------------------------------------------
def sedd_log_score(logits: torch.Tensor, input_ids: torch.Tensor, sigma: torch.Tensor,
                   scale_by_sigma: bool = True) -> torch.Tensor:
    """SEDD.forward's output from the raw network output: [B, L, V] logits, input_ids [B, L], sigma [B].

    scale_by_sigma subtracts log(e^sigma - 1) (expm1 below 0.5, for precision, as published) and log(V - 1), so
    the score sums to about 1 / (e^sigma - 1) at a masked position; then the input token's column is set to 0
    (the ratio p(x) / p(x) = 1).
    """
    log_score = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 kept
    if scale_by_sigma:
        sigma = sigma.to(log_score.dtype)
        esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
        log_score = log_score - esigm1.log()[:, None, None] - math.log(log_score.shape[-1] - 1)
    return log_score.scatter(-1, input_ids[..., None], 0.0)


def sedd_denoising_log_probs(log_score: torch.Tensor, input_ids: torch.Tensor, absorbing_id: int) -> torch.Tensor:
    """The clean-token distribution [B, L, V] (log) implied by SEDD's log-score at each position.

    Absorbed positions: the normalised score over the non-absorbing tokens, p(y) = s[y] / sum_{y' != abs} s[y'].
    Other positions are carried over (the absorbing graph never moves a clean token back).
    """
    log_score = log_score.to(torch.promote_types(log_score.dtype, torch.float32))
    masked = log_score.index_fill(-1, torch.tensor([absorbing_id], device=log_score.device), float("-inf"))
    log_probs = torch.log_softmax(masked, dim=-1)
    carried = torch.full_like(log_probs, float("-inf")).scatter(-1, input_ids[..., None], 0.0)
    return torch.where((input_ids == absorbing_id)[..., None], log_probs, carried)
