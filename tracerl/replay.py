"""Trajectory -> training rows ("replay"): the states the policy is evaluated on, and which tokens each scores.

Estimators (all feed the same loss):
  trace (TraceRL)  the states the sampler actually visited. Full attention: one row per (shrunk) step v, the
                   response masked wherever unmask_step >= v, scoring the tokens of step v. Block diffusion: one
                   packed row per *round* r, `[prompt | clean response | noisy copy of every block]`: the noisy
                   copy of block b holds the state before its r-th (shrunk) step and sees the prompt, the clean
                   blocks < b and itself, exactly the context the KV-cached sampler gave it. A response then costs
                   (max steps per block) / s forwards instead of one per step.
  random_masking   d1 / diffu-GRPO: the completion masked at a random ratio t ~ U(0, 1] (each token
                   independently), prompt tokens masked with p_mask_prompt; scores the masked completion tokens.
  coupled          DiffuCoder: a random mask and its complement, two rows per response, so every completion token
                   is scored exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tracerl.models.masks import block_index, positions_from_padding
from tracerl.rollout.trajectory import Trajectory

ESTIMATORS = ("trace", "random_masking", "coupled")


@dataclass
class ReplayBatch:
    input_ids: torch.Tensor  # [R, T] int64, the state each row is evaluated on
    position_ids: torch.Tensor  # [R, T] int64 rotary positions
    key_padding: torch.Tensor  # [R, T] int64, 1 = real token
    visible: torch.Tensor | None  # [R, T, T] bool explicit attention (packed rows); None = the model's own policy
    loss_mask: torch.Tensor  # [R, T] bool, positions whose log-prob enters the loss
    source_row: torch.Tensor  # [R] int64, trajectory row each training row comes from (non-decreasing)
    source_pos: torch.Tensor  # [R, T] int64, response index j of the token scored at a position, -1 elsewhere
    step_id: torch.Tensor  # [R, T] int64, trace step (after shrinkage) of a scored token, -1 elsewhere
    forwards_per_response: float  # training forwards spent per trajectory row

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, rows: slice) -> "ReplayBatch":
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        return ReplayBatch(**values)

    def gather(self, per_token: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Map a trajectory tensor [N, L] onto the rows: [R, T], `fill` where nothing is scored."""
        pos = self.source_pos.clamp(min=0)
        out = per_token[self.source_row[:, None], pos]
        return torch.where(self.source_pos >= 0, out, torch.full_like(out, fill))

    def targets(self, traj: Trajectory) -> torch.Tensor:
        """[R, T] the committed token at each scored position (0 elsewhere)."""
        return self.gather(traj.response_ids, fill=0).long()

    def scatter(self, per_row: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[R, T] values at scored positions -> [N, L] per trajectory token (each token is scored once)."""
        out = torch.zeros(shape, dtype=per_row.dtype)
        sel = self.loss_mask
        rows = self.source_row[:, None].expand_as(self.source_pos)[sel]
        out[rows, self.source_pos[sel]] = per_row[sel].cpu()
        return out


def build_replay(
    traj: Trajectory,
    train_step: torch.Tensor,
    estimator: str = "trace",
    p_mask_prompt: float = 0.0,
    generator: torch.Generator | None = None,
) -> ReplayBatch:
    """Training rows for `traj`. train_step [N, L]: each token's step after shrinkage (credit.shrink_steps)."""
    if estimator == "trace":
        if traj.block_size is not None:
            return _trace_packed(traj, train_step)
        return _trace_rows(traj, train_step)
    if estimator in ("random_masking", "coupled"):
        return _random_rows(traj, estimator, p_mask_prompt, generator)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")


def _trace_rows(traj: Trajectory, train_step: torch.Tensor) -> ReplayBatch:
    """Full attention: one row per (trajectory row, distinct train step)."""
    P, L = traj.prompt_length, traj.response_length
    rows, steps = [], []
    for n in range(traj.num_sequences):
        for v in torch.unique(train_step[n][traj.action_mask[n]]).tolist():
            rows.append(n)
            steps.append(v)
    row_t = torch.tensor(rows, dtype=torch.long)
    step_t = torch.tensor(steps, dtype=torch.long)  # a merged group starts at its first step: the state before it
    committed = traj.unmask_step[row_t] < step_t[:, None]  # [R, L]
    resp = torch.where(committed, traj.response_ids[row_t], torch.full_like(committed, traj.mask_token_id,
                                                                             dtype=torch.long))
    scored = (train_step[row_t] == step_t[:, None]) & traj.action_mask[row_t]  # [R, L]
    key_padding = traj.attention_mask()[row_t]
    pos = torch.arange(L).expand(len(rows), L)
    source_pos = torch.cat([torch.full((len(rows), P), -1), torch.where(scored, pos, -1)], dim=1)
    step_id = torch.cat([torch.full((len(rows), P), -1), torch.where(scored, step_t[:, None], -1)], dim=1)
    return ReplayBatch(
        input_ids=torch.cat([traj.prompt_ids[row_t], resp], dim=1),
        position_ids=positions_from_padding(key_padding),
        key_padding=key_padding,
        visible=None,
        loss_mask=source_pos >= 0,
        source_row=row_t,
        source_pos=source_pos,
        step_id=step_id,
        forwards_per_response=len(rows) / max(traj.num_sequences, 1),
    )


def _rank_within_block(traj: Trajectory, train_step: torch.Tensor) -> torch.Tensor:
    """[N, L] rank of each action's train step among its block's distinct train steps (-1 for non-actions).

    Blocks are sampled one after another, so every step of block b precedes every step of block b + 1 and a
    row-wide dense rank minus the block's smallest rank is the rank inside the block.
    """
    block = traj.block_of_position()  # [L]
    rank = torch.full_like(train_step, -1)
    for n in range(traj.num_sequences):
        act = traj.action_mask[n]
        _, dense = torch.unique(train_step[n][act], return_inverse=True)
        global_rank = torch.full((traj.response_length,), -1, dtype=torch.long)
        global_rank[act] = dense
        first = torch.zeros(int(block.max()) + 1, dtype=torch.long)
        first = first.scatter_reduce(0, block[act], dense, reduce="amin", include_self=False)
        rank[n] = torch.where(act, global_rank - first[block], -1)
    return rank


def _round_start_steps(train_step: torch.Tensor, rank: torch.Tensor, block: torch.Tensor, r: int) -> torch.Tensor:
    """[K] for each block: the first step of its round-r group (a block without one: int64 max, i.e. all clean)."""
    start = torch.full((int(block.max()) + 1,), torch.iinfo(torch.long).max, dtype=torch.long)
    sel = rank == r
    return start.scatter_reduce(0, block[sel], train_step[sel], reduce="amin")


def _trace_packed(traj: Trajectory, train_step: torch.Tensor) -> ReplayBatch:
    """Block diffusion: one packed row per (trajectory row, round)."""
    N, P, L, bs = traj.num_sequences, traj.prompt_length, traj.response_length, traj.block_size
    rank = _rank_within_block(traj, train_step)  # [N, L]
    frame_pos, noisy_block = packed_layout(P, L, bs)  # [T], [T]
    visible = packed_visibility(frame_pos, noisy_block, bs)  # [T, T]
    block = traj.block_of_position()
    rows = [(n, r) for n in range(N) for r in range(int(rank[n].max()) + 1)]
    noisy_resp = (noisy_block >= 0) & (frame_pos >= P)  # [T] noisy positions holding response tokens
    where = noisy_resp.nonzero().flatten()
    j = frame_pos[noisy_resp] - P  # response index of each of them
    ids = torch.empty(len(rows), frame_pos.numel(), dtype=torch.long)
    source_pos = torch.full(ids.shape, -1, dtype=torch.long)
    step_id = torch.full(ids.shape, -1, dtype=torch.long)
    frames = traj.sequences()
    for i, (n, r) in enumerate(rows):
        start = _round_start_steps(train_step[n], rank[n], block, r)[block[j]]  # [len(j)]
        masked = traj.unmask_step[n, j] >= start  # not yet committed before this round's step
        ids[i] = frames[n, frame_pos]
        ids[i, where] = torch.where(masked, traj.mask_token_id, frames[n, P + j])
        scored = (rank[n, j] == r) & traj.action_mask[n, j]
        source_pos[i, where[scored]] = j[scored]
        step_id[i, where[scored]] = train_step[n, j[scored]]
    row_t = torch.tensor([n for n, _ in rows], dtype=torch.long)
    key_padding = traj.attention_mask()[row_t][:, frame_pos]
    return ReplayBatch(
        input_ids=ids,
        position_ids=positions_from_padding(traj.attention_mask())[row_t][:, frame_pos],
        key_padding=key_padding,
        visible=visible[None] & key_padding.bool()[:, None, :],
        loss_mask=source_pos >= 0,
        source_row=row_t,
        source_pos=source_pos,
        step_id=step_id,
        forwards_per_response=len(rows) / max(N, 1),
    )


def packed_layout(P: int, L: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order of a packed row: the clean frame [0, P + L), then a noisy copy of every aligned block that holds
    response tokens (the prompt's tail included, as in the sampler's chunk).

    Returns (frame_pos [T]: frame position each packed token copies, noisy_block [T]: block id of a noisy copy's
    token, -1 for the clean part).
    """
    noisy = torch.arange((P // bs) * bs, P + L)
    frame_pos = torch.cat([torch.arange(P + L), noisy])
    noisy_block = torch.cat([torch.full((P + L,), -1), block_index(noisy, bs)])
    return frame_pos, noisy_block


def packed_visibility(frame_pos: torch.Tensor, noisy_block: torch.Tensor, bs: int) -> torch.Tensor:
    """[T, T] bool. Clean queries: block-causal over the clean frame. A noisy copy of block b: clean keys in blocks
    < b plus its own copy (bidirectional)."""
    blk = block_index(frame_pos, bs)
    clean = noisy_block < 0
    clean_q = clean[:, None] & clean[None, :] & (blk[None, :] <= blk[:, None])
    noisy_to_clean = (~clean)[:, None] & clean[None, :] & (blk[None, :] < noisy_block[:, None])
    noisy_to_self = (~clean)[:, None] & (~clean)[None, :] & (noisy_block[:, None] == noisy_block[None, :])
    return clean_q | noisy_to_clean | noisy_to_self


def _random_rows(
    traj: Trajectory, estimator: str, p_mask_prompt: float, generator: torch.Generator | None
) -> ReplayBatch:
    """d1's one-step estimator (one row per response) or DiffuCoder's coupled pair (two rows per response)."""
    N, P, L = traj.num_sequences, traj.prompt_length, traj.response_length
    ratio = torch.rand(N, 1, generator=generator).clamp(min=1e-3)  # t ~ U(0, 1]
    mask = torch.rand(N, L, generator=generator) < ratio  # [N, L]
    masks = [mask] if estimator == "random_masking" else [mask, ~mask]
    row_t = torch.arange(N).repeat_interleave(len(masks))  # rows stay ordered by trajectory row
    resp_mask = torch.stack(masks, dim=1).reshape(-1, L) & traj.action_mask[row_t]  # only the policy's tokens
    prompt = traj.prompt_ids[row_t].clone()
    if p_mask_prompt > 0:
        hide = (torch.rand(prompt.shape, generator=generator) < p_mask_prompt) & traj.prompt_mask[row_t]
        prompt[hide] = traj.mask_token_id
    resp = torch.where(resp_mask, traj.mask_token_id, traj.response_ids[row_t])
    key_padding = traj.attention_mask()[row_t]
    pos = torch.arange(L).expand(len(row_t), L)
    source_pos = torch.cat([torch.full((len(row_t), P), -1), torch.where(resp_mask, pos, -1)], dim=1)
    return ReplayBatch(
        input_ids=torch.cat([prompt, resp], dim=1),
        position_ids=positions_from_padding(key_padding),
        key_padding=key_padding,
        visible=None,
        loss_mask=source_pos >= 0,
        source_row=row_t,
        source_pos=source_pos,
        step_id=torch.where(source_pos >= 0, 0, -1),
        forwards_per_response=float(len(masks)),
    )


def replay_logits(model, batch: ReplayBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Aligned logits [R, T, V] (or [R, len(keep), V]) under the attention the rows were built for."""
    dev = model.device
    if batch.visible is not None:
        return model.logits_packed(batch.input_ids.to(dev), batch.visible.to(dev), batch.position_ids.to(dev),
                                   keep=None if keep is None else keep.to(dev))
    return model.logits(batch.input_ids.to(dev), batch.key_padding.to(dev), keep=None if keep is None else keep.to(dev))


def token_logprobs(
    model, batch: ReplayBatch, targets: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target | row state) at every scored position: ([R, T] float32, 0 elsewhere; entropy [R, T] or None).

    Only the columns some row scores go through the LM head: the vocabulary projection is the largest
    activation in the step, and most columns of a replay row are context.
    """
    from tracerl.losses import entropy_from_logits
    from tracerl.rollout.policies import sampling_logprobs

    temperature = temperature if temperature > 0 else 1.0
    cols = batch.loss_mask.any(0).nonzero().flatten()  # [K]
    logits = replay_logits(model, batch, keep=cols)  # [R, K, V]
    logp_all = sampling_logprobs(logits, model.mask_token_id, temperature)
    picked = logp_all.gather(-1, targets[:, cols, None].to(logits.device)).squeeze(-1)  # [R, K]
    dev = picked.device
    out = torch.zeros(batch.loss_mask.shape, dtype=torch.float32, device=dev).index_copy(1, cols.to(dev), picked)
    if not with_entropy:
        return out, None
    ent = entropy_from_logits(logits.float() / temperature)
    return out, torch.zeros_like(out).index_copy(1, cols.to(dev), ent)
