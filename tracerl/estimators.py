"""The policy-gradient estimators TraceRL implements, and what each one fixes about the update.

  trace    TraceRL: the states the sampler visited (tracerl.replay), the sampler's own log-prob distribution,
           group-relative advantages (TRL's GRPO defaults), token-mean loss.
  d1       diffu-GRPO (Zhao et al. 2025, dllm-reasoning/d1): the whole completion masked and prompt tokens masked
           with p_mask_prompt (0.15), a one-forward mean-field log-prob, a fresh mask for every PPO iteration
           (old and reference log-probs on the same mask), advantage r - group mean (no std), PPO-clip + k3 KL,
           loss sum(m l) / sum(m) per micro-batch.
  coupled  coupled-GRPO (Gong et al. 2025, apple/ml-diffucoder): per iteration one t ~ U(0.2, 0.8) for the batch;
           three passes per completion (all masked; masked where u < t; masked where u > t); a token's score is
           (l_all + [u < t] l_1 / t + [u > t] l_2 / (1 - t)) / 2; leave-one-out advantage, no std; PPO-clip + k3
           KL on the score; the prompt is never masked.
  wd1      wd1 (Tang et al. 2025, xiaohangt/wd1): d1's masks and log-prob, no ratio, no old or reference
           log-probs: loss = sum_i (softmax_group(-A)_i - softmax_group(A)_i) * sum_k m_ik l_ik, A = r - mean.

The published estimators score log-softmax over the full vocabulary at temperature 1 (the `[MASK]` token included),
as their code does, and train on the completion up to and including its first EOS. Settings the method defines
are resolved from the estimator when the recipe leaves them unset (None); docs/estimators.md lists the published
defaults of everything else (epsilon, beta, num_iterations, ...), which the shipped recipes set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tracerl.errors import UserError

if TYPE_CHECKING:
    from tracerl.config import AlgorithmConfig


@dataclass(frozen=True)
class EstimatorSpec:
    scale_rewards: str  # the advantage's std normalisation when the recipe leaves it unset
    loss_aggregation: str  # the loss normalisation when unset
    loss_type: str  # ppo | reinforce | wd1
    p_mask_prompt: float  # prompt masking when unset (0 = never)
    baseline: str = "mean"  # mean | leave_one_out (coupled-GRPO's)
    fresh_masks: bool = False  # new random masks every PPO iteration
    published_logprob: bool = False  # full-vocabulary temperature-1 log-softmax instead of the sampler's distribution
    completion_loss_mask: bool = False  # train on the completion up to its first EOS (else: the policy's actions)


ESTIMATORS: dict[str, EstimatorSpec] = {
    "trace": EstimatorSpec("group", "token-mean", "ppo", 0.0),
    "d1": EstimatorSpec("none", "microbatch-token-mean", "ppo", 0.15, fresh_masks=True, published_logprob=True,
                        completion_loss_mask=True),
    "coupled": EstimatorSpec("none", "microbatch-token-mean", "ppo", 0.0, baseline="leave_one_out",
                             fresh_masks=True, published_logprob=True, completion_loss_mask=True),
    "wd1": EstimatorSpec("none", "microbatch-sum", "wd1", 0.15, fresh_masks=True, published_logprob=True,
                         completion_loss_mask=True),
}
RENAMED = {"random_masking": "d1"}


def spec(name: str) -> EstimatorSpec:
    if name in RENAMED:
        raise UserError(f"algorithm.estimator={name!r} was a simplified d1; use algorithm.estimator={RENAMED[name]} "
                        "(diffu-GRPO as published)")
    if name not in ESTIMATORS:
        raise UserError(f"algorithm.estimator: {name!r} is not one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def resolve(alg: "AlgorithmConfig") -> "AlgorithmConfig":
    """The algorithm section with every estimator-defined setting that was left unset filled in; refuses settings
    that contradict the estimator, naming both keys."""
    s = spec(alg.estimator)
    out = replace(
        alg,
        scale_rewards=alg.scale_rewards if alg.scale_rewards is not None else s.scale_rewards,
        loss_aggregation=alg.loss_aggregation if alg.loss_aggregation is not None else s.loss_aggregation,
        loss_type=alg.loss_type if alg.loss_type is not None else s.loss_type,
        p_mask_prompt=alg.p_mask_prompt if alg.p_mask_prompt is not None else s.p_mask_prompt,
    )
    name = alg.estimator
    if (out.loss_type == "wd1") != (name == "wd1"):
        raise UserError(f"algorithm.loss_type={out.loss_type} does not go with algorithm.estimator={name}: wd1's "
                        "weighted likelihood is its own ratio-free objective (leave loss_type unset)")
    if out.p_mask_prompt and name in ("trace", "coupled"):
        why = "the trace replays the prompt as sampled" if name == "trace" else "coupled-GRPO never masks the prompt"
        raise UserError(f"algorithm.p_mask_prompt={out.p_mask_prompt} does not go with algorithm.estimator={name}: "
                        f"{why}")
    if not 0.0 <= out.p_mask_prompt < 1.0:
        raise UserError(f"algorithm.p_mask_prompt must lie in [0, 1), got {out.p_mask_prompt}")
    return out
