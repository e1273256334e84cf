"""Tiny random-initialised diffusion LMs and a character-level tokenizer, built in-process (no downloads).

The models are transformers' own Llama / Qwen2 / Qwen3 stacks with a handful of layers; what makes them
diffusion LMs is the `FamilySpec` (mask id, attention policy), exactly as for the real checkpoints. The `mdlm` and
`sedd` architectures are TraceRL's DiT (dit.py) in those families' published conventions (the mask appended as the
last vocabulary entry), and save in their published layouts.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tracerl.errors import UserError
from tracerl.models.base import DiffusionLM, FamilySpec

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|mask|>", "<|unk|>", "<|user|>", "<|assistant|>"]
CHARSET = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer in the standard Hugging Face format (tokenizer.json + tokenizer_config.json).

    A BPE model with no merges splits text into single characters; `Fuse` joins them back without spaces.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        mask_token="<|mask|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


DIT_ARCHS = ("mdlm", "sedd")


def build_tiny_model(
    arch: str = "llama",
    block_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DiffusionLM:
    """A random diffusion LM: `arch` in llama | qwen2 | qwen3 | mdlm | sedd; block_size None = full attention."""
    if arch in DIT_ARCHS:
        if block_size is not None or intermediate_size not in (None, 4 * hidden_size):
            raise UserError(f"tiny {arch}: the DiT has full attention and a 4 x hidden MLP (no block_size / "
                             "intermediate_size)")
        return build_tiny_dit(arch, hidden_size, num_layers, num_heads, max_position_embeddings, seed, dtype)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted([*ARCHITECTURES, *DIT_ARCHS])}")
    tokenizer = build_char_tokenizer()
    config_cls, model_cls = ARCHITECTURES[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    spec = FamilySpec(name="tracerl_tiny", mask_token_id=tokenizer.mask_token_id, block_size=block_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = model_cls(config).to(dtype)
    backbone.eval()
    return DiffusionLM(backbone, tokenizer, spec)


def build_tiny_dit(arch: str, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                   max_position_embeddings: int = 2048, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> DiffusionLM:
    """A random MDLM or SEDD: the char tokenizer plus an appended mask / absorbing id (the published convention).

    MDLM as mdlm-owt: time_conditioning off (sigma fed as 0). SEDD: conditioned on sigma, scale_by_sigma on.
    Dropout is 0, so a tiny model's train-mode forward is deterministic.
    """
    from tracerl.models.dit import DiTConfig, DiTForDiffusionLM
    from tracerl.models.mdlm import attach_mask_token

    tokenizer = build_char_tokenizer()
    mask_id = len(tokenizer)  # appended, as MDLM does for GPT-2 and SEDD's absorbing state `tokens`
    config = DiTConfig(vocab_size=mask_id + 1, hidden_size=hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, cond_dim=max(16, hidden_size // 2),
                       max_position_embeddings=max_position_embeddings, dropout=0.0,
                       time_conditioning=arch == "sedd", mask_token_id=mask_id, scale_by_sigma=arch == "sedd",
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = DiTForDiffusionLM(config).to(dtype)
    backbone.eval()
    attach_mask_token(tokenizer, mask_id)
    spec = FamilySpec(name=arch, mask_token_id=mask_id, time_conditioned=config.time_conditioning)
    return DiffusionLM(backbone, tokenizer, spec)
