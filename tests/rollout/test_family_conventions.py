"""Each family is rolled out by its own authors' rules where those differ for the same settings. References are
written from the published code: LLaDA generate.py (confidence = softmax(logits)[x0] at temperature 1), Dream's
generation_utils.py (top_p_logits before top_k_logits; int(masked * (1 - s/t)) tokens per step on
linspace(1, 1e-3, steps + 1)), SDAR generate.py / dLLM-RL's JetEngine (counts split over the whole block_length,
conf > threshold with the step's count as the floor), Fast-dLLM and dLLM-RL's LLaDA / Dream rollouts (conf >=
threshold, at least one)."""

import math

import pytest

import torch

from tests.conftest import encode
from tracerl.models import build_tiny_model
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.policies import choose_commits, convention_for, dream_counts, sampling_logprobs


def probs_of(values: list[float]) -> torch.Tensor:
    """Logits [1, V + 1] whose softmax over the first V columns is `values`; the last column is [MASK] (excluded)."""
    return torch.tensor([[math.log(v) for v in values] + [0.0]])


def test_top_p_keeps_the_token_that_completes_the_mass_and_dream_filters_top_p_first():
    mask = 4
    # Dream's / SDAR's top_p_logits drop a token only when the mass before it EXCEEDS top_p: 0.75 keeps all three
    kept = sampling_logprobs(probs_of([0.5, 0.25, 0.25]), mask_token_id=3, top_p=0.75).exp()[0, :3]
    torch.testing.assert_close(kept, torch.tensor([0.5, 0.25, 0.25]))
    logits = probs_of([0.4, 0.3, 0.2, 0.1])
    # Dream: top-p 0.5 on the full distribution keeps {0.4, 0.3} (0.7 before 0.2), then top-k 2 keeps both
    dream = sampling_logprobs(logits, mask, top_k=2, top_p=0.5, top_p_first=True).exp()[0, :4]
    torch.testing.assert_close(dream, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    # SDAR: top-k 2 first gives [4/7, 3/7]; then 4/7 > 0.5 lies before the second token, which goes
    sdar = sampling_logprobs(logits, mask, top_k=2, top_p=0.5).exp()[0, :4]
    torch.testing.assert_close(sdar, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_the_threshold_rule_of_each_family():
    conf = torch.tensor([[0.9, 0.5, 0.3, 0.1]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    # Fast-dLLM / dLLM-RL: conf >= T commits; SDAR: conf > T
    assert choose_commits(conf, masked, None, 0.9).tolist() == [[True, False, False, False]]
    assert choose_commits(conf, masked, None, 0.9, strict=True).tolist() == [[True, False, False, False]]
    assert choose_commits(conf, masked, None, 0.5).tolist() == [[True, True, False, False]]
    assert choose_commits(conf, masked, None, 0.5, strict=True).tolist() == [[True, False, False, False]]
    # nothing above T: LLaDA / Dream commit the best one, SDAR the step's scheduled count (here 2)
    assert choose_commits(conf, masked, None, 0.95).tolist() == [[True, False, False, False]]
    assert choose_commits(conf, masked, torch.tensor([2]), 0.95, strict=True).tolist() == [[True, True, False, False]]
    assert [convention_for(4, 0).name, convention_for(None, 1).name, convention_for(None, 0).name] == [
        "sdar", "dream", "llada"]


def dream_reference(num_masked: int, steps: int) -> list[int]:
    """Dream's _sample: the tokens committed at each step (0 included) of one block of `num_masked` masks."""
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    counts = []
    for i in range(steps):
        t, s = timesteps[i], timesteps[i + 1]
        n = int(num_masked * (1 - s / t)) if i < steps - 1 else num_masked
        counts.append(n)
        num_masked -= n
    return counts


def test_dream_commits_its_own_schedule():
    assert dream_reference(16, 16)[:2] == [0, 1] and sum(dream_reference(16, 16)) == 16
    remaining, got = 32, []
    for i in range(16):
        got.append(int(dream_counts(torch.tensor([remaining]), i, 16)))
        remaining -= got[-1]
    assert got == dream_reference(32, 16) and got != [2] * 16  # LLaDA's even split would be 2 per step
    base = build_tiny_model("qwen2", seed=0)
    model = DiffusionLM(base.backbone, base.tokenizer, FamilySpec("tracerl_tiny", base.mask_token_id, logit_shift=1))
    for steps in (16, 6):
        traj = generate(model, encode(model, ["hello"]), RolloutConfig(max_completion_length=16, steps=steps,
                                                                        remasking="entropy", temperature=0.0))
        committed = traj.unmask_step[0][traj.action_mask[0]]
        counts = torch.bincount(committed, minlength=int(committed.max()) + 1).tolist()
        assert not (traj.response_ids[0] == model.eos_token_id).any()  # (EOS padding would change the counts)
        assert counts == [n for n in dream_reference(16, steps) if n]  # a step that commits nothing is no step
        assert traj.num_forwards == steps  # ... but runs its forward, as Dream's loop does


def dream_origin_reference(steps: int) -> list[float]:
    """Dream's _sample with alg="origin": p_transfer = 1 - s / t if i < steps - 1 else 1, each masked position
    independently (torch.rand(...) < p_transfer), on timesteps = linspace(1, 1e-3, steps + 1)."""
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    return [float(1 - timesteps[i + 1] / timesteps[i]) if i < steps - 1 else 1.0 for i in range(steps)]


def test_dream_origin_unmasks_each_position_with_dreams_transfer_probability(monkeypatch):
    """Each forward sees the state before its step: the share of the still-masked positions it unmasks must be
    Binomial(remaining, p_i) with Dream's p_i, and the last step commits all that is left (no extra forward)."""
    base = build_tiny_model("qwen2", seed=0)
    model = DiffusionLM(base.backbone, base.tokenizer, FamilySpec("tracerl_tiny", base.mask_token_id, logit_shift=1))
    real, eos, mask = model.logits, model.eos_token_id, model.mask_token_id
    masked_seen: list[int] = []

    def counting(input_ids, *args, **kwargs):  # EOS never (padding would end rows early)
        masked_seen.append(int((input_ids == mask).sum()))
        return real(input_ids, *args, **kwargs).index_fill(-1, torch.tensor([eos]), -1e4)

    monkeypatch.setattr(model, "logits", counting)
    rows, L, steps = 96, 16, 6
    traj = generate(model, encode(model, ["hello"]) * rows, RolloutConfig(
        max_completion_length=L, steps=steps, remasking="dream_origin", temperature=1.0, seed=1))
    assert traj.action_mask.all() and (traj.unmask_step >= 0).all()
    p = dream_origin_reference(steps)
    assert p[0] == pytest.approx(0.1665, abs=1e-6) and p[-1] == 1.0  # t_1 = 1 - 0.999 / 6
    seen = masked_seen + [0] * (steps + 1 - len(masked_seen))  # (all rows done before the grid's end)
    assert len(masked_seen) <= steps and seen[0] == rows * L
    for i in range(steps - 1):
        n, committed = seen[i], seen[i] - seen[i + 1]
        assert abs(committed - n * p[i]) <= 5 * math.sqrt(n * p[i] * (1 - p[i])) + 1e-9, (i, committed, n, p[i])
    assert seen[steps - 1] > 0  # the last step had masks left, and committed all of them (checked above)
    # a row's rollout depends only on its seed, not on the batch
    seeds, prompts = [5, 6, 7], encode(model, ["hello", "ab", "xyz"])
    cfg = RolloutConfig(max_completion_length=L, steps=steps, remasking="dream_origin", temperature=1.0)
    batch = generate(model, prompts, cfg, row_seeds=seeds)
    alone = generate(model, prompts[1:2], cfg, row_seeds=seeds[1:2])
    assert torch.equal(alone.unmask_step[0], batch.unmask_step[1])
    assert torch.equal(alone.response_ids[0], batch.response_ids[1])


def test_llada_scores_its_choice_at_temperature_one():
    """With top_k 1 the draw is the argmax at any temperature; LLaDA then ranks the positions by the temperature-1
    probability of that argmax, exactly as greedy decoding does (the filtered distribution would tie them at 1)."""
    model = build_tiny_model("llama", seed=0)
    prompts = encode(model, ["hello", "abc"])
    base = dict(max_completion_length=16, steps=16, block_length=8, seed=0)
    greedy = generate(model, prompts, RolloutConfig(**base, temperature=0.0))
    filtered = generate(model, prompts, RolloutConfig(**base, temperature=0.5, top_k=1))
    assert torch.equal(filtered.unmask_step, greedy.unmask_step)
    assert torch.equal(filtered.response_ids, greedy.response_ids)


def test_sdar_splits_the_whole_block_in_the_first_block():
    """A first block that shares the prompt's tail has fewer masks than block_length; SDAR's counts still split
    block_length over the block's steps: with 3 steps per block of 4 ([2, 1, 1]) a 2-mask first block commits
    both at its first step (its own split, [1, 1], would take two)."""
    model = build_tiny_model("qwen3", block_size=4, seed=0)
    prompt = encode(model, ["abcdef"])  # 6 tokens: the first response block holds 2 positions
    cfg = dict(max_completion_length=8, steps=6, temperature=0.0)  # 2 response blocks' worth: 3 steps per block
    traj = generate(model, prompt, RolloutConfig(**cfg))
    assert traj.block_offset.tolist() == [2] and traj.unmask_step[0, :2].tolist() == [0, 0]
    full_block = traj.unmask_step[0, 2:6]
    assert sorted(torch.bincount(full_block - full_block.min()).tolist(), reverse=True) == [2, 1, 1]
    # the dynamic threshold keeps the step's count as its floor: where nothing reaches 0.99 (a random tiny model),
    # it commits exactly the static schedule; Fast-dLLM's "at least one" would spend a step per token
    dyn = generate(model, prompt, RolloutConfig(**cfg, threshold=0.99))
    assert torch.equal(dyn.unmask_step, traj.unmask_step)


def eos_prone(arch: str, block_size: int | None = None) -> DiffusionLM:
    """A tiny model whose EOS row is scaled up, so greedy rollouts commit EOS mid-response."""
    model = build_tiny_model(arch, block_size=block_size, seed=0)
    with torch.no_grad():
        model.backbone.lm_head.weight[model.eos_token_id] *= 6
    return model


@torch.no_grad()
def llada_greedy(model: DiffusionLM, prompt: list[int], length: int, block: int) -> list[int]:
    """LLaDA's generate.py, greedy, one token per step, semi-AR blocks; nothing special happens after an EOS."""
    mask = model.mask_token_id
    x = torch.tensor([prompt + [mask] * length])
    P = len(prompt)
    for b in range(length // block):
        for _ in range(block):
            logits = model.logits(x).float()
            logits[..., mask] = float("-inf")  # (ours: [MASK] is never a choice)
            p = logits.softmax(-1)
            conf, x0 = p.max(-1)
            eligible = torch.zeros_like(x, dtype=torch.bool)
            eligible[:, P + b * block:P + (b + 1) * block] = True
            conf = conf.masked_fill(~(eligible & (x == mask)), float("-inf"))
            i = int(conf.argmax())
            x[0, i] = x0[0, i]
    return x[0, P:].tolist()


def test_after_eos_denoise_is_llada_generate_and_fill_pads_without_forwards():
    model = eos_prone("llama")
    prompt = encode(model, ["hello"])
    base = dict(max_completion_length=16, steps=16, block_length=8, temperature=0.0)
    denoised = generate(model, prompt, RolloutConfig(**base, after_eos="denoise"))
    assert denoised.action_mask.all() and denoised.num_forwards == 16
    assert denoised.response_ids[0].tolist() == llada_greedy(model, prompt[0], 16, 8)
    eos = model.eos_token_id
    assert (denoised.response_ids[0] == eos).any()  # the case under test: an EOS mid-response
    filled = generate(model, prompt, RolloutConfig(**base))  # after_eos: fill, the default
    first = int((filled.response_ids[0] == eos).nonzero()[0])
    pad = ~filled.action_mask[0]
    assert pad.any() and (filled.response_ids[0][pad] == eos).all() and not pad[:first + 1].any()
    assert filled.num_forwards < 16  # the padding took no forward


def test_after_eos_finish_block_denoises_the_eos_block_then_pads():
    """SDAR's generate / JetEngine stop after the block that holds the EOS."""
    model = eos_prone("qwen3", block_size=4)
    prompt = encode(model, ["abcdefgh"])  # 8 tokens: whole blocks of 4 from the response's first position
    traj = generate(model, prompt, RolloutConfig(max_completion_length=16, steps=16, temperature=0.0,
                                                 after_eos="finish_block"))
    ids, acted = traj.response_ids[0], traj.action_mask[0]
    first = int((ids == model.eos_token_id).nonzero()[0])
    block_end = (first // 4 + 1) * 4
    assert acted[:block_end].all() and not acted[block_end:].any() and block_end < 16
    assert (ids[block_end:] == model.eos_token_id).all()
    assert traj.unmask_step[0, block_end:].max() == traj.unmask_step[0, :block_end].max()  # at the last step


def test_a_dream_row_with_nothing_to_commit_is_the_same_alone_and_in_a_batch():
    """EOS padding can leave a row so few masks that Dream's count for a step is 0 while a batch-mate's is not: the
    row must sit that step out (no draw from its seed, no cache state of its own) exactly as it does alone."""
    base = eos_prone("qwen2")
    model = DiffusionLM(base.backbone, base.tokenizer, FamilySpec("tracerl_tiny", base.mask_token_id, logit_shift=1))
    prompts = encode(model, ["zebra", "hello", "what is 2+2", "xyz"])
    for extra in (dict(temperature=1.0), dict(temperature=0.0, cache="dual", cache_refresh=3),
                  dict(temperature=0.0, cache="elastic")):
        cfg = RolloutConfig(max_completion_length=16, steps=16, block_length=16, **extra)
        batch = generate(model, prompts, cfg, row_seeds=[11, 12, 13, 14])
        for n, prompt in enumerate(prompts):
            alone = generate(model, [prompt], cfg, row_seeds=[11 + n])
            assert torch.equal(alone.response_ids[0], batch.response_ids[n]), (extra, n)
            assert torch.equal(alone.unmask_step[0], batch.unmask_step[n]), (extra, n)
            torch.testing.assert_close(alone.behaviour_logprob[0], batch.behaviour_logprob[n], atol=1e-5, rtol=0)
