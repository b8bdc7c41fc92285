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
def tiny_nowindow_dir(tmp_path_factory) -> Path:
    """Mistral v0.3's shape: no sliding window."""
    return build_tiny_model(tmp_path_factory.mktemp("tinynw"), sliding_window=None, seed=4)


@pytest.fixture(scope="session")
def tiny_llama31_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama31"), arch="llama", sliding_window=None,
                            rope_scaling="llama3", seed=2)


@pytest.fixture(scope="session")
def tiny_llama2_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama2"), arch="llama", sliding_window=None,
                            kv_heads=8, seed=3)


@pytest.fixture(autouse=True)
def engine_test_device(monkeypatch):
    """``MISTRAL_SERVE_TEST_DEVICE=cuda`` (or ``cpu``) runs every ``LLM(...)`` built by a test
    on that device: the default ``device="auto"`` becomes the named one, and on CUDA the
    default KV pool is 1 GiB (as on CPU) instead of 90% of the card, so the many engines a
    suite builds never starve each other. Unset (the default): nothing changes. bench/gpu/check.sh
    uses it to run the HF-equality tests on a GPU; a missing CUDA device fails, never silently
    falls back to CPU."""
    import os

    device = os.environ.get("MISTRAL_SERVE_TEST_DEVICE")
    if not device:
        yield None
        return
    from typing import Literal

    from pydantic import Field

    from mistral_serve.engine import llm as llm_module
    from mistral_serve.engine.args import EngineArgs

    if device not in ("cpu", "cuda"):
        pytest.fail(f"MISTRAL_SERVE_TEST_DEVICE={device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail("MISTRAL_SERVE_TEST_DEVICE=cuda but torch sees no CUDA device")
    kv_default = 1024**3 if device == "cuda" else None
    test_device = device

    class DeviceEngineArgs(EngineArgs):
        device: Literal["auto", "cpu", "cuda"] = test_device
        kv_cache_memory_bytes: int | None = Field(kv_default, gt=0)

    monkeypatch.setattr(llm_module, "EngineArgs", DeviceEngineArgs)
    yield device
    if device == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
