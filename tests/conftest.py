"""Shared fixtures: tiny checkpoints built once per test session (deterministic by seed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mistral_serve.model.tiny import build_tiny_model, ensure_tiny_model

torch.set_num_threads(2)
pytest_plugins = ["ray_fixtures"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded default model (Mistral v3 tokenizer, GQA 4:1, window 128)."""
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_window32_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny32"), sliding_window=32, seed=1)


@pytest.fixture(scope="session")
def tiny_llama31_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama31"), arch="llama", sliding_window=None,
                            rope_scaling="llama3", seed=2)


@pytest.fixture(scope="session")
def tiny_llama2_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama2"), arch="llama", sliding_window=None,
                            kv_heads=8, seed=3)
