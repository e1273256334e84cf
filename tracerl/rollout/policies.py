"""Token sampling and unmasking policies: which token each masked position gets, and which positions commit.

The same `sampling_logprobs` serves the sampler and the training replay, so a recorded behaviour log-prob and a
replayed one come from one formula (temperature, top-k, top-p, and the `[MASK]` token never being a choice).
"""

from __future__ import annotations

import torch


def sampling_logprobs(
    logits: torch.Tensor, mask_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """[..., V] raw logits -> [..., V] float32 log-probs of the distribution tokens are drawn from.

    temperature 0 (greedy) reports the temperature-1 distribution. `[MASK]` is excluded: committing it would leave
    the position masked forever.
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    # out of place: the caller's logits (and autograd's saved tensors) stay untouched
    logits = logits.index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the best token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


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
    conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor | None, threshold: float | None
) -> torch.Tensor:
    """Which masked positions to commit this step: [B, C] bool.

    Static: the k highest-confidence masked positions per row (k [B], clamped to what is masked).
    Dynamic (threshold): every masked position with conf > threshold, and at least the best one.
    """
    conf = conf.masked_fill(~masked, float("-inf"))
    if threshold is not None:
        pick = masked & (conf > threshold)
        best = torch.zeros_like(pick).scatter(-1, conf.argmax(-1, keepdim=True), True)
        return pick | (best & masked)
    order = conf.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return masked & (rank < k[:, None])


def static_schedule(num_tokens: int, steps: int) -> list[int]:
    """Tokens to commit at each step when spreading `num_tokens` over `steps` (LLaDA: the remainder goes first).

    Steps that would commit nothing are dropped, so a block shorter than its step budget spends fewer forwards.
    """
    base, extra = divmod(num_tokens, steps)
    return [n for n in (base + (1 if i < extra else 0) for i in range(steps)) if n > 0]
