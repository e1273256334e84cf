"""The published MDLM / SEDD samplers as rollout policies (rollout.remasking mdlm_ancestral, sedd_euler,
sedd_analytic), checked against the equations of /work/notes/mdlm_sedd_spec.md section 4, written out here:

    grid     t_i = 1 - i (1 - 1e-5) / steps (i < steps), dt = (1 - 1e-5) / steps, restarting in every block
    sigma    sigma(t) = -log(1 - (1 - 1e-3) t),  g(t) = (1 - 1e-3) / (1 - (1 - 1e-3) t)
    MDLM     P(unmask at step i | masked) = dt / t_i                 => each position unmasks at step i w.p. dt
    SEDD     log_s = raw - log(e^sigma - 1) - log(V - 1), S = sum_{y != A} exp(log_s[y])
             Euler: P = dt g(t) S;  analytic: P = (e^{sigma(t) - sigma(t - dt)} - 1) S;  both clamped to [0, 1]
    final    a forward at t = 1e-5 commits what is left (MDLM argmax, SEDD sampled)

The tiny DiTs get re-drawn weights large enough that the noise level visibly changes the output, so a replay fed the
wrong sigma fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import encode
from tracerl.errors import UserError
from tracerl.models import build_tiny_model
from tracerl.rollout import RolloutConfig, Trajectory, generate, published
from tracerl.rollout.policies import sampling_logprobs

NOISE_EPS, GRID_EPS = 1e-3, 1e-5
PROMPTS = ["1+2=", "a longer prompt", "x"]  # unequal lengths: left padding


# ---- models --------------------------------------------------------------------------------------------------------
def sharpened(arch: str, seed: int, time_conditioning: bool | None = None):
    """A tiny MDLM / SEDD whose sigma embedding and adaLN matter (the default init is nearly sigma-blind)."""
    model = build_tiny_model(arch, seed=seed)
    if time_conditioning is not None:  # an MDLM trained with time_conditioning: true
        model.backbone.config.time_conditioning = time_conditioning
        model.spec.time_conditioned = time_conditioning
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if p.dim() != 2:
                continue
            fan_in = 1 if "vocab_embed" in name else p.shape[1]
            gain = 1.0 if "vocab_embed" in name else 0.6 if "output_layer.linear" in name else 1.5  # logits ~N(0, 1)
            p.copy_(torch.randn(p.shape, generator=gen) * gain / fan_in**0.5)
    return model


@pytest.fixture(scope="module")
def dits():
    return {"mdlm": sharpened("mdlm", 0), "mdlm_tc": sharpened("mdlm", 1, time_conditioning=True),
            "sedd": sharpened("sedd", 2)}


def sigma(t):
    return -torch.log1p(-(1 - NOISE_EPS) * torch.as_tensor(t, dtype=torch.float64))


def grid(steps: int) -> tuple[torch.Tensor, float]:
    """t_0 .. t_{steps-1} of torch.linspace(1, 1e-5, steps + 1), and dt."""
    return torch.linspace(1, GRID_EPS, steps + 1, dtype=torch.float64)[:-1], (1 - GRID_EPS) / steps


def grid_index(traj: Trajectory, steps_per_block: int) -> torch.Tensor:
    """[N, L] which grid step (0..steps-1, steps = the final denoise) committed each action, read back from the
    recorded sigma: t = (1 - e^-sigma) / (1 - 1e-3), i = (1 - t) / dt."""
    level = traj.noise_level.gather(1, traj.unmask_step.clamp(min=0)).double()  # [N, L]
    t = -torch.expm1(-level) / (1 - NOISE_EPS)
    _, dt = grid(steps_per_block)
    final = torch.isclose(level, sigma(GRID_EPS).float().double(), rtol=1e-3)
    return torch.where(final, steps_per_block, ((1 - t) / dt).round().long())


def sedd_log_score(raw: torch.Tensor, ids: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """SEDD.forward (scale_by_sigma, then the input token's column := 0), from model/transformer.py."""
    raw = raw.double()
    esigm1 = torch.where(sig < 0.5, torch.expm1(sig), sig.exp() - 1).double()
    log_score = raw - esigm1.log()[:, None, None] - math.log(raw.shape[-1] - 1)
    return torch.scatter(log_score, -1, ids[..., None], torch.zeros_like(log_score[..., :1]))


def published_unmask_probability(predictor: str, raw, ids, t: float, dt: float) -> torch.Tensor:
    """1 - P(stay absorbed) of SEDD's predictors as sampling.py builds their categorical input (A = last index)."""
    sig = sigma(torch.full((ids.shape[0],), t))
    score = sedd_log_score(raw, ids, sig).exp()  # [N, L, V]
    onehot = F.one_hot(ids, raw.shape[-1]).double()
    if predictor == "euler":  # onehot(x) + dt g(t) rate, rate = transp_rate(x) * score with rate[x] = -sum others
        rate = score * (ids == raw.shape[-1] - 1)[..., None]
        rate[..., -1] = 0
        rate[..., -1] = -rate.sum(-1)
        g = (1 - NOISE_EPS) / (1 - (1 - NOISE_EPS) * t)
        probs = onehot + dt * g * rate
    else:  # analytic: staggered_score * transp_transition
        dsig = (sig - sigma(torch.full((ids.shape[0],), t - dt)))[:, None, None]
        stag = score * dsig.exp()
        stag[..., -1] += (1 - dsig.exp()[..., 0]) * score.sum(-1)
        edge = (-dsig).exp() * onehot + torch.where(ids == raw.shape[-1] - 1, 1 - (-dsig[..., 0]).exp(), 0)[..., None]
        probs = stag * edge
    return (1 - probs[..., -1]).clamp(0, 1)


def replay_errors(model, traj: Trajectory, noise: str = "recorded", top_k: int = 0, top_p: float = 1.0) -> float:
    """Rerun every step on the state before it, fed the recorded sigma, and compare the committed tokens' log-probs.
    noise="derived" feeds nothing (the network derives sigma from the masked share) to show the record matters."""
    worst = 0.0
    for step in range(traj.num_steps):
        level = None
        if traj.noise_level is not None and noise == "recorded":
            level = torch.nan_to_num(traj.noise_level[:, step], nan=0.0)  # NaN: the row has no such step
        with torch.no_grad():
            logits = model.logits(traj.state_before(step), traj.attention_mask(), noise_level=level)
        lp = sampling_logprobs(logits[:, traj.prompt_length:], traj.mask_token_id, traj.temperature or 1.0, top_k,
                               top_p)
        lp = lp.gather(-1, traj.response_ids[..., None]).squeeze(-1)
        sel = (traj.unmask_step == step) & traj.action_mask
        if sel.any():
            worst = max(worst, (lp[sel] - traj.behaviour_logprob[sel]).abs().max().item())
    return worst


def constant_score(model, monkeypatch, log_c: float) -> list[torch.Tensor]:
    """Replace the network by raw logits log_c everywhere (EOS never: no padding distorts the counts); returns the
    list the sigmas fed to it land in."""
    fed: list[torch.Tensor] = []
    V, eos = model.backbone.config.vocab_size, model.eos_token_id

    def logits(input_ids, attention_mask=None, keep=None, noise_level=None):
        fed.append(noise_level)
        out = torch.full((input_ids.shape[0], len(keep), V), log_c)
        out[..., eos] = -1e4
        return out

    monkeypatch.setattr(model, "logits", logits)
    return fed


def binomial_ok(count: float, n: int, p: float, z: float = 5.0) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1e-9


# ---- (a) the per-step unmask rule ----------------------------------------------------------------------------------
@pytest.mark.parametrize("block_length", [16, 8])
def test_mdlm_ancestral_unmasks_L_dt_per_step(dits, monkeypatch, block_length):
    """Each position unmasks at grid step i with probability t_i * dt / t_i = dt (uniform over the block's steps)."""
    model = dits["mdlm_tc"]
    real = model.logits
    eos = model.eos_token_id

    def no_eos(*args, **kwargs):  # keep every position an action: EOS padding would end rows early
        return real(*args, **kwargs).index_fill(-1, torch.tensor([eos]), -1e4)

    monkeypatch.setattr(model, "logits", no_eos)
    rows, L, steps = 128, 16, 8
    per_block = steps // (L // block_length)
    traj = generate(model, encode(model, ["1+2="]) * rows, RolloutConfig(
        max_completion_length=L, steps=steps, block_length=block_length, remasking="mdlm_ancestral", seed=3))
    assert traj.action_mask.all()
    index = grid_index(traj, per_block)  # [N, L]
    _, dt = grid(per_block)
    for b in range(L // block_length):
        cols = slice(b * block_length, (b + 1) * block_length)
        counts = torch.bincount(index[:, cols].flatten(), minlength=per_block + 1)
        n = rows * block_length
        assert all(binomial_ok(counts[i].item(), n, dt) for i in range(per_block)), counts.tolist()
        assert counts[per_block].item() <= 2  # P(still masked at 1e-5) = 1e-5 per position
    # the grid restarts per block: block 1 starts only once block 0 is done, again at t = 1
    if block_length < L:
        first, second = traj.unmask_step[:, :block_length], traj.unmask_step[:, block_length:]
        assert (first.max(1).values < second.min(1).values).all()


@pytest.mark.parametrize("predictor", ["sedd_euler", "sedd_analytic"])
@pytest.mark.parametrize("c", [0.7, 3.0])  # a score mass below the exact one (slower), and above it (clamped at 1)
def test_sedd_unmask_rule_follows_the_score_mass(dits, monkeypatch, predictor, c):
    """With raw logits log(c) everywhere, S = c (V - 2) / ((V - 1)(e^sigma - 1)) at every masked position (EOS
    excluded), so each step's probability is known: P(unmask at step i) = prod_{j<i} (1 - p_j) p_i, and the final
    denoise takes the rest."""
    model = dits["sedd"]
    fed = constant_score(model, monkeypatch, math.log(c))
    rows, L, steps = 128, 16, 4
    traj = generate(model, encode(model, ["1+2="]) * rows, RolloutConfig(
        max_completion_length=L, steps=steps, remasking=predictor, seed=5))
    V, A = model.backbone.config.vocab_size, model.mask_token_id
    times, dt = grid(steps)
    raw = torch.full((1, 1, V), math.log(c))
    raw[..., model.eos_token_id] = -1e4
    p = [published_unmask_probability(predictor.removeprefix("sedd_"), raw, torch.tensor([[A]]), float(t), dt).item()
         for t in times]
    expected = [math.prod(1 - q for q in p[:i]) * p[i] for i in range(steps)] + [math.prod(1 - q for q in p)]
    counts = torch.bincount(grid_index(traj, steps).flatten(), minlength=steps + 1)
    for i, q in enumerate(expected):
        assert binomial_ok(counts[i].item(), rows * L, q), (counts.tolist(), [rows * L * q for q in expected])
    # the network was fed sigma(t_i) for every row, and sigma(1e-5) for the final denoise when anything was left
    want = sigma(torch.cat([times, torch.tensor([GRID_EPS], dtype=torch.float64)]))
    for f in fed:
        assert f.shape == (rows,) and torch.isclose(f.double()[:, None], want[None], rtol=1e-6).any(1).all()


@pytest.mark.parametrize("predictor", ["sedd_euler", "sedd_analytic"])
def test_sedd_probability_is_the_published_one_on_a_real_score(dits, predictor):
    model = dits["sedd"]
    A = model.mask_token_id
    ids = torch.tensor(encode(model, ["ab" + " " * 6, "wxyz" + " " * 4]))
    ids[0, 2:], ids[1, 4:] = A, A  # masked tails
    for t, dt in [(1.0, 0.25), (0.6, 0.1), (0.05, 0.0499)]:
        level = sigma(torch.full((2,), t)).float()
        with torch.no_grad():
            raw = model.logits(ids, noise_level=level)
        ours = published.unmask_probability(predictor, t, dt, NOISE_EPS, raw, ids, A, scale_by_sigma=True)
        want = published_unmask_probability(predictor.removeprefix("sedd_"), raw, ids, t, dt)
        masked = ids == A
        torch.testing.assert_close(ours[masked].double(), want[masked], atol=1e-5, rtol=1e-4)


# ---- (b) the final denoise -----------------------------------------------------------------------------------------
def test_final_denoise_leaves_nothing_masked_and_mdlm_takes_the_argmax(dits, monkeypatch):
    """Cut MDLM's grid to its first half (t = 1, 0.75 of a 4-step grid): about half the positions are still masked
    at its end, and the final forward at t = 1e-5 commits them greedily."""
    model = dits["mdlm_tc"]
    monkeypatch.setattr(published, "time_grid", lambda steps: ([1.0, 0.75], (1 - GRID_EPS) / 4))
    traj = generate(model, encode(model, PROMPTS * 4), RolloutConfig(max_completion_length=16, steps=4,
                                                                     remasking="mdlm_ancestral", seed=0))
    assert not (traj.response_ids == model.mask_token_id).any() and (traj.unmask_step >= 0).all()
    final = torch.isclose(traj.noise_level.gather(1, traj.unmask_step), sigma(GRID_EPS).float()) & traj.action_mask
    assert final.sum() > 30  # about half of the positions EOS padding leaves as actions
    for step in traj.unmask_step[final].unique().tolist():
        with torch.no_grad():
            logits = model.logits(traj.state_before(step), traj.attention_mask(), noise_level=torch.nan_to_num(
                traj.noise_level[:, step]))[:, traj.prompt_length:]
        greedy = sampling_logprobs(logits, model.mask_token_id).argmax(-1)
        here = final & (traj.unmask_step == step)
        assert torch.equal(traj.response_ids[here], greedy[here])
    assert replay_errors(model, traj) < 1e-5


@pytest.mark.parametrize("predictor", ["sedd_euler", "sedd_analytic"])
def test_final_denoise_resolves_a_small_score_mass(dits, monkeypatch, predictor):
    model = dits["sedd"]
    constant_score(model, monkeypatch, math.log(0.05))  # p ~ 0.05 dt / t: most positions reach the final denoise
    traj = generate(model, encode(model, PROMPTS * 4), RolloutConfig(max_completion_length=16, steps=4,
                                                                     remasking=predictor, seed=1))
    assert not (traj.response_ids == model.mask_token_id).any() and traj.action_mask.all()
    final = torch.isclose(traj.noise_level.gather(1, traj.unmask_step), sigma(GRID_EPS).float())
    assert final.float().mean() > 0.5
    assert len(set(traj.response_ids[final].tolist())) > 20  # sampled from the (uniform) score, not an argmax


# ---- (c) replay exactness ------------------------------------------------------------------------------------------
REPLAY_CASES = [
    ("mdlm", "mdlm_ancestral", {}), ("mdlm_tc", "mdlm_ancestral", {}), ("sedd", "sedd_euler", {}),
    ("sedd", "sedd_analytic", {}), ("sedd", "mdlm_ancestral", {}),
    ("sedd", "sedd_euler", dict(temperature=0.7, top_k=20, top_p=0.9)),
    ("mdlm_tc", "mdlm_ancestral", dict(temperature=0.0)),
    ("mdlm_tc", "dream_origin", {}), ("sedd", "dream_origin", dict(temperature=0.7, top_k=20, top_p=0.9)),
]


@pytest.mark.parametrize("name,remasking,extra", REPLAY_CASES)
@pytest.mark.parametrize("block_length", [16, 8])
def test_replay_reproduces_every_step(dits, name, remasking, extra, block_length):
    model = dits[name]
    cfg = RolloutConfig(max_completion_length=16, steps=8, block_length=block_length, remasking=remasking, seed=0,
                        **{"temperature": 1.0, **extra})
    traj = generate(model, encode(model, PROMPTS * 2), cfg)
    assert replay_errors(model, traj, top_k=cfg.top_k, top_p=cfg.top_p) < 1e-5
    if model.spec.time_conditioned:
        # the record is what makes it exact: sigma(t_i) per row step, not the sigma of the masked share
        S = traj.num_steps
        assert traj.noise_level.shape == (6, S) and traj.noise_level.dtype == torch.float32
        has_step = torch.arange(S)[None, :] < traj.steps_per_sequence()[:, None]
        assert torch.isnan(traj.noise_level).eq(~has_step).all()
        assert replay_errors(model, traj, "derived", cfg.top_k, cfg.top_p) > 1e-3
    else:
        assert traj.noise_level is None


@pytest.mark.parametrize("kind", ["full", "block"])
def test_mdlm_ancestral_runs_on_other_families(full_model, block_model, kind):
    """The ancestral rule is model-free: LLaDA-style and block-diffusion (KV cache) models sample with it too."""
    model = full_model if kind == "full" else block_model
    cfg = RolloutConfig(max_completion_length=16, steps=8, block_length=8 if kind == "full" else None,
                        remasking="mdlm_ancestral", temperature=1.0, seed=0)
    traj = generate(model, encode(model, PROMPTS), cfg)
    assert traj.noise_level is None and (traj.unmask_step >= 0).all()
    assert replay_errors(model, traj) < 1e-5


# ---- (d) batch invariance ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,remasking", [("mdlm_tc", "mdlm_ancestral"), ("sedd", "sedd_euler"),
                                            ("sedd", "sedd_analytic")])
def test_a_prompt_samples_the_same_alone_and_in_a_batch(dits, name, remasking):
    model = dits[name]
    seeds = [11, 22, 33]
    cfg = RolloutConfig(max_completion_length=16, steps=8, block_length=8, remasking=remasking, temperature=1.0)
    ids = encode(model, PROMPTS)
    batch = generate(model, ids, cfg, row_seeds=seeds)
    reordered = generate(model, ids[::-1], cfg, row_seeds=seeds[::-1])
    for row in range(len(PROMPTS)):
        alone = generate(model, [ids[row]], cfg, row_seeds=[seeds[row]])
        for other, r in ((batch, row), (reordered, len(PROMPTS) - 1 - row)):
            assert torch.equal(alone.response_ids[0], other.response_ids[r])
            assert torch.equal(alone.unmask_step[0], other.unmask_step[r])
            assert torch.equal(alone.action_mask[0], other.action_mask[r])
            torch.testing.assert_close(alone.behaviour_logprob[0], other.behaviour_logprob[r], atol=1e-5, rtol=0)
            S = alone.num_steps
            torch.testing.assert_close(alone.noise_level[0], other.noise_level[r, :S], equal_nan=True)
            assert torch.isnan(other.noise_level[r, S:]).all()


# ---- (e) refusals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("remasking", ["mdlm_ancestral", "sedd_euler", "sedd_analytic"])
def test_threshold_is_refused_naming_both_keys(dits, remasking):
    cfg = RolloutConfig(max_completion_length=8, steps=8, remasking=remasking, threshold=0.9)
    with pytest.raises(UserError, match=rf"remasking.*{remasking}.*rollout\.threshold"):
        generate(dits["sedd"], encode(dits["sedd"], ["hi"]), cfg)
    from tracerl.recipe import load_config

    with pytest.raises(UserError, match=r"^rollout\.remasking.*rollout\.threshold=0\.9"):
        load_config(None, [f"rollout.remasking={remasking}", "rollout.threshold=0.9"])


@pytest.mark.parametrize("remasking", ["sedd_euler", "sedd_analytic"])
@pytest.mark.parametrize("name", ["mdlm", "llama"])
def test_sedd_samplers_need_a_sedd_model(dits, full_model, remasking, name):
    model = full_model if name == "llama" else dits[name]
    family = model.family
    with pytest.raises(UserError, match=rf"rollout\.remasking={remasking}.*'sedd'.*{family!r}"):
        generate(model, encode(model, ["hi"]), RolloutConfig(max_completion_length=8, steps=8, remasking=remasking))


def test_recipe_accepts_the_published_samplers():
    from tracerl.recipe import load_config

    for remasking in published.SAMPLERS:
        assert load_config(None, [f"rollout.remasking={remasking}"]).rollout.remasking == remasking


# ---- the record travels --------------------------------------------------------------------------------------------
def test_noise_level_survives_select_concat_save_load(dits, tmp_path):
    model = dits["sedd"]
    cfg = RolloutConfig(max_completion_length=8, steps=8, remasking="sedd_euler", seed=0)
    short = generate(model, encode(model, PROMPTS), RolloutConfig(**{**cfg.__dict__, "steps": 2}))
    long = generate(model, encode(model, PROMPTS), cfg)
    assert short.num_steps < long.num_steps
    joined = Trajectory.concat([short, long])
    assert joined.noise_level.shape == (6, long.num_steps)
    torch.testing.assert_close(joined.select([3, 4, 5]).noise_level, long.noise_level, equal_nan=True)
    assert torch.isnan(joined.noise_level[:3, short.num_steps:]).all()
    joined.save(tmp_path / "t.pt")
    back = Trajectory.load(tmp_path / "t.pt")
    torch.testing.assert_close(back.noise_level, joined.noise_level, equal_nan=True)
    with pytest.raises(ValueError, match="with and without"):
        Trajectory.concat([long, generate(model, encode(model, PROMPTS), RolloutConfig(max_completion_length=8,
                                                                                       steps=8, seed=0))])


def test_older_trajectory_formats(dits, tmp_path):
    traj = generate(dits["mdlm"], encode(dits["mdlm"], PROMPTS), RolloutConfig(max_completion_length=8, steps=4))
    data = {f: getattr(traj, f) for f in traj.__dataclass_fields__ if f != "noise_level"}
    torch.save({"format": "tracerl.Trajectory/2", **data}, tmp_path / "v2.pt")
    assert Trajectory.load(tmp_path / "v2.pt").noise_level is None  # format 2 fed no sigma
    torch.save({"format": "tracerl.Trajectory/1", **data}, tmp_path / "v1.pt")
    with pytest.raises(ValueError, match="format 'tracerl.Trajectory/1'.*record the rollout again"):
        Trajectory.load(tmp_path / "v1.pt")
