"""Which attention backend an engine runs, and why (logged once at start-up).

``auto``: ``flashinfer`` on CUDA when the ``flashinfer`` package imports and the dtype and
head size are ones its kernels are built for (fp16/bf16; head_dim 64, 128 or 256, as vLLM's
FlashInfer backend lists them: Mistral 7B's is 128), else ``torch``. The test models' head_dim
is 32, so their float32 HF-equality runs use ``torch`` on every device. The environment variable
``MISTRAL_SERVE_ATTENTION_BACKEND`` replaces ``auto`` (bench/gpu/check.sh runs the same tests
once per backend with it); an explicit engine argument wins over it. Asking for ``flashinfer``
where it cannot run is an error, never a silent fallback: a benchmark or test that believes it
measured FlashInfer must have.
"""

from __future__ import annotations

import importlib
import os

import torch

from mistral_serve.model.attention import TorchBackend
from mistral_serve.model.attention_backend import AttentionBackend
from mistral_serve.model.attention_flashinfer import FlashInferBackend
from mistral_serve.model.config import ModelConfig

ENV_VAR = "MISTRAL_SERVE_ATTENTION_BACKEND"
BACKENDS = ("auto", "torch", "flashinfer")
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
FLASHINFER_HEAD_DIMS = (64, 128, 256)


def flashinfer_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FlashInfer cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"device is {device.type} (FlashInfer runs on CUDA only)"
    if dtype not in FLASHINFER_DTYPES:
        return f"dtype {str(dtype).removeprefix('torch.')} (FlashInfer's kernels are fp16/bf16)"
    if head_dim not in FLASHINFER_HEAD_DIMS:
        return f"head_dim {head_dim} (FlashInfer's kernels: {', '.join(map(str, FLASHINFER_HEAD_DIMS))})"
    try:
        importlib.import_module("flashinfer")
    except Exception as e:  # ImportError, or a broken install failing at import
        return f"flashinfer is not importable ({type(e).__name__}: {e})"
    return None


def resolve_attention_backend(requested: str, device: torch.device, dtype: torch.dtype,
                              head_dim: int) -> tuple[str, str]:
    """(backend name, reason) for the engine argument ``requested``; raises ValueError when
    ``flashinfer`` is asked for and cannot run, or the variable names no backend."""
    source = "engine argument"
    env = os.environ.get(ENV_VAR)
    if requested == "auto" and env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r}: expected one of {', '.join(BACKENDS)}")
        requested, source = env, f"{ENV_VAR}={env}"
    if requested == "torch":
        return "torch", f"requested ({source})"
    problem = flashinfer_problem(device, dtype, head_dim)
    if requested == "flashinfer":
        if problem:
            raise ValueError(f"attention backend 'flashinfer' requested ({source}) but {problem}")
        return "flashinfer", f"requested ({source})"
    if problem:
        return "torch", f"auto: {problem}"
    version = getattr(importlib.import_module("flashinfer"), "__version__", "?")
    return "flashinfer", f"auto: CUDA, {str(dtype).removeprefix('torch.')}, flashinfer {version} importable"


def create_attention_backend(name: str, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                             block_size: int, max_num_seqs: int, max_model_len: int) -> AttentionBackend:
    if name == "torch":
        return TorchBackend(block_size, config.sliding_window, device)
    return FlashInferBackend(block_size, config.sliding_window, device, num_heads=config.num_attention_heads,
                             num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, dtype=dtype,
                             max_num_seqs=max_num_seqs, max_model_len=max_model_len)
