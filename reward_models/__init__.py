"""Rewards for TraceRL: TRL's reward-function contract, a loader, built-ins, a combiner and a code sandbox.

    from reward_models import load_reward, RewardSet
    math_reward = load_reward("math")                       # built-in
    mine = load_reward("my_rewards.py:exact_match")         # a user's TRL reward function, unchanged
    rewards = RewardSet([{"fn": "math", "weight": 1.0}, {"fn": "format", "weight": 0.2}], on_error="zero")
    result = rewards(prompts, completions, answer=answers)  # result.total [N], result.metrics

See docs/rewards.md.
"""
from .combine import RewardResult, RewardSet
from .loader import BUILTINS, RewardSpec, load_reward, parse_spec
from .protocol import ProcessReward, RewardError, RewardSpecError, completion_text

__all__ = ["BUILTINS", "ProcessReward", "RewardError", "RewardResult", "RewardSet", "RewardSpec", "RewardSpecError",
           "completion_text", "load_reward", "parse_spec"]
