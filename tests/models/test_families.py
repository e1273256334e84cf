"""Published checkpoint layouts (LLaDA, Dream, SDAR/TraDo) load natively onto transformers' own classes.

Every checkpoint here is written by tests/models/published_checkpoints.py in the family's published layout (config
keys, tensor names, tokenizer with the family's mask token), so these tests exercise exactly the path a user's
downloaded directory takes, without a download and without the families' remote code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from tests.models.published_checkpoints import EMBED_ROWS, save_tensors, write_dream, write_llada, write_sdar
from tracerl.errors import UserError
from tracerl.models import load_model
from tracerl.models.masks import attention_bias

WRITERS = {"llada": write_llada, "dream": write_dream, "sdar": write_sdar}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family -> directory of a freshly written published-layout checkpoint."""
    root = tmp_path_factory.mktemp("published")
    return {name: (write(root / name), root / name)[1] for name, write in WRITERS.items()}


@pytest.fixture(scope="module")
def models(ckpt):
    return {name: load_model(str(path), device="cpu") for name, path in ckpt.items()}


def ids_for(model, text: str, batch: int = 1) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]] * batch)


def safetensor_names(path) -> set[str]:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


# ---- loading --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, cls, mask_token, block, shift", [
    ("llada", "LlamaForCausalLM", "<|mdm_mask|>", None, 0),
    ("dream", "Qwen2ForCausalLM", "<|mask|>", None, 1),
    ("sdar", "Qwen3ForCausalLM", "<|MASK|>", 4, 0),
])
def test_loads_natively_onto_transformers_class(models, ckpt, family, cls, mask_token, block, shift):
    model = models[family]
    config = json.loads((ckpt[family] / "config.json").read_text())
    assert type(model.backbone).__name__ == cls  # transformers' own class, not the checkpoint's remote code
    assert model.family == config["model_type"]
    assert model.mask_token_id == config["mask_token_id"] == model.tokenizer.convert_tokens_to_ids(mask_token)
    assert (model.block_size, model.spec.logit_shift) == (block, shift)
    assert model.logits(ids_for(model, "abc")).shape == (1, 3, EMBED_ROWS)  # padded embedding rows = logit width
    assert model.tokenizer.chat_template  # the chat template travels with the checkpoint's tokenizer


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def llada_reference(t: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward written from its paper/code, straight from the published tensors, in float64:
    RMSNorm pre-norm blocks, rotate-half RoPE over the full head, GQA, SwiGLU silu(ff_proj) * up_proj, no mask."""
    t = {k: v.double() for k, v in t.items()}
    B, L = ids.shape
    d, H, KV, eps = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["rms_norm_eps"]
    hd = d // H

    def lin(x, name):
        return x @ t[name + ".weight"].T + t.get(name + ".bias", torch.zeros(()).double())

    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd)
    angles = torch.arange(L).double()[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # [L, hd]

    def rope(x):  # [B, heads, L, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()

    x = t["model.transformer.wte.weight"][ids]  # [B, L, d]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = _rms(x, t[p + "attn_norm.weight"], eps)
        q = rope(lin(h, p + "q_proj").view(B, L, H, hd).transpose(1, 2))
        k = rope(lin(h, p + "k_proj").view(B, L, KV, hd).transpose(1, 2)).repeat_interleave(H // KV, dim=1)
        v = lin(h, p + "v_proj").view(B, L, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v  # bidirectional: no mask
        x = x + lin(att.transpose(1, 2).reshape(B, L, d), p + "attn_out")
        h = _rms(x, t[p + "ff_norm.weight"], eps)
        x = x + lin(F.silu(lin(h, p + "ff_proj")) * lin(h, p + "up_proj"), p + "ff_out")
    x = _rms(x, t["model.transformer.ln_f.weight"], eps)
    head = t.get("model.transformer.ff_out.weight", t["model.transformer.wte.weight"])  # weight_tying: wte
    return x @ head.T


@pytest.mark.parametrize("tying, qkv_bias", [(False, False), (True, True)])
def test_llada_matches_plain_torch_reference(tmp_path, tying, qkv_bias):
    """The proof that the weight mapping is right: our loaded model == LLaDA's math on the raw tensors."""
    cfg = write_llada(tmp_path, weight_tying=tying, qkv_bias=qkv_bias, seed=3)
    model = load_model(str(tmp_path), device="cpu")
    assert type(model.backbone).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    ids = torch.randint(6, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = llada_reference(load_file(str(tmp_path / "model.safetensors")), cfg, ids)
    with torch.no_grad():
        got = model.logits(ids)
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


# ---- attention policy and alignment ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_full_attention_families_are_bidirectional(models, family):
    model = models[family]
    ids = ids_for(model, "the cat sat")
    changed = ids.clone()
    changed[0, -1] = model.tokenizer.convert_tokens_to_ids("z")
    with torch.no_grad():
        before, after = model.logits(ids), model.logits(changed)
    position = 1 if model.spec.logit_shift else 0  # Dream's aligned position 0 is raw output 0, also affected
    assert (before[0, position] - after[0, position]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_left_padding_does_not_change_real_positions(models, family):
    model = models[family]
    ids = ids_for(model, "hello there")
    pad = model.pad_token_id
    padded = torch.cat([torch.full((1, 3), pad), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    # A shifted family's aligned position 0 has no previous output (it reuses raw 0; padded, it reads a pad's
    # output): the first prompt token is never predicted, so only positions from 1 on have to agree.
    first = model.spec.logit_shift
    with torch.no_grad():
        torch.testing.assert_close(model.logits(padded, mask)[:, 3 + first:], model.logits(ids)[:, first:],
                                   atol=1e-5, rtol=1e-5)


def test_dream_logits_are_shifted_raw_qwen2_outputs(models):
    """Dream's raw output at i predicts token i+1: aligned[i] = raw[i-1] (and aligned[0] = raw[0])."""
    model = models["dream"]
    ids = ids_for(model, "shift me", batch=2)
    with torch.no_grad():
        raw = model.backbone(input_ids=ids, attention_mask=attention_bias(torch.ones_like(ids), None, model.dtype),
                             position_ids=torch.arange(ids.shape[1])[None].expand_as(ids)).logits
        aligned = model.logits(ids)
        keep = torch.tensor([0, 3, 5])
        kept = model.logits(ids, keep=keep)
    expected = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
    torch.testing.assert_close(aligned, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kept, expected[:, keep], atol=1e-6, rtol=1e-6)


def test_sdar_is_block_causal(models):
    model = models["sdar"]  # block_size 4 from config.json
    ids = ids_for(model, "abcdefghijkl")  # 3 blocks
    changed = ids.clone()
    changed[0, 9] = model.tokenizer.convert_tokens_to_ids("z")  # inside block 2
    with torch.no_grad():
        before, after = model.logits(ids), model.logits(changed)
    assert torch.equal(before[:, :8], after[:, :8])  # earlier blocks never see a later block
    assert (before[0, 8] - after[0, 8]).abs().max() > 1e-3  # bidirectional inside the block


def test_sdar_cached_block_logits_equal_uncached(models):
    model = models["sdar"]
    ids = ids_for(model, "abcdefghijkl", batch=2)
    ones = torch.ones_like(ids)
    with torch.no_grad():
        full = model.logits(ids)
        _, cache = model.logits_cached(ids[:, :8], ones[:, :8], None, keep_in_cache=8)  # two committed blocks
        block, cache = model.logits_cached(ids[:, 8:], ones, cache, keep_in_cache=0)
    torch.testing.assert_close(block, full[:, 8:], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 8  # the noisy block was dropped again


def test_sdar_block_size_from_config_default_and_override(tmp_path):
    write_sdar(tmp_path / "a", block_size=8)
    write_sdar(tmp_path / "b", block_size=None)
    assert load_model(str(tmp_path / "a"), device="cpu").block_size == 8
    assert load_model(str(tmp_path / "b"), device="cpu").block_size == 4  # the published SDAR / TraDo block size
    assert load_model(str(tmp_path / "a"), device="cpu", block_size=2).block_size == 2


# ---- persistence, dtype, sharding --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_save_round_trip_keeps_published_layout(models, ckpt, tmp_path, family):
    model = models[family]
    model.save_pretrained(tmp_path)
    assert safetensor_names(tmp_path) == safetensor_names(ckpt[family])  # published tensor names, nothing else
    original = json.loads((ckpt[family] / "config.json").read_text())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in original if k != "torch_dtype"} == {k: v for k, v in original.items()
                                                                       if k != "torch_dtype"}
    reloaded = load_model(str(tmp_path), device="cpu")
    ids = ids_for(model, "round trip", batch=2)
    with torch.no_grad():
        assert torch.equal(reloaded.logits(ids), model.logits(ids))
    assert (reloaded.mask_token_id, reloaded.block_size) == (model.mask_token_id, model.block_size)


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_save_keeps_the_published_tokenizer_files_verbatim(ckpt, tmp_path, family):
    """transformers 5's tokenizer save_pretrained rewrites tokenizer_config.json in a form older transformers cannot
    read and drops a slow BPE tokenizer's vocab.json / merges.txt (Dream's DreamTokenizer and SDAR's Qwen2Tokenizer
    read exactly those): the saved directory must carry the files the tokenizer was read from, byte for byte."""
    import shutil

    source = tmp_path / "published"
    shutil.copytree(ckpt[family], source)
    (source / "vocab.json").write_text('{"a": 0}')  # Qwen's BPE pair, as Dream and SDAR ship it beside the rest
    (source / "merges.txt").write_text("#version: 0.2\n")
    model = load_model(str(source), device="cpu")
    model.save_pretrained(tmp_path / "saved")
    files = [f.name for f in source.iterdir() if f.name.startswith(("tokenizer", "special_tokens", "added_tokens"))
             or f.name in ("vocab.json", "merges.txt")]
    assert {"tokenizer_config.json", "vocab.json", "merges.txt"} <= set(files)
    for name in files:
        assert (tmp_path / "saved" / name).read_bytes() == (source / name).read_bytes(), name
    reloaded = load_model(str(tmp_path / "saved"), device="cpu")
    assert reloaded.tokenizer("round trip")["input_ids"] == model.tokenizer("round trip")["input_ids"]


def test_save_copies_published_remote_code(models, tmp_path):
    models["llada"].save_pretrained(tmp_path)
    assert (tmp_path / "configuration_llada.py").is_file()  # older-transformers tooling keeps working


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_bf16_load_is_close_to_fp32(models, ckpt, family):
    bf16 = load_model(str(ckpt[family]), dtype="bfloat16", device="cpu")
    assert bf16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = ids_for(bf16, "low precision")
    with torch.no_grad():
        ref, low = models[family].logits(ids), bf16.logits(ids).float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_sharded_checkpoint_loads_and_saves(models, tmp_path):
    write_llada(tmp_path / "sharded", shards=3)  # same seed as the single-file fixture
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = load_model(str(tmp_path / "sharded"), device="cpu")
    ids = ids_for(sharded, "shards")
    with torch.no_grad():
        assert torch.equal(sharded.logits(ids), models["llada"].logits(ids))
    sharded.save_pretrained(tmp_path / "resaved", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "resaved" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "resaved"), device="cpu").logits(ids), sharded.logits(ids))


def test_missing_tensor_is_a_user_error(tmp_path):
    write_llada(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_tensors(tensors, tmp_path)
    with pytest.raises(UserError, match="missing"):
        load_model(str(tmp_path), device="cpu")


def test_truncated_weights_are_a_user_error_naming_the_file(tmp_path):
    write_llada(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted download
    with pytest.raises(UserError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(str(tmp_path), device="cpu")


# ---- configuration errors and overrides --------------------------------------------------------------------
def _patch_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_model_type_lists_supported_families(tmp_path):
    write_dream(tmp_path)
    _patch_config(tmp_path, model_type="mystery")
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path), device="cpu")
    assert all(name in str(err.value) for name in ("llada", "Dream", "sdar", "trust_remote_code"))


@pytest.mark.parametrize("change, key", [({"block_type": "sequential"}, "block_type"),
                                         ({"scale_logits": True}, "scale_logits"),
                                         ({"num_experts": 64}, "LLaDA-MoE")])
def test_llada_variants_that_would_compute_differently_are_refused(tmp_path, change, key):
    write_llada(tmp_path)
    _patch_config(tmp_path, **change)
    with pytest.raises(UserError, match=key):
        load_model(str(tmp_path), device="cpu")


def test_sliding_window_is_refused(tmp_path):
    write_dream(tmp_path)
    _patch_config(tmp_path, use_sliding_window=True)
    with pytest.raises(UserError, match="use_sliding_window"):
        load_model(str(tmp_path), device="cpu")


def test_mask_id_override_and_tokenizer_fallback(tmp_path):
    config = write_llada(tmp_path)
    assert load_model(str(tmp_path), device="cpu", mask_token_id=7).mask_token_id == 7
    _patch_config(tmp_path, mask_token_id=None)
    assert load_model(str(tmp_path), device="cpu").mask_token_id == config["mask_token_id"]  # "<|mdm_mask|>"
    with pytest.raises(UserError, match="outside"):
        load_model(str(tmp_path), device="cpu", mask_token_id=EMBED_ROWS)
    with pytest.raises(UserError, match="block_size"):
        load_model(str(tmp_path), device="cpu", block_size=4)  # LLaDA is full attention


# ---- remote code (opt-in) ------------------------------------------------------------------------------------
TOY_CONFIG_PY = """from transformers import LlamaConfig


class ToyDiffConfig(LlamaConfig):
    model_type = "toydiff"
"""
TOY_MODELING_PY = """from transformers import LlamaForCausalLM

from .configuration_toydiff import ToyDiffConfig


class ToyDiffForCausalLM(LlamaForCausalLM):
    config_class = ToyDiffConfig
"""


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory):
    """A checkpoint that ships its own modeling code (a Llama under a model_type transformers does not know)."""
    from tracerl.models import build_tiny_model

    path = tmp_path_factory.mktemp("remote")
    native = build_tiny_model("llama", seed=5)
    native.backbone.save_pretrained(path)
    native.tokenizer.save_pretrained(path)
    (path / "configuration_toydiff.py").write_text(TOY_CONFIG_PY)
    (path / "modeling_toydiff.py").write_text(TOY_MODELING_PY)
    _patch_config(path, model_type="toydiff", mask_token_id=native.mask_token_id,
                  auto_map={"AutoConfig": "configuration_toydiff.ToyDiffConfig",
                            "AutoModelForCausalLM": "modeling_toydiff.ToyDiffForCausalLM"})
    return path, native


def test_remote_code_is_off_by_default(remote_dir):
    with pytest.raises(UserError, match="trust_remote_code"):
        load_model(str(remote_dir[0]), device="cpu")


def test_remote_code_model_behind_the_adapter(remote_dir, tmp_path):
    path, native = remote_dir
    model = load_model(str(path), device="cpu", trust_remote_code=True)
    assert type(model.backbone.model).__name__ == "ToyDiffForCausalLM" and model.family == "remote"
    assert model.mask_token_id == native.mask_token_id
    ids = torch.cat([torch.full((1, 2), native.pad_token_id), ids_for(native, "remote")], dim=1)
    mask = (torch.arange(ids.shape[1]) >= 2).long()[None]
    with torch.no_grad():  # the 4D bidirectional mask and pad-skipping positions reach the remote model
        torch.testing.assert_close(model.logits(ids, mask), native.logits(ids, mask), atol=1e-5, rtol=1e-5)
        assert model.hidden_states(ids, mask).shape == (1, ids.shape[1], native.config.hidden_size)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_toydiff.py").is_file()
    assert load_model(str(tmp_path), device="cpu", trust_remote_code=True).mask_token_id == native.mask_token_id


def test_remote_adapter_sets_alignment_and_mask_mode(remote_dir):
    from tracerl.models.remote import REMOTE_ADAPTERS, RemoteAdapter, register_remote_adapter

    path, native = remote_dir
    register_remote_adapter("toydiff", RemoteAdapter(logit_shift=1, attention="none"))
    try:
        model = load_model(str(path), device="cpu", trust_remote_code=True)
    finally:
        REMOTE_ADAPTERS.pop("toydiff")
    ids = ids_for(native, "shifted")
    with torch.no_grad():
        raw = native.logits(ids)
        torch.testing.assert_close(model.logits(ids), torch.cat([raw[:, :1], raw[:, :-1]], dim=1), atol=1e-5,
                                   rtol=1e-5)
        padding = torch.ones_like(ids)
        padding[0, 0] = 0
        with pytest.raises(ValueError, match="padding"):
            model.logits(ids, padding)


# ---- prompts ------------------------------------------------------------------------------------------------
def test_format_prompt_uses_the_checkpoint_chat_template(models):
    from tracerl.models.prompting import format_prompt

    tok = models["sdar"].tokenizer
    assert format_prompt(tok, "2+2?", use_chat_template=True) == "<|user|>2+2?\n<|assistant|>"
    chat = format_prompt(tok, [{"role": "user", "content": "hi"}], True, system_prompt="be brief")
    assert chat == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert format_prompt(tok, "2+2?", use_chat_template=False) == "2+2?"
    assert format_prompt(tok, "2+2?", use_chat_template=False, system_prompt="Solve:") == "Solve:\n\n2+2?"


def test_format_prompt_errors(models):
    from tracerl.models.prompting import format_prompt

    tok = models["llada"].tokenizer
    conversation = [{"role": "user", "content": "hi"}]
    # a conversation always goes through the template, as TRL applies it to conversational data
    assert format_prompt(tok, conversation, use_chat_template=False) == format_prompt(tok, "hi", True)
    with pytest.raises(UserError, match="'role' and 'content'"):
        format_prompt(tok, [{"text": "hi"}], use_chat_template=True)
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(UserError, match="no chat template"):
            format_prompt(tok, "hi", use_chat_template=True)
        with pytest.raises(UserError, match="the prompt is a conversation .* has no chat template"):
            format_prompt(tok, conversation, use_chat_template=False)
    finally:
        tok.chat_template = template


# ---- full rollouts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_rollout_runs_on_every_family(models, family):
    rollout = pytest.importorskip("tracerl.rollout")
    if not hasattr(rollout, "generate"):
        pytest.skip("tracerl.rollout.generate is not written yet")
    model = models[family]
    prompts = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("2+2=", "a longer prompt")]
    block = None if model.block_size else 4
    base = dict(max_completion_length=8, steps=8, block_length=block, temperature=0.0)
    traj = rollout.generate(model, prompts, rollout.RolloutConfig(**base))
    assert traj.response_ids.shape == (2, 8) and traj.num_forwards >= 8
    assert not (traj.response_ids == model.mask_token_id).any()
    assert (traj.unmask_step >= 0).all()
    if model.block_size:  # the KV-cached sampler reproduces the uncached one on the published layout too
        naive = rollout.generate(model, prompts, rollout.RolloutConfig(**base, use_kv_cache=False))
        assert torch.equal(naive.response_ids, traj.response_ids)


# ---- GPU (runs where CUDA is present; skipped elsewhere) -----------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_loads_onto_cuda_in_bf16(models, ckpt, family):
    gpu = load_model(str(ckpt[family]), device="cuda", dtype="auto")  # auto = bf16 on a GPU
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    assert all(b.device.type == "cuda" for b in gpu.backbone.buffers())  # rotary tables rebuilt on the device
    ids = ids_for(gpu, "on the device", batch=2)
    with torch.no_grad():
        ref, got = models[family].logits(ids), gpu.logits(ids.cuda()).float().cpu()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_a_config_that_contradicts_the_weights_shapes_is_a_user_error(tmp_path):
    write_llada(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_kv_heads"] = 1  # the weights have KV_HEADS key heads
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match its config.json: size mismatch"):
        load_model(str(tmp_path), device="cpu")


def test_export_writes_the_dtype_the_base_was_published_in(tmp_path):
    """`tracerl export` loads in float32 on the CPU; the written checkpoint is in the base's published dtype."""
    from safetensors import safe_open

    from tracerl.cli import main

    write_llada(tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert main(["export", str(tmp_path / "bf16"), "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert main(["export", str(tmp_path / "bf16"), "--output", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["torch_dtype"] == "float32"
    # LLaDA's published config.json names no torch_dtype (only "precision": "amp_bf16"): read off the weights
    write_llada(tmp_path / "published", dtype=torch.bfloat16, shards=2)
    assert "torch_dtype" not in json.loads((tmp_path / "published" / "config.json").read_text())
    assert main(["export", str(tmp_path / "published"), "--output", str(tmp_path / "out2")]) == 0
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_lora_adapter_trained_on_the_published_llada_code_loads_with_its_weights(tmp_path):
    """peft on the published LLaDA code names modules model.transformer.blocks.N.{q_proj, attn_out, ff_proj, ...}:
    renamed onto the Llama modules, the adapter computes what W + (alpha / r) B A written into the published
    checkpoint computes (the reference is built from the LoRA equation, on the published tensor names)."""
    from safetensors.torch import save_file

    from tracerl.build import build_model
    from tracerl.config import ModelConfig

    write_llada(tmp_path / "base")
    weights = load_file(str(tmp_path / "base" / "model.safetensors"))
    r, alpha, gen = 4, 8, torch.Generator().manual_seed(0)
    adapter, merged = {}, dict(weights)
    for i in range(2):
        for module in ("q_proj", "attn_out", "ff_proj", "ff_out"):
            name = f"model.transformer.blocks.{i}.{module}"
            out_dim, in_dim = weights[name + ".weight"].shape
            a, b = torch.randn(r, in_dim, generator=gen) * 0.3, torch.randn(out_dim, r, generator=gen) * 0.3
            adapter[f"base_model.model.{name}.lora_A.weight"] = a
            adapter[f"base_model.model.{name}.lora_B.weight"] = b
            merged[name + ".weight"] = weights[name + ".weight"] + (alpha / r) * b @ a
    (tmp_path / "adapter").mkdir()
    save_file(adapter, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "base"), "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": ["q_proj", "attn_out", "ff_proj", "ff_out"], "task_type": "CAUSAL_LM",
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True}))
    write_llada(tmp_path / "merged")
    save_file(merged, str(tmp_path / "merged" / "model.safetensors"))
    model = build_model(ModelConfig(path=str(tmp_path / "adapter"), device="cpu"))
    reference = load_model(str(tmp_path / "merged"), device="cpu")
    ids = ids_for(model, "hello world")
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), reference.logits(ids), rtol=1e-4, atol=1e-4)
        assert (model.logits(ids) - load_model(str(tmp_path / "base"), device="cpu").logits(ids)).abs().max() > 1e-2
    # an adapter whose modules fit nothing is refused by name, not silently dropped
    bad = {k.replace("q_proj", "query_key_value"): v for k, v in adapter.items() if "q_proj" in k}
    save_file(bad, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"no Llama module for the published module 'query_key_value'"):
        build_model(ModelConfig(path=str(tmp_path / "adapter"), device="cpu"))


def test_an_adapter_for_another_model_is_refused_naming_the_misfit(tmp_path):
    from tracerl.config import PeftSection
    from tracerl.models import build_tiny_model
    from tracerl.peft_utils import apply_lora, load_lora, save_lora

    save_lora(apply_lora(build_tiny_model("llama", hidden_size=32), PeftSection(r=4)), tmp_path / "a")
    with pytest.raises(UserError, match=r"the adapter does not fit .*size mismatch for .*q_proj\.lora_A"):
        load_lora(build_tiny_model("llama", hidden_size=64), tmp_path / "a")
