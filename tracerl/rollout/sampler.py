"""The batched denoising sampler: `generate(model, prompt_ids, config) -> Trajectory`.

Full-attention models (LLaDA, Dream) are sampled semi-autoregressively: the response is cut into blocks of
`block_length`, each block is denoised in `steps / num_blocks` steps, and every step runs the whole frame.
Block-diffusion models (SDAR/TraDo) are sampled block by block in their own attention blocks; with the KV cache,
a committed block is encoded once (merged into the next block's first forward) and never recomputed.

The published MDLM / Dream / SEDD samplers (`remasking` mdlm_ancestral, dream_origin, sedd_euler, sedd_analytic;
published.py) walk
each block on their own time grid: every masked position unmasks at random with the published probability, and a
time-conditioned network is fed the grid's sigma(t_i), which the Trajectory records (`noise_level`).

Batch invariance: a row's rollout depends only on its own prompt, the policy and its seed. Positions and blocks
are counted from the row's first real token (never from the left padding), each row keeps its own step count and,
with row seeds, draws from its own generator; rows of a batch only share the forwards.
"""

from __future__ import annotations

import torch

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM
from tracerl.rollout import published
from tracerl.rollout.caching import ApproximateCache
from tracerl.rollout.elastic import PUBLISHED_GAMMA, ElasticCache
from tracerl.rollout.config import PUBLISHED_SAMPLERS, RolloutConfig, derive_seed
from tracerl.rollout.policies import (choose_commits, confidence, convention_for, dream_counts, sample_tokens,
                                      sampling_logprobs, static_schedule)
from tracerl.rollout.trajectory import Trajectory


def pad_prompts(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids [N, P] int64, mask [N, P] bool)."""
    if not prompts:
        raise UserError("no prompts to generate from")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = True
    return ids, mask


class _Blocks:
    """Where each row's response blocks lie, in its own coordinates.

    Block j of row n covers response positions [j * B - offset_n, (j + 1) * B - offset_n) clipped to [0, L).
    Block diffusion counts blocks from the row's first real token, so offset_n = prompt_length_n % B (the first
    response block shares its attention block with the prompt's tail); a semi-AR schedule starts its blocks at the
    response, offset 0. Either way a row's blocks never depend on the padding its batch gave it.
    """

    def __init__(self, offset: torch.Tensor, block: int, length: int):
        self.offset, self.block, self.length = offset, block, length  # [N], B, L
        self.count = -(-(int(offset.max()) + length) // block) if offset.numel() else 0  # blocks of the longest row

    def span(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo [N], hi [N]) response positions of block j per row (lo == hi: the row has no block j)."""
        lo = (j * self.block - self.offset).clamp(0, self.length)
        hi = ((j + 1) * self.block - self.offset).clamp(0, self.length)
        return lo, hi


class _Sampler:
    """Mutable state of one batched rollout; `run` fills the trajectory tensors."""

    def __init__(self, model: DiffusionLM, ids: torch.Tensor, pmask: torch.Tensor, cfg: RolloutConfig,
                 blocks: _Blocks, row_seeds: list[int] | None):
        self.model, self.cfg, self.blocks = model, cfg, blocks
        self.convention = convention_for(model.block_size, model.spec.logit_shift)  # the family's published rules
        N, P = ids.shape
        L = cfg.max_completion_length
        dev = model.device
        self.P, self.L, self.mask_id, self.eos_id = P, L, model.mask_token_id, model.eos_token_id
        self.x = torch.cat([ids.to(dev), torch.full((N, L), self.mask_id, device=dev)], dim=1)  # [N, P+L]
        self.attn = torch.cat([pmask.to(dev).long(), torch.ones(N, L, dtype=torch.long, device=dev)], dim=1)
        self.unmask_step = torch.full((N, L), -1, dtype=torch.long, device=dev)  # [N, L]
        self.logprob = torch.zeros(N, L, dtype=torch.float32, device=dev)  # [N, L]
        self.top1 = torch.zeros(N, L, dtype=torch.long, device=dev)  # [N, L] greedy choice where each was committed
        self.action = torch.zeros(N, L, dtype=torch.bool, device=dev)  # [N, L]
        self.row_step = torch.zeros(N, dtype=torch.long, device=dev)  # [N] steps each row has spent
        self.forwards = 0
        # One generator per row makes a row's random draws its own: the same alone and in any batch. Without
        # row seeds, one generator serves the batch (or the global RNG when cfg.seed is None).
        self.row_generators = None if row_seeds is None else [
            torch.Generator(device=dev).manual_seed(int(s)) for s in row_seeds]
        self.generator = None
        if row_seeds is None and cfg.seed is not None:
            self.generator = torch.Generator(device=dev).manual_seed(cfg.seed)
        self.cache = None  # block diffusion: K/V of the frame columns that are final for every row
        # full attention with rollout.cache: Fast-dLLM's approximate prefix / dual cache, refreshed per block
        self.approx = None if cfg.cache in ("none", "elastic") else ApproximateCache(model, cfg.cache,
                                                                                      cfg.cache_horizon)
        # or Elastic-Cache: one full forward, then a window of masks with attention-drift-triggered refresh
        self.elastic = None if cfg.cache != "elastic" else ElasticCache(
            model, cfg.cache_window or blocks.block, PUBLISHED_GAMMA if cfg.cache_gamma is None else cfg.cache_gamma,
            drift_axis=cfg.cache_drift or "heads")
        self.approx_block, self.approx_age = -1, 0  # the block the cache belongs to; steps since its refresh
        # The published samplers feed a time-conditioned network the grid's sigma; each fed value is logged with the
        # rows that committed on it and their step, to become Trajectory.noise_level.
        self.feeds_noise = cfg.remasking in PUBLISHED_SAMPLERS and model.spec.time_conditioned and bool(
            getattr(model.config, "time_conditioning", False))
        self.noise_eps = float(getattr(model.config, "noise_eps", 1e-3))  # LogLinearNoise(eps), published 1e-3
        self.noise_log: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # committed, step, sigma: [N]

    # ---- the forwards -------------------------------------------------------------------------------------
    def block_logits(self, j: int, lo: torch.Tensor, hi: torch.Tensor, noise_level: torch.Tensor | None = None,
                     active: torch.Tensor | None = None) -> torch.Tensor:
        """Aligned logits [N, B, V] of each row's block-j positions (row n: response lo_n + [0, B)).

        noise_level [N]: the sigma fed to a time-conditioned network (None: the network derives it).
        active [N]: the rows with masks left in the block (None: all); Elastic-Cache keeps the others' state."""
        self.forwards += 1
        P, B = self.P, self.blocks.block
        end = P + int(hi.max())
        if self.model.block_size is not None and self.cfg.use_kv_cache:
            # The chunk runs from the end of the cache to the end of the widest block. Frame columns before the
            # earliest block start of any row, P + j*B - max(offset), belong to committed blocks of every row and
            # are final: the first forward of a block adds them to the cache. A row whose block starts later
            # has committed tokens inside the chunk; they are recomputed (exactly) at each step of the block.
            cached = self.cache.get_seq_length() if self.cache is not None else 0
            final = max(P + j * B - int(self.blocks.offset.max()), cached)
            logits, self.cache = self.model.logits_cached(
                self.x[:, cached:end], self.attn[:, :end], self.cache, keep_in_cache=final - cached)
            first = cached
        elif self.elastic is not None:
            first = P + int(lo.min())
            logits = self.elastic.block_logits(self.x, self.attn, first, end, active)
        elif self.approx is not None:  # semi-AR blocks start at the response: one [lo, hi) for every row
            first = P + int(lo.min())
            refresh_every = self.cfg.cache_refresh
            if self.approx_block != j or (refresh_every is not None and self.approx_age >= refresh_every):
                # the block's first step (and every cache_refresh-th after it): one exact forward that refreshes
                self.approx_block, self.approx_age = j, 1
                logits = self.approx.refresh(self.x, self.attn, first, end)
            else:
                self.approx_age += 1
                logits = self.approx.step(self.x, self.attn)
        else:
            first = P + int(lo.min())
            extra = {} if noise_level is None else {"noise_level": noise_level}
            logits = self.model.logits(self.x, self.attn, keep=torch.arange(first, end, device=self.x.device), **extra)
        cols = (P + lo[:, None] + torch.arange(B, device=lo.device) - first).clamp(max=logits.shape[1] - 1)
        return logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))  # [N, B, V]

    # ---- one block ----------------------------------------------------------------------------------------
    def block_view(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lo [N], hi [N], size [N], valid [N, B], cols [N, B]) of every row's block j."""
        lo, hi = self.blocks.span(j)
        B = self.blocks.block
        size = hi - lo  # [N] positions of the block per row (fewer in a partial first / last block)
        valid = torch.arange(B, device=lo.device)[None, :] < size[:, None]  # [N, B]
        cols = (lo[:, None] + torch.arange(B, device=lo.device)).clamp(max=self.L - 1)  # [N, B] response index
        return lo, hi, size, valid, cols

    def still_masked(self, cols: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked [N, B] block positions still [MASK], active [N] rows with any)."""
        masked = (self.x[:, self.P:].gather(1, cols) == self.mask_id) & valid
        return masked, masked.any(1)

    def denoise_block(self, j: int, steps_per_block: int) -> None:
        """Unmask every row's block-j positions until none is masked."""
        if self.cfg.remasking in PUBLISHED_SAMPLERS:
            return self.denoise_block_on_grid(j, steps_per_block)
        lo, hi, size, valid, cols = self.block_view(j)
        B, conv = self.blocks.block, self.convention
        if conv.block_schedule:  # SDAR: the whole block's split, whatever part of it the response holds
            schedules = [static_schedule(B, steps_per_block) if n else [] for n in size.tolist()]
        else:
            schedules = [static_schedule(int(n), steps_per_block) if n else [] for n in size.tolist()]
        i = 0
        while True:
            masked, active = self.still_masked(cols, valid)
            if not active.any():
                break
            k = None
            if conv.dream_schedule and self.cfg.threshold is None:
                k = dream_counts(masked.sum(1), i, steps_per_block)
                # a row whose count is 0 sits this step out (no draw, no cache state of its own moves), and the
                # forward runs even when every row does, as in Dream's loop: a cache's refresh clock (cache_refresh)
                # then ticks once per step alone and in any batch alike
                active = active & (k > 0)
            elif self.cfg.threshold is None or conv.block_schedule:
                # past the schedule (only when EOS padding changed the counts): commit everything left
                k = torch.tensor([sch[i] if i < len(sch) else B for sch in schedules], device=lo.device)
            logits = self.block_logits(j, lo, hi, active=active)
            self.commit(logits, masked, active, cols, size, k)
            i += 1

    def draw_tokens(self, logprobs: torch.Tensor, active: torch.Tensor, size: torch.Tensor, greedy: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [N, B] from logprobs [N, B, V] (argmax when greedy) and their log-probs [N, B]."""
        if self.row_generators is None:
            return sample_tokens(logprobs, greedy, self.generator)
        tokens = logprobs.argmax(-1)
        if not greedy:
            for n in active.nonzero().flatten().tolist():  # each row draws only for its own block, from its own RNG
                c, gen = int(size[n]), self.row_generators[n]
                tokens[n, :c] = torch.multinomial(logprobs[n, :c].exp(), 1, generator=gen).squeeze(-1)
        return tokens, logprobs.gather(-1, tokens[..., None]).squeeze(-1)

    def draw_uniform(self, active: torch.Tensor, size: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Uniform [0, 1) noise [N, B]; with row generators only active rows draw, for their own block."""
        if self.row_generators is None:
            return torch.rand(shape, generator=self.generator, device=self.x.device)
        noise = torch.zeros(shape, device=self.x.device)
        for n in active.nonzero().flatten().tolist():
            c = int(size[n])
            noise[n, :c] = torch.rand(c, generator=self.row_generators[n], device=self.x.device)
        return noise

    def draw(self, logits: torch.Tensor, logprobs: torch.Tensor, active: torch.Tensor, size: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [N, B], their log-probs [N, B] and the remasking confidence [N, B] of one step."""
        cfg = self.cfg
        tokens, token_lp = self.draw_tokens(logprobs, active, size, greedy=cfg.temperature == 0)
        if cfg.remasking == "random":
            return tokens, token_lp, self.draw_uniform(active, size, tokens.shape)
        scored_lp = token_lp
        drawn_at_1 = cfg.temperature in (0, 1) and cfg.top_k == 0 and cfg.top_p >= 1.0
        if cfg.remasking == "low_confidence" and self.convention.raw_confidence and not drawn_at_1:
            # LLaDA scores the choice under softmax(logits) at temperature 1, not the distribution it drew from
            scored_lp = sampling_logprobs(logits, self.mask_id).gather(-1, tokens[..., None]).squeeze(-1)
        return tokens, token_lp, confidence(cfg.remasking, logprobs, scored_lp, None)

    def commit(self, logits: torch.Tensor, masked: torch.Tensor, active: torch.Tensor, cols: torch.Tensor,
               size: torch.Tensor, k: torch.Tensor | None) -> None:
        cfg, conv = self.cfg, self.convention
        logprobs = sampling_logprobs(logits, self.mask_id, cfg.temperature, cfg.top_k, cfg.top_p,
                                     conv.top_p_first)  # [N, B, V]
        tokens, token_lp, conf = self.draw(logits, logprobs, active, size)
        pick = choose_commits(conf, masked, k, cfg.threshold, conv.strict_threshold)  # [N, B], in each row's block
        self.write(pick, tokens, token_lp, cols, top1=logprobs.argmax(-1))

    def write(self, pick: torch.Tensor, tokens: torch.Tensor, token_lp: torch.Tensor, cols: torch.Tensor,
              noise_level: torch.Tensor | None = None, top1: torch.Tensor | None = None) -> None:
        """Commit tokens [N, B] where pick [N, B]; a row that commits anything spends one of its own steps.
        top1 [N, B]: the sampling distribution's most likely token there (the greedy choice, for fidelity metrics)."""
        rows, slot = pick.nonzero(as_tuple=True)
        pos = cols[rows, slot]  # response index of every committed token
        self.x[:, self.P:][rows, pos] = tokens[rows, slot]
        self.unmask_step[rows, pos] = self.row_step[rows]
        self.logprob[rows, pos] = token_lp[rows, slot].float()
        if top1 is not None:
            self.top1[rows, pos] = top1[rows, slot]
        self.action[rows, pos] = True
        committed = pick.any(1)  # [N]; a published sampler's forward may unmask nothing in a row: no step then
        if noise_level is not None:
            self.noise_log.append((committed, self.row_step.clone(), noise_level))
        if self.cfg.after_eos == "fill":
            self.pad_after_eos()
        self.row_step += committed.long()

    # ---- one block on the published samplers' time grid -----------------------------------------------------
    def denoise_block_on_grid(self, j: int, steps_per_block: int) -> None:
        """MDLM ancestral / Dream origin / SEDD Euler or analytic over block j: grid steps t_i, then the final
        denoise (never reached by Dream's, whose last step commits everything left)."""
        lo, hi, size, valid, cols = self.block_view(j)
        cfg = self.cfg
        if cfg.remasking == "dream_origin":
            times, dream_p = published.dream_grid(steps_per_block)
        else:
            (times, dt), dream_p = published.time_grid(steps_per_block), None
        scale_by_sigma = bool(getattr(self.model.config, "scale_by_sigma", False))  # SEDD's log-score convention
        for i, t in enumerate(times):
            masked, active = self.still_masked(cols, valid)
            if not active.any():
                return
            fed = self.fed_noise(t)
            logits = self.block_logits(j, lo, hi, fed)  # [N, B, V]
            logprobs = sampling_logprobs(logits, self.mask_id, cfg.temperature, cfg.top_k, cfg.top_p,
                                         self.convention.top_p_first)
            tokens, token_lp = self.draw_tokens(logprobs, active, size, greedy=cfg.temperature == 0)
            block_ids = self.x[:, self.P:].gather(1, cols)  # [N, B]
            if dream_p is not None:
                p = torch.full(block_ids.shape, dream_p[i], device=block_ids.device)
            else:
                p = published.unmask_probability(cfg.remasking, t, dt, self.noise_eps, logits, block_ids,
                                                 self.mask_id, scale_by_sigma)  # [N, B]
            unmask = self.draw_uniform(active, size, p.shape) < p  # [N, B] Bernoulli(p), independent per position
            self.write(masked & unmask, tokens, token_lp, cols, fed, top1=logprobs.argmax(-1))
        masked, active = self.still_masked(cols, valid)
        if active.any():
            self.final_denoise(j, lo, hi, size, cols, masked, active)

    def final_denoise(self, j: int, lo: torch.Tensor, hi: torch.Tensor, size: torch.Tensor, cols: torch.Tensor,
                      masked: torch.Tensor, active: torch.Tensor) -> None:
        """The published noise removal at t = 1e-5: every position still masked commits, MDLM greedily (argmax),
        SEDD sampled from the score. Its log-prob is recorded under the sampling distribution like any other."""
        fed = self.fed_noise(published.GRID_EPS)
        logits = self.block_logits(j, lo, hi, fed)
        cfg = self.cfg
        logprobs = sampling_logprobs(logits, self.mask_id, cfg.temperature, cfg.top_k, cfg.top_p,
                                         self.convention.top_p_first)
        greedy = cfg.remasking == "mdlm_ancestral" or cfg.temperature == 0
        tokens, token_lp = self.draw_tokens(logprobs, active, size, greedy)
        self.write(masked, tokens, token_lp, cols, fed, top1=logprobs.argmax(-1))

    def fed_noise(self, t: float) -> torch.Tensor | None:
        """[N] sigma(t) for a time-conditioned network (every row of the block is at the same grid time), else None."""
        if not self.feeds_noise:
            return None
        return torch.full((self.x.shape[0],), published.sigma(t, self.noise_eps), dtype=torch.float32,
                          device=self.x.device)

    def noise_levels(self) -> torch.Tensor | None:
        """Trajectory.noise_level [N, S] float32: the sigma fed at each row's own steps, NaN where it has none."""
        if not self.feeds_noise:
            return None
        N, S = self.x.shape[0], int(self.row_step.max()) if self.x.shape[0] else 0
        out = torch.full((N, S), float("nan"), dtype=torch.float32, device=self.x.device)
        for committed, step, sigma in self.noise_log:
            rows = committed.nonzero().flatten()
            out[rows, step[rows]] = sigma[rows]
        return out

    def pad_after_eos(self, at_step: torch.Tensor | None = None) -> None:
        """Once an EOS is committed, every still-masked position after it becomes EOS padding (not an action),
        filled at the row's current step (or `at_step` [N])."""
        resp = self.x[:, self.P:]
        is_eos = (resp == self.eos_id) & (self.unmask_step >= 0)
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        fill = after & (resp == self.mask_id)
        if fill.any():
            resp[fill] = self.eos_id
            step = self.row_step if at_step is None else at_step
            self.unmask_step[fill] = step[:, None].expand_as(fill)[fill]

    # ---- the whole response -------------------------------------------------------------------------------
    def run(self, steps_per_block: int) -> None:
        for j in range(self.blocks.count):
            self.denoise_block(j, steps_per_block)
            if self.cfg.after_eos == "finish_block":  # the EOS's block is done: what follows it is padding, filled
                self.pad_after_eos(at_step=(self.row_step - 1).clamp(min=0))  # at the row's last step
            if not (self.x[:, self.P:] == self.mask_id).any():
                break  # EOS padding filled the rest: no forward is spent on finished blocks


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompt_ids: torch.Tensor | list[list[int]],
    config: RolloutConfig,
    prompt_mask: torch.Tensor | None = None,
    group_id: torch.Tensor | None = None,
    row_seeds: torch.Tensor | list[int] | None = None,
) -> Trajectory:
    """Denoise a response for every prompt row and record the trajectory.

    prompt_ids: [N, P] int64 (left-padded, with prompt_mask [N, P]) or a list of token lists.
    group_id: [N] int64, rows answering the same prompt (default: every row its own group).
    row_seeds: [N] one seed per row: each row samples from its own generator, so its rollout is the same alone and
    in any batch. Default: `derive_seed(config.seed, n)` for row n when config.seed is set, else the global RNG.
    """
    config.validate()
    config.check_family(model.family, model.block_size)
    if isinstance(prompt_ids, list):
        prompt_ids, prompt_mask = pad_prompts(prompt_ids, model.pad_token_id)
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    N, P = prompt_ids.shape
    L = config.max_completion_length
    empty = (prompt_mask.long().sum(1) == 0).nonzero().flatten().tolist()
    if empty and model.spec.logit_shift:
        raise UserError(f"prompt row {empty[0]} is empty: this model ({model.family!r}) predicts each token from the "
                        "output one position before it, so the first response token needs a prompt token before it")
    longest = int(prompt_mask.long().sum(1).max()) if N else 0
    if longest + L > model.max_length:
        raise UserError(
            f"prompt of {longest} tokens + max_completion_length {L} = {longest + L} exceeds the model's maximum "
            f"length {model.max_length} (max_position_embeddings)"
        )
    if row_seeds is None and config.seed is not None:
        row_seeds = [derive_seed(config.seed, n) for n in range(N)]
    if row_seeds is not None:
        row_seeds = [int(s) for s in torch.as_tensor(row_seeds).tolist()]
        if len(row_seeds) != N:
            raise ValueError(f"row_seeds has {len(row_seeds)} entries for {N} prompt rows")
    block = config.resolve_block_length(model.block_size)
    prompt_lengths = prompt_mask.long().sum(1)  # [N]
    offset = prompt_lengths % block if model.block_size is not None else torch.zeros_like(prompt_lengths)
    blocks = _Blocks(offset.to(model.device), block, L)
    steps_per_block = max(1, config.steps // (L // block))
    sampler = _Sampler(model, prompt_ids, prompt_mask, config, blocks, row_seeds)
    was_training = model.training
    model.eval()
    try:
        sampler.run(steps_per_block)
    finally:
        model.train(was_training)
    cpu = torch.device("cpu")
    noise_level = sampler.noise_levels()
    return Trajectory(
        prompt_ids=prompt_ids.to(cpu),
        prompt_mask=prompt_mask.to(cpu).bool(),
        response_ids=sampler.x[:, P:].to(cpu),
        unmask_step=sampler.unmask_step.to(cpu),
        action_mask=sampler.action.to(cpu),
        behaviour_logprob=sampler.logprob.to(cpu),
        behaviour_top1=sampler.top1.to(cpu),
        block_offset=offset.to(cpu).long(),
        group_id=(group_id if group_id is not None else torch.arange(N)).to(cpu).long(),
        num_forwards=sampler.forwards,
        mask_token_id=model.mask_token_id,
        pad_token_id=model.eos_token_id,
        eos_token_id=model.eos_token_id,
        block_size=model.block_size,
        block_length=block,
        temperature=float(config.temperature),
        noise_level=None if noise_level is None else noise_level.to(cpu),
    )
