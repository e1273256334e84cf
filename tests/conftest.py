"""Shared fixtures: tiny models built in-process (no downloads), saved checkpoint directories."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models gain nothing from 2 threads, and lose a lot when the cores are shared


@pytest.fixture(scope="session")
def full_model():
    """A tiny full-attention (LLaDA-style) diffusion LM on transformers' Llama."""
    from tracerl.models import build_tiny_model

    return build_tiny_model("llama", block_size=None, seed=0)


@pytest.fixture(scope="session")
def block_model():
    """A tiny block-diffusion (SDAR-style) LM on transformers' Qwen3, block_size 4."""
    from tracerl.models import build_tiny_model

    return build_tiny_model("qwen3", block_size=4, seed=1)


@pytest.fixture(scope="session")
def saved_full_model(tmp_path_factory, full_model):
    path = tmp_path_factory.mktemp("tiny_full")
    full_model.save_pretrained(path)
    return path


def encode(model, texts):
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
