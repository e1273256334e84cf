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
    """Block id of each position (a row's own positions: 0 = its first real token); 0 everywhere when block_size
    is None."""
    if block_size is None:
        return torch.zeros_like(positions)
    return torch.div(positions, block_size, rounding_mode="floor")


def attention_bias(
    key_padding: torch.Tensor,
    block_size: int | None,
    dtype: torch.dtype,
    query_start: int = 0,
) -> torch.Tensor:
    """Bias for queries at frame columns [query_start, K) over keys at [0, K).

    key_padding: [B, K] {0,1}, 1 = real token. block_size None -> full bidirectional attention among real tokens;
    int -> block-causal: a query in block b sees keys in blocks <= b (bidirectional inside its own block).
    Blocks are counted in each row's OWN positions (0 = its first real token), never in frame columns, so left
    padding cannot move a row's block boundaries: a prompt gets the same blocks alone and in any batch.
    Returns [B, 1, K - query_start, K].
    """
    real = key_padding.bool()
    if block_size is None:
        visible = real[:, None, :].expand(-1, key_padding.shape[-1] - query_start, -1)  # [B, Q, K]
        return visibility_to_bias(visible, dtype)
    blk = block_index(positions_from_padding(key_padding), block_size)  # [B, K]
    causal = blk[:, None, :] <= blk[:, query_start:, None]  # [B, Q, K]
    return visibility_to_bias(causal & real[:, None, :], dtype)


def packed_visibility(block: torch.Tensor, noisy: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
    """Attention of packed block-diffusion rows `[prompt | clean response | noisy copies]`: [R, T, T] bool.

    block [R, T] own block id of each token; noisy [R, T] bool, True for a noisy copy; key_padding [R, T] {0,1}.
    Clean queries: block-causal over the clean tokens. A noisy token of block b: the clean tokens of blocks < b and
    the noisy tokens of its own block b (bidirectional), i.e. exactly the context the KV-cached sampler gave it.
    Built per forward (per micro-batch), never stored per row: it is the largest tensor of a packed replay.
    """
    clean = ~noisy
    earlier_or_same = block[:, None, :] <= block[:, :, None]  # [R, Q, K]
    clean_q = clean[:, :, None] & clean[:, None, :] & earlier_or_same
    noisy_to_clean = noisy[:, :, None] & clean[:, None, :] & (block[:, None, :] < block[:, :, None])
    noisy_to_self = noisy[:, :, None] & noisy[:, None, :] & (block[:, None, :] == block[:, :, None])
    return (clean_q | noisy_to_clean | noisy_to_self) & key_padding.bool()[:, None, :]
