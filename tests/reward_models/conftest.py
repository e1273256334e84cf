"""Fixtures for the reward tests: a tiny learned reward model saved in a temp dir (no downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


def save_tiny_classifier(path: Path, num_labels: int = 1, seed: int = 0) -> Path:
    """A 1-layer random Llama sequence classifier and the project's char tokenizer, saved to `path`."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tracerl.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         num_labels=num_labels, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny_rm"))
