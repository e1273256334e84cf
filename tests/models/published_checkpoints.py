"""Tiny random checkpoints written in each family's *published* layout, by our own code (no downloads).

Each writer produces what a user downloads from the Hub, scaled down: config.json with the published key names,
model.safetensors (or shards + index) with the published tensor names, and a tokenizer carrying the family's mask
token string. The models are random; what the tests check is the mapping, not the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken

from tracerl.models.tiny import build_char_tokenizer

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, EMBED_ROWS = 32, 2, 4, 2, 64, 128


def write_tokenizer(path: Path, mask_token: str, as_mask_token: bool, custom_class: bool = False):
    """The char tokenizer plus the family's mask token; `custom_class` mimics Dream's remote-code tokenizer."""
    tok = build_char_tokenizer()
    if mask_token not in tok.get_vocab():
        tok.add_tokens([AddedToken(mask_token, special=True)])
    if as_mask_token:
        tok.mask_token = mask_token
    tok.save_pretrained(path)
    if custom_class:
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(tokenizer_class="DreamTokenizer",
                   auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
        cfg_file.write_text(json.dumps(cfg))
        (path / "tokenization_dream.py").write_text("# stands in for Dream's custom tokenizer class\n")
    return tok


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, shards: int = 1) -> None:
    """model.safetensors, or `shards` files + model.safetensors.index.json (Hugging Face's sharded layout)."""
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


class _Random:
    def __init__(self, seed: int, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def __call__(self, *shape: int, std: float = 0.15, mean: float = 0.0) -> torch.Tensor:
        return (mean + std * torch.randn(*shape, generator=self.gen)).to(self.dtype)


def write_llada(path: Path, *, weight_tying: bool = False, qkv_bias: bool = False, shards: int = 1, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict:
    """A LLaDA-8B-shaped checkpoint at toy width: model.transformer.{wte, blocks.N.*, ln_f, ff_out}."""
    path.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(path, "<|mdm_mask|>", as_mask_token=False)
    r, hd = _Random(seed, dtype), HIDDEN // HEADS
    t = {"model.transformer.wte.weight": r(EMBED_ROWS, HIDDEN, std=1.0),
         "model.transformer.ln_f.weight": r(HIDDEN, std=0.1, mean=1.0)}
    if not weight_tying:
        t["model.transformer.ff_out.weight"] = r(EMBED_ROWS, HIDDEN)
    for i in range(LAYERS):
        b = f"model.transformer.blocks.{i}."
        t.update({b + "q_proj.weight": r(HIDDEN, HIDDEN), b + "k_proj.weight": r(KV_HEADS * hd, HIDDEN),
                  b + "v_proj.weight": r(KV_HEADS * hd, HIDDEN), b + "attn_out.weight": r(HIDDEN, HIDDEN),
                  b + "ff_proj.weight": r(MLP, HIDDEN), b + "up_proj.weight": r(MLP, HIDDEN),
                  b + "ff_out.weight": r(HIDDEN, MLP), b + "attn_norm.weight": r(HIDDEN, std=0.1, mean=1.0),
                  b + "ff_norm.weight": r(HIDDEN, std=0.1, mean=1.0)})
        if qkv_bias:
            t.update({b + "q_proj.bias": r(HIDDEN), b + "k_proj.bias": r(KV_HEADS * hd),
                      b + "v_proj.bias": r(KV_HEADS * hd)})
    save_tensors(t, path, shards)
    config = {
        "model_type": "llada", "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "activation_type": "silu", "alibi": False, "attention_dropout": 0.0, "attention_layer_norm": False,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": HIDDEN,
        "embedding_dropout": 0.0, "embedding_size": EMBED_ROWS, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.eos_token_id, "include_bias": False, "include_qkv_bias": qkv_bias,
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": tok.convert_tokens_to_ids("<|mdm_mask|>"), "max_sequence_length": 64,
        "mlp_hidden_size": MLP, "mlp_ratio": 4, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS,
        "residual_dropout": 0.0, "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": len(tok),
        "weight_tying": weight_tying,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "configuration_llada.py").write_text("# stands in for LLaDA's published remote code\n")
    return config


def write_dream(path: Path, seed: int = 1) -> dict:
    """A Dream-v0-shaped checkpoint at toy width: Qwen2 names, q/k/v biases, untied lm_head."""
    path.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(path, "<|mask|>", as_mask_token=True, custom_class=True)
    r, hd = _Random(seed, torch.float32), HIDDEN // HEADS
    t = {"model.embed_tokens.weight": r(EMBED_ROWS, HIDDEN, std=1.0),
         "model.norm.weight": r(HIDDEN, std=0.1, mean=1.0), "lm_head.weight": r(EMBED_ROWS, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update(_qwen_layer(r, p, HIDDEN, hd, bias=True))
    save_tensors(t, path)
    config = {
        "model_type": "Dream", "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2,
        "attention_dropout": 0.0, "mask_token_id": tok.mask_token_id, "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "vocab_size": EMBED_ROWS,
        "use_cache": False, "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config


def write_sdar(path: Path, seed: int = 2, block_size: int | None = 4, head_dim: int = 16) -> dict:
    """An SDAR/TraDo-shaped checkpoint at toy width: Qwen3 names (q_norm/k_norm), tied embeddings, block_size."""
    path.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(path, "<|MASK|>", as_mask_token=True)
    r = _Random(seed, torch.float32)
    t = {"model.embed_tokens.weight": r(EMBED_ROWS, HIDDEN, std=1.0),
         "model.norm.weight": r(HIDDEN, std=0.1, mean=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update(_qwen_layer(r, p, HIDDEN, head_dim, bias=False))
        t.update({p + "self_attn.q_norm.weight": r(head_dim, std=0.1, mean=1.0),
                  p + "self_attn.k_norm.weight": r(head_dim, std=0.1, mean=1.0)})
    save_tensors(t, path)
    config = {
        "model_type": "sdar", "architectures": ["SDARForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS, "head_dim": head_dim,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None, "attention_bias": False,
        "attention_dropout": 0.0, "mask_token_id": tok.mask_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "vocab_size": EMBED_ROWS, "fuse_cross_entropy": True,
    }
    if block_size is not None:
        config["block_size"] = block_size
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config


def _qwen_layer(r: _Random, p: str, hidden: int, head_dim: int, bias: bool) -> dict[str, torch.Tensor]:
    q, kv = HEADS * head_dim, KV_HEADS * head_dim
    t = {p + "self_attn.q_proj.weight": r(q, hidden), p + "self_attn.k_proj.weight": r(kv, hidden),
         p + "self_attn.v_proj.weight": r(kv, hidden), p + "self_attn.o_proj.weight": r(hidden, q),
         p + "mlp.gate_proj.weight": r(MLP, hidden), p + "mlp.up_proj.weight": r(MLP, hidden),
         p + "mlp.down_proj.weight": r(hidden, MLP), p + "input_layernorm.weight": r(hidden, std=0.1, mean=1.0),
         p + "post_attention_layernorm.weight": r(hidden, std=0.1, mean=1.0)}
    if bias:
        t.update({p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv),
                  p + "self_attn.v_proj.bias": r(kv)})
    return t
