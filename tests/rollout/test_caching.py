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
from tracerl.rollout.caching import ApproximateCache
from tracerl.trainer import RLTrainer

PROMPTS = ["hello", "a longer prompt x", "ab"]  # left padding in the batch


def dream_like() -> DiffusionLM:
    base = build_tiny_model("qwen2", seed=2)
    return DiffusionLM(base.backbone, base.tokenizer, FamilySpec("tracerl_tiny", base.mask_token_id, logit_shift=1))


@pytest.fixture(scope="module")
def models():
    return {"llada": build_tiny_model("llama", seed=0), "dream": dream_like()}


@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("mode,horizon", [("prefix", None), ("prefix", 100), ("dual", None)])
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


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_cached_rollout_is_batch_invariant(models, mode):
    model = models["dream"]
    cfg = RolloutConfig(max_completion_length=16, steps=16, block_length=8, temperature=1.0, cache=mode)
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
