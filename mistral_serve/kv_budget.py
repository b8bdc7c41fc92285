"""KV-pool sizing: how many cache blocks fit in a byte budget, and the budget on a GPU.

Shared by the engine (``LLMEngine`` sizes its pool with it) and ``mistral-serve plan``
(``capacity``); depends on the model config only, never on ``engine`` or ``serving``.
"""

from __future__ import annotations

from mistral_serve.model.config import ModelConfig

GIB = 1024**3
CPU_DEFAULT_KV_BYTES = 1 * GIB


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_blocks_for_budget(config: ModelConfig, kv_bytes: int, block_size: int, dtype_bytes: int) -> int:
    """Blocks of ``block_size`` tokens that fit in ``kv_bytes``."""
    return kv_bytes // (config.kv_bytes_per_token(dtype_bytes) * block_size)


def cuda_kv_budget(total: int, free: int, utilization: float, activation_reserve: int) -> int:
    """KV bytes on a GPU: the utilization share of the card, less what is already in use
    (weights, CUDA context, other processes) and a reserve for one step's activations."""
    return max(0, int(total * utilization) - (total - free) - activation_reserve)


def activation_reserve_bytes(config: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int, dtype_bytes: int) -> int:
    """Peak activations of one step: the widest layer for every token, plus float32 logits."""
    widest = max(2 * config.intermediate_size, config.hidden_size * 4)
    return 2 * max_num_batched_tokens * widest * dtype_bytes + max_num_seqs * config.vocab_size * 4 * 3
