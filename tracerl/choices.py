"""Every closed set of choices a recipe field takes, declared once as a Literal type.

The schema (tracerl/config.py) types its fields with these, so the recipe loader checks them and `tracerl
validate` lists them; the modules that act on a choice (losses, credit, the sampler) take the same types.
"""

from __future__ import annotations

from typing import Literal, get_args

Remasking = Literal["low_confidence", "top_margin", "entropy", "random", "mdlm_ancestral", "dream_origin",
                    "sedd_euler", "sedd_analytic"]
CacheMode = Literal["none", "prefix", "dual", "elastic"]
DriftAxis = Literal["heads", "keys"]
AfterEos = Literal["fill", "finish_block", "denoise"]
LossType = Literal["ppo", "reinforce", "wd1"]
KLKind = Literal["k1", "k2", "k3"]
KLAgainst = Literal["reference", "old"]
Aggregation = Literal["token-mean", "step-mean", "sequence-mean", "sequence-sum", "state-sum", "constant",
                      "microbatch-token-mean", "microbatch-sum"]
ScaleRewards = Literal["group", "group-population", "batch", "none"]
ValueOutcome = Literal["raw", "group"]
OldLogprobs = Literal["recompute", "rollout"]
OnError = Literal["raise", "zero"]
RolloutCorrection = Literal["none", "tis"]
DType = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]


def options(choice: object) -> tuple[str, ...]:
    """The values of a Literal type (unwrapping `X | None`)."""
    args = get_args(choice)
    if args and all(isinstance(a, str) for a in args):
        return args
    return tuple(v for a in args for v in options(a))
