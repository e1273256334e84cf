"""Elastic-Cache (Nguyen-Tri et al. 2025, arXiv 2510.14973) for full-attention diffusion LMs (LLaDA, Dream).

Fast-dLLM's caches (caching.py) refresh on a fixed schedule. Elastic-Cache decides per step and per layer, from
what the attention itself says, how much to recompute. Reproduced from the authors' code
(`generate_with_elastic_cache` and `LLaDABlock.attention`, read in yxu-dev/Elastic-Cache @ 1796317):

  step 0    one full forward over the frame; every layer keeps its input hidden states and its post-RoPE
            queries, keys and values for every position.
  step i    only the *query set* runs through the network: the most-attended token of every layer (the union over
            layers), the positions whose token changed since the last forward (the tokens just committed), and a
            sliding window: the first `window` still-masked positions. The masks beyond the window are served from
            the cache ("block caching of distant MASKs"). At every layer the query rows' fresh q / k / v replace
            theirs in the cache, and the query rows attend over every cached key.
  drift     at layer l the tracked tokens' attention is compared with what the same tokens' cached queries gave
            against the layer's keys before this step's update: the cosine similarity taken across the heads
            (`F.cosine_similarity(past, now, dim=1)` on [B, heads, tracked, keys], as the authors' code does),
            averaged over the tracked tokens and the keys. Below `gamma`, every layer after l recomputes every
            position: layer l + 1 starts from its cached inputs with the query rows written in, and all its caches
            are rebuilt. `drift_axis="keys"` (rollout.cache_drift: keys) compares instead each head's attention
            distribution over the keys (cosine over the key axis, averaged over heads): our reading of "the attention
            weights change", not the authors' code (benchmarks/cache_fidelity.py measures both).
  tracking  at every layer, the token that is not [MASK] and receives the most attention from the window's masks
            (summed over heads and rows) is that layer's tracked token for the next step.

Defaults are the published ones: gamma 0.9, one tracked token per layer; the window is 16 masks for LLaDA and 32
for Dream in the authors' scripts. The sampler here keeps its own schedule (semi-AR blocks, remasking policy,
threshold): the window starts at the current block and must cover it, so every position the sampler may commit
has fresh logits; masks past the block inside the window are recomputed like the authors' window.

Two deliberate differences, both for batches: drift and tracking are decided per row (the authors run batch 1
and average over the batch), and a left-padded row's padding is excluded from attention, from the tracked-token
choice and from the drift average (the authors pass no mask). On an unpadded row alone both are the authors'
computation. Shifted families (Dream: raw output i predicts token i + 1) query the position before each window
mask, as the authors' Dream code does.

The layers are Llama / Qwen2 / Qwen3 decoder layers of the native backbones (also under peft: the projections are
called as modules, so LoRA applies); `benchmarks/cache_fidelity.py` measures what the cache costs and keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tracerl.models.base import DiffusionLM
from tracerl.models.masks import positions_from_padding

PUBLISHED_GAMMA = 0.9  # the update trigger of the authors' scripts (LLaDA and Dream)
TRACK_NUM = 1  # most-attended tokens tracked per layer (authors' default)


def attention_drift(past: torch.Tensor, now: torch.Tensor, tracked: torch.Tensor, keys: torch.Tensor,
                    axis: str = "heads") -> torch.Tensor:
    """Per-row drift similarity [N] of the tracked tokens' attention.

    axis "heads" (the authors' code): cosine similarity across the heads axis at each key, averaged over the valid
    tracked rows and the real keys. axis "keys": the cosine similarity of each head's attention distribution over
    the real keys, averaged over the heads and the valid tracked rows.
    past, now: attention weights [N, H, K, T] (K tracked query rows); tracked [N, K] bool real tracked rows;
    keys [N, T] bool real key positions. A row with no tracked token reports 1.0 (no drift measurable)."""
    if axis == "keys":
        real = keys[:, None, None, :].to(past.dtype)  # padding keys count in neither vector
        past, now, dim = past * real, now * real, -1
        weight = tracked[:, None, :].expand(-1, past.shape[1], -1).to(past.dtype)  # [N, H, K]
    else:
        dim = 1
        weight = (tracked[:, :, None] & keys[:, None, :]).to(past.dtype)  # [N, K, T]
    # F.cosine_similarity(past, now, dim) written out, torch's formula to the bit: each vector divided by its own
    # norm clamped at eps = 1e-8 (where most keys get ~1e-30 of every head's attention, clamping the product of the
    # norms instead gives a different, lower statistic). Torch's own reduction over a middle axis is several times
    # slower than this.
    eps = 1e-8
    unit_past = past / torch.linalg.vector_norm(past, dim=dim, keepdim=True).clamp(min=eps)
    unit_now = now / torch.linalg.vector_norm(now, dim=dim, keepdim=True).clamp(min=eps)
    sim = (unit_past * unit_now).sum(dim)  # [N, K, T] (heads) or [N, H, K] (keys)
    count = weight.sum((1, 2))
    return torch.where(count > 0, (sim * weight).sum((1, 2)) / count.clamp(min=1), torch.ones_like(count))


def _pack(select: torch.Tensor, sink: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected columns of select [N, T] bool, left-aligned -> (positions [N, W] long, valid [N, W] bool); empty
    slots point at the `sink` column, whose writes are discarded and which no query sees."""
    count = select.sum(1)
    width = max(int(count.max()) if select.numel() else 0, 1) if width is None else width
    cols = torch.arange(select.shape[1], device=select.device).expand_as(select)
    ordered = torch.where(select, cols, torch.full_like(cols, sink)).sort(1).values  # selected first, in order
    if ordered.shape[1] < width:
        ordered = F.pad(ordered, (0, width - ordered.shape[1]), value=sink)
    positions = ordered[:, :width]
    return positions, positions != sink


class _LayerCache:
    """One layer's cache over T + 1 columns (the last is the sink): its input hidden states [N, T+1, d] and its
    post-RoPE queries [N, H, T+1, hd], keys and values [N, KV, T+1, hd]."""

    def __init__(self, hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.hidden, self.q, self.k, self.v = hidden, q, k, v


class ElasticCache:
    """Elastic-Cache over a rollout: `block_logits(x, attn, s, e)` at every step; the first call is the full
    forward. Counts layer passes (`layer_passes`) and how many of them recomputed every position (`full_passes`):
    the published `num_computed / total_computed`."""

    def __init__(self, model: DiffusionLM, window: int, gamma: float = PUBLISHED_GAMMA, track_num: int = TRACK_NUM,
                 drift_axis: str = "heads"):
        backbone = model.backbone
        inner = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        self.decoder = inner.get_decoder()  # embed_tokens, layers, norm, rotary_emb
        self.lm_head = inner.get_output_embeddings()
        self.layers: list[nn.Module] = list(self.decoder.layers)
        self.mask_id, self.shift = model.mask_token_id, model.spec.logit_shift
        self.window, self.gamma, self.track_num, self.drift_axis = window, gamma, track_num, drift_axis
        self.caches: list[_LayerCache] | None = None
        self.track: torch.Tensor | None = None  # [layers, N, track_num] each layer's most-attended positions
        self.previous: torch.Tensor | None = None  # [N, T] the frame the last forward saw
        self.layer_passes = self.full_passes = 0

    # ---- one step ------------------------------------------------------------------------------------------
    def block_logits(self, x: torch.Tensor, attn: torch.Tensor, s: int, e: int,
                     active: torch.Tensor | None = None) -> torch.Tensor:
        """Aligned logits [N, e - s, V] of frame columns [s, e) (x [N, T] the frame, attn [N, T] its padding);
        fresh at every still-masked column of the block, zero at the committed ones (which the sampler never
        reads).

        active [N] bool: the rows still denoising the block (None: all). A row that has finished its block while
        others have not (the dynamic threshold) sits the step out: its forward runs with the batch's, but its caches,
        tracked tokens and last-seen frame are put back afterwards, so it resumes where a row decoding alone
        would."""
        idle = None if active is None or self.caches is None else (~active).nonzero().flatten()
        if idle is None or not idle.numel():
            return self.step(x, attn, s, e)
        saved = self.row_state(idle)
        out = self.step(x, attn, s, e)
        self.restore_rows(idle, saved)
        return out

    def row_state(self, rows: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor, torch.Tensor]:
        """Copies of what a step changes for `rows`: every layer's caches, the tracked tokens, the last frame."""
        layers = [(c.hidden[rows], c.q[rows], c.k[rows], c.v[rows]) for c in self.caches]
        return layers, self.track[:, rows], self.previous[rows]

    def restore_rows(self, rows: torch.Tensor, saved: tuple[list[tuple[torch.Tensor, ...]], torch.Tensor,
                                                             torch.Tensor]) -> None:
        layers, track, previous = saved
        for cache, (hidden, q, k, v) in zip(self.caches, layers):
            cache.hidden[rows], cache.q[rows], cache.k[rows], cache.v[rows] = hidden, q, k, v
        self.track[:, rows], self.previous[rows] = track, previous

    def step(self, x: torch.Tensor, attn: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """One forward of every row (see block_logits)."""
        N, T = x.shape
        masked = x == self.mask_id  # [N, T]
        ahead = masked.clone()
        ahead[:, :s] = False
        in_window = ahead & (ahead.long().cumsum(1) <= self.window)  # the first `window` masks from the block on
        window_pos, window_valid = _pack(in_window, T)  # [N, W]
        window_rows = torch.where(window_valid, (window_pos - self.shift).clamp(min=0), window_pos)  # output rows
        if self.caches is None:  # step 0: the full forward
            query, query_valid, tracked_count = window_rows, window_valid, 0
            reset = torch.zeros(N, dtype=torch.long, device=x.device)
        else:
            changed = (x != self.previous) & attn.bool()
            tracked = torch.zeros(N, T + 1, dtype=torch.bool, device=x.device)
            tracked.scatter_(1, self.track.permute(1, 0, 2).reshape(N, -1), True)
            tracked_pos, tracked_valid = _pack(tracked[:, :T], T)
            changed_pos, changed_valid = _pack(changed, T)
            query = torch.cat([tracked_pos, changed_pos, window_rows], dim=1)  # [N, Q]
            query_valid = torch.cat([tracked_valid, changed_valid, window_valid], dim=1)
            tracked_count = tracked_pos.shape[1]
            reset = torch.full((N,), len(self.layers), dtype=torch.long, device=x.device)  # no layer yet
        hidden = self.forward(x, attn, masked, query, query_valid, tracked_count, window_valid, reset)  # [N, W, d]
        raw = self.lm_head(self.decoder.norm(hidden)).float()  # [N, W, V]
        self.previous = x.clone()
        out = raw.new_zeros(N, e - s, raw.shape[-1])
        inside = window_valid & (window_pos < e)
        rows, slots = inside.nonzero(as_tuple=True)
        out[rows, window_pos[rows, slots] - s] = raw[rows, slots]
        return out

    # ---- the layers ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attn: torch.Tensor, masked: torch.Tensor, query: torch.Tensor,
                query_valid: torch.Tensor, tracked_count: int, window_valid: torch.Tensor,
                reset: torch.Tensor) -> torch.Tensor:
        """Run the layers; rows switch to full recomputation at layer reset[n] (0: the whole forward is full).
        Returns the last layer's hidden states [N, W, d] of the window's output rows (the last W query slots)."""
        N, T = x.shape
        W = window_valid.shape[1]
        sink_query = torch.where(query_valid, query, torch.full_like(query, T))  # [N, Q] writes of empty slots sink
        keys = attn.bool()  # [N, T] real keys
        key_bias = torch.zeros(N, T + 1, dtype=self.decoder.embed_tokens.weight.dtype, device=x.device)
        key_bias[:, :T].masked_fill_(~keys, float("-inf"))
        key_bias[:, T] = float("-inf")  # the sink is no one's key
        rope_positions = F.pad(positions_from_padding(attn), (0, 1))  # [N, T + 1]
        # which keys may be tracked: real, not [MASK], not the sink
        trackable = torch.cat([keys & ~masked, torch.zeros(N, 1, dtype=torch.bool, device=x.device)], dim=1)
        hq = self.decoder.embed_tokens(x.gather(1, query.clamp(max=T - 1)))  # [N, Q, d] partial rows
        hf = self.decoder.embed_tokens(x) if bool((reset == 0).any()) else None  # [N, T, d] full rows
        if self.caches is None:
            self.caches = [None] * len(self.layers)  # type: ignore[list-item]
            self.track = torch.zeros(len(self.layers), N, self.track_num, dtype=torch.long, device=x.device)
        ctx = _Context(keys, key_bias, rope_positions, trackable, sink_query, query_valid, tracked_count,
                       window_valid, W)
        for l, layer in enumerate(self.layers):
            switching = (reset == l).nonzero().flatten()
            if l > 0 and switching.numel():  # from layer l on these rows recompute everything: the layer's input
                # is its cached input with this step's query rows written in
                written = self.caches[l].hidden[switching]  # [n, T+1, d] (a copy)
                written.scatter_(1, sink_query[switching, :, None].expand(-1, -1, hq.shape[-1]), hq[switching])
                if hf is None:
                    hf = hq.new_zeros(N, T, hq.shape[-1])
                hf[switching] = written[:, :T]
            full = (reset <= l).nonzero().flatten()
            partial = (reset > l).nonzero().flatten()
            self.layer_passes += N
            self.full_passes += full.numel()
            if full.numel():
                hf[full] = self.full_layer(l, layer, hf[full], full, ctx)
            if partial.numel() == N:
                hq = self.partial_layer(l, layer, hq, None, ctx, reset)
            elif partial.numel():
                hq[partial] = self.partial_layer(l, layer, hq[partial], partial, ctx, reset)
        out = hq[:, -W:].clone()
        full = (reset < len(self.layers)).nonzero().flatten()
        if full.numel():
            rows_idx = query[full, -W:].clamp(max=T - 1)
            out[full] = hf[full].gather(1, rows_idx[:, :, None].expand(-1, -1, hf.shape[-1]))
        return out

    def full_layer(self, l: int, layer: nn.Module, h: torch.Tensor, rows: torch.Tensor, ctx: "_Context"
                   ) -> torch.Tensor:
        """Every position of `rows` through layer l (h [n, T, d]); the layer's caches are rebuilt for them."""
        n, T, _ = h.shape
        attn_mod = layer.self_attn
        positions = ctx.rope_positions[rows, :T]
        q, k, v = _project(layer, layer.input_layernorm(h), positions, self.decoder.rotary_emb)
        cache = self.caches[l]
        if cache is None:  # step 0 builds the caches (the sink column starts at zero)
            cache = self.caches[l] = _LayerCache(
                h.new_zeros(n, T + 1, h.shape[-1]),
                q.new_zeros(*q.shape[:2], T + 1, q.shape[-1]), k.new_zeros(*k.shape[:2], T + 1, k.shape[-1]),
                v.new_zeros(*v.shape[:2], T + 1, v.shape[-1]))
        cache.hidden[rows, :T] = h
        cache.q[rows, :, :T], cache.k[rows, :, :T], cache.v[rows, :, :T] = q, k, v
        bias = ctx.key_bias[rows, None, None, :T]  # [n, 1, 1, T]
        kk, vv = _repeat_kv(k, attn_mod), _repeat_kv(v, attn_mod)
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias, scale=attn_mod.scaling)  # [n, H, T, hd]
        # the window's output rows pick the layer's tracked token
        win = ctx.sink_query[rows, -ctx.W:].clamp(max=T - 1)  # [n, W]
        qw = q.gather(2, win[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        weights = _attention_weights(qw, kk, bias, attn_mod.scaling)  # [n, H, W, T]
        self.pick_tracked(l, rows, F.pad(weights, (0, 1)), ctx)
        h = h + attn_mod.o_proj(out.transpose(1, 2).reshape(n, T, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def partial_layer(self, l: int, layer: nn.Module, h: torch.Tensor, rows: torch.Tensor | None, ctx: "_Context",
                      reset: torch.Tensor) -> torch.Tensor:
        """The query rows of `rows` (None: every row, updated in place) through layer l (h [n, Q, d]) over the
        cached keys; runs the drift test."""
        n, Q, d = h.shape
        attn_mod = layer.self_attn
        cache = self.caches[l]
        sinks = _take(ctx.sink_query, rows)  # [n, Q]
        hidden = _take(cache.hidden, rows)
        hidden.scatter_(1, sinks[:, :, None].expand(-1, -1, d), h)
        _put(cache.hidden, rows, hidden)
        q, k, v = _project(layer, layer.input_layernorm(h), _take(ctx.rope_positions, rows).gather(1, sinks),
                           self.decoder.rotary_emb)
        bias = _take(ctx.key_bias, rows)[:, None, None, :]  # [n, 1, 1, T+1]
        qc, kc, vc = _take(cache.q, rows), _take(cache.k, rows), _take(cache.v, rows)
        K = ctx.tracked_count
        past = None
        if K:  # the tracked tokens' attention before this step's update: cached queries against cached keys
            past_q = qc.gather(2, sinks[:, None, :K, None].expand(-1, qc.shape[1], -1, qc.shape[-1]))  # [n, H, K, hd]
            past = _attention_weights(past_q, _repeat_kv(kc, attn_mod), bias, attn_mod.scaling)  # [n, H, K, T+1]
        qc.scatter_(2, sinks[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]), q)
        kv_index = sinks[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        kc.scatter_(2, kv_index, k)
        vc.scatter_(2, kv_index, v)
        for full, part in ((cache.q, qc), (cache.k, kc), (cache.v, vc)):
            _put(full, rows, part)
        kk, vv = _repeat_kv(kc, attn_mod), _repeat_kv(vc, attn_mod)
        weights = _attention_weights(q, kk, bias, attn_mod.scaling)  # [n, H, Q, T+1] float32
        out = weights.to(vv.dtype) @ vv  # [n, H, Q, hd]
        if past is not None:
            keys = F.pad(_take(ctx.keys, rows), (0, 1))
            sim = attention_drift(past, weights[:, :, :K], _take(ctx.query_valid, rows)[:, :K], keys,
                                  self.drift_axis)  # [n]
            drifted = (sim < self.gamma).nonzero().flatten()
            all_rows = torch.arange(n, device=h.device) if rows is None else rows
            reset[all_rows[drifted]] = l + 1  # layers l + 1 .. L - 1 recompute every position
        self.pick_tracked(l, rows, weights[:, :, -ctx.W:], ctx)
        h = h + attn_mod.o_proj(out.transpose(1, 2).reshape(n, Q, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def pick_tracked(self, l: int, rows: torch.Tensor | None, weights: torch.Tensor, ctx: "_Context") -> None:
        """Layer l's tracked tokens for the next step: the `track_num` non-[MASK] keys that receive the most
        attention from the window's rows (weights [n, H, W, T+1], summed over heads and valid rows)."""
        mass = (weights * _take(ctx.window_valid, rows)[:, None, :, None]).sum((1, 2))  # [n, T+1]
        mass = mass.masked_fill(~_take(ctx.trackable, rows), -1.0)
        top = mass.topk(self.track_num, dim=-1)
        # nothing trackable (an empty prompt before any commit): track the sink, i.e. nothing, rather than a
        # padding or [MASK] column
        picked = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, mass.shape[-1] - 1))
        if rows is None:
            self.track[l] = picked
        else:
            self.track[l, rows] = picked


class _Context:
    """What every layer of one step shares."""

    def __init__(self, keys, key_bias, rope_positions, trackable, sink_query, query_valid, tracked_count,
                 window_valid, W):
        self.keys, self.key_bias, self.rope_positions, self.trackable = keys, key_bias, rope_positions, trackable
        self.sink_query, self.query_valid, self.tracked_count = sink_query, query_valid, tracked_count
        self.window_valid, self.W = window_valid, W


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows of t (a copy), or t itself for every row (rows None), so in-place edits land in the cache."""
    return t if rows is None else t[rows]


def _put(t: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> None:
    """Write back what `_take` copied (nothing to do when it handed out t itself)."""
    if rows is not None:
        t[rows] = value


def _project(layer: nn.Module, normed: torch.Tensor, positions: torch.Tensor, rotary: nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """normed [n, S, d] at rotary positions [n, S] -> post-RoPE q [n, H, S, hd], k and v [n, KV, S, hd], as the
    transformers Llama / Qwen2 / Qwen3 attention computes them (Qwen3's per-head q/k norms before RoPE)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    q, k = attn.q_proj(normed).view(shape), attn.k_proj(normed).view(shape)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    v = attn.v_proj(normed).view(shape).transpose(1, 2)
    cos, sin = rotary(normed, positions)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v


def _attention_weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) in float32, as transformers' eager attention computes it: q [n, H, S, hd],
    k [n, H, T, hd], bias [n, 1, 1, T] -> [n, H, S, T]."""
    return torch.softmax((q @ k.transpose(-1, -2)).float() * scale + bias.float(), dim=-1)


def _repeat_kv(t: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """[n, KV, S, hd] -> [n, H, S, hd] (grouped-query attention shares each key head among its query heads)."""
    groups = attn.num_key_value_groups
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)
