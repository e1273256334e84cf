"""Elastic-Cache (rollout.cache: elastic): exact where the math says so, the published drift statistic and trigger,
batch invariance, composition with the sampler's options, bad settings refused."""

import math

import pytest
import torch

from tests.conftest import encode
from tracerl.errors import UserError
from tracerl.models import build_tiny_model
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.caching import cache_settings
from tracerl.rollout.elastic import ElasticCache, attention_drift

PROMPTS = ["hello", "a longer prompt x", "ab"]  # left padding in the batch


def tiny(arch: str, shift: int) -> DiffusionLM:
    base = build_tiny_model(arch, seed=2)
    model = DiffusionLM(base.backbone, base.tokenizer, FamilySpec("tracerl_tiny", base.mask_token_id,
                                                                  logit_shift=shift))
    return model.eval()


def frame(model: DiffusionLM, committed: int = 4, length: int = 16) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts + `committed` random tokens + masks: (x [3, T], attn [3, T], response start)."""
    ids = encode(model, PROMPTS)
    width = max(len(i) for i in ids)
    x = torch.full((3, width + length), model.mask_token_id)
    attn = torch.zeros_like(x)
    for n, seq in enumerate(ids):
        x[n, width - len(seq):width] = torch.tensor(seq)
        attn[n, width - len(seq):] = 1
    x[:, width:width + committed] = torch.randint(10, 90, (3, committed), generator=torch.Generator().manual_seed(0))
    return x, attn, width


@pytest.mark.parametrize("arch, shift", [("llama", 0), ("qwen2", 1), ("qwen3", 0)])
@torch.no_grad()
def test_the_first_forward_and_an_unchanged_requery_are_the_exact_forward(arch, shift):
    """Step 0 runs every position through our own layer loop: it must be transformers' forward (left padding, GQA,
    Qwen3's q/k norms, Dream's shift). Querying the same frame again finds every cache current: the query rows'
    logits are exact again and no layer sees drift."""
    model = tiny(arch, shift)
    x, attn, start = frame(model)
    s, e = start + 4, start + 8
    exact = model.logits(x, attn)[:, s:e]
    cache = ElasticCache(model, window=4)
    torch.testing.assert_close(cache.block_logits(x, attn, s, e), exact, atol=1e-5, rtol=0)
    full_after_first = cache.full_passes
    assert full_after_first == cache.layer_passes == 3 * len(cache.layers)
    torch.testing.assert_close(cache.block_logits(x, attn, s, e), exact, atol=1e-5, rtol=0)
    assert cache.full_passes == full_after_first  # cosine 1 everywhere: nothing triggered


def test_the_drift_statistic_is_the_published_cosine_across_heads():
    """Worked by hand. Row 0: two heads, one tracked token, keys (a, b, padding). Before: head 0 (1/2, 1/2),
    head 1 (1, 0); now: head 0 (1/2, 1/2), head 1 (0, 1). Across the heads, key a compares (1/2, 1) with (1/2, 0):
    (1/4) / (sqrt(5)/2 * 1/2) = 1/sqrt(5); key b the mirror image, also 1/sqrt(5). The padding key is left out of
    the mean (the authors, at batch 1, have none). Row 1 tracks nothing: no drift is measurable, 1.0."""
    past = torch.tensor([[[[0.5, 0.5, 0.0]], [[1.0, 0.0, 0.0]]], [[[0.2, 0.8, 0.0]], [[0.3, 0.7, 0.0]]]])
    now = torch.tensor([[[[0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0]]], [[[0.9, 0.1, 0.0]], [[0.3, 0.7, 0.0]]]])
    tracked = torch.tensor([[True], [False]])
    keys = torch.tensor([[True, True, False], [True, True, False]])
    sim = attention_drift(past, now, tracked, keys)
    torch.testing.assert_close(sim, torch.tensor([1 / math.sqrt(5), 1.0]))


@torch.no_grad()
def test_a_drift_below_gamma_recomputes_every_later_layer():
    """The trigger as published: a layer whose similarity falls below gamma makes layers l + 1 .. L - 1 recompute
    every position. Cosine similarities lie in [0, 1] for attention weights, so gamma 0 never triggers and a gamma
    above 1 always triggers at the first layer: L - 1 full layers per row at each later step."""
    model = tiny("llama", 0)
    x, attn, start = frame(model)
    s, e = start + 4, start + 8
    counts = {}
    for gamma in (0.0, 1.5):
        cache = ElasticCache(model, window=4, gamma=gamma)
        cache.block_logits(x, attn, s, e)
        x2 = x.clone()
        x2[:, s] = 42  # one committed token
        cache.block_logits(x2, attn, s + 1, e)
        counts[gamma] = cache.full_passes - 3 * len(cache.layers)
    L = len(cache.layers)
    assert L >= 2 and counts == {0.0: 0, 1.5: 3 * (L - 1)}


@pytest.mark.parametrize("extra", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9),
                                   dict(temperature=1.0, threshold=0.3), dict(temperature=1.0, remasking="random"),
                                   dict(temperature=1.0, cache_window=12, cache_gamma=0.5)])
@pytest.mark.parametrize("shift", [0, 1])
def test_a_row_alone_is_the_row_in_a_padded_batch(extra, shift):
    """Drift, tracking and refresh are decided per row and padding is nobody's key: a row's cached rollout does
    not depend on the rows it is batched with, under every sampler option."""
    model = tiny("qwen2" if shift else "llama", shift)
    cfg = RolloutConfig(max_completion_length=24, steps=12, block_length=8, cache="elastic", **extra)
    batch = generate(model, encode(model, PROMPTS), cfg, row_seeds=[7, 8, 9])
    assert not (batch.response_ids == model.mask_token_id).any()
    for row in range(3):
        alone = generate(model, encode(model, PROMPTS[row:row + 1]), cfg, row_seeds=[7 + row])
        assert torch.equal(alone.response_ids[0], batch.response_ids[row])
        torch.testing.assert_close(alone.behaviour_logprob[0], batch.behaviour_logprob[row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [0, 1])
@torch.no_grad()
def test_a_row_that_finished_its_block_keeps_its_state_while_the_others_denoise(shift):
    """With the dynamic threshold rows finish a block after different numbers of forwards; a finished row sits the
    batch's next forwards out. Its caches, tracked tokens and last-seen frame must not move meanwhile, or its next
    block starts from a state it never had alone (a sharpened head makes the threshold commit several tokens at
    once, so the rows really do finish apart)."""
    model = tiny("qwen2" if shift else "llama", shift)
    model.backbone.lm_head.weight.mul_(30)
    prompts = encode(model, ["xy", "a much longer prompt here"])
    cfg = RolloutConfig(max_completion_length=24, steps=24, block_length=8, temperature=1.0, threshold=0.5,
                        cache="elastic")
    batch = generate(model, prompts, cfg, row_seeds=[1, 2])
    alone = [generate(model, prompts[r:r + 1], cfg, row_seeds=[1 + r]) for r in range(2)]
    # the forwards each row spends on each block (its distinct commit steps there) differ: some row idled
    spent = [[len(t.unmask_step[0, b:b + 8].unique()) for b in range(0, 24, 8)] for t in alone]
    assert spent[0] != spent[1]
    for r in range(2):
        assert torch.equal(alone[r].response_ids[0], batch.response_ids[r])
        torch.testing.assert_close(alone[r].behaviour_logprob[0], batch.behaviour_logprob[r], atol=1e-5, rtol=0)


def test_one_step_per_block_in_the_first_block_is_exact():
    """A rollout of one block committed in one step is the step-0 full forward alone: exactly the uncached one."""
    model = tiny("llama", 0)
    cfg = dict(max_completion_length=8, steps=1, block_length=8, temperature=1.0)
    cached = generate(model, encode(model, PROMPTS), RolloutConfig(**cfg, cache="elastic"), row_seeds=[1, 2, 3])
    exact = generate(model, encode(model, PROMPTS), RolloutConfig(**cfg), row_seeds=[1, 2, 3])
    assert torch.equal(cached.response_ids, exact.response_ids)
    torch.testing.assert_close(cached.behaviour_logprob, exact.behaviour_logprob, atol=1e-5, rtol=0)


def test_lora_applies_inside_the_cached_layers():
    """The projections are called as modules, so a peft-wrapped model's adapters are in the cached forward too."""
    from tracerl.config import PeftSection
    from tracerl.peft_utils import apply_lora

    model = apply_lora(build_tiny_model("llama", seed=0), PeftSection(r=4, lora_alpha=8))
    for name, param in model.backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-zero adapter changes the logits
    model.eval()
    x, attn, start = frame(model)
    with torch.no_grad():
        exact = model.logits(x, attn)[:, start + 4:start + 8]
        got = ElasticCache(model, window=4).block_logits(x, attn, start + 4, start + 8)
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=0)


def test_bad_settings_are_refused_naming_the_keys():
    model = tiny("llama", 0)
    with pytest.raises(UserError, match=r"^cache_window=4 is shorter than the block .*\(block_length=8\)"):
        generate(model, encode(model, ["hi"]), RolloutConfig(max_completion_length=16, steps=8, block_length=8,
                                                              cache="elastic", cache_window=4))
    from pathlib import Path

    from tracerl.recipe import load_config

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "repeat_tracerl.yaml")
    with pytest.raises(UserError, match=r"^rollout\.cache_window=4 is shorter than the block"):
        load_config(recipe, ["rollout.cache=elastic", "rollout.cache_window=4", "rollout.block_length=32"])
    cfg = load_config(recipe, ["rollout.cache=elastic", "rollout.cache_window=64", "rollout.cache_gamma=0.8"])
    assert (cfg.rollout.cache, cfg.rollout.cache_window, cfg.rollout.cache_gamma) == ("elastic", 64, 0.8)
    with pytest.raises(UserError, match="cache_window=16 needs rollout.cache elastic"):
        RolloutConfig(cache="dual", cache_window=16).validate()
    with pytest.raises(UserError, match="cache_gamma=-0.1 needs rollout.cache elastic and a value in"):
        RolloutConfig(cache="elastic", cache_gamma=-0.1).validate()
    with pytest.raises(UserError, match="cache_gamma=nan needs"):
        RolloutConfig(cache="elastic", cache_gamma=float("nan")).validate()
    with pytest.raises(UserError, match="cache_horizon=8 needs rollout.cache prefix or dual"):
        RolloutConfig(cache="elastic", cache_horizon=8).validate()
    block = build_tiny_model("qwen3", seed=0, block_size=4)
    with pytest.raises(UserError, match="rollout.cache=elastic is for full-attention models"):
        generate(block, encode(block, ["hi"]), RolloutConfig(max_completion_length=8, steps=8, cache="elastic"))


def test_the_short_names_of_the_benchmarks():
    assert cache_settings("elastic:w64:g0.8") == {"cache": "elastic", "cache_window": 64, "cache_gamma": 0.8}
    with pytest.raises(ValueError, match="knobs are"):
        cache_settings("elastic:gx")


def test_the_drift_statistic_is_torch_cosine_similarity_across_heads():
    """attention_drift writes the cosine out for speed; it must stay torch's F.cosine_similarity(dim=1), the call
    the authors make, on softmax weights of every shape the cache produces."""
    g = torch.Generator().manual_seed(0)
    for sharpness, keys in ((1.0, 9), (12.0, 300)):  # peaked: most keys get ~1e-30 from every head
        past = torch.softmax(sharpness * torch.randn(3, 4, 2, keys, generator=g), -1)
        now = torch.softmax(sharpness * torch.randn(3, 4, 2, keys, generator=g), -1)
        ones = torch.ones(3, 2, dtype=torch.bool), torch.ones(3, keys, dtype=torch.bool)
        reference = torch.nn.functional.cosine_similarity(past, now, dim=1).mean((1, 2))
        torch.testing.assert_close(attention_drift(past, now, *ones), reference, atol=1e-6, rtol=0)


def test_the_trainer_measures_and_corrects_the_elastic_gap(tmp_path):
    """The trajectory records the cached forwards' log-probs: the replay of the exact model differs, the trainer
    logs the gap and TIS weights the loss, as for the other caches."""
    from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig
    from tracerl.trainer import RLTrainer

    def reward(prompts, completions, **kw):
        return [sum(map(ord, c)) % 13 / 13 for c in completions]

    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=16, steps=16, block_length=4, temperature=1.0, cache="elastic"),
        algorithm=AlgorithmConfig(rollout_correction="tis", tis_cap=2.0),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        trainer=TrainerConfig(max_steps=1, num_generations=2, per_device_train_batch_size=6,
                              output_dir=str(tmp_path / "run")),
    )
    metrics = RLTrainer(cfg, build_tiny_model("llama", seed=0), reward, [{"prompt": p} for p in PROMPTS]).train_step()
    assert metrics["rollout/logprob_gap_mean"] > 1e-4
    assert 0.0 < metrics["rollout/is_weight_mean"] <= 2.0


def test_the_drift_over_the_keys_compares_each_heads_distribution():
    """axis 'keys', worked by hand on the same weights as above. Row 0, head 0: (1/2, 1/2) against itself, 1;
    head 1: (1, 0) against (0, 1), 0; the mean over heads is 1/2 (the padding key is zero in both and changes
    nothing). Row 1 tracks nothing: 1.0."""
    past = torch.tensor([[[[0.5, 0.5, 0.0]], [[1.0, 0.0, 0.0]]], [[[0.2, 0.8, 0.0]], [[0.3, 0.7, 0.0]]]])
    now = torch.tensor([[[[0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0]]], [[[0.9, 0.1, 0.0]], [[0.3, 0.7, 0.0]]]])
    tracked = torch.tensor([[True], [False]])
    keys = torch.tensor([[True, True, False], [True, True, False]])
    torch.testing.assert_close(attention_drift(past, now, tracked, keys, axis="keys"), torch.tensor([0.5, 1.0]))


def test_the_drift_axis_is_a_setting():
    model = tiny("llama", 0)
    cfg = RolloutConfig(max_completion_length=16, steps=8, block_length=8, temperature=0.0, cache="elastic",
                        cache_drift="keys", cache_gamma=1.5)  # always triggers: every later layer recomputed
    traj = generate(model, encode(model, PROMPTS), cfg)
    assert not (traj.response_ids == model.mask_token_id).any()
    assert cache_settings("elastic:dkeys") == {"cache": "elastic", "cache_drift": "keys"}
    with pytest.raises(UserError, match="cache_drift='rows' needs rollout.cache elastic and one of heads, keys"):
        RolloutConfig(cache="elastic", cache_drift="rows").validate()
    with pytest.raises(UserError, match="cache_drift='keys' needs rollout.cache elastic"):
        RolloutConfig(cache="dual", cache_drift="keys").validate()
