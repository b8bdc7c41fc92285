"""Capacity math shared by ``mistral-serve plan`` and the engine's KV-pool sizing.

How many KV tokens fit next to the weights, how many sequences that is at a given context
(with and without Mistral's sliding window), and the decode-step floor set by memory
bandwidth (every decode step reads all weights once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The KV-budget helpers live in ``kv_budget`` (no ``engine`` import); re-exported here for
# existing callers (``LLMEngine`` imports them from this module).
from mistral_serve.kv_budget import (  # noqa: F401
    CPU_DEFAULT_KV_BYTES,
    GIB,
    activation_reserve_bytes,
    cdiv,
    cuda_kv_budget,
    kv_blocks_for_budget,
)
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.quantization.footprint import weight_bytes


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float


GPUS = {
    "H100-80GB": GPU("H100-80GB", 80 * 10**9, 3.35e12),
    "H200-141GB": GPU("H200-141GB", 141 * 10**9, 4.8e12),
    "H100-PCIe-80GB": GPU("H100-PCIe-80GB", 80 * 10**9, 2.0e12),
    "H100-NVL-94GB": GPU("H100-NVL-94GB", 94 * 10**9, 3.9e12),
    "A100-80GB": GPU("A100-80GB", 80 * 10**9, 2.039e12),
    "A100-40GB": GPU("A100-40GB", 40 * 10**9, 1.555e12),
    "L40S-48GB": GPU("L40S-48GB", 48 * 10**9, 0.864e12),
    "A10G-24GB": GPU("A10G-24GB", 24 * 10**9, 0.6e12),
    "L4-24GB": GPU("L4-24GB", 24 * 10**9, 0.3e12),
}

_MISTRAL_7B = dict(
    vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
# Published config.json values (the fields capacity math needs), for planning without a download.
PRESETS: dict[str, dict] = {
    "mistral-7b-v0.1": dict(_MISTRAL_7B, model_type="mistral", vocab_size=32000, rope_theta=10000.0,
                            sliding_window=4096, max_position_embeddings=32768),
    "mistral-7b-v0.3": dict(_MISTRAL_7B, model_type="mistral", rope_theta=1e6, sliding_window=None,
                            max_position_embeddings=32768),
    "llama-3.1-8b": dict(_MISTRAL_7B, model_type="llama", vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, head_dim=128,
                        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}
PRESET_ALIASES = {
    "mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistral-7b-v0.1",
    "mistralai/Mistral-7B-v0.3": "mistral-7b-v0.3",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b-v0.3",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-2-13b-hf": "llama-2-13b",
}


@dataclass(frozen=True)
class Plan:
    model: str
    gpu: str
    dtype_bytes: int
    max_model_len: int
    parameters: int
    quantization: str
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_token_without_gqa: int
    kv_budget_bytes: int
    kv_tokens: int
    kv_tokens_per_seq: int
    max_seqs: int
    max_seqs_without_window: int
    max_seqs_without_gqa: int
    decode_floor_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def plan(
    config: ModelConfig,
    model: str,
    gpu: GPU,
    dtype_bytes: int,
    max_model_len: int | None = None,
    utilization: float = 0.9,
    block_size: int = 16,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 256,
    quantization: str = "none",
) -> Plan:
    """``quantization`` shrinks the weights (hence more KV fits and the decode floor drops);
    the KV cache and activations stay in ``dtype_bytes``."""
    params = config.num_parameters()
    weights = weight_bytes(config, quantization, dtype_bytes)
    ctx = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    reserve = activation_reserve_bytes(config, max_num_batched_tokens, max_num_seqs, dtype_bytes)
    budget = cuda_kv_budget(gpu.memory_bytes, gpu.memory_bytes - weights, utilization, reserve)
    per_token = config.kv_bytes_per_token(dtype_bytes)
    blocks = budget // (per_token * block_size)
    window = config.sliding_window
    blocks_per_seq_full = cdiv(ctx, block_size)
    blocks_per_seq = min(blocks_per_seq_full, cdiv(window, block_size) + 1) if window else blocks_per_seq_full
    mha_per_token = config.kv_bytes_per_token(dtype_bytes, gqa=False)
    return Plan(
        model=model,
        gpu=gpu.name,
        dtype_bytes=dtype_bytes,
        max_model_len=ctx,
        parameters=params,
        quantization=quantization,
        weight_bytes=weights,
        kv_bytes_per_token=per_token,
        kv_bytes_per_token_without_gqa=mha_per_token,
        kv_budget_bytes=budget,
        kv_tokens=blocks * block_size,
        kv_tokens_per_seq=blocks_per_seq * block_size,
        max_seqs=blocks // blocks_per_seq,
        max_seqs_without_window=blocks // blocks_per_seq_full,
        max_seqs_without_gqa=(budget // (mha_per_token * block_size)) // blocks_per_seq_full,
        decode_floor_ms=weights / gpu.bandwidth_bytes_per_s * 1e3,
    )


def format_plan(p: Plan, config: ModelConfig) -> str:
    gib = lambda b: f"{b / GIB:,.2f} GiB"  # noqa: E731
    kib = lambda b: f"{b / 1024:,.0f} KiB"  # noqa: E731
    window = f"{config.sliding_window} tokens" if config.sliding_window else "none"
    rows = [
        ("model", p.model),
        ("GPU", p.gpu),
        ("dtype bytes", p.dtype_bytes),
        ("parameters", f"{p.parameters / 1e9:.2f} B"),
        ("quantization", p.quantization),
        ("weights", gib(p.weight_bytes)),
        ("KV per token (GQA)", kib(p.kv_bytes_per_token)),
        ("KV per token (without GQA)", kib(p.kv_bytes_per_token_without_gqa)),
        ("KV budget", gib(p.kv_budget_bytes)),
        ("KV tokens that fit", f"{p.kv_tokens:,}"),
        ("  prefix cache", "cached blocks no sequence holds are reclaimable: counted as free, in the tokens above"),
        ("context (max_model_len)", f"{p.max_model_len:,}"),
        ("sliding window", window),
        ("KV tokens per full-context sequence", f"{p.kv_tokens_per_seq:,}"),
        ("max concurrent sequences at full context", f"{p.max_seqs:,}"),
        ("  … if the window were ignored", f"{p.max_seqs_without_window:,}"),
        ("  … without GQA (MHA)", f"{p.max_seqs_without_gqa:,}"),
        ("decode step floor (weights / bandwidth)", f"{p.decode_floor_ms:.2f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_gpu_table(plans: list[Plan]) -> str:
    """One row per GPU: what ``plan --all-gpus`` prints to compare cards (and quantizations)."""
    head = ("GPU", "quantization", "weights GiB", "KV tokens", "max seqs", "decode floor ms")
    rows = [(p.gpu, p.quantization, f"{p.weight_bytes / GIB:.2f}", f"{p.kv_tokens:,}", f"{p.max_seqs:,}",
             f"{p.decode_floor_ms:.2f}") for p in plans]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [head, *rows])
