"""The DiffusionLM interface on tiny models: attention policy, KV cache, save/load."""

import pytest
import torch

from tracerl.errors import UserError
from tracerl.models import build_tiny_model, load_model


def _ids(model, text):
    return torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_full_attention_is_bidirectional(arch):
    model = build_tiny_model(arch)
    ids = _ids(model, "abcdefgh")
    changed = ids.clone()
    changed[0, -1] = model.tokenizer.convert_tokens_to_ids("z")
    before, after = model.logits(ids), model.logits(changed)
    assert before.shape == (1, 8, len(model.tokenizer))
    # a later token moves the very first position's distribution: no causal mask anywhere
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-4


def test_block_attention_never_sees_later_blocks(block_model):
    ids = _ids(block_model, "abcdefghijkl")  # 3 blocks of 4
    changed = ids.clone()
    changed[0, 8:] = block_model.tokenizer.convert_tokens_to_ids("z")
    before, after = block_model.logits(ids), block_model.logits(changed)
    assert torch.equal(before[0, :8], after[0, :8])
    assert (before[0, 8:] - after[0, 8:]).abs().max() > 1e-4
    # but inside a block attention is bidirectional
    changed2 = ids.clone()
    changed2[0, 7] = block_model.tokenizer.convert_tokens_to_ids("z")
    assert (block_model.logits(changed2)[0, 4] - before[0, 4]).abs().max() > 1e-4


def test_cached_logits_equal_uncached(block_model):
    ids = _ids(block_model, "abcdefghijklmn")  # 14 tokens: blocks [0,4) [4,8) [8,12) [12,14)
    full = block_model.logits(ids)
    pad = torch.ones_like(ids)
    cache = None
    for start, end in [(0, 4), (4, 8), (8, 12), (12, 14)]:
        cached = cache.get_seq_length() if cache is not None else 0
        got, cache = block_model.logits_cached(ids[:, cached:end], pad[:, :end], cache, keep_in_cache=end - cached)
        torch.testing.assert_close(got, full[:, start:end], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 14


def test_left_padding_does_not_change_logits(full_model):
    ids = _ids(full_model, "hello")
    padded = torch.cat([torch.full((1, 3), full_model.pad_token_id), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(full_model.logits(padded, mask)[:, 3:], full_model.logits(ids), atol=1e-5, rtol=1e-5)


def test_keep_returns_selected_positions(full_model):
    ids = _ids(full_model, "abcdef")
    keep = torch.tensor([2, 5])
    torch.testing.assert_close(full_model.logits(ids, keep=keep), full_model.logits(ids)[:, [2, 5]])


@pytest.mark.parametrize("block_size", [None, 4])
def test_save_load_round_trip(tmp_path, block_size):
    model = build_tiny_model("qwen3", block_size=block_size, seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer.json").is_file()
    loaded = load_model(str(tmp_path))
    ids = _ids(model, "round trip")
    assert torch.equal(loaded.logits(ids), model.logits(ids))
    assert loaded.block_size == block_size and loaded.mask_token_id == model.mask_token_id
    assert loaded.tokenizer.decode(ids[0]) == "round trip"


def test_block_size_override(saved_full_model):
    assert load_model(str(saved_full_model), block_size=8).block_size == 8


def test_char_tokenizer_round_trips_text(full_model):
    text = "Solve: 12 + 30 = ?\n#### 42"
    ids = full_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert full_model.tokenizer.decode(ids) == text


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_unknown_family_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neo_diffusion"}')
    with pytest.raises(UserError, match="unknown model family.*gpt_neo_diffusion"):
        load_model(str(tmp_path))


def _broken_copy(src, dst, what):
    import json
    import shutil

    shutil.copytree(src, dst)
    if what == "no weights":
        for f in dst.glob("*.safetensors"):
            f.unlink()
    elif what == "truncated weights":
        for f in dst.glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:100])
    elif what == "no tokenizer":
        for f in [*dst.glob("tokenizer*"), *dst.glob("special_tokens*")]:
            f.unlink()
    elif what == "config list":
        (dst / "config.json").write_text("[]")
    elif what == "bad spec":
        config = json.loads((dst / "config.json").read_text())
        config["tracerl_diffusion"]["blocksize"] = 4
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("what, message", [
    ("no weights", "could not load the model weights"),
    ("truncated weights", "could not load the model weights"),
    ("no tokenizer", "could not load the tokenizer"),
    ("config list", "a model config is a JSON object, got list"),
    ("bad spec", "'tracerl_diffusion' is not a TraceRL family spec"),
])
def test_a_broken_checkpoint_directory_is_a_user_error_naming_it(saved_full_model, tmp_path, what, message):
    path = _broken_copy(saved_full_model, tmp_path / "ckpt", what)
    with pytest.raises(UserError, match=message) as info:
        load_model(str(path))
    assert str(path) in str(info.value)


def test_a_mask_id_outside_the_vocabulary_is_a_user_error(saved_full_model):
    with pytest.raises(UserError, match="mask_token_id 99999 is outside the model's vocabulary"):
        load_model(str(saved_full_model), mask_token_id=99999)


def test_bf16_model_runs():
    model = build_tiny_model("llama", dtype=torch.bfloat16)
    out = model.logits(_ids(model, "abc"))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
