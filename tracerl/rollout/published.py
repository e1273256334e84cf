"""The published MDLM / SEDD / Dream samplers as unmasking policies (`rollout.remasking`: mdlm_ancestral,
dream_origin, sedd_euler, sedd_analytic), written from kuleshov-group/mdlm `diffusion.py`,
louaaron/Score-Entropy-Discrete-Diffusion `sampling.py` / `graph_lib.py` and Dream's `generation_utils.py`
(`alg="origin"`, the default of its DreamGenerationConfig).

Each block is denoised on the published time grid t_i = 1 - i (1 - 1e-5) / steps, i = 0..steps-1, each step going
from t = t_i to s = t_i - dt (the grid restarts per semi-AR block; block_length = max_completion_length is the
published unblocked sampler). At every step each still-masked position of the block unmasks independently with

    mdlm_ancestral   P = (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t = dt / t     (model-free)
    sedd_euler       P = dt g(t) S                            clamped to [0, 1]
    sedd_analytic    P = (e^{sigma(t) - sigma(s)} - 1) S      clamped to [0, 1]

and dream_origin walks Dream's grid instead, timesteps = linspace(1, 1e-3, steps + 1) in float32, with
    dream_origin     P = 1 - s / t at steps 0 .. steps-2, and P = 1 at the last one   (model-free)
so it needs no final forward.

where S = sum_{y != [MASK]} score[y] is SEDD's total score mass at the position (`tracerl.models.sedd`), and a
position that unmasks takes a token from `sampling_logprobs` (temperature 1 is the published one). A last forward
at t = 1e-5 resolves what is still masked: MDLM takes the argmax, SEDD samples from the score.

What a Trajectory records: for a committed token, the log-prob of its value under the token distribution, as for
every other policy. The unmask decision is not in it. For MDLM that is exact (the decision does not depend on the
parameters). For SEDD it is a choice: the decision depends on the parameters through S, and a policy gradient
over the recorded log-probs treats which positions unmask as part of the environment.
"""

from __future__ import annotations

import math

import torch

from tracerl.models.sedd import sedd_log_score
from tracerl.rollout.config import PUBLISHED_SAMPLERS as SAMPLERS
from tracerl.rollout.policies import DREAM_EPS
GRID_EPS = 1e-5  # the sampling grid's end (MDLM `_sample(eps=1e-5)`, SEDD `get_pc_sampler(eps=1e-5)`)


def time_grid(steps: int) -> tuple[list[float], float]:
    """([t_0 .. t_{steps-1}], dt): torch.linspace(1, 1e-5, steps + 1) without its last point, in float64."""
    dt = (1.0 - GRID_EPS) / steps
    return [1.0 - i * dt for i in range(steps)], dt


def dream_grid(steps: int) -> tuple[list[float], list[float]]:
    """Dream's `origin` sampler: ([t_0 .. t_{steps-1}], [P_0 .. P_{steps-1}]) on timesteps = torch.linspace(1,
    1e-3, steps + 1) (float32, as Dream computes it), P_i = 1 - t_{i+1} / t_i and 1 at the last step."""
    ts = torch.linspace(1, DREAM_EPS, steps + 1)
    return [float(t) for t in ts[:-1]], [float(1 - ts[i + 1] / ts[i]) if i < steps - 1 else 1.0 for i in range(steps)]


def sigma(t: float, noise_eps: float) -> float:
    """LogLinearNoise.total_noise: sigma(t) = -log(1 - (1 - eps) t), the noise level the network is fed."""
    return -math.log1p(-(1.0 - noise_eps) * t)


def rate(t: float, noise_eps: float) -> float:
    """LogLinearNoise.rate_noise: g(t) = d sigma / dt = (1 - eps) / (1 - (1 - eps) t)."""
    return (1.0 - noise_eps) / (1.0 - (1.0 - noise_eps) * t)


def log_score_mass(logits: torch.Tensor, input_ids: torch.Tensor, noise_level: torch.Tensor, mask_id: int,
                   scale_by_sigma: bool) -> torch.Tensor:
    """log S [N, B] at masked positions: log sum_{y != [MASK]} exp(SEDD's log-score[y]).

    logits [N, B, V] raw network output, input_ids [N, B] the tokens it was run on, noise_level [N] sigma.
    """
    log_score = sedd_log_score(logits, input_ids, noise_level, scale_by_sigma)  # [N, B, V]
    log_score = log_score.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    return torch.logsumexp(log_score, dim=-1)


def unmask_probability(remasking: str, t: float, dt: float, noise_eps: float, logits: torch.Tensor,
                       input_ids: torch.Tensor, mask_id: int, scale_by_sigma: bool) -> torch.Tensor:
    """P(a masked position unmasks at this step) [N, B] float32 (meaningful at masked positions only).

    logits [N, B, V] and input_ids [N, B]: the block's network output and tokens (read by the SEDD rules only).
    """
    N, B = input_ids.shape
    if remasking == "mdlm_ancestral":
        return torch.full((N, B), dt / t, dtype=torch.float32, device=input_ids.device)
    if remasking == "dream_origin":
        raise ValueError("dream_origin's probabilities come from dream_grid (they are not dt / t at its last step)")
    sigma_t = sigma(t, noise_eps)
    fed = torch.full((N,), sigma_t, dtype=torch.float32, device=input_ids.device)
    log_mass = log_score_mass(logits, input_ids, fed, mask_id, scale_by_sigma)  # [N, B]
    if remasking == "sedd_euler":
        log_factor = math.log(dt * rate(t, noise_eps))
    elif remasking == "sedd_analytic":
        log_factor = math.log(math.expm1(sigma_t - sigma(t - dt, noise_eps)))
    else:
        raise ValueError(f"{remasking!r} is not a published sampler ({', '.join(SAMPLERS)})")
    # in log space, so a large learned score mass cannot overflow before the clamp
    return (log_mass + log_factor).exp().clamp(0.0, 1.0).float()
