"""Weight bytes of a model under each quantization, in the layout the kernels hold at run time.

Only the decoder's projections are quantized; embeddings, norms and the vocabulary
projection (lm_head) stay in the model dtype, as in the published AWQ/GPTQ checkpoints and
vLLM. Scales are the kernels' bfloat16 (int8: one per output channel; int4: a scale and a
zero per group of 128 inputs), FP8's are float32 per channel.
"""

from __future__ import annotations

from mistral_serve.model.config import ModelConfig
from mistral_serve.model.quantization.config import INT4_ON_LOAD_GROUP_SIZE, QUANTIZATION_METHODS

_SCALE_BYTES = 2  # bfloat16


def projection_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of the fused projections of one decoder layer."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]


def _projection_bytes(n: int, k: int, method: str, group_size: int) -> float:
    if method == "int8":
        return n * k + n * _SCALE_BYTES
    if method == "fp8":
        return n * k + n * 4
    return n * k / 2 + (k // group_size) * n * 2 * _SCALE_BYTES  # int4, awq, gptq: 4-bit q + scale and zero


def weight_bytes(config: ModelConfig, method: str, dtype_bytes: int,
                 group_size: int = INT4_ON_LOAD_GROUP_SIZE) -> int:
    """All weights of ``config`` with its projections quantized by ``method`` ('none': none)."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {method!r} is not one of {QUANTIZATION_METHODS}")
    total = config.num_parameters() * dtype_bytes
    if method == "none":
        return total
    layers = config.num_hidden_layers
    for n, k in projection_shapes(config):
        total += layers * (_projection_bytes(n, k, method, group_size) - n * k * dtype_bytes)
    return int(total)
