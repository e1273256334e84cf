"""Denoising rollouts: the sampler, its unmasking policies, and the Trajectory it records."""

from tracerl.rollout.config import RolloutConfig
from tracerl.rollout.sampler import generate, pad_prompts
from tracerl.rollout.trajectory import Trajectory

__all__ = ["RolloutConfig", "Trajectory", "generate", "pad_prompts"]
