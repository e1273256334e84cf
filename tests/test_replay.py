"""Replay rows: the first PPO ratio is exactly 1 because the rows rebuild the rollout's own states."""

import pytest
import torch

from tests.conftest import encode
from tracerl.credit import shrink_steps
from tracerl.replay import build_replay, token_logprobs
from tracerl.rollout import RolloutConfig, generate

PROMPTS = ["hello", "abcdefg hij", "x"]  # lengths 5, 11, 1: no prompt is a multiple of block_size 4


def _rollout(model, **kw):
    cfg = dict(max_completion_length=16, steps=8, block_length=None if model.block_size else 8, seed=0)
    return generate(model, encode(model, PROMPTS), RolloutConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("kind", ["full", "block"])
def test_trace_rows_reproduce_behaviour_logprobs(kind, full_model, block_model):
    model = full_model if kind == "full" else block_model
    traj = _rollout(model)
    batch = build_replay(traj, traj.unmask_step, "trace")
    lp = token_logprobs(model, batch, batch.targets(traj), temperature=1.0).logprob
    old = batch.gather(traj.behaviour_logprob)
    assert (lp - old)[batch.loss_mask].abs().max().item() < 1e-5
    # every action token is scored exactly once
    counts = torch.zeros_like(traj.behaviour_logprob)
    rows = batch.source_row[:, None].expand_as(batch.source_pos)[batch.loss_mask]
    counts.index_put_((rows, batch.source_pos[batch.loss_mask]), torch.ones(len(rows)), accumulate=True)
    assert torch.equal(counts.bool(), traj.action_mask) and counts.max() == 1


def test_packed_block_replay_costs_max_steps_per_block(block_model):
    traj = _rollout(block_model, max_completion_length=16, steps=16)  # 1 token per step, 4 steps per full block
    assert traj.block_offset.tolist() == [1, 3, 1]  # each prompt's own tail in its first response block
    batch = build_replay(traj, traj.unmask_step, "trace")
    assert batch.forwards_per_response == 4  # max steps per block, not 16 steps
    shrunk = shrink_steps(traj.unmask_step, traj.action_mask, 2, traj.block_of_position())
    assert build_replay(traj, shrunk, "trace").forwards_per_response == 2
    # the packed rows equal the rollout's states: log-probs agree at 1e-5 in float32
    lp = token_logprobs(block_model, batch, batch.targets(traj), 1.0).logprob
    assert (lp - batch.gather(traj.behaviour_logprob))[batch.loss_mask].abs().max() < 1e-5


def test_full_attention_rows_per_shrunk_step(full_model):
    traj = _rollout(full_model)  # 8 steps per row
    assert build_replay(traj, traj.unmask_step, "trace").forwards_per_response == 8
    shrunk = shrink_steps(traj.unmask_step, traj.action_mask, 4)
    batch = build_replay(traj, shrunk, "trace")
    assert batch.forwards_per_response == 2
    # a merged group is trained from the state before its first step: steps 0 and 4
    first_row = batch.input_ids[batch.source_row == 0]
    P = traj.prompt_length
    assert torch.equal(first_row[0, P:], traj.state_before(0)[0, P:])
    assert torch.equal(first_row[1, P:], traj.state_before(4)[0, P:])
