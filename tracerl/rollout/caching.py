"""Approximate KV caching for full-attention diffusion LMs (LLaDA, Dream): Fast-dLLM's prefix and dual caches.

A full-attention model's keys and values change whenever any token changes, so no cache is exact. Fast-dLLM (Wu
et al. 2025) reuses them anyway within a semi-autoregressive block:

  every block [s, e) starts with one full forward over the frame (exact: it is the block's first step) that also
  fills the cache with every position's keys and values;
  prefix  later steps run the block and everything after it ([s, end) or, with a horizon H as dLLM-RL does,
          [s, min(e + H, end)) with the rest dropped from attention) over the cached prefix [0, s), which is stale;
  dual    later steps run only the block over the cached prefix [0, s) and suffix [e, end), both stale.

Two knobs trade speed back for fidelity. A horizon H recomputes H positions past the block at every step as well:
the prefix cache then drops the positions beyond them from attention (dLLM-RL's windowed cache), the dual cache
serves them stale from its cache, so only the far [MASK] suffix is stale (after Elastic-Cache's observation that
distant masks matter least; Elastic-Cache itself, with its attention-drift test and layer-wise refresh, is
rollout.cache: elastic in elastic.py). A refresh interval R runs the exact full forward again every R steps inside the block (a fixed-period
refresh; dLLM-Cache also refreshes on fixed periods, with separate prompt / response intervals and partial updates
in between), so no key is more than R - 1 steps stale. benchmarks/cache_fidelity.py measures what
each costs and keeps on a trained model.

The behaviour log-probs a rollout records are those of these cached forwards; the trainer's replay scores the
exact model, and measures the gap (`rollout/*` metrics) and can correct it (algorithm.rollout_correction: tis).
Shifted families (Dream: raw output i predicts token i + 1) start the window one position early, so the block's
first token is scored from the output before it, as the uncached model does (Fast-dLLM instead commits that token
unconditionally in the full forward).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tracerl.models.base import DiffusionLM
from tracerl.models.masks import positions_from_padding

CACHE_MODES = ("none", "prefix", "dual", "elastic")
_KNOBS = {"h": ("cache_horizon", int), "r": ("cache_refresh", int), "w": ("cache_window", int),
          "g": ("cache_gamma", float), "d": ("cache_drift", str)}


def cache_settings(name: str) -> dict[str, str | int | float]:
    """The rollout settings a short cache name stands for, as benchmarks and result tables write them:
    'dual:h8:r4' -> {cache: dual, cache_horizon: 8, cache_refresh: 4}; 'elastic:w64:g0.8' -> {cache: elastic,
    cache_window: 64, cache_gamma: 0.8}; a mode alone."""
    mode, *knobs = name.split(":")
    if mode not in CACHE_MODES:
        raise ValueError(f"cache {name!r}: the mode must be one of {', '.join(CACHE_MODES)}")
    settings: dict[str, str | int | float] = {"cache": mode}
    for knob in knobs:
        key, kind = _KNOBS.get(knob[:1], (None, int))
        try:
            value = kind(knob[1:]) if key else None
        except ValueError:
            value = None
        if value is None:
            raise ValueError(f"cache {name!r}: knobs are :hH (cache_horizon), :rR (cache_refresh), :wW (cache_window), "
                             f":gG (cache_gamma) and :dkeys / :dheads (cache_drift), got {knob!r}")
        settings[key] = value
    return settings


class ApproximateCache:
    """The cache of one semi-AR block; `refresh` at the block's first step, `step` after."""

    def __init__(self, model: DiffusionLM, mode: str, horizon: int | None):
        self.model, self.mode, self.horizon = model, mode, horizon
        self.shift = model.spec.logit_shift
        self.cache: DynamicCache | None = None

    def refresh(self, x: torch.Tensor, attn: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Full forward over the frame x [N, T] (exact); fills the cache. Returns aligned logits [N, e - s, V]."""
        logits, cache = self.model.logits_and_cache(x, attn, keep=torch.arange(s, e, device=x.device))
        self.s, self.e, self.start = s, e, max(s - self.shift, 0)  # the window starts one early for shifted logits
        T = x.shape[1]
        # the window [start, end) is recomputed at every later step
        if self.mode == "prefix":
            self.end = T if self.horizon is None else min(e + self.horizon, T)
            _keep(cache, self.start)
        else:  # dual: keep [0, start) and [end, T) in this order; the window's keys are appended at each step
            self.end = min(e + (self.horizon or 0), T)
            for layer in cache.layers:
                layer.keys = torch.cat([layer.keys[:, :, :self.start], layer.keys[:, :, self.end:]], dim=2)
                layer.values = torch.cat([layer.values[:, :, :self.start], layer.values[:, :, self.end:]], dim=2)
        self.cache, self.cached = cache, cache.get_seq_length()
        return logits

    def step(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """One later step of the block: aligned logits [N, e - s, V] from the window over the cached keys."""
        s, e, start, stop = self.s, self.e, self.start, self.end
        if self.mode == "prefix":
            key_padding = attn[:, :stop]  # cached [0, start), then the window [start, stop)
        else:  # cache order ([0, start), [stop, T)), then the window
            key_padding = torch.cat([attn[:, :start], attn[:, stop:], attn[:, start:stop]], dim=1)
        positions = positions_from_padding(attn)[:, start:stop]
        # aligned logit of frame column c is raw output c - shift (column 0 reuses output 0), at window index
        # (c - shift) - start: only the block's go through the LM head
        index = (torch.arange(s, e, device=x.device) - self.shift).clamp(min=0) - start
        logits = self.model.logits_over_cache(x[:, start:stop], positions, key_padding, self.cache, keep=index)
        _keep(self.cache, self.cached)  # the window's keys were appended: drop them (recomputed at the next step)
        return logits  # [N, e - s, V]


def _keep(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer (transformers' crop takes the number to drop)."""
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)
