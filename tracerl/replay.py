"""Trajectory -> training rows ("replay"): the states the policy is evaluated on, and which tokens each scores.

Estimators (tracerl/estimators.py says what else each one fixes):
  trace    TraceRL: the states the sampler actually visited. Full attention: one row per (shrunk) step v, the
           response masked wherever unmask_step >= v, scoring the tokens of step v. Block diffusion: one packed
           row per *round* r (tracerl.packing): the noisy copy of block b holds the state before its r-th (shrunk)
           step and sees the prompt, the clean blocks < b and itself, exactly the context the KV-cached sampler
           gave it. A response then costs (max steps per block) / s forwards instead of one per step.
  d1, wd1  diffu-GRPO's one-step estimate: every completion position masked (EOS padding too), each real prompt
           token masked with probability p_mask_prompt; one row per completion.
  coupled  coupled-GRPO: three rows per completion (all masked; masked where u < t; masked where u > t, with one
           t ~ U(0.2, 0.8) for the batch), the prompt clean; a token's score combines its rows with `coef`.
On block-diffusion models the random-mask estimators use the packed layout, so a block sees clean context.

A token's score is sum over the rows that score it of coef * log-prob (coef 1 and one row per token, except
coupled), built per forward chunk in token space ([sequences, L]) by `ReplayBatch.to_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from tracerl.steps import step_rank
from tracerl.estimators import spec
from tracerl.models.masks import positions_from_padding
from tracerl.packing import PackedRows, pack_rows
from tracerl.rollout.trajectory import Trajectory

LOGPROB_FLOOR = -1e4  # a token outside a top-k / top-p set scores this instead of -inf (no inf in any loss term)
COUPLED_T_RANGE = (0.2, 0.8)  # coupled-GRPO's mask ratio t ~ U(0.2, 0.8) (ml-diffucoder coupled_grpo.py)


@dataclass
class ReplayBatch:
    input_ids: torch.Tensor  # [R, T] int64, the state each row is evaluated on
    position_ids: torch.Tensor  # [R, T] int64 rotary positions
    key_padding: torch.Tensor  # [R, T] int64, 1 = real token
    block: torch.Tensor | None  # [R, T] int64 own block id (packed rows); None = the model's own attention
    noisy: torch.Tensor | None  # [R, T] bool, True in the noisy part of a packed row
    loss_mask: torch.Tensor  # [R, T] bool, positions whose log-prob enters the loss
    source_row: torch.Tensor  # [R] int64, trajectory row each training row comes from (non-decreasing)
    source_pos: torch.Tensor  # [R, T] int64, response index j of the token scored at a position, -1 elsewhere
    step_id: torch.Tensor  # [R, T] int64, trace step (after shrinkage) of a scored token, -1 elsewhere
    forwards_per_response: float  # training forwards spent per trajectory row
    response_length: int  # L, the range of source_pos
    coef: torch.Tensor | None = None  # [R, T] float32 weight of a scored log-prob in its token's score (None: 1)
    published_logprob: bool = False  # score full-vocabulary temperature-1 log-softmax (d1, coupled, wd1)
    whole_sequences: bool = False  # a token's score needs several rows: forward chunks keep a sequence's rows
    target_ids: torch.Tensor | None = None  # [R, T] int64 the committed token at each scored position (0 elsewhere)
    noise_level: torch.Tensor | None = None  # [R] float32 sigma the sampler fed the network in each row's state
    #   (time-conditioned families under the published samplers); None: the model derives it from the state

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def visibility(self) -> torch.Tensor | None:
        """[R, T, T] bool attention of packed rows, built for these rows only (None: the model's own policy)."""
        if self.block is None:
            return None
        return PackedRows(self.input_ids, self.position_ids, self.key_padding, self.block, self.noisy,
                          0).visibility()

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

    def to_tokens(self, per_row: torch.Tensor, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row values [r, T] of THESE rows -> (sequences [k] they come from, scores [k, L], touched [k, L]).

        score = sum over the rows scoring a token of coef * value (differentiable); touched marks the tokens these
        rows score. L is the response length (source positions are response indices).
        """
        dev = per_row.device
        seqs, local = torch.unique(self.source_row, return_inverse=True)  # [k], [r]
        sel = self.loss_mask.to(dev)
        rows = local.to(dev)[:, None].expand_as(sel)[sel]
        pos = self.source_pos.to(dev)[sel]
        coef = torch.ones_like(per_row) if self.coef is None else self.coef.to(dev, per_row.dtype)
        length = self.response_length
        scores = torch.zeros(len(seqs), length, dtype=per_row.dtype, device=dev).index_put(
            (rows, pos), (coef * per_row)[sel], accumulate=True)
        touched = torch.zeros(len(seqs), length, dtype=torch.bool, device=dev).index_put(
            (rows, pos), torch.ones_like(pos, dtype=torch.bool))
        return seqs, scores, touched

    def token_rows(self, shape: torch.Size) -> torch.Tensor:
        """[N, L] int64: the row (training state) scoring each trajectory token, -1 where none does. For rows that
        score each token once (trace); elsewhere a token keeps one of its rows."""
        out = torch.full(shape, -1, dtype=torch.long)
        rows, cols = self.loss_mask.nonzero(as_tuple=True)
        out[self.source_row[rows], self.source_pos[rows, cols]] = rows
        return out

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
    spec(estimator)  # a clear error for an unknown (or renamed) estimator
    if estimator == "trace":
        batch = _trace_packed(traj, train_step) if traj.block_size is not None else _trace_rows(traj, train_step)
    elif estimator == "coupled":
        batch = _coupled_rows(traj, generator)
    else:
        batch = _d1_rows(traj, p_mask_prompt, generator)
    batch.target_ids = batch.targets(traj)
    return batch


def _trace_rows(traj: Trajectory, train_step: torch.Tensor) -> ReplayBatch:
    """Full attention: one row per (trajectory row, distinct train step)."""
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
    noise = None if traj.noise_level is None else traj.noise_level[row_t, step_t]
    return _frame_batch(traj, row_t, traj.prompt_ids[row_t], resp, scored, step_t[:, None].expand_as(scored),
                        noise_level=noise)


def _frame_batch(traj: Trajectory, row_t: torch.Tensor, prompt: torch.Tensor, resp: torch.Tensor,
                 scored: torch.Tensor, step: torch.Tensor, coef: torch.Tensor | None = None,
                 noise_level: torch.Tensor | None = None) -> ReplayBatch:
    """Rows in the sampler's own frame `[prompt (P) | response (L)]` under the model's own attention: prompt
    [R, P], response state [R, L], scored [R, L] with step ids and coef [R, L]; noise_level [R] (the state's sigma,
    the published samplers on time-conditioned families)."""
    R, P, L = len(row_t), traj.prompt_length, traj.response_length
    key_padding = traj.attention_mask()[row_t]
    none = torch.full((R, P), -1)
    source_pos = torch.cat([none, torch.where(scored, torch.arange(L).expand(R, L), -1)], dim=1)
    return ReplayBatch(
        input_ids=torch.cat([prompt, resp], dim=1),
        position_ids=positions_from_padding(key_padding),
        key_padding=key_padding,
        block=None,
        noisy=None,
        loss_mask=source_pos >= 0,
        source_row=row_t,
        source_pos=source_pos,
        step_id=torch.cat([none, torch.where(scored, step, -1)], dim=1),
        forwards_per_response=R / max(traj.num_sequences, 1),
        response_length=L,
        coef=None if coef is None else torch.cat([torch.zeros(R, P), torch.where(scored, coef, 0.0)], dim=1),
        noise_level=noise_level,
    )


def _trace_packed(traj: Trajectory, train_step: torch.Tensor) -> ReplayBatch:
    """Block diffusion: one packed row per (trajectory row, round); round r holds, for every block, the state
    before the block's r-th (shrunk) step and scores that step's tokens."""
    N = traj.num_sequences
    block = traj.block_of_position()  # [N, L]
    K = int(block.max()) + 1
    segment = torch.arange(N)[:, None] * K + block  # [N, L] one bucket per (row, block)
    rank = step_rank(train_step, traj.action_mask, segment)  # [N, L] rank of the step inside its block, -1 else
    rounds = (rank.amax(1) + 1).clamp(min=0)  # [N]
    R_max = int(rounds.max()) if N else 0
    # first step of round r in block b of row n: [N, R_max, K]; a block without a round r stays all clean
    never = torch.iinfo(torch.long).max
    start = torch.full((N, R_max * K), never, dtype=torch.long)
    act = rank >= 0
    start.scatter_reduce_(1, torch.where(act, rank * K + block, 0), torch.where(act, train_step, never), "amin")
    start = start.view(N, R_max, K)
    row_t = torch.arange(N).repeat_interleave(rounds)  # [R]
    round_t = torch.cat([torch.arange(int(r)) for r in rounds]) if N else torch.zeros(0, dtype=torch.long)
    first_step = start[row_t, round_t].gather(1, block[row_t])  # [R, L] the state each block is shown in
    masked = traj.unmask_step[row_t] >= first_step
    noisy = torch.where(masked, traj.mask_token_id, traj.response_ids[row_t])
    scored = (rank[row_t] == round_t[:, None]) & traj.action_mask[row_t]  # [R, L]
    packed = pack_rows(traj.prompt_ids[row_t], traj.prompt_mask[row_t], traj.response_ids[row_t], noisy,
                       traj.block_size)
    return _packed_batch(packed, row_t, scored, torch.where(scored, train_step[row_t], -1), N)


def _packed_batch(packed: PackedRows, row_t: torch.Tensor, scored: torch.Tensor, step: torch.Tensor, N: int,
                  coef: torch.Tensor | None = None) -> ReplayBatch:
    """A ReplayBatch over packed rows scoring the noisy response tokens `scored` [R, L] (step ids, coef [R, L])."""
    R, T = packed.input_ids.shape
    L = scored.shape[1]
    cols = slice(packed.response_start, packed.response_start + L)
    source_pos = torch.full((R, T), -1, dtype=torch.long)
    source_pos[:, cols] = torch.where(scored, torch.arange(L).expand(R, L), -1)
    step_id = torch.full((R, T), -1, dtype=torch.long)
    step_id[:, cols] = torch.where(scored, step, -1)
    coef_t = None
    if coef is not None:
        coef_t = torch.zeros(R, T)
        coef_t[:, cols] = torch.where(scored, coef, 0.0)
    return ReplayBatch(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        key_padding=packed.key_padding,
        block=packed.block,
        noisy=packed.noisy,
        loss_mask=source_pos >= 0,
        source_row=row_t,
        source_pos=source_pos,
        step_id=step_id,
        forwards_per_response=R / max(N, 1),
        response_length=L,
        coef=coef_t,
    )


def _masked_rows(traj: Trajectory, row_t: torch.Tensor, prompt: torch.Tensor, hide: torch.Tensor,
                 scored: torch.Tensor, coef: torch.Tensor | None) -> ReplayBatch:
    """Rows of the published estimators: response positions `hide` [R, L] masked, `scored` [R, L] scored with
    weight `coef` [R, L]; `prompt` [R, P] as it is shown (possibly partly masked)."""
    N = traj.num_sequences
    resp = torch.where(hide, traj.mask_token_id, traj.response_ids[row_t])
    if traj.block_size is not None:  # a block sees the clean blocks before it, as when it was sampled
        packed = pack_rows(prompt, traj.prompt_mask[row_t], traj.response_ids[row_t], resp, traj.block_size)
        batch = _packed_batch(packed, row_t, scored, torch.zeros_like(resp), N, coef)
    else:
        batch = _frame_batch(traj, row_t, prompt, resp, scored, torch.zeros_like(resp), coef)
    batch.published_logprob = True
    batch.whole_sequences = coef is not None
    return batch


def _d1_rows(traj: Trajectory, p_mask_prompt: float, generator: torch.Generator | None) -> ReplayBatch:
    """d1 / wd1 (diffu-GRPO's forward_process): the whole completion masked, EOS padding included; each real prompt
    token masked with probability p_mask_prompt (one uniform draw per position); the completion up to and including
    its first EOS is scored."""
    N, P, L = traj.num_sequences, traj.prompt_length, traj.response_length
    row_t = torch.arange(N)
    prompt = traj.prompt_ids.clone()
    u = torch.rand(N, P + L, generator=generator)[:, :P]  # [N, P]; d1 draws one [b, P + L] matrix per call
    prompt[(u < p_mask_prompt) & traj.prompt_mask] = traj.mask_token_id
    hide = torch.ones(N, L, dtype=torch.bool)
    return _masked_rows(traj, row_t, prompt, hide, traj.completion_mask(), None)


def _coupled_rows(traj: Trajectory, generator: torch.Generator | None) -> ReplayBatch:
    """coupled-GRPO (ml-diffucoder's forward_process + selective_log_softmax): one t ~ U(0.2, 0.8) for the batch,
    u ~ U(0, 1) per completion position; rows per completion: everything masked, masked where u < t, masked where
    u > t. Token score = (l_all + [u < t] l_1 / t + [u > t] l_2 / (1 - t)) / 2. The prompt is never masked."""
    N, L = traj.num_sequences, traj.response_length
    lo, hi = COUPLED_T_RANGE
    t = lo + (hi - lo) * float(torch.rand(1, generator=generator))
    u = torch.rand(N, L, generator=generator)  # [N, L]
    passes = [torch.ones(N, L, dtype=torch.bool), u < t, u > t]  # [N, L] each
    weights = [0.5, 0.5 / t, 0.5 / (1 - t)]
    row_t = torch.arange(N).repeat_interleave(3)  # rows stay ordered by sequence
    hide = torch.stack(passes, dim=1).reshape(3 * N, L)
    coef = torch.tensor(weights).repeat(N)[:, None].expand(3 * N, L)
    scored = hide & traj.completion_mask()[row_t]
    return _masked_rows(traj, row_t, traj.prompt_ids[row_t], hide, scored, coef)


def replay_logits(model, batch: ReplayBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Aligned logits [R, T, V] (or [R, len(keep), V]) under the attention the rows were built for."""
    dev = model.device
    keep = None if keep is None else keep.to(dev)
    if batch.block is not None:
        return model.logits_packed(batch.input_ids.to(dev), batch.visibility().to(dev), batch.position_ids.to(dev),
                                   keep=keep)
    noise = None if batch.noise_level is None else batch.noise_level.to(dev)
    return model.logits(batch.input_ids.to(dev), batch.key_padding.to(dev), keep=keep, noise_level=noise)


class TokenScores(NamedTuple):
    logprob: torch.Tensor  # [R, T] float32 log pi(target | row state) at scored positions, 0 elsewhere
    entropy: torch.Tensor | None  # [R, T] entropy of the scored distribution (with_entropy)
    top1: torch.Tensor | None  # [R, T] int64 its most likely token (with_entropy: the fidelity metrics read it)


def token_logprobs(
    model, batch: ReplayBatch, targets: torch.Tensor, temperature: float, with_entropy: bool = False,
    top_k: int = 0, top_p: float = 1.0,
) -> TokenScores:
    """log pi(target | row state) at every scored position ([R, T] float32, 0 elsewhere), and with_entropy the
    entropy and the most likely token there.

    pi is the distribution the sampler draws from (temperature, top-k, top-p, `[MASK]` excluded: one formula,
    `sampling_logprobs`), so the first PPO ratio is exactly 1; the published estimators' rows score the full
    vocabulary at temperature 1 instead, as their papers' code does. A target outside the current top-k / top-p set
    scores LOGPROB_FLOOR. Only the columns some row scores go through the LM head: the vocabulary projection is
    the largest activation in the step, and most columns of a replay row are context.
    """
    from tracerl.rollout.policies import convention_for, sampling_logprobs

    temperature = temperature if temperature > 0 else 1.0
    cols = batch.loss_mask.any(0).nonzero().flatten()  # [K]
    logits = replay_logits(model, batch, keep=cols)  # [R, K, V]
    if batch.published_logprob:  # d1 / coupled / wd1 as their code scores: full vocabulary, temperature 1
        logp_all = torch.log_softmax(logits.float(), dim=-1)
    else:
        top_p_first = convention_for(model.block_size, model.spec.logit_shift).top_p_first  # as the sampler drew
        logp_all = sampling_logprobs(logits, model.mask_token_id, temperature, top_k, top_p, top_p_first)  # [R, K, V]
    picked = logp_all.gather(-1, targets[:, cols, None].to(logits.device)).squeeze(-1)  # [R, K]
    picked = picked.clamp(min=LOGPROB_FLOOR)
    dev = picked.device
    out = torch.zeros(batch.loss_mask.shape, dtype=torch.float32, device=dev).index_copy(1, cols.to(dev), picked)
    if not with_entropy:
        return TokenScores(out, None, None)
    p = logp_all.exp()
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)  # of the sampling distribution
    top1 = torch.zeros(out.shape, dtype=torch.long, device=dev).index_copy(1, cols.to(dev), logp_all.argmax(-1))
    return TokenScores(out, torch.zeros_like(out).index_copy(1, cols.to(dev), ent), top1)
