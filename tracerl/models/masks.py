"""Attention masks for diffusion LMs, as additive 4D biases that transformers' attention code takes as-is.

transformers returns a 4D mask unchanged (masking_utils: "if the mask is already 4D, return it"), so passing one
is how we turn a causal Llama/Qwen stack into a bidirectional or block-causal denoiser without touching its code.
The bias is additive (0 = attend, dtype-min = blocked) because that works for both the eager and the SDPA kernels.
"""

from __future__ import annotations

import torch


def positions_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions that skip left padding: [B, L] {0,1} -> [B, L] int64 (pads get position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def visibility_to_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Q, K] bool (True = query may attend key) -> [B, 1, Q, K] additive bias in `dtype`.

    A query row that sees nothing (a left-pad query) is allowed to see every key instead: its output is never
    used, and an all-blocked row would turn into NaN inside softmax on some kernels.
    """
    empty_rows = ~visible.any(-1, keepdim=True)
    visible = visible | empty_rows
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible, torch.finfo(dtype).min)
    return bias.unsqueeze(1)


def block_index(positions: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Block id of each absolute position (padded frame); one block for everything when block_size is None."""
    if block_size is None:
        return torch.zeros_like(positions)
    return torch.div(positions, block_size, rounding_mode="floor")


def attention_bias(
    key_padding: torch.Tensor,
    block_size: int | None,
    dtype: torch.dtype,
    query_start: int = 0,
) -> torch.Tensor:
    """Bias for queries at absolute frame positions [query_start, K) over keys at [0, K).

    key_padding: [B, K] {0,1}, 1 = real token. block_size None -> full bidirectional attention among real tokens;
    int -> block-causal: a query in block b sees keys in blocks <= b (bidirectional inside its own block).
    Returns [B, 1, K - query_start, K].
    """
    num_keys = key_padding.shape[-1]
    device = key_padding.device
    key_pos = torch.arange(num_keys, device=device)
    query_pos = key_pos[query_start:]
    causal = block_index(key_pos, block_size)[None, :] <= block_index(query_pos, block_size)[:, None]  # [Q, K]
    visible = causal[None] & key_padding.bool()[:, None, :]  # [B, Q, K]
    return visibility_to_bias(visible, dtype)
