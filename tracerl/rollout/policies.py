"""Token sampling and unmasking policies: which token each masked position gets, and which positions commit.

The same `sampling_logprobs` serves the sampler and the training replay, so a recorded behaviour log-prob and a
replayed one come from one formula (temperature, top-k, top-p, and the `[MASK]` token never being a choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DREAM_EPS = 1e-3  # the end of Dream's time grid (generation_utils.py: timesteps = linspace(1, eps, steps + 1))


@dataclass(frozen=True)
class SamplerConvention:
    """Where the published samplers of the three full-size families differ for the same settings; each family is
    rolled out as its own authors' code does.

    raw_confidence: low_confidence scores a choice by softmax(logits) at temperature 1, unfiltered, whatever it was
        drawn at (LLaDA generate.py, Fast-dLLM, dLLM-RL's LLaDA rollout); else by the probability it was drawn with
        (Dream's maskgit_plus, SDAR).
    top_p_first: nucleus filtering before top-k (Dream's sample_tokens); else top-k first (SDAR).
    strict_threshold: the dynamic threshold commits conf > T (SDAR, JetEngine); else conf >= T (Fast-dLLM,
        dLLM-RL's LLaDA / Dream rollouts).
    block_schedule: block diffusion; the static counts split the whole block_length over its steps even where the
        response's first block is shorter (it shares the prompt's tail), and the threshold falls back to the step's
        count (SDAR generate.py, JetEngine); else each block's own positions are split and the threshold commits
        at least one.
    dream_schedule: step i of a block commits int(masked x (1 - s/t)) on Dream's grid t, s = timesteps[i], [i+1],
        everything left at its last step (a step that commits nothing still runs its forward, as Dream's does);
        else LLaDA's even split.
    """

    name: str
    raw_confidence: bool = False
    top_p_first: bool = False
    strict_threshold: bool = False
    block_schedule: bool = False
    dream_schedule: bool = False


LLADA = SamplerConvention("llada", raw_confidence=True)
DREAM = SamplerConvention("dream", top_p_first=True, dream_schedule=True)
SDAR = SamplerConvention("sdar", strict_threshold=True, block_schedule=True)


def convention_for(block_size: int | None, logit_shift: int) -> SamplerConvention:
    """The family's published sampler: block diffusion -> SDAR, shifted logits -> Dream, else LLaDA (MDLM, SEDD
    and the tiny test models included)."""
    if block_size is not None:
        return SDAR
    return DREAM if logit_shift else LLADA


def sampling_logprobs(
    logits: torch.Tensor, mask_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    top_p_first: bool = False,
) -> torch.Tensor:
    """[..., V] raw logits -> [..., V] float32 log-probs of the distribution tokens are drawn from.

    temperature 0 (greedy) reports the temperature-1 distribution. `[MASK]` is excluded: committing it would leave
    the position masked forever. top-k then top-p (SDAR), or top-p on the full distribution then top-k
    (`top_p_first`: Dream's sample_tokens).
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    # out of place: the caller's logits (and autograd's saved tensors) stay untouched
    logits = logits.index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    if top_p_first:
        return torch.log_softmax(_top_k(_top_p(logits, top_p), top_k), dim=-1)
    return torch.log_softmax(_top_p(_top_k(logits, top_k), top_p), dim=-1)


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it exceeds top_p (Dream's and SDAR's top_p_logits: the best token
        # always stays, and a token that completes exactly top_p is kept)
        drop_sorted = (probs.cumsum(-1) - probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logprobs: torch.Tensor, greedy: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, V] log-probs -> (tokens [B, C] int64, their log-probs [B, C])."""
    if greedy:
        tokens = logprobs.argmax(-1)
    else:
        flat = logprobs.exp().reshape(-1, logprobs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(logprobs.shape[:-1])
    return tokens, logprobs.gather(-1, tokens[..., None]).squeeze(-1)


def confidence(
    remasking: str, logprobs: torch.Tensor, token_logprob: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """[B, C] score: higher = commit sooner.

    low_confidence: p(chosen token) (LLaDA); top_margin: p1 - p2; entropy: -H(p); random: uniform noise.
    """
    if remasking == "low_confidence":
        return token_logprob.exp()
    if remasking == "top_margin":
        top2 = torch.topk(logprobs, 2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    if remasking == "entropy":
        p = logprobs.exp()
        return (p * logprobs.clamp(min=-1e30)).sum(-1)  # clamp: 0 * -inf would be NaN
    if remasking == "random":
        return torch.rand(token_logprob.shape, generator=generator, device=token_logprob.device)
    raise ValueError(f"unknown remasking {remasking!r}")


def choose_commits(
    conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor | None, threshold: float | None,
    strict: bool = False,
) -> torch.Tensor:
    """Which masked positions to commit this step: [B, C] bool.

    Static: the k highest-confidence masked positions per row (k [B], clamped to what is masked).
    Dynamic (threshold): every masked position with conf >= threshold (`strict`: > threshold), and at least the
    k best (k None: the best one).
    """
    conf = conf.masked_fill(~masked, float("-inf"))
    if threshold is not None:
        pick = masked & ((conf > threshold) if strict else (conf >= threshold))
        if k is not None:  # SDAR: the step's scheduled count is the floor
            return pick | _top_ranked(conf, masked, k)
        best = torch.zeros_like(pick).scatter(-1, conf.argmax(-1, keepdim=True), True)
        return pick | (best & masked)
    return _top_ranked(conf, masked, k)


def _top_ranked(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, C] bool: the k [B] highest-confidence masked positions of each row."""
    order = conf.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return masked & (rank < k[:, None])


def dream_counts(masked: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """[B] tokens each row commits at `step` of `steps` on Dream's grid (masked [B] int64, still masked in the
    block): int(masked x (1 - s/t)), t, s = timesteps[step], [step + 1], float32 as Dream computes it; all at
    the last step. Early steps can commit nothing."""
    if step >= steps - 1:
        return masked
    grid = torch.linspace(1, DREAM_EPS, steps + 1)
    t, s = grid[step], grid[step + 1]
    return (masked.float().cpu() * (1 - s / t)).long().to(masked.device)  # int() truncates; counts are >= 0


def static_schedule(num_tokens: int, steps: int) -> list[int]:
    """Tokens to commit at each step when spreading `num_tokens` over `steps` (LLaDA: the remainder goes first).

    Steps that would commit nothing are dropped, so a block shorter than its step budget spends fewer forwards.
    """
    base, extra = divmod(num_tokens, steps)
    return [n for n in (base + (1 if i < extra else 0) for i in range(steps)) if n > 0]
