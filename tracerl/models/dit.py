"""The diffusion transformer (DiT) of MDLM and SEDD, written natively as a transformers PreTrainedModel.

Both published checkpoints (kuleshov-group/mdlm-owt, louaaron/sedd-small / sedd-medium) run the same network,
"DDiT": a bidirectional transformer whose LayerNorms are modulated by the noise level (adaLN, as in DiT):

    c     = silu(fc2(silu(fc1(timestep_embedding(sigma)))))                      # [B, cond] (per token here)
    x     = E[ids]                                                                # [B, L, D]
    per block:  shift1, scale1, gate1, shift2, scale2, gate2 = adaLN(c)           # 6 x [B, 1, D]
                h = LN(x) * (1 + scale1) + shift1
                x = x + gate1 * attn_out(SDPA(rope(q), rope(k), v))                # q, k, v = attn_qkv(h)
                x = x + gate2 * mlp_out(gelu_tanh(mlp_in(LN(x) * (1 + scale2) + shift2)))
    out:        shift, scale = adaLN_out(c);  logits = linear(LN(x) * (1 + scale) + shift)

LN is LayerNorm without bias (weight only, eps 1e-5, computed in fp32); RoPE is rotate-half over the full head
with base 10000, on q and k only. Residual dropout (`dropout`) applies in train mode, as published.

TraceRL's additions: the attention pattern comes from the 4D additive bias DiffusionLM passes (full bidirectional
over real tokens, pads blocked), rotary positions from `position_ids` (so left padding is invisible), and the
noise level is either given (`noise_level` [B], the published sigma) or derived from the share of `[MASK]` tokens
each query sees (see `derive_noise_level`). `logits` are the raw output layer: the family modules (mdlm.py,
sedd.py) explain why log_softmax over them without the mask column is the published denoising distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

# Readers of published config.json layouts (registered by mdlm.py, sedd.py): dict -> DiTConfig, or None if not theirs
PUBLISHED_CONFIG_READERS: list[Callable[[dict], "DiTConfig | None"]] = []


class DiTConfig(PretrainedConfig):
    """The DDiT network and its noise conditioning, in transformers' naming (hidden_size, num_hidden_layers, ...).

    The family loaders translate the published config.json (MDLM: hidden_dim, n_blocks, ...; SEDD: model.* keys)
    into this; `published` keeps the original dict so a save writes it back unchanged.
    """

    model_type = "tracerl_dit"

    def __init__(
        self,
        vocab_size: int = 50258,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        cond_dim: int = 128,
        max_position_embeddings: int = 1024,
        dropout: float = 0.1,
        time_conditioning: bool = True,  # False (MDLM's default): the network always sees sigma = 0
        mask_token_id: int | None = None,  # [MASK] / absorbing state, to derive the noise level from the input
        noise_schedule: str = "loglinear",
        noise_eps: float = 1e-3,  # LogLinearNoise(eps): sigma(t) = -log(1 - (1 - eps) t)
        rope_theta: float = 10000.0,
        mlp_ratio: int = 4,
        layer_norm_eps: float = 1e-5,
        frequency_embedding_size: int = 256,
        scale_by_sigma: bool = False,  # SEDD: the log-score subtracts log(e^sigma - 1) + log(V - 1) (sedd.py)
        initializer_range: float = 0.02,
        **kwargs,
    ):
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.cond_dim = cond_dim
        self.max_position_embeddings = max_position_embeddings
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.mask_token_id = mask_token_id
        self.noise_schedule = noise_schedule
        self.noise_eps = noise_eps
        self.rope_theta = rope_theta
        self.mlp_ratio = mlp_ratio
        self.layer_norm_eps = layer_norm_eps
        self.frequency_embedding_size = frequency_embedding_size
        self.scale_by_sigma = scale_by_sigma
        self.initializer_range = initializer_range
        self.use_cache = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """Also reads a published MDLM / SEDD config.json, as the same network's DiTConfig: peft re-reads the base
        model's config.json when it saves an adapter, to tell whether the vocabulary was resized (it would
        otherwise save both vocabulary matrices into every adapter)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        for read in PUBLISHED_CONFIG_READERS:
            found = read(config_dict)
            if found is not None:
                return found.to_dict(), kwargs
        return config_dict, kwargs


@dataclass
class DiTModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # [B, L, D] residual stream after the last block
    conditioning: torch.Tensor | None = None  # [B, 1 or L, cond] c = silu(sigma_map(sigma)), for the output layer
    noise_level: torch.Tensor | None = None  # [B] or [B, L]: the sigma the network was conditioned on


@dataclass
class DiTOutput(ModelOutput):
    logits: torch.Tensor | None = None  # [B, L or kept, V] raw output layer (position-aligned)
    noise_level: torch.Tensor | None = None  # [B] or [B, L]: the sigma the network was conditioned on


# ---- noise level ------------------------------------------------------------------------------------------------
def loglinear_sigma(t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """MDLM's / SEDD's LogLinearNoise.total_noise: sigma(t) = -log(1 - (1 - eps) t), t in [0, 1]."""
    return -torch.log1p(-(1.0 - eps) * t)


def derive_noise_level(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask_token_id: int,
                       eps: float = 1e-3) -> torch.Tensor:
    """sigma from the share of [MASK] tokens, taken as the diffusion time t of the loglinear schedule.

    A query's t is the share of masked tokens among the keys it may attend to, so under DiffusionLM's full
    attention every real token of a row gets the row's share (masked / real tokens) and pads count for nothing.
    All-masked maps to t = 1, sigma = -log(eps) (where MDLM's and SEDD's samplers start); clean to sigma = 0.
    Returns [B] when every query of a row agrees, else [B, L] (left-pad queries, packed rows).
    """
    masked = (input_ids == mask_token_id).float()  # [B, L]
    if attention_mask is None:
        return loglinear_sigma(masked.mean(-1), eps)  # [B]
    visible = (attention_mask > torch.finfo(attention_mask.dtype).min / 2)[:, 0].float()  # [B, Q, K]
    share = (visible @ masked[..., None])[..., 0] / visible.sum(-1).clamp(min=1.0)  # [B, Q]
    sigma = loglinear_sigma(share, eps)
    # a CPU-GPU sync point, once per forward (as is torch.unique in DiTModel.forward)
    return sigma[:, 0] if bool((sigma == sigma[:, :1]).all()) else sigma


def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[...] -> [..., dim] sinusoidal features [cos(sigma f_k), sin(sigma f_k)], f_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


# ---- layers -----------------------------------------------------------------------------------------------------
class DiTLayerNorm(nn.Module):
    """LayerNorm without bias, normalised in fp32 (as published), scaled by its weight in the model dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTSigmaEmbedding(nn.Module):
    """TimestepEmbedder: sinusoidal features of sigma -> fc1 -> SiLU -> fc2 (published sigma_map.mlp.{0,2})."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.frequency_embedding_size = config.frequency_embedding_size
        self.fc1 = nn.Linear(config.frequency_embedding_size, config.cond_dim)
        self.fc2 = nn.Linear(config.cond_dim, config.cond_dim)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(sigma, self.frequency_embedding_size).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(features)))


class DiTRotary(nn.Module):
    """Rotate-half RoPE over the whole head. inv_freq is computed, not stored: the published `rotary_emb.inv_freq`
    buffer is checked against it at load and written back at save (mdlm.py / sedd.py)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config  # native._rebuild_meta_buffers re-creates this module from it after a meta-device build
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> cos, sin [B, 1, L, head_dim] in fp32."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # [B, L, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos(), emb.sin()


def rotary_inv_freq(config: DiTConfig) -> torch.Tensor:
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, self.heads, self.dropout = config.hidden_size, config.num_attention_heads, config.dropout
        self.norm1 = DiTLayerNorm(dim, config.layer_norm_eps)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = DiTLayerNorm(dim, config.layer_norm_eps)
        self.mlp_in = nn.Linear(dim, config.mlp_ratio * dim)
        self.mlp_out = nn.Linear(config.mlp_ratio * dim, dim)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # [B, 1|L, D]
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.attn_qkv(h).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, L, d]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # v is not rotated
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # published attention: no dropout
        a = a.transpose(1, 2).reshape(B, L, D)
        x = x + gate1 * F.dropout(self.attn_out(a), self.dropout, self.training)
        h = modulate(self.norm2(x), shift2, scale2)
        h = self.mlp_out(F.gelu(self.mlp_in(h), approximate="tanh"))
        return x + gate2 * F.dropout(h, self.dropout, self.training)


class DiTOutputLayer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm_final = DiTLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.linear = nn.Linear(config.hidden_size, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---- models -----------------------------------------------------------------------------------------------------
class DiTPreTrainedModel(PreTrainedModel):
    config_class = DiTConfig
    base_model_prefix = "dit"
    _no_split_modules = ("DiTBlock",)
    supports_gradient_checkpointing = False
    _supports_sdpa = True  # the blocks always run torch SDPA (build_backbone asks for "sdpa")


class DiTModel(DiTPreTrainedModel):
    """Embedding, noise conditioning and the blocks: the decoder a value head reads (`last_hidden_state`)."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        self.vocab_embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.sigma_map = DiTSigmaEmbedding(config)
        self.rotary = DiTRotary(config)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vocab_embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.vocab_embed = value

    def conditioning_sigma(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           noise_level: torch.Tensor | None) -> torch.Tensor:
        """The sigma the network sees: given, else derived from the masks; zero without time conditioning."""
        if noise_level is None:
            if self.config.mask_token_id is None:
                raise ValueError("noise_level is needed: the config names no mask_token_id to derive it from")
            noise_level = derive_noise_level(input_ids, attention_mask, self.config.mask_token_id,
                                             self.config.noise_eps)
        noise_level = torch.as_tensor(noise_level, dtype=torch.float32, device=input_ids.device)
        if noise_level.dim() == 0:
            noise_level = noise_level.expand(input_ids.shape[0])
        if noise_level.shape not in ((input_ids.shape[0],), tuple(input_ids.shape)):
            raise ValueError(f"noise_level must be [B] or [B, L] for input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(noise_level.shape)}")
        if not self.config.time_conditioning:
            noise_level = torch.zeros_like(noise_level)  # MDLM: time_conditioning=False feeds sigma = 0
        return noise_level

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        use_cache: bool | None = False,
        cache: object | None = None,
        **kwargs,
    ) -> DiTModelOutput:
        """input_ids [B, L]; attention_mask: 4D additive bias [B, 1, L, L] or None (full attention); position_ids
        [B, L] rotary positions (None: 0..L-1); noise_level [B] / [B, L] sigma or None (derived)."""
        if use_cache or cache is not None:
            raise ValueError("the DiT (MDLM / SEDD) is a full-attention model: it has no KV cache")
        B, L = input_ids.shape
        if attention_mask is not None:
            if attention_mask.dim() != 4:
                raise ValueError("the DiT takes a 4D attention bias [B, 1, Q, K] (tracerl.models.masks), not a "
                                 f"{attention_mask.dim()}D padding mask")
            if attention_mask.dtype == torch.bool:  # True = may attend -> additive 0 / -inf-like bias
                blocked = torch.finfo(self.vocab_embed.weight.dtype).min
                attention_mask = torch.zeros(attention_mask.shape, dtype=self.vocab_embed.weight.dtype,
                                             device=attention_mask.device).masked_fill(~attention_mask, blocked)
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)[None].expand(B, L)
        sigma = self.conditioning_sigma(input_ids, attention_mask, noise_level)
        # Few distinct sigmas (one per row, or two with left padding): embed each once, then gather per token.
        values, index = torch.unique(sigma, return_inverse=True)
        c = F.silu(self.sigma_map(values))[index]  # [B, cond] or [B, L, cond]
        c = c[:, None] if sigma.dim() == 1 else c  # [B, 1 | L, cond]
        x = self.vocab_embed(input_ids)  # [B, L, D]
        cos, sin = self.rotary(position_ids)
        bias = attention_mask.to(x.dtype) if attention_mask is not None else None
        for block in self.blocks:
            x = block(x, cos, sin, c, bias)
        return DiTModelOutput(last_hidden_state=x, conditioning=c, noise_level=sigma)


class DiTForDiffusionLM(DiTPreTrainedModel):
    """DiTModel + the adaLN-modulated output layer. `logits[:, i]` is the raw network output at position i."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        self.dit = DiTModel(config)
        self.output_layer = DiTOutputLayer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.dit.vocab_embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.dit.vocab_embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer.linear  # peft "all-linear" leaves it out (tracerl.peft_utils)

    def get_decoder(self) -> DiTModel:
        return self.dit

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        cache: object | None = None,
        use_cache: bool | None = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DiTOutput:
        """As DiTModel.forward; logits_to_keep: 0 = all positions, n = the last n, 1D tensor = those positions."""
        out = self.dit(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       noise_level=noise_level, use_cache=use_cache, cache=cache)
        x, c = out.last_hidden_state, out.conditioning
        keep: slice | torch.Tensor = slice(None)
        if isinstance(logits_to_keep, torch.Tensor):
            keep = logits_to_keep
        elif logits_to_keep:
            keep = slice(-logits_to_keep, None)
        x = x[:, keep]
        c = c if c.shape[1] == 1 else c[:, keep]
        return DiTOutput(logits=self.output_layer(x, c), noise_level=out.noise_level)
