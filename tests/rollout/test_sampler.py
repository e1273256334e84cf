"""The sampler and its recorder: exactness tests that fail if anything is recorded wrongly."""

import pytest
import torch

from tests.conftest import encode
from tracerl.errors import UserError
from tracerl.rollout import RolloutConfig, Trajectory, generate
from tracerl.rollout.policies import choose_commits, sampling_logprobs, static_schedule

PROMPTS = ["hello", "abcdefg hij", "x"]  # unequal lengths: left padding, and P not a multiple of block_size


def replay_max_error(model, traj: Trajectory) -> float:
    """Rebuild the state before every step, rerun the model, compare the committed tokens' log-probs."""
    worst = 0.0
    for step in range(traj.num_steps):
        logits = model.logits(traj.state_before(step), traj.attention_mask())[:, traj.prompt_length:]
        lp = sampling_logprobs(logits, traj.mask_token_id, traj.temperature or 1.0)
        lp = lp.gather(-1, traj.response_ids[..., None]).squeeze(-1)
        sel = (traj.unmask_step == step) & traj.action_mask
        if sel.any():
            worst = max(worst, (lp[sel] - traj.behaviour_logprob[sel]).abs().max().item())
    return worst


@pytest.mark.parametrize("kind", ["full", "block", "block_nocache"])
@pytest.mark.parametrize("remasking,threshold", [("low_confidence", None), ("low_confidence", 0.05), ("random", None),
                                                 ("top_margin", None), ("entropy", None)])
def test_replay_reproduces_recorded_logprobs(kind, remasking, threshold, full_model, block_model):
    model = full_model if kind == "full" else block_model
    cfg = RolloutConfig(max_completion_length=16, steps=8, block_length=8 if kind == "full" else None,
                        remasking=remasking, threshold=threshold, temperature=1.0, seed=0,
                        use_kv_cache=kind != "block_nocache")
    traj = generate(model, encode(model, PROMPTS), cfg)
    assert replay_max_error(model, traj) < 1e-5


def test_every_position_has_exactly_one_step(full_model):
    traj = generate(full_model, encode(full_model, PROMPTS),
                    RolloutConfig(max_completion_length=16, steps=8, block_length=8, seed=1))
    assert (traj.unmask_step >= 0).all()
    assert (traj.response_ids != traj.mask_token_id).all()
    # static schedule: 16 tokens over 2 blocks x 4 steps = 2 per step, and each step stays inside its block
    for row in range(traj.num_sequences):
        assert torch.bincount(traj.unmask_step[row]).tolist() == [2] * 8
    assert traj.unmask_step[:, :8].max() < traj.unmask_step[:, 8:].min()


def test_block_positions_follow_the_rows_own_blocks(block_model):
    # prompt of 5 tokens: own positions 4..7 form block 1, so the first response block holds 3 positions (5, 6, 7)
    # and later ones 4 each, whatever padding the batch adds
    traj = generate(block_model, encode(block_model, ["hello", "a longer prompt"]),
                    RolloutConfig(max_completion_length=12, steps=12, block_length=None, seed=0))
    assert traj.block_offset.tolist() == [1, 3]  # 5 % 4, 15 % 4
    assert traj.block_of_position()[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert traj.block_of_position()[1].tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    block = traj.block_of_position()[0]
    steps = traj.unmask_step[0]
    for b in range(block.max()):
        assert steps[block == b].max() < steps[block == b + 1].min()


def test_greedy_is_identical_with_and_without_kv_cache(block_model):
    prompts = encode(block_model, PROMPTS)
    base = dict(max_completion_length=24, steps=12, block_length=None, temperature=0.0)
    cached = generate(block_model, prompts, RolloutConfig(**base, use_kv_cache=True))
    naive = generate(block_model, prompts, RolloutConfig(**base, use_kv_cache=False))
    assert torch.equal(cached.response_ids, naive.response_ids)
    assert torch.equal(cached.unmask_step, naive.unmask_step)
    torch.testing.assert_close(cached.behaviour_logprob, naive.behaviour_logprob, atol=1e-5, rtol=1e-5)


def test_same_seed_same_trajectory(full_model):
    cfg = RolloutConfig(max_completion_length=16, steps=8, seed=7, temperature=1.0)
    a = generate(full_model, encode(full_model, PROMPTS), cfg)
    b = generate(full_model, encode(full_model, PROMPTS), cfg)
    c = generate(full_model, encode(full_model, PROMPTS), RolloutConfig(max_completion_length=16, steps=8, seed=8))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.unmask_step, b.unmask_step)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_dynamic_threshold_commits_at_least_one_per_step(full_model):
    prompts = encode(full_model, PROMPTS)
    cfg = dict(max_completion_length=16, steps=16, block_length=16, seed=0)
    static = generate(full_model, prompts, RolloutConfig(**cfg))
    eager = generate(full_model, prompts, RolloutConfig(**cfg, threshold=1e-4))  # every token clears it
    strict = generate(full_model, prompts, RolloutConfig(**cfg, threshold=0.99))  # none does: one per step
    assert static.num_forwards == 16
    assert eager.num_forwards == 1 and (eager.unmask_step == 0).all()
    assert strict.num_forwards == 16
    for row in range(3):
        assert torch.bincount(strict.unmask_step[row]).tolist() == [1] * 16


def test_eos_pads_the_rest_of_the_response(full_model, monkeypatch):
    """Make EOS certain at response position 5: it commits first, and everything after it becomes padding."""
    eos, real_logits = full_model.eos_token_id, full_model.logits
    P = 11  # longest prompt below

    def eos_at_5(input_ids, attention_mask=None, keep=None):
        out = real_logits(input_ids, attention_mask, keep=keep).clone()
        out[:, (keep == P + 5).nonzero().flatten(), eos] = 50.0
        return out

    monkeypatch.setattr(full_model, "logits", eos_at_5)
    traj = generate(full_model, encode(full_model, PROMPTS), RolloutConfig(max_completion_length=16, steps=16,
                                                                           block_length=16, seed=0))
    assert traj.prompt_length == P
    assert (traj.response_ids[:, 5] == eos).all() and (traj.unmask_step[:, 5] == 0).all()
    assert (traj.response_ids[:, 6:] == eos).all()
    assert not traj.action_mask[:, 6:].any() and (traj.unmask_step[:, 6:] == 0).all()
    assert (traj.behaviour_logprob[:, 6:] == 0).all()
    assert traj.completion_mask()[:, :6].all() and not traj.completion_mask()[:, 6:].any()
    assert traj.num_forwards == 6  # 5 remaining positions, one per step, then nothing is masked


def test_trajectory_save_load(tmp_path, block_model):
    traj = generate(block_model, encode(block_model, PROMPTS), RolloutConfig(max_completion_length=8, steps=4,
                                                                            block_length=None, seed=0))
    traj.save(tmp_path / "t.pt")
    back = Trajectory.load(tmp_path / "t.pt")
    for name in ("prompt_ids", "response_ids", "unmask_step", "behaviour_logprob", "block_offset", "group_id"):
        assert torch.equal(getattr(back, name), getattr(traj, name))
    assert back.num_forwards == traj.num_forwards and back.block_size == 4


def test_static_schedule_and_commit_choice():
    assert static_schedule(10, 4) == [3, 3, 2, 2]
    assert static_schedule(3, 8) == [1, 1, 1]
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.7]])
    masked = torch.tensor([[False, True, True, True]])
    assert choose_commits(conf, masked, torch.tensor([2]), None).tolist() == [[False, False, True, True]]
    assert choose_commits(conf, masked, None, 0.95).tolist() == [[False, False, False, True]]


def test_top_k_and_top_p_restrict_the_sampling_distribution():
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0]]])
    topk = sampling_logprobs(logits, mask_token_id=4, top_k=2).exp()
    assert (topk[..., 2:] == 0).all() and topk.sum().item() == pytest.approx(1.0)
    probs = torch.softmax(logits[..., :4], -1)  # [0.644, 0.237, 0.087, 0.032] once [MASK] is excluded
    topp = sampling_logprobs(logits, mask_token_id=4, top_p=0.85).exp()
    assert (topp[..., :2] > 0).all() and (topp[..., 2:] == 0).all()
    assert topp[0, 0, 0].item() == pytest.approx((probs[0, 0, 0] / probs[0, 0, :2].sum()).item(), rel=1e-5)


def test_mask_token_is_never_sampled(full_model):
    logits = torch.zeros(1, 1, len(full_model.tokenizer))
    logits[..., full_model.mask_token_id] = 100.0
    lp = sampling_logprobs(logits, full_model.mask_token_id)
    assert lp[..., full_model.mask_token_id].item() == float("-inf")


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=5, block_length=8), "steps=5 cannot be divided over 2 blocks"),
    (dict(threshold=1.5), "threshold must lie in"),
    (dict(threshold=0.0), "threshold must lie in"),
    (dict(remasking="lowest"), "remasking='lowest'"),
    (dict(cache="prefx"), "cache='prefx' is not one of none, prefix, dual, elastic"),
    (dict(cache="dual", cache_refresh=1.5), "cache_refresh must be a whole number, got 1.5"),
    (dict(block_length=5), "not a multiple of block_length=5"),
    (dict(block_length=-8), "block_length must be >= 1"),  # 16 % -8 == 0: it would pass the multiple check
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
])
def test_bad_rollout_settings(full_model, kwargs, match):
    cfg = RolloutConfig(**{"max_completion_length": 16, "steps": 8, **kwargs})
    with pytest.raises(UserError, match=match):
        generate(full_model, encode(full_model, ["hi"]), cfg)


def test_an_empty_prompt_is_refused_where_the_first_token_has_no_output_before_it():
    """A shifted model (Dream) scores token i from output i - 1: an empty prompt leaves the first response token
    nothing to be scored from (alone it would read a [MASK]'s output, in a batch a padding column's), so it is
    refused, naming the row. Unshifted models take it, and an empty row alone is the row in a batch."""
    from tracerl.models import build_tiny_model
    from tracerl.models.base import DiffusionLM, FamilySpec

    base = build_tiny_model("qwen2", seed=2)
    dream = DiffusionLM(base.backbone, base.tokenizer, FamilySpec("tracerl_tiny", base.mask_token_id, logit_shift=1))
    cfg = RolloutConfig(max_completion_length=16, steps=16, block_length=8, temperature=1.0)
    with pytest.raises(UserError, match="prompt row 0 is empty"):
        generate(dream, [[], [40, 41, 42]], cfg, row_seeds=[5, 6])
    for cache in ("none", "elastic"):
        llada = build_tiny_model("llama", seed=2)
        cfg = RolloutConfig(max_completion_length=16, steps=16, block_length=8, temperature=1.0, cache=cache)
        batch = generate(llada, [[40, 41, 42], []], cfg, row_seeds=[6, 5])
        alone = generate(llada, [[]], cfg, row_seeds=[5])
        assert torch.equal(alone.response_ids[0], batch.response_ids[1])
        torch.testing.assert_close(alone.behaviour_logprob[0], batch.behaviour_logprob[1], atol=1e-5, rtol=0)


def test_prompt_longer_than_model_maximum():
    from tracerl.models import build_tiny_model

    model = build_tiny_model("llama", max_position_embeddings=32)
    with pytest.raises(UserError, match="exceeds the model's maximum length 32"):
        generate(model, [[5] * 30], RolloutConfig(max_completion_length=8, steps=8))
