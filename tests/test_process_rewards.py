"""Process rewards end to end: a reward function returns per-step (or per-token) rewards next to its outcome, and
credit assignment uses them, with group baselines (DeepSeekMath's process supervision) and with the value model.
Expected advantages are worked by hand from the formulas in the docstrings."""

import math

import pytest
import torch

from reward_models import ProcessReward, RewardError, RewardSet
from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig
from tracerl.credit import process_advantages, process_table, shrink_steps
from tracerl.models import build_tiny_model
from tracerl.replay import build_replay
from tracerl.rollout import RolloutConfig
from tracerl.trainer import RLTrainer

NAN = float("nan")


def test_process_advantages_by_hand():
    # group A = rows 0, 1; group B = row 2 (a single given reward: no spread, advantage 0)
    process = torch.tensor([[1.0, 0.0, 3.0], [2.0, 2.0, NAN], [5.0, NAN, NAN]])
    unmask = torch.tensor([[0, 2, 1, 2], [1, 0, 1, 0], [0, 0, 0, 0]])
    act = torch.ones(3, 4, dtype=torch.bool)
    # group A's given rewards 1, 0, 3, 2, 2: mean 1.6, unbiased variance (0.36 + 2.56 + 1.96 + 0.16 + 0.16) / 4 = 1.3
    std = math.sqrt(1.3)
    r0 = [(1 - 1.6) / std, (0 - 1.6) / std, (3 - 1.6) / std]
    r1 = [0.4 / std, 0.4 / std]
    to_go0 = [r0[0] + r0[1] + r0[2], r0[1] + r0[2], r0[2]]  # sum over the row's steps from t on
    to_go1 = [r1[0] + r1[1], r1[1]]
    want = torch.tensor([[to_go0[0], to_go0[2], to_go0[1], to_go0[2]],
                         [to_go1[1], to_go1[0], to_go1[1], to_go1[0]],
                         [0.0, 0.0, 0.0, 0.0]])
    got = process_advantages(process, torch.tensor([0, 0, 1]), unmask, act, "group", eps=0.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # shrinkage s=2 merges row 0's steps {0, 1}: those tokens start at step 0 and get every later reward
    merged = shrink_steps(unmask, act, 2)
    got = process_advantages(process, torch.tensor([0, 0, 1]), merged, act, "group", eps=0.0)
    assert got[0].tolist() == pytest.approx([to_go0[0], to_go0[2], to_go0[0], to_go0[2]], abs=1e-6)
    # "none": no std division
    got = process_advantages(process, torch.tensor([0, 0, 1]), unmask, act, "none")
    assert got[0, 0].item() == pytest.approx(-0.6 - 1.6 + 1.4, abs=1e-6)


def test_token_rewards_land_on_the_step_that_committed_them():
    unmask = torch.tensor([[0, 1, 1, 2]])
    act = torch.tensor([[True, True, True, False]])  # the last token is EOS padding: no decision, no reward
    table = process_table(torch.tensor([[0.5, NAN]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]]), unmask, act)
    assert table.tolist() == [[1.5, 5.0]]  # step 0: 0.5 + 1.0; step 1: 2.0 + 3.0; step 2 had no action


def _trainer(tmp_path, reward, **algorithm):
    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=8, steps=4, block_length=4, temperature=1.0),
        algorithm=AlgorithmConfig(**algorithm),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        trainer=TrainerConfig(max_steps=1, num_generations=2, per_device_train_batch_size=2,
                              output_dir=str(tmp_path)),
    )
    return RLTrainer(cfg, build_tiny_model("llama", seed=0), RewardSet([reward]), [{"prompt": "hi"}])


def _credit(trainer):
    batch = trainer.sample_and_score([0])
    traj, rewards, metrics, process = batch.traj, batch.rewards, batch.metrics, batch.process
    train_step = traj.unmask_step  # shrink 1
    adv, _ = trainer.assign_credit(traj, rewards, train_step, build_replay(traj, train_step), process)
    return traj, rewards, process, adv, metrics


def test_a_per_step_reward_changes_the_advantages_as_hand_worked(tmp_path):
    def stepwise(prompts, completions, trajectory, **kwargs):
        # outcome 1 for the first sample, 0 for the second; step rewards -0.1 x (step index) on the first only
        n_steps = [int(trajectory.unmask_step[i].max()) + 1 for i in range(len(completions))]
        return [ProcessReward(outcome=1.0, steps=[-0.1 * t for t in range(n_steps[0])]), 0.0]

    traj, rewards, process, adv, metrics = _credit(_trainer(tmp_path, stepwise, process_reward_coef=0.5))
    assert rewards.tolist() == [1.0, 0.0]
    steps = process[0][torch.isfinite(process[0])].tolist()
    assert steps == pytest.approx([-0.1 * t for t in range(len(steps))])
    # outcome: (R - mean) / (std + 1e-4) with std of {1, 0} = sqrt(0.5)
    outcome = [0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4)]
    # process: only row 0 gave step rewards, so they are its group's rewards: mean m, unbiased std s
    m = sum(steps) / len(steps)
    s = math.sqrt(sum((x - m) ** 2 for x in steps) / (len(steps) - 1))
    norm = [(x - m) / (s + 1e-4) for x in steps]
    for j in range(traj.response_length):
        if not traj.action_mask[0, j]:
            continue
        t = int(traj.unmask_step[0, j])
        assert adv.advantages[0, j].item() == pytest.approx(outcome[0] + 0.5 * sum(norm[t:]), abs=1e-5)
    assert torch.allclose(adv.advantages[1][traj.action_mask[1]], torch.tensor(outcome[1]), atol=1e-5)
    assert metrics["rewards/process/mean"] == pytest.approx(m)
    # coefficient 0: the outcome alone, as before
    _, _, _, plain, _ = _credit(_trainer(tmp_path, stepwise, process_reward_coef=0.0))
    assert torch.allclose(plain.advantages[0][traj.action_mask[0]], torch.tensor(outcome[0]), atol=1e-5)


def test_process_rewards_sit_on_their_steps_in_the_value_models_gae(tmp_path):
    def stepwise(prompts, completions, **kwargs):
        return [ProcessReward(outcome=1.0, steps=[0.25, -0.5]), {"outcome": 0.0, "tokens": [0.125]}]

    trainer = _trainer(tmp_path, stepwise, use_value_model=True, whiten_advantages=False, gamma=1.0, lam=1.0)
    torch.nn.init.zeros_(trainer.value_model.head.weight)  # V = 0: A_j = sum of the rewards from the token's step on
    traj, _, process, adv, _ = _credit(trainer)
    for n, (outcome, per_step) in enumerate([(1.0, {0: 0.25, 1: -0.5}), (0.0, {})]):
        if n == 1:  # the token reward of position 0 lands on the step that committed it
            per_step = {int(traj.unmask_step[1, 0]): 0.125}
        for j in range(traj.response_length):
            if traj.action_mask[n, j]:
                t = int(traj.unmask_step[n, j])
                want = outcome + sum(v for u, v in per_step.items() if u >= t)
                assert adv.advantages[n, j].item() == pytest.approx(want, abs=1e-6)


def test_a_process_reward_that_does_not_fit_the_sample_names_reward_and_sample(tmp_path):
    def too_long(prompts, completions, **kwargs):
        return [0.0, ProcessReward(outcome=0.0, steps=[0.0] * 99)]

    trainer = _trainer(tmp_path, too_long)
    with pytest.raises(RewardError, match=r"reward 'too_long' at sample 1: returned 99 step rewards"):
        trainer.sample_and_score([0])


def test_a_trl_reward_returning_floats_is_unchanged():
    rs = RewardSet([lambda prompts, completions, **kw: [0.5, 1.0]])
    result = rs(["a", "b"], ["x", "y"])
    assert result.total.tolist() == [0.5, 1.0] and result.step_rewards is None and result.token_rewards is None
