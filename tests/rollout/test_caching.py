"""Approximate caches for full attention (Fast-dLLM's prefix and dual cache): exact where the math says so, an
honest record of the cached forwards otherwise, the gap measured and corrected by the trainer, bad combinations
refused."""

import pytest
import torch

from tests.conftest import encode
from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig
from tracerl.errors import UserError
from tracerl.models import build_tiny_model
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.caching import ApproximateCache, cache_settings
from tracerl.trainer import RLTrainer

PROMPTS = ["hello", "a longer prompt x", "ab"]  # left padding in the batch


def dream_like() -> DiffusionLM:
    base = build_tiny_model("qwen2", seed=2)
    return DiffusionLM(base.backbone, base.tokenizer, FamilySpec("tracerl_tiny", base.mask_token_id, logit_shift=1))


@pytest.fixture(scope="module")
def models():
    return {"llada": build_tiny_model("llama", seed=0), "dream": dream_like()}


@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("mode,horizon", [("prefix", None), ("prefix", 100), ("dual", None), ("dual", 0), ("dual", 5),
                                          ("dual", 100)])
def test_a_cached_step_with_nothing_changed_is_the_exact_forward(models, kind, mode, horizon):
    """Right after the refresh nothing is stale: the cached window must give the exact logits of the block (the
    Dream shift included: the block's first token is read from the output before it)."""
    model = models[kind]
    ids = encode(model, PROMPTS)
    width = max(len(i) for i in ids)
    x = torch.full((3, width + 16), model.mask_token_id)
    attn = torch.zeros_like(x)
    for n, seq in enumerate(ids):
        x[n, width - len(seq):width] = torch.tensor(seq)
        attn[n, width - len(seq):] = 1
    s, e = width + 4, width + 8  # the second semi-AR block of 4
    x[:, width:s] = torch.randint(10, 90, (3, 4))  # a committed first block
    exact = model.logits(x, attn)[:, s:e]
    cache = ApproximateCache(model, mode, horizon)
    torch.testing.assert_close(cache.refresh(x, attn, s, e), exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.step(x, attn), exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_step_per_block_is_exact(models, mode):
    """With one step per block every forward is a refresh: the cached rollout is the exact one."""
    model = models["llada"]
    base = dict(max_completion_length=16, steps=4, block_length=4, temperature=1.0)
    cached = generate(model, encode(model, PROMPTS), RolloutConfig(**base, cache=mode), row_seeds=[1, 2, 3])
    exact = generate(model, encode(model, PROMPTS), RolloutConfig(**base), row_seeds=[1, 2, 3])
    assert torch.equal(cached.response_ids, exact.response_ids)
    torch.testing.assert_close(cached.behaviour_logprob, exact.behaviour_logprob, atol=1e-5, rtol=0)
    assert cached.num_forwards == exact.num_forwards == 4


@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_refresh_at_every_step_is_exact(models, kind, mode):
    """cache_refresh 1 makes every forward a full one: the rollout (several steps per block) is the exact one."""
    model = models[kind]
    base = dict(max_completion_length=16, steps=16, block_length=8, temperature=1.0)
    cached = generate(model, encode(model, PROMPTS), RolloutConfig(**base, cache=mode, cache_refresh=1),
                      row_seeds=[1, 2, 3])
    exact = generate(model, encode(model, PROMPTS), RolloutConfig(**base), row_seeds=[1, 2, 3])
    assert torch.equal(cached.response_ids, exact.response_ids)
    torch.testing.assert_close(cached.behaviour_logprob, exact.behaviour_logprob, atol=1e-5, rtol=0)


def _refreshes(model, cfg: RolloutConfig) -> list[int]:
    """The step indices (0-based, in order) whose forward was a cache refresh."""
    calls, step = [], [0]
    refresh = ApproximateCache.refresh

    def spy(self, *args):
        calls.append(step[0])
        step[0] += 1
        return refresh(self, *args)

    def spy_step(self, *args):
        step[0] += 1
        return original_step(self, *args)

    original_step = ApproximateCache.step
    ApproximateCache.refresh, ApproximateCache.step = spy, spy_step
    try:
        generate(model, encode(model, PROMPTS), cfg, row_seeds=[1, 2, 3])
    finally:
        ApproximateCache.refresh, ApproximateCache.step = refresh, original_step
    return calls


def test_the_refresh_interval_counts_steps_inside_each_block(models):
    """8 steps per block of 8 (1 token per step): refreshes at each block's first step, then every R-th."""
    base = dict(max_completion_length=16, steps=16, block_length=8, temperature=1.0, cache="dual")
    assert _refreshes(models["llada"], RolloutConfig(**base)) == [0, 8]
    assert _refreshes(models["llada"], RolloutConfig(**base, cache_refresh=3)) == [0, 3, 6, 8, 11, 14]
    assert _refreshes(models["llada"], RolloutConfig(**base, cache_refresh=8)) == [0, 8]


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_a_dual_cache_whose_horizon_covers_the_suffix_is_the_prefix_cache(models, kind):
    """With a horizon past the frame's end nothing after the block is served stale: dual == prefix, token for
    token and log-prob for log-prob."""
    model = models[kind]
    base = dict(max_completion_length=16, steps=16, block_length=4, temperature=1.0)
    dual = generate(model, encode(model, PROMPTS), RolloutConfig(**base, cache="dual", cache_horizon=16),
                    row_seeds=[1, 2, 3])
    prefix = generate(model, encode(model, PROMPTS), RolloutConfig(**base, cache="prefix"), row_seeds=[1, 2, 3])
    assert torch.equal(dual.response_ids, prefix.response_ids)
    torch.testing.assert_close(dual.behaviour_logprob, prefix.behaviour_logprob, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["prefix", "dual", "dual:h4:r3", "prefix:h2:r5"])
def test_a_cached_rollout_is_batch_invariant(models, name):
    model = models["dream"]
    cfg = RolloutConfig(max_completion_length=16, steps=16, block_length=8, temperature=1.0, **cache_settings(name))
    ids = encode(model, PROMPTS)
    batch = generate(model, ids, cfg, row_seeds=[5, 6, 7])
    for row in range(3):
        alone = generate(model, [ids[row]], cfg, row_seeds=[5 + row])
        assert torch.equal(alone.response_ids[0], batch.response_ids[row])
        torch.testing.assert_close(alone.behaviour_logprob[0], batch.behaviour_logprob[row], atol=1e-5, rtol=0)


def test_the_trainer_measures_the_gap_and_corrects_it(tmp_path, models):
    """Several steps per block: the recorded log-probs are the cached forwards', the replay the exact model's. The
    first epoch logs the gap; with rollout_correction=tis each token's loss is weighted by min(pi_old / pi_sampler,
    C), whose mean it logs."""
    def reward(prompts, completions, **kw):
        return [sum(map(ord, c)) % 13 / 13 for c in completions]

    rows = [{"prompt": p} for p in PROMPTS]
    metrics = {}
    for cache, correction in [("none", "none"), ("dual", "none"), ("dual", "tis")]:
        cfg = RLConfig(
            rollout=RolloutConfig(max_completion_length=16, steps=16, block_length=4, temperature=1.0, cache=cache),
            algorithm=AlgorithmConfig(rollout_correction=correction, tis_cap=2.0),
            optimizer=OptimizerConfig(learning_rate=1e-3),
            trainer=TrainerConfig(max_steps=1, num_generations=2, per_device_train_batch_size=6,
                                  output_dir=str(tmp_path / cache / correction)),
        )
        metrics[cache, correction] = RLTrainer(cfg, build_tiny_model("llama", seed=0), reward, rows).train_step()
    exact = metrics["none", "none"]
    assert exact["rollout/logprob_gap_mean"] < 1e-5 and exact["rollout/greedy_mismatch"] == 0.0
    cached = metrics["dual", "none"]
    assert cached["rollout/logprob_gap_mean"] > 1e-4 and cached["rollout/ratio_dev_mean"] > 1e-4
    assert "rollout/is_weight_mean" not in cached
    corrected = metrics["dual", "tis"]
    assert 0.0 < corrected["rollout/is_weight_mean"] <= 2.0
    assert corrected["rollout/logprob_gap_mean"] == pytest.approx(cached["rollout/logprob_gap_mean"])


def test_bad_combinations_are_refused_naming_the_keys(block_model, tmp_path):
    with pytest.raises(UserError, match="rollout.cache=prefix is for full-attention models"):
        generate(block_model, encode(block_model, ["hi"]), RolloutConfig(max_completion_length=8, steps=8,
                                                                        cache="prefix"))
    mdlm = build_tiny_model("mdlm", seed=0)
    with pytest.raises(UserError, match="rollout.cache=dual needs a transformers backbone"):
        generate(mdlm, encode(mdlm, ["hi"]), RolloutConfig(max_completion_length=8, steps=8, cache="dual"))
    with pytest.raises(UserError, match="rollout.cache and rollout.remasking"):
        RolloutConfig(cache="dual", remasking="mdlm_ancestral").validate()
    with pytest.raises(UserError, match="cache_refresh=2 needs rollout.cache prefix or dual"):
        RolloutConfig(cache_refresh=2).validate()
    with pytest.raises(UserError, match="cache_refresh=0 needs"):
        RolloutConfig(cache="dual", cache_refresh=0).validate()
    with pytest.raises(UserError, match="cache_horizon=-1 needs"):
        RolloutConfig(cache="dual", cache_horizon=-1).validate()
    with pytest.raises(UserError, match="cache_horizon=8 needs rollout.cache prefix or dual"):
        RolloutConfig(cache_horizon=8).validate()
    from pathlib import Path

    from tracerl.recipe import load_config

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "repeat_tracerl.yaml")
    with pytest.raises(UserError, match=r"^rollout\.cache_refresh=4 needs rollout\.cache prefix or dual"):
        load_config(recipe, ["rollout.cache_refresh=4"])
    with pytest.raises(UserError, match="algorithm.rollout_correction=tis needs algorithm.estimator=trace"):
        AlgorithmConfig(rollout_correction="tis", old_logprobs="rollout").validate()
    # and through the CLI: exit 2 before training starts
    from tests.test_cli_train import cli

    tiny = tmp_path / "tiny"
    out = cli("tiny", str(tiny), "--arch", "qwen3", "--block-size", "4")
    assert out.returncode == 0, out.stderr
    out = cli("train", "recipes/cpu_quickstart.yaml", f"model.path={tiny}", "rollout.cache=prefix",
              "rollout.block_length=null", f"trainer.output_dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "rollout.cache=prefix is for full-attention models" in out.stderr


def test_cache_names_spell_the_settings():
    assert cache_settings("none") == {"cache": "none"}
    assert cache_settings("dual:h8:r4") == {"cache": "dual", "cache_horizon": 8, "cache_refresh": 4}
    assert cache_settings("prefix:r2") == {"cache": "prefix", "cache_refresh": 2}
    with pytest.raises(ValueError, match="mode must be one of none, prefix, dual"):
        cache_settings("exact")
    with pytest.raises(ValueError, match="got 'x8'"):
        cache_settings("dual:x8")
