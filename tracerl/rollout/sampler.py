"""The batched denoising sampler: `generate(model, prompt_ids, config) -> Trajectory`.

Full-attention models (LLaDA, Dream) are sampled semi-autoregressively: the response is cut into blocks of
`block_length`, each block is denoised in `steps / num_blocks` steps, and every step runs the whole frame.
Block-diffusion models (SDAR/TraDo) are sampled block by block in their own attention blocks; with the KV cache,
a committed block is encoded once (merged into the next block's first forward) and never recomputed.
"""

from __future__ import annotations

import torch

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM
from tracerl.rollout.config import RolloutConfig
from tracerl.rollout.policies import choose_commits, confidence, sample_tokens, sampling_logprobs, static_schedule
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


def block_bounds(prompt_length: int, response_length: int, block: int, aligned: bool) -> torch.Tensor:
    """[K + 1] frame positions where response blocks start (last = end of frame).

    aligned (block diffusion): blocks sit at absolute multiples of `block`, so the first one may be shared with
    the tail of the prompt. Otherwise (semi-AR schedule) blocks start at the first response token.
    """
    P, L = prompt_length, response_length
    if aligned:
        inner = list(range((P // block + 1) * block, P + L, block))
        return torch.tensor([P, *inner, P + L])
    return torch.arange(P, P + L + 1, block)


class _Sampler:
    """Mutable state of one batched rollout; `run` fills the trajectory tensors."""

    def __init__(self, model: DiffusionLM, ids: torch.Tensor, pmask: torch.Tensor, cfg: RolloutConfig):
        self.model, self.cfg = model, cfg
        N, P = ids.shape
        L = cfg.max_completion_length
        dev = model.device
        self.P, self.L, self.mask_id, self.eos_id = P, L, model.mask_token_id, model.eos_token_id
        self.x = torch.cat([ids.to(dev), torch.full((N, L), self.mask_id, device=dev)], dim=1)  # [N, P+L]
        self.attn = torch.cat([pmask.to(dev).long(), torch.ones(N, L, dtype=torch.long, device=dev)], dim=1)
        self.unmask_step = torch.full((N, L), -1, dtype=torch.long, device=dev)  # [N, L]
        self.logprob = torch.zeros(N, L, dtype=torch.float32, device=dev)  # [N, L]
        self.action = torch.zeros(N, L, dtype=torch.bool, device=dev)  # [N, L]
        self.step = 0
        self.forwards = 0
        self.generator = None
        if cfg.seed is not None:
            self.generator = torch.Generator(device=dev).manual_seed(cfg.seed)
        self.cache = None  # block diffusion: K/V of every committed block before the current one

    # ---- the forwards -------------------------------------------------------------------------------------
    def block_logits(self, start: int, end: int, block_start: int) -> torch.Tensor:
        """Aligned logits [N, end - start, V] for the response positions [start, end) of the current block."""
        self.forwards += 1
        if not (self.model.block_size is not None and self.cfg.use_kv_cache):
            keep = torch.arange(start, end, device=self.x.device)
            return self.model.logits(self.x, self.attn, keep=keep)
        # The chunk runs from the end of the cache to the end of the block. Whatever lies before the block in it
        # (the prompt's complete blocks on the first forward, the block committed just before otherwise) is
        # final, so it is kept in the cache; the noisy block itself is dropped again after the forward.
        cached = self.cache.get_seq_length() if self.cache is not None else 0
        logits, self.cache = self.model.logits_cached(
            self.x[:, cached:end], self.attn[:, :end], self.cache, keep_in_cache=block_start - cached
        )
        return logits[:, start - cached:]

    # ---- one block ----------------------------------------------------------------------------------------
    def denoise_block(self, start: int, end: int, block_start: int, steps_per_block: int) -> None:
        """Unmask response positions [start, end) (frame coordinates) until none is masked."""
        schedule = static_schedule(end - start, steps_per_block) if self.cfg.threshold is None else []
        i = 0
        while True:
            masked = self.x[:, start:end] == self.mask_id  # [N, C]
            if not masked.any():
                break
            logits = self.block_logits(start, end, block_start)
            k = None
            if self.cfg.threshold is None:
                # past the schedule (only when EOS padding changed the counts): commit everything left
                k_val = schedule[i] if i < len(schedule) else end - start
                k = torch.full((masked.shape[0],), k_val, device=masked.device)
            self.commit(logits, masked, start, k)
            i += 1

    def commit(self, logits: torch.Tensor, masked: torch.Tensor, start: int, k: torch.Tensor | None) -> None:
        cfg = self.cfg
        logprobs = sampling_logprobs(logits, self.mask_id, cfg.temperature, cfg.top_k, cfg.top_p)  # [N, C, V]
        tokens, token_lp = sample_tokens(logprobs, cfg.temperature == 0, self.generator)  # [N, C]
        conf = confidence(cfg.remasking, logprobs, token_lp, self.generator)
        pick = choose_commits(conf, masked, k, cfg.threshold)  # [N, C] bool
        C = pick.shape[1]
        cols = slice(start - self.P, start - self.P + C)
        self.x[:, start:start + C] = torch.where(pick, tokens, self.x[:, start:start + C])
        self.unmask_step[:, cols] = torch.where(pick, self.step, self.unmask_step[:, cols])
        self.logprob[:, cols] = torch.where(pick, token_lp, self.logprob[:, cols])
        self.action[:, cols] |= pick
        self.pad_after_eos()
        self.step += 1

    def pad_after_eos(self) -> None:
        """Once an EOS is committed, every still-masked position after it becomes EOS padding (not an action)."""
        resp = self.x[:, self.P:]
        is_eos = (resp == self.eos_id) & (self.unmask_step >= 0)
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        fill = after & (resp == self.mask_id)
        if fill.any():
            resp[fill] = self.eos_id
            self.unmask_step[fill] = self.step

    # ---- the whole response -------------------------------------------------------------------------------
    def run(self, bounds: torch.Tensor, block: int, steps_per_block: int) -> None:
        aligned = self.model.block_size is not None
        for b in range(len(bounds) - 1):
            start, end = int(bounds[b]), int(bounds[b + 1])
            block_start = (start // block) * block if aligned else start  # may include the prompt's tail
            self.denoise_block(start, end, block_start, steps_per_block)
            if not (self.x[:, self.P:] == self.mask_id).any():
                break  # EOS padding filled the rest: no forward is spent on finished blocks


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompt_ids: torch.Tensor | list[list[int]],
    config: RolloutConfig,
    prompt_mask: torch.Tensor | None = None,
    group_id: torch.Tensor | None = None,
) -> Trajectory:
    """Denoise a response for every prompt row and record the trajectory.

    prompt_ids: [N, P] int64 (left-padded, with prompt_mask [N, P]) or a list of token lists.
    group_id: [N] int64, rows answering the same prompt (default: every row its own group).
    """
    config.validate()
    if isinstance(prompt_ids, list):
        prompt_ids, prompt_mask = pad_prompts(prompt_ids, model.pad_token_id)
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    N, P = prompt_ids.shape
    L = config.max_completion_length
    if P + L > model.max_length:
        raise UserError(
            f"prompt of {P} tokens + max_completion_length {L} = {P + L} exceeds the model's maximum length "
            f"{model.max_length} (max_position_embeddings)"
        )
    block = config.resolve_block_length(model.block_size)
    bounds = block_bounds(P, L, block, aligned=model.block_size is not None)
    steps_per_block = max(1, config.steps // (L // block))
    sampler = _Sampler(model, prompt_ids, prompt_mask, config)
    was_training = model.training
    model.eval()
    try:
        sampler.run(bounds, block, steps_per_block)
    finally:
        model.train(was_training)
    cpu = torch.device("cpu")
    return Trajectory(
        prompt_ids=prompt_ids.to(cpu),
        prompt_mask=prompt_mask.to(cpu).bool(),
        response_ids=sampler.x[:, P:].to(cpu),
        unmask_step=sampler.unmask_step.to(cpu),
        action_mask=sampler.action.to(cpu),
        behaviour_logprob=sampler.logprob.to(cpu),
        block_bounds=bounds,
        group_id=(group_id if group_id is not None else torch.arange(N)).to(cpu).long(),
        num_forwards=sampler.forwards,
        mask_token_id=model.mask_token_id,
        pad_token_id=model.eos_token_id,
        eos_token_id=model.eos_token_id,
        block_size=model.block_size,
        temperature=float(config.temperature),
    )
