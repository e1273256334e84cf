"""The clean + noisy packed layout of block-diffusion training rows (RL replay, baseline estimators and SFT).

A block-diffusion model samples block by block: a block is denoised seeing the prompt and the *clean* committed
blocks before it. One training forward reproduces that context for every block of a response at once:

    [ left pad | prompt | clean response | pad | prompt tail | noisy response ]
      `------- clean part: P + L -------'  `----- noisy part: M + L ------'

The noisy part holds a (partly) masked copy of the response; each of its tokens sees the clean tokens of the
blocks before its own and the noisy tokens of its own block (`masks.packed_visibility`). Blocks are counted in
each row's own positions (0 = its first real token), so the response's first block may share its block with the
prompt's last `m = prompt_length % block_size` tokens: the noisy part carries a copy of that tail, right-aligned
in `M = max m` columns, so noisy response token j sits in the same column (`response_start + j`) on every row.

No `[R, T, T]` attention is stored: rows carry per-token block ids and a noisy flag, and the attention of the rows
in one forward is built just before it (`PackedRows.visibility`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tracerl.models.masks import block_index, packed_visibility, positions_from_padding


@dataclass
class PackedRows:
    input_ids: Tensor  # [R, T] int64
    position_ids: Tensor  # [R, T] int64, each row's own positions (a noisy copy has the position it copies)
    key_padding: Tensor  # [R, T] int64, 1 = real token
    block: Tensor  # [R, T] int64, own block id of each token
    noisy: Tensor  # [R, T] bool, True in the noisy part
    response_start: int  # column of noisy response token 0; token j sits at response_start + j

    def visibility(self) -> Tensor:
        """[R, T, T] bool: which keys each query may attend (built on demand, one forward's rows at a time)."""
        return packed_visibility(self.block, self.noisy, self.key_padding)


def pack_rows(
    prompt_ids: Tensor, prompt_mask: Tensor, clean_response: Tensor, noisy_response: Tensor, block_size: int
) -> PackedRows:
    """prompt_ids / prompt_mask [R, P] (left-padded), clean_response / noisy_response [R, L] -> PackedRows.

    The prompt as given (it may itself be partly masked, as d1 does) appears in the clean part and, for its tail,
    in the noisy part.
    """
    R, P = prompt_ids.shape
    L = clean_response.shape[1]
    ones = torch.ones(R, L, dtype=torch.long)
    frame_padding = torch.cat([prompt_mask.long(), ones], dim=1)  # [R, P + L]
    own = positions_from_padding(frame_padding)  # [R, P + L]
    tail = prompt_mask.long().sum(1) % block_size  # [R] prompt tokens sharing the response's first block
    M = int(tail.max()) if R else 0
    tail_real = torch.arange(M)[None, :] >= (M - tail)[:, None]  # [R, M] the last `tail` columns are real
    input_ids = torch.cat([prompt_ids, clean_response, prompt_ids[:, P - M:], noisy_response], dim=1)
    positions = torch.cat([own, own[:, P - M:P], own[:, P:]], dim=1)  # [R, T]
    key_padding = torch.cat([frame_padding, tail_real.long(), ones], dim=1)
    noisy = torch.cat([torch.zeros(R, P + L, dtype=torch.bool), torch.ones(R, M + L, dtype=torch.bool)], dim=1)
    return PackedRows(
        input_ids=input_ids,
        position_ids=positions,
        key_padding=key_padding,
        block=block_index(positions, block_size),
        noisy=noisy,
        response_start=P + L + M,
    )
