"""Diffusion-LM families behind one interface: `load_model(path) -> DiffusionLM`."""

from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.models.loading import load_model, register_family, supported_families
from tracerl.models.tiny import build_char_tokenizer, build_tiny_model

__all__ = [
    "DiffusionLM",
    "FamilySpec",
    "build_char_tokenizer",
    "build_tiny_model",
    "load_model",
    "register_family",
    "supported_families",
]
