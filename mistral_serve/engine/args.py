"""Engine arguments, named as vLLM names them where the concept is the same."""

from __future__ import annotations

import os
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="checkpoint directory or hub repo id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: the checkpoint's dtype on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="default: the model's max_position_embeddings")
    max_num_seqs: int = Field(128, ge=1, description="sequences in the running batch at most")
    max_num_batched_tokens: int = Field(2048, ge=16, description="tokens (prefill + decode) per step at most")
    block_size: int = Field(16, ge=1, le=1024)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="KV pool size; default on CPU: 1 GiB; on CUDA derived from gpu_memory_utilization"
    )
    enable_chunked_prefill: bool = True
    quantization: Literal["none", "int8", "int4", "fp8", "awq", "gptq"] = Field(
        "none", description="weights: int8 (per-channel) / int4 (group 128) / fp8 quantized on load from a float "
        "checkpoint; awq / gptq checkpoints are detected from config.json even with 'none' (docs/quantization.md)")
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV of full blocks of earlier prompts that share a prefix (vLLM's name and default)")
    attention_backend: Literal["auto", "torch", "flashinfer"] = Field(
        "auto", description="auto: flashinfer on CUDA in fp16/bf16 when the flashinfer package imports, else torch; "
        "the MISTRAL_SERVE_ATTENTION_BACKEND environment variable replaces auto (model/attention_select.py)")
    enforce_eager: bool = Field(
        False, description="never replay CUDA graphs for decode steps (vLLM's name); graphs need CUDA and the "
        "flashinfer backend, so on CPU they never apply")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU (default: every core this process may run on; "
        "served by mistral-serve: the replica's replicas.num_cpus, serving/config.py)")

    def cpu_threads(self) -> int:
        """The intra-op threads the engine sets on CPU. Set explicitly, never left to torch's
        default: that follows ``OMP_NUM_THREADS``, which Ray sets to an actor's ``num_cpus``
        (1 for an LLMReplica), so a served engine ran on one thread where the offline one ran
        on two."""
        return self.num_threads or len(os.sched_getaffinity(0))

    def torch_dtype(self, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(checkpoint_dtype or "bfloat16", torch.bfloat16)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
