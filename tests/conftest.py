"""Shared pytest fixtures: a tiny ChatML tokenizer and a tiny Llama model folder, built once per session.

Why session scope: building them takes about a second, and every test that needs a model would otherwise pay
for it. Tests must treat them as read-only (load a fresh model from `tiny_model_dir` before mutating one).
"""

from __future__ import annotations

import pytest

from tuneforge.models.tiny import make_tiny_model_dir, make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with SmolLM2-like ChatML template (pad == eos == <|im_end|>)."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Path of a tiny random Llama + tokenizer saved as a normal HF folder (safetensors)."""
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_model")))
