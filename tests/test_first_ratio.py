"""The first PPO ratio is exactly 1, for every sampling option x old_logprobs x family kind x PPO iterations.

Through the trainer: the policy loss is spied on, and the ratio of its first epoch (before any optimizer step) must
be 1 at every scored token. With `old_logprobs: rollout` this holds only if the sampler recorded the log-prob of
the very distribution the replay scores (temperature, top-k, top-p and all); with `recompute` the old log-probs are
the first epoch's own, so it holds bit for bit. Later epochs must divide by the same old log-probs as the first.
"""

import pytest
import torch

from tests.rollout.test_published_samplers import sharpened
from tracerl import losses
from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig
from tracerl.models import build_tiny_model
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.rollout import RolloutConfig
from tracerl.trainer import RLTrainer

ROWS = [{"prompt": p} for p in ["hello", "ab", "xyz q", "the cat"]]
SAMPLING = {
    "temperature": dict(temperature=0.7),
    "greedy": dict(temperature=0.0),
    "top_k": dict(temperature=1.0, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "threshold": dict(temperature=1.0, threshold=0.2),
    "top_margin": dict(temperature=1.0, remasking="top_margin"),
    "entropy": dict(temperature=1.0, remasking="entropy"),
    "random": dict(temperature=1.0, remasking="random"),
}


def char_code_reward(prompts, completions, **kwargs):
    """Different completions almost surely score differently: every sampled group has a spread."""
    return [sum(ord(ch) for ch in c) % 97 / 97 for c in completions]


def family(kind: str) -> DiffusionLM:
    if kind == "full":
        return build_tiny_model("llama", seed=0)
    if kind == "block":
        return build_tiny_model("qwen3", block_size=4, seed=1)
    base = build_tiny_model("qwen2", seed=2)  # Dream-style: raw output i predicts token i + 1
    return DiffusionLM(base.backbone, base.tokenizer, FamilySpec("tracerl_tiny", base.mask_token_id, logit_shift=1))


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("kind", ["full", "block", "shifted"])
@pytest.mark.parametrize("old", ["rollout", "recompute"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_first_ratio_is_one(tmp_path, monkeypatch, sampling, old, kind, iterations):
    calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    epoch = [-1]
    real_loss, real_epoch = losses.policy_loss, RLTrainer._epoch

    def spy_loss(lp, old_lp, adv, mask, **kw):
        calls.append((epoch[0], lp.detach().clone(), old_lp.detach().clone(), mask.clone()))
        return real_loss(lp, old_lp, adv, mask, **kw)

    def spy_epoch(self, *args):
        epoch[0] += 1
        return real_epoch(self, *args)

    monkeypatch.setattr(losses, "policy_loss", spy_loss)
    monkeypatch.setattr(RLTrainer, "_epoch", spy_epoch)
    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=8, steps=4, block_length=None if kind == "block" else 4,
                              **SAMPLING[sampling]),
        algorithm=AlgorithmConfig(old_logprobs=old, num_iterations=iterations),
        optimizer=OptimizerConfig(learning_rate=1e-2),
        trainer=TrainerConfig(max_steps=1, num_generations=2, per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, output_dir=str(tmp_path)),
    )
    RLTrainer(cfg, family(kind), char_code_reward, ROWS).train_step()
    first = [c for c in calls if c[0] == 0]
    assert first and sum(int(c[3].sum()) for c in first) > 0
    for _, lp, old_lp, mask in first:
        ratio = torch.exp(lp - old_lp)[mask]
        if old == "recompute":
            assert torch.equal(ratio, torch.ones_like(ratio))
        else:
            assert (ratio - 1).abs().max() < 1e-5
    # later epochs divide by the same old log-probs, although the policy has moved
    for e in range(1, iterations):
        later = [c for c in calls if c[0] == e]
        assert len(later) == len(first)
        for (_, _, old_first, mask), (_, lp, old_later, _) in zip(first, later):
            assert torch.equal(old_first[mask], old_later[mask])
    if iterations > 1 and sampling != "greedy":  # greedy groups are identical: no spread, no update
        moved = max((torch.exp(c[1] - c[2]) - 1)[c[3]].abs().max().item() for c in calls if c[0] == iterations - 1)
        assert moved > 1e-4


@pytest.mark.parametrize("arch,remasking", [("mdlm", "mdlm_ancestral"), ("sedd", "sedd_euler"),
                                            ("sedd", "sedd_analytic")])
@pytest.mark.parametrize("value", [False, True])
def test_first_ratio_is_one_for_the_published_samplers(tmp_path, monkeypatch, arch, remasking, value):
    """MDLM / SEDD sampled as their papers do: the replay feeds each state the sigma the sampler fed (the
    trajectory's noise_level), so the behaviour log-probs replay exactly, with and without the value model."""
    calls = []
    real_loss = losses.policy_loss

    def spy_loss(lp, old_lp, adv, mask, **kw):
        calls.append(torch.exp(lp.detach() - old_lp)[mask])
        return real_loss(lp, old_lp, adv, mask, **kw)

    monkeypatch.setattr(losses, "policy_loss", spy_loss)
    # sharpened weights and time conditioning on: the sigma fed to the network changes its output
    model = sharpened(arch, seed=3, time_conditioning=True if arch == "mdlm" else None)
    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=8, steps=4, block_length=8, remasking=remasking),
        algorithm=AlgorithmConfig(old_logprobs="rollout", use_value_model=value),
        optimizer=OptimizerConfig(learning_rate=1e-2),
        trainer=TrainerConfig(max_steps=1, num_generations=2, per_device_train_batch_size=4, output_dir=str(tmp_path)),
    )
    trainer = RLTrainer(cfg, model, char_code_reward, ROWS)
    batch = trainer.sample_and_score([0, 1])
    assert batch.traj.noise_level is not None
    trainer.learn(batch.traj, batch.rewards)
    ratios = torch.cat(calls)
    assert ratios.numel() > 0 and (ratios - 1).abs().max() < 1e-5
