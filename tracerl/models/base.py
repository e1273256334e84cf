"""DiffusionLM: the one interface the sampler, the trainer and the value model use for every model family.

A family adapter wraps a transformers causal-LM class (Llama, Qwen2, Qwen3, ...) and supplies what makes it a
masked-diffusion denoiser: the `[MASK]` id, the attention policy (full bidirectional, or block-causal with
`block_size`), and the logit alignment (`logit_shift`: 1 for families like Dream whose raw output at i predicts
token i+1). Everything the caller sees is position-aligned: `logits[:, i]` is the distribution of token i.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tracerl.models.masks import attention_bias, positions_from_padding, visibility_to_bias


@dataclass
class FamilySpec:
    """What distinguishes one diffusion family from a plain causal LM."""

    name: str  # the `model_type` a checkpoint of this family carries ("llada", "Dream", "sdar", "tracerl_tiny")
    mask_token_id: int
    block_size: int | None = None  # None: full bidirectional attention
    logit_shift: int = 0  # 1: raw output at i predicts token i+1 (Dream); aligned inside `logits`
    time_conditioned: bool = False  # the backbone takes `noise_level` [B] (MDLM / SEDD sigma); None = derive it


class DiffusionLM(nn.Module):
    """A masked-diffusion LM over a transformers backbone.

    `backbone` is any `*ForCausalLM` (possibly wrapped by peft); `forward`/`logits` never apply a causal mask of
    their own: the attention pattern always comes from `tracerl.models.masks`.
    """

    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, spec: FamilySpec):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.spec = spec
        _disable_causal_flags(backbone)

    # ---- properties the rest of TraceRL reads -------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        return self.spec.mask_token_id

    @property
    def block_size(self) -> int | None:
        return self.spec.block_size

    @property
    def family(self) -> str:
        return self.spec.name

    @property
    def config(self) -> Any:
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    @property
    def pad_token_id(self) -> int:
        tok_pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(tok_pad if tok_pad is not None else self.eos_token_id)

    @property
    def eos_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise ValueError(f"model family {self.family!r}: neither the tokenizer nor config.json names an EOS token")
        return int(eos)

    # ---- forward passes -------------------------------------------------------------------------------------
    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, L] -> position-aligned logits [B, L, V] (or [B, len(keep), V] for keep = 1D positions).

        attention_mask [B, L] {0,1} marks real tokens (left padding = 0). The family's attention policy applies.
        noise_level [B]: the published sigma of time-conditioned families (MDLM, SEDD); None = derived by the
        backbone from each row's share of masked positions. Families without time conditioning ignore it.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        bias = attention_bias(attention_mask, self.block_size, self.dtype)
        return self._run(input_ids, attention_mask, bias, keep=keep, noise_level=noise_level)

    def logits_cached(
        self,
        chunk_ids: torch.Tensor,
        key_padding: torch.Tensor,
        cache: DynamicCache | None,
        keep_in_cache: int,
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Block diffusion with a KV cache: run only `chunk_ids` on top of the cached prefix.

        chunk_ids [B, C] sit at frame positions [S, S + C) where S = cached length; key_padding [B, S + C] marks
        real tokens over the whole visible frame. After the forward, the cache keeps the first `keep_in_cache`
        positions of the chunk (committed blocks) and drops the rest (the still-noisy block), so a committed
        block is encoded exactly once. Returns (aligned logits [B, C, V], cache).
        """
        if self.block_size is None:
            raise ValueError("logits_cached needs a block-diffusion model (block_size is None)")
        if self.spec.logit_shift:
            raise ValueError("a KV cache with shifted logits is not supported")
        cached = cache.get_seq_length() if cache is not None else 0
        bias = attention_bias(key_padding, self.block_size, self.dtype, query_start=cached)
        logits, cache = self._run(chunk_ids, key_padding, bias, cache=cache, query_start=cached)
        drop = chunk_ids.shape[1] - keep_in_cache
        if drop > 0:
            cache.crop(-drop)
        return logits, cache

    def logits_and_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         keep: torch.Tensor | None = None) -> tuple[torch.Tensor, DynamicCache]:
        """Full attention: aligned logits [B, L, V] of the whole frame (or [B, len(keep), V] of the frame columns
        `keep` [K]; a large vocabulary makes the rest costly) and a cache of every position's keys and values (the
        refresh forward of the approximate caches, tracerl/rollout/caching.py)."""
        if self.block_size is not None:
            raise ValueError("logits_and_cache is for full-attention models (block diffusion has logits_cached)")
        bias = attention_bias(attention_mask, None, self.dtype)
        return self._run(input_ids, attention_mask, bias, keep=keep, query_start=0)

    def logits_over_cache(self, window_ids: torch.Tensor, positions: torch.Tensor, key_padding: torch.Tensor,
                          cache: DynamicCache, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Full attention over cached keys: window_ids [B, Q] at rotary positions [B, Q] attend to the cache's keys
        and their own; key_padding [B, C + Q] marks real keys in that order. Returns RAW logits [B, Q, V] (the
        caller aligns shifted families), or [B, len(keep), V] of the window indices `keep` [K] only (the LM head
        over a long window is costly with a large vocabulary), and leaves the window's keys appended to the cache."""
        visible = key_padding.bool()[:, None, :].expand(-1, window_ids.shape[1], -1)  # [B, Q, C + Q]
        out = self.backbone(input_ids=window_ids, attention_mask=visibility_to_bias(visible, self.dtype),
                            position_ids=positions, cache=cache, use_cache=True,
                            logits_to_keep=0 if keep is None else keep)
        return out.logits

    def _run(self, input_ids, key_padding, bias, keep=None, cache=None, query_start: int | None = None,
             noise_level: torch.Tensor | None = None):
        """One backbone forward; returns aligned logits (and the cache when `query_start` is given)."""
        positions = positions_from_padding(key_padding)
        use_cache = query_start is not None
        if use_cache:
            positions = positions[:, query_start:]
            if cache is None:
                cache = DynamicCache(config=self.backbone.config)
        raw_keep: torch.Tensor | int = 0
        if keep is not None:
            # Aligned logit i is raw output i - shift; position 0 of a shifted family reuses raw output 0.
            raw_keep = (keep - self.spec.logit_shift).clamp(min=0)
        extra = {"noise_level": noise_level} if self.spec.time_conditioned else {}
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=bias,
            position_ids=positions,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=raw_keep,
            **extra,
        )
        logits = out.logits
        if self.spec.logit_shift and keep is None:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return (logits, cache) if use_cache else logits  # the cache object is filled in place

    def logits_packed(
        self,
        input_ids: torch.Tensor,
        visible: torch.Tensor,
        position_ids: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for a packed sequence with an explicit attention pattern (training replay).

        input_ids [B, T]; visible [B, T, T] bool (query i may attend key j); position_ids [B, T] rotary positions;
        keep: 1D positions whose logits are wanted. Lets one forward hold a clean copy and noisy copies of the
        response side by side.
        """
        if self.spec.logit_shift:
            raise ValueError("packed replay needs position-aligned raw logits (shifted families use per-step rows)")
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=visibility_to_bias(visible, self.dtype),
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep if keep is not None else 0,
        )
        return out.logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(input_ids, attention_mask)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states [B, L, H], aligned like `logits` (for value heads).

        Either the family's own attention over `attention_mask` [B, L], or an explicit pattern `visible`
        [B, L, L] with `position_ids` [B, L] (packed replay rows). noise_level [B] as for `logits`.
        """
        if visible is not None:
            bias = visibility_to_bias(visible, self.dtype)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            bias = attention_bias(attention_mask, self.block_size, self.dtype)
            position_ids = positions_from_padding(attention_mask)
        extra = {"noise_level": noise_level} if self.spec.time_conditioned else {}
        out = self.decoder()(input_ids=input_ids, attention_mask=bias, position_ids=position_ids, use_cache=False,
                             **extra)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.spec.logit_shift:
            hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
        return hidden

    def decoder(self) -> nn.Module:
        """The transformer stack without the LM head (through a peft wrapper, whose LoRA layers live inside it)."""
        inner = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return inner.get_decoder()

    # ---- persistence ----------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """Write a Hugging Face directory that `load_model` reads back (config.json, safetensors, tokenizer)."""
        from tracerl.models.loading import save_model

        save_model(self, Path(path), **kwargs)


def _disable_causal_flags(backbone: nn.Module) -> None:
    """Attention modules carry `is_causal=True`; kernels that trust the flag (flash, SDPA without a mask) would
    then ignore our mask. We always pass a mask, and clear the flag so no path can fall back to causal."""
    for module in backbone.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
