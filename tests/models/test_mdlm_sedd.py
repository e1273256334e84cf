"""MDLM and SEDD load natively from their published layouts onto TraceRL's DiT (tracerl/models/dit.py).

The checkpoints here are written by this file in the published layouts (MDLM: config.json with MDLMConfig keys and
`backbone.*` tensors; SEDD: the hydra config with `tokens` / `graph` / `noise` / `model` and the SEDD module's
tensor names), with a GPT-2-like tokenizer (no mask token) beside them. The reference forward below is the
published DDiT written from its equations in plain float64 torch, straight from the raw tensors.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from tracerl.errors import UserError
from tracerl.models import build_tiny_model, load_model
from tracerl.models.dit import derive_noise_level
from tracerl.models.masks import attention_bias
from tracerl.models.tiny import build_char_tokenizer
from tracerl.rollout.policies import sampling_logprobs

HIDDEN, HEADS, BLOCKS, COND, EPS = 32, 4, 2, 16, 1e-3


# ---- writing published checkpoints -------------------------------------------------------------------------------
def gpt2_like_tokenizer():
    """The char tokenizer without a mask token, as GPT-2's: the model appends the mask as its last id."""
    tok = build_char_tokenizer()
    tok.mask_token = None
    return tok


def dit_tensors(prefix: str, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random published DIT tensors (MDLM prefix "backbone.", SEDD ""); adaLN weights large enough that the
    noise level visibly changes the output."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2, mean=0.0):
        return mean + std * torch.randn(*shape, generator=gen)

    p, D = prefix, HIDDEN
    t = {p + "vocab_embed.embedding": r(vocab, D, std=1.0),
         p + "sigma_map.mlp.0.weight": r(COND, 256), p + "sigma_map.mlp.0.bias": r(COND),
         p + "sigma_map.mlp.2.weight": r(COND, COND, std=0.5), p + "sigma_map.mlp.2.bias": r(COND),
         p + "rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, D // HEADS, 2).float() / (D // HEADS)),
         p + "output_layer.norm_final.weight": r(D, std=0.1, mean=1.0),
         p + "output_layer.linear.weight": r(vocab, D), p + "output_layer.linear.bias": r(vocab),
         p + "output_layer.adaLN_modulation.weight": r(2 * D, COND), p + "output_layer.adaLN_modulation.bias": r(2 * D)}
    for i in range(BLOCKS):
        b = f"{p}blocks.{i}."
        t.update({b + "norm1.weight": r(D, std=0.1, mean=1.0), b + "norm2.weight": r(D, std=0.1, mean=1.0),
                  b + "attn_qkv.weight": r(3 * D, D), b + "attn_out.weight": r(D, D),
                  b + "mlp.0.weight": r(4 * D, D), b + "mlp.0.bias": r(4 * D),
                  b + "mlp.2.weight": r(D, 4 * D, std=0.1), b + "mlp.2.bias": r(D),
                  b + "adaLN_modulation.weight": r(6 * D, COND), b + "adaLN_modulation.bias": r(6 * D)})
    return t


def write_mdlm(path, time_conditioning=False, seed=0, tokenizer=True, **extra) -> dict:
    """kuleshov-group/mdlm-owt's layout at toy width (vocab = tokenizer + the appended mask)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = gpt2_like_tokenizer()
    if tokenizer:
        tok.save_pretrained(path)
    vocab = len(tok) + 1
    save_file(dit_tensors("backbone.", vocab, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["MDLM"], "model_type": "mdlm", "return_dict": False,
              "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                           "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
              "vocab_size": vocab, "model_length": 64, "hidden_dim": HIDDEN, "cond_dim": COND, "n_blocks": BLOCKS,
              "n_heads": HEADS, "dropout": 0.1, "time_conditioning": time_conditioning, "torch_dtype": "float32",
              "transformers_version": "4.38.2", **extra}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "modeling_mdlm.py").write_text("# stands in for MDLM's published remote code (flash-attn)\n")
    return config


def write_sedd(path, seed=1, tokenizer=True, graph="absorb", noise="loglinear", scale_by_sigma=True) -> dict:
    """louaaron/sedd-small's layout at toy width: the hydra config (no model_type), SEDD's own tensor names."""
    path.mkdir(parents=True, exist_ok=True)
    tok = gpt2_like_tokenizer()
    if tokenizer:
        tok.save_pretrained(path)
    save_file(dit_tensors("", len(tok) + 1, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"ngpus": 8, "tokens": len(tok),
              "training": {"batch_size": 512, "accum": 1, "n_iters": 1300001, "weight": "standard"},
              "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
              "graph": {"type": graph, "file": "data", "report_all": False},
              "noise": {"type": noise, "sigma_min": 1e-4, "sigma_max": 20},
              "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
              "model": {"name": "small", "type": "ddit", "hidden_size": HIDDEN, "cond_dim": COND, "length": 64,
                        "n_blocks": BLOCKS, "n_heads": HEADS, "scale_by_sigma": scale_by_sigma, "dropout": 0.1},
              "optim": {"optimizer": "AdamW", "lr": 3e-4}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config


WRITERS = {"mdlm": lambda p: write_mdlm(p, time_conditioning=False), "mdlm_tc": lambda p: write_mdlm(p, True, 2),
           "sedd": write_sedd}
PREFIX = {"mdlm": "backbone.", "mdlm_tc": "backbone.", "sedd": ""}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_published")
    return {name: (write(root / name), root / name)[1] for name, write in WRITERS.items()}


@pytest.fixture(scope="module")
def models(ckpt):
    return {name: load_model(str(path), device="cpu") for name, path in ckpt.items()}


def raw_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def ids_for(model, text: str, masks: int = 0) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"] + [model.mask_token_id] * masks])


# ---- the published forward, from its equations ------------------------------------------------------------------
def dit_reference(t: dict, prefix: str, ids: torch.Tensor, sigma: torch.Tensor,
                  key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """DDiT in float64: c = silu(sigma_map(sigma)); adaLN-modulated pre-LN blocks with rotary full attention;
    modulated output layer. key_padding [B, L] blocks pad keys and counts rotary positions from the first real."""
    t = {k: v.double() for k, v in t.items()}
    p, (B, L), D, hd = prefix, ids.shape, HIDDEN, HIDDEN // HEADS

    def lin(x, name, bias=True):
        return x @ t[name + ".weight"].T + (t[name + ".bias"] if bias else 0)

    def ln(x, w):  # LayerNorm, no bias, eps 1e-5
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    half = 128  # frequency_embedding_size 256
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma.double()[:, None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = F.silu(lin(F.silu(lin(emb, p + "sigma_map.mlp.0")), p + "sigma_map.mlp.2"))[:, None]  # [B, 1, cond]

    pad = torch.ones(B, L, dtype=torch.long) if key_padding is None else key_padding
    pos = (pad.cumsum(-1) - 1).clamp(min=0).double()  # [B, L]
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[..., None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]  # [B, 1, L, hd]

    def rope(u):
        return u * cos + torch.cat([-u[..., hd // 2:], u[..., : hd // 2]], -1) * sin

    blocked = ~pad.bool()[:, None, None, :]  # [B, 1, 1, L]
    x = t[p + "vocab_embed.embedding"][ids]
    for i in range(BLOCKS):
        b = f"{p}blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(c, b + "adaLN_modulation").chunk(6, -1)
        h = ln(x, t[b + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = lin(h, b + "attn_qkv", bias=False).view(B, L, 3, HEADS, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # [B, H, L, hd]
        scores = (rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)).masked_fill(blocked, float("-inf"))
        a = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, L, D)
        x = x + g1 * lin(a, b + "attn_out", bias=False)
        h = ln(x, t[b + "norm2.weight"]) * (1 + sc2) + sh2
        x = x + g2 * lin(gelu_tanh(lin(h, b + "mlp.0")), b + "mlp.2")
    shift, scale = lin(c, p + "output_layer.adaLN_modulation").chunk(2, -1)
    return lin(ln(x, t[p + "output_layer.norm_final.weight"]) * (1 + scale) + shift, p + "output_layer.linear")


def loglinear(t: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(-(1 - EPS) * t)


# ---- loading ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, family, conditioned", [("mdlm", "mdlm", False), ("mdlm_tc", "mdlm", True),
                                                      ("sedd", "sedd", True)])
def test_loads_published_layout_natively(models, name, family, conditioned):
    model = models[name]
    vocab = len(gpt2_like_tokenizer()) + 1
    assert type(model.backbone).__name__ == "DiTForDiffusionLM" and model.family == family
    assert model.mask_token_id == vocab - 1  # MDLM: vocab_size - 1; SEDD: `tokens` (the absorbing state)
    assert model.tokenizer.mask_token_id == vocab - 1 and len(model.tokenizer) == vocab  # "[MASK]" appended
    assert (model.block_size, model.spec.logit_shift, model.spec.time_conditioned) == (None, 0, conditioned)
    assert model.logits(ids_for(model, "abc", masks=2)).shape == (1, 5, vocab)
    assert model.max_length == 64


@pytest.mark.parametrize("name", ["mdlm", "mdlm_tc", "sedd"])
def test_forward_matches_published_equations(models, ckpt, name):
    """The proof that names and math are right: our model == the DDiT equations on the raw published tensors."""
    model, t = models[name], raw_tensors(ckpt[name])
    ids = torch.cat([ids_for(model, "hi there", masks=4), ids_for(model, "a b c de", masks=4)])
    sigma = torch.tensor([0.3, 2.5])
    fed = sigma if model.spec.time_conditioned else torch.zeros(2)  # MDLM time_conditioning=False: sigma -> 0
    with torch.no_grad():
        got = model.logits(ids, noise_level=sigma)
    torch.testing.assert_close(got.double(), dit_reference(t, PREFIX[name], ids, fed), atol=1e-4, rtol=1e-4)


def test_noise_level_changes_the_output_only_when_time_conditioned(models):
    ids = ids_for(models["sedd"], "hello", masks=3)
    with torch.no_grad():
        for name, moves in [("sedd", True), ("mdlm_tc", True), ("mdlm", False)]:
            a = models[name].logits(ids, noise_level=torch.tensor([0.1]))
            b = models[name].logits(ids, noise_level=torch.tensor([3.0]))
            assert ((a - b).abs().max() > 1e-3) == moves, name


def test_derived_noise_level_is_the_loglinear_sigma_of_the_masked_share(models, ckpt):
    """noise_level=None: sigma = -log(1 - (1 - eps) t) with t = masked / real tokens of the row; pads don't count."""
    model = models["sedd"]
    m, pad = model.mask_token_id, model.pad_token_id
    ids = torch.tensor([[pad, pad, 5, 6, m, m, m, m],  # 4 of 6 real tokens masked
                        [5, 6, 7, 8, 9, 10, 11, m]])  # 1 of 8
    key_padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    bias = attention_bias(key_padding, None, torch.float32)
    expected = loglinear(torch.tensor([4 / 6, 1 / 8]))
    sigma = derive_noise_level(ids, bias, m, EPS)  # [B], or [B, L] where pad queries see other keys
    sigma = sigma if sigma.dim() == 2 else sigma[:, None].expand(-1, 8)
    torch.testing.assert_close(sigma[0, 2:], expected[0].expand(6))
    torch.testing.assert_close(sigma[1], expected[1].expand(8))
    torch.testing.assert_close(derive_noise_level(ids[1:], None, m, EPS), expected[1:])
    assert float(derive_noise_level(torch.full((1, 4), m), None, m, EPS)) == pytest.approx(-math.log(EPS), rel=1e-5)
    with torch.no_grad():  # the forward conditions on it: equal to the reference fed the expected sigma
        got = model.logits(ids, key_padding)
    ref = dit_reference(raw_tensors(ckpt["sedd"]), "", ids, expected, key_padding)
    torch.testing.assert_close(got.double()[0, 2:], ref[0, 2:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.double()[1], ref[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mdlm", "sedd"])
def test_bidirectional_and_left_padding_invariant(models, name):
    model = models[name]
    ids = ids_for(model, "hello there", masks=3)
    changed = ids.clone()
    changed[0, 9] = model.tokenizer.convert_tokens_to_ids("z")
    padded = torch.cat([torch.full((1, 3), model.pad_token_id), ids], dim=1)
    key_padding = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        base = model.logits(ids)
        assert (model.logits(changed)[0, 0] - base[0, 0]).abs().max() > 1e-3  # a later token moves position 0
        torch.testing.assert_close(model.logits(padded, key_padding)[:, 3:], base, atol=1e-5, rtol=1e-5)
        keep = torch.tensor([1, 4, 13])
        torch.testing.assert_close(model.logits(ids, keep=keep), base[:, keep], atol=1e-6, rtol=1e-6)


# ---- the published denoising distributions ------------------------------------------------------------------------
def test_mdlm_logits_give_the_subs_distribution(models, ckpt):
    """diffusion.py `_subs_parameterization`: mask column += -1e6, log-normalise; unmasked positions carried over.
    The sampler's log_softmax with [MASK] excluded must be that distribution at every masked position."""
    from tracerl.models.mdlm import subs_log_probs

    model = models["mdlm_tc"]
    ids = torch.cat([ids_for(model, "abc", masks=5), ids_for(model, "xyzw", masks=4)])
    sigma = loglinear(torch.tensor([5 / 8, 4 / 8]))
    raw = dit_reference(raw_tensors(ckpt["mdlm_tc"]), "backbone.", ids, sigma)
    subs = raw.clone()
    subs[:, :, model.mask_token_id] += -1e6
    subs = subs - torch.logsumexp(subs, dim=-1, keepdim=True)
    unmasked = ids != model.mask_token_id
    subs[unmasked] = -1e6
    subs[unmasked, ids[unmasked]] = 0
    with torch.no_grad():
        ours = sampling_logprobs(model.logits(ids), model.mask_token_id)  # what the rollout samples from
    masked = ~unmasked
    assert (ours[masked][:, model.mask_token_id] == float("-inf")).all()  # MDLM's -1e6: never [MASK]
    real = torch.arange(ours.shape[-1]) != model.mask_token_id
    torch.testing.assert_close(ours[masked][:, real].double(), subs[masked][:, real], atol=1e-5, rtol=1e-5)
    helper = subs_log_probs(raw, ids, model.mask_token_id)
    torch.testing.assert_close(helper[masked][:, real], subs[masked][:, real], atol=1e-9, rtol=1e-9)
    assert torch.equal(helper[unmasked].argmax(-1), ids[unmasked]) and (helper[unmasked].max(-1).values == 0).all()


def _sedd_published_log_score(raw, ids, sigma):
    """SEDD.forward after the blocks: scale_by_sigma, then the input token's column set to 0."""
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
    log_score = raw - esigm1.log()[:, None, None] - math.log(raw.shape[-1] - 1)
    return torch.scatter(log_score, -1, ids[..., None], torch.zeros_like(log_score[..., :1]))


def test_sedd_logits_give_the_published_sampler_distribution(models, ckpt):
    """Every SEDD predictor, once a masked position leaves the absorbing state, draws the token with probability
    proportional to the score: the analytic step (staggered_score * transp_transition), the Euler step (reverse
    rate) and the final denoiser. Our logits must give exactly that normalised score."""
    from tracerl.models.sedd import sedd_denoising_log_probs, sedd_log_score

    model = models["sedd"]
    A = model.mask_token_id  # absorbing = V - 1
    ids = torch.cat([ids_for(model, "abc", masks=5), ids_for(model, "wxyz", masks=4)])
    t_now, dt = torch.tensor([0.7, 0.45]), 0.05
    sigma = loglinear(t_now)
    raw = dit_reference(raw_tensors(ckpt["sedd"]), "", ids, sigma)
    score = _sedd_published_log_score(raw, ids, sigma).exp()
    masked = ids == A

    dsigma = (sigma - loglinear(t_now - dt))[:, None]  # analytic predictor (graph_lib.Absorbing)
    stag = score * dsigma.exp()[..., None]
    stag[..., -1] += (1 - dsigma.exp()) * score.sum(-1)
    edge = (-dsigma).exp()[..., None] * F.one_hot(ids, raw.shape[-1]) + torch.where(
        ids == A, 1 - (-dsigma).exp(), 0)[..., None]
    analytic = (stag * edge)[..., :-1]
    rate = score * (F.one_hot(ids, raw.shape[-1]) * -1 + (ids == A)[..., None])  # Euler: transp_rate * score
    euler = rate[..., :-1]
    with torch.no_grad():
        ours = sampling_logprobs(model.logits(ids, noise_level=sigma), A)[..., :-1].exp().double()
    for published in (analytic, euler, score[..., :-1]):  # the denoiser draws from score[..., :-1] too
        torch.testing.assert_close(ours[masked], published[masked] / published[masked].sum(-1, keepdim=True),
                                   atol=1e-5, rtol=1e-5)
    # the helpers reproduce the published log-score and its conditional distribution
    torch.testing.assert_close(sedd_log_score(raw, ids, sigma, scale_by_sigma=True),
                               _sedd_published_log_score(raw, ids, sigma), atol=1e-6, rtol=1e-6)
    helper = sedd_denoising_log_probs(_sedd_published_log_score(raw, ids, sigma), ids, A).exp()
    torch.testing.assert_close(helper[masked][..., :-1], ours[masked], atol=1e-5, rtol=1e-5)
    # the unmask probability of the analytic step with the exact score would be (e^{dsigma} - 1) * sum(score)
    p_stay = (stag * edge)[..., -1][masked]
    torch.testing.assert_close(p_stay, 1 - (dsigma.exp() - 1).expand_as(ids)[masked] * score[..., :-1].sum(-1)[masked])


# ---- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, key", [({"parameterization": "sedd"}, "parameterization"),
                                        ({"cross_attn": True}, "cross_attn"),
                                        ({"backbone": "ar"}, "backbone"),
                                        ({"diffusion": "uniform"}, "diffusion"),
                                        ({"noise": {"type": "cosine"}}, "noise.type"),
                                        ({"block_size": 4}, "block_size")])
def test_mdlm_variants_are_refused_naming_the_key(tmp_path, extra, key):
    write_mdlm(tmp_path, **extra)
    with pytest.raises(UserError, match=key):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("change, key", [({"graph": "uniform"}, "graph.type"), ({"noise": "geometric"}, "noise.type")])
def test_sedd_variants_are_refused_naming_the_key(tmp_path, change, key):
    write_sedd(tmp_path, **change)
    with pytest.raises(UserError, match=key):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("writer, family", [(write_mdlm, "MDLM"), (write_sedd, "SEDD")])
def test_missing_tokenizer_is_refused_and_the_tokenizer_option_supplies_it(tmp_path, writer, family):
    writer(tmp_path / "ckpt", tokenizer=False)
    with pytest.raises(UserError, match=f"{family} checkpoint ships no tokenizer.*tokenizer=DIR"):
        load_model(str(tmp_path / "ckpt"), device="cpu")
    gpt2_like_tokenizer().save_pretrained(tmp_path / "tok")
    model = load_model(str(tmp_path / "ckpt"), device="cpu", tokenizer=str(tmp_path / "tok"))
    assert model.tokenizer.decode(ids_for(model, "ok")[0]) == "ok"
    with pytest.raises(UserError, match="not a directory"):
        load_model(str(tmp_path / "ckpt"), device="cpu", tokenizer=str(tmp_path / "nope"))


def test_tokenizer_that_does_not_fit_is_refused(tmp_path):
    write_mdlm(tmp_path / "m", tokenizer=False)
    write_sedd(tmp_path / "s", tokenizer=False)
    small = build_char_tokenizer()
    small.add_tokens(["<extra1>", "<extra2>"])  # 104 tokens for a 103-entry vocabulary
    small.save_pretrained(tmp_path / "tok")
    for name in ("m", "s"):
        with pytest.raises(UserError, match="tokenizer has 104 tokens"):
            load_model(str(tmp_path / name), device="cpu", tokenizer=str(tmp_path / "tok"))


def test_tokenizer_option_is_refused_for_families_that_ship_one(tmp_path):
    from tests.models.published_checkpoints import write_llada

    write_llada(tmp_path / "llada")
    with pytest.raises(UserError, match="`tokenizer` option"):
        load_model(str(tmp_path / "llada"), device="cpu", tokenizer=str(tmp_path))


def test_mdlm_mask_from_a_tokenizer_that_has_one(tmp_path):
    """MDLM's rule for tokenizers with a mask token (BERT's for LM1B): that token, no appended id."""
    write_mdlm(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] -= 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = raw_tensors(tmp_path)
    for name in ("backbone.vocab_embed.embedding", "backbone.output_layer.linear.weight",
                 "backbone.output_layer.linear.bias"):
        tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    build_char_tokenizer().save_pretrained(tmp_path)  # has <|mask|> (id 2) and covers the vocabulary
    model = load_model(str(tmp_path), device="cpu")
    assert model.mask_token_id == 2 == model.tokenizer.mask_token_id


def test_sedd_absorbing_id_cannot_be_overridden(ckpt):
    with pytest.raises(UserError, match="absorbing state is fixed"):
        load_model(str(ckpt["sedd"]), device="cpu", mask_token_id=3)


# ---- persistence --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mdlm", "mdlm_tc", "sedd"])
def test_save_round_trip_keeps_the_published_layout(models, ckpt, tmp_path, name):
    model = models[name]
    model.save_pretrained(tmp_path)
    assert raw_tensors(tmp_path).keys() == raw_tensors(ckpt[name]).keys()  # published names, rotary buffer too
    original = json.loads((ckpt[name] / "config.json").read_text())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved.get(k) for k in original if k != "torch_dtype"} == {k: v for k, v in original.items()
                                                                          if k != "torch_dtype"}
    if name.startswith("mdlm"):
        assert (tmp_path / "modeling_mdlm.py").is_file()  # the remote code travels with it
    reloaded = load_model(str(tmp_path), device="cpu")  # the tokenizer now sits beside the weights
    ids = ids_for(model, "round trip", masks=3)
    with torch.no_grad():
        assert torch.equal(reloaded.logits(ids), model.logits(ids))
    assert reloaded.mask_token_id == model.mask_token_id and len(reloaded.tokenizer) == len(model.tokenizer)


@pytest.mark.parametrize("arch", ["mdlm", "sedd"])
def test_tiny_cli_writes_the_published_layout(tmp_path, arch):
    from tracerl.cli import main

    assert main(["tiny", str(tmp_path), "--arch", arch, "--hidden-size", "32", "--num-layers", "1"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config.get("model_type") == "mdlm") if arch == "mdlm" else {"tokens", "graph", "model"} <= set(config)
    model = load_model(str(tmp_path), device="cpu")
    tiny = build_tiny_model(arch, hidden_size=32, num_layers=1)
    assert model.family == arch and model.mask_token_id == len(model.tokenizer) - 1
    ids = ids_for(model, "tiny", masks=2)
    with torch.no_grad():
        assert torch.equal(model.logits(ids), tiny.logits(ids))


def test_bf16_load_is_close_to_fp32(models, ckpt):
    bf16 = load_model(str(ckpt["sedd"]), dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = ids_for(bf16, "low precision", masks=3)
    with torch.no_grad():
        ref, low = models["sedd"].logits(ids), bf16.logits(ids).float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


# ---- training machinery -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mdlm", "sedd"])
def test_lora_all_linear_skips_the_output_layer_and_value_model_runs(ckpt, tmp_path, name):
    from tracerl.config import PeftSection
    from tracerl.peft_utils import apply_lora, merge_lora, save_lora
    from tracerl.value import ValueModel

    model = load_model(str(ckpt[name]), device="cpu")
    ids = ids_for(model, "lora", masks=3)
    with torch.no_grad():
        before = model.logits(ids)
    apply_lora(model, PeftSection(r=4, target_modules="all-linear"))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.backbone.named_parameters() if ".lora_A." in n}
    assert not any("output_layer.linear" in n for n in wrapped)  # the vocabulary projection stays plain
    assert any("attn_qkv" in n for n in wrapped) and any("mlp_in" in n for n in wrapped)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), before)  # LoRA B starts at zero
    loss = model.logits(ids).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.backbone.named_parameters() if "lora_B" in n)
    save_lora(model, tmp_path / "adapter")  # peft reads the published config.json: the vocabulary is not "resized"
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert all("lora_" in k for k in f.keys())  # noqa: SIM118 (no vocabulary matrices in the adapter)

    value = ValueModel.from_policy(model)  # a second adapter on the same base
    batch = SimpleNamespace(input_ids=ids, key_padding=torch.ones_like(ids),
                            position_ids=torch.arange(ids.shape[1])[None], visibility=lambda: None)
    values = value(batch)
    assert values.shape == ids.shape and torch.isfinite(values).all()

    merged = merge_lora(model)  # export path: plain weights again, saved in the published layout
    merged.save_pretrained(tmp_path / "merged")
    assert raw_tensors(tmp_path / "merged").keys() == raw_tensors(ckpt[name]).keys()


@pytest.mark.parametrize("name", ["mdlm", "sedd"])
def test_rollout_generate_runs(models, name):
    from tracerl.rollout import RolloutConfig, generate

    model = models[name]
    prompts = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("2+2=", "a longer prompt")]
    cfg = RolloutConfig(max_completion_length=8, steps=8, block_length=4, remasking="low_confidence",
                        temperature=1.0, seed=0)
    traj = generate(model, prompts, cfg)
    assert traj.response_ids.shape == (2, 8) and traj.num_forwards >= 8
    assert not (traj.response_ids == model.mask_token_id).any() and (traj.unmask_step >= 0).all()
    assert model.tokenizer.decode(traj.response_ids[0])  # decodes with the loaded tokenizer


# ---- GPU (runs where CUDA is present; skipped elsewhere) ---------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mdlm_tc", "sedd"])
def test_loads_onto_cuda_in_bf16(models, ckpt, name):
    gpu = load_model(str(ckpt[name]), device="cuda", dtype="auto")  # auto = bf16 on a GPU
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    assert all(b.device.type == "cuda" for b in gpu.backbone.buffers())  # rotary frequencies rebuilt there
    ids = torch.cat([ids_for(gpu, "on the device", masks=3)] * 2)
    with torch.no_grad():
        ref, got = models[name].logits(ids), gpu.logits(ids.cuda()).float().cpu()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_a_published_checkpoint_without_a_tokenizer_exports_and_generates_from_the_cli(tmp_path, capsys):
    """MDLM / SEDD ship no tokenizer: `tracerl generate --tokenizer DIR` names one, and `tracerl export` of a LoRA
    run finds the one the run saved beside its adapter."""
    from tracerl.cli import main
    from tracerl.config import PeftSection
    from tracerl.peft_utils import apply_lora, save_lora

    write_mdlm(tmp_path / "base", tokenizer=False)
    gpt2_like_tokenizer().save_pretrained(tmp_path / "tok")
    assert main(["generate", "--model", str(tmp_path / "base"), "--prompt", "ab", "--max-completion-length", "4",
                 "--device", "cpu"]) == 2
    assert "ships no tokenizer" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "base"), "--tokenizer", str(tmp_path / "tok"), "--prompt", "ab",
                 "--max-completion-length", "4", "--device", "cpu"]) == 0
    model = apply_lora(load_model(str(tmp_path / "base"), device="cpu", tokenizer=str(tmp_path / "tok")),
                       PeftSection(r=2))
    save_lora(model, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
                 "--output", str(tmp_path / "merged")]) == 0
    merged = load_model(str(tmp_path / "merged"), device="cpu")
    assert merged.tokenizer.decode(ids_for(merged, "ok")[0]) == "ok"
