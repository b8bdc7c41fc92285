"""Weight bytes of a model under each quantization, in the layout the loaded model holds at run
time (``tests/test_quantization.py`` checks this against the bytes of the loaded model).

Quantized: the decoder's projections, by the method, and the input embedding table, int8 per
row unless tied to the lm_head (``embedding.py`` says why). Norms and the vocabulary projection
(lm_head) stay in the model dtype, as in the published AWQ/GPTQ checkpoints and vLLM. Scales
are the kernels' bfloat16 (int8 and the embedding: one per output channel / row; int4: a scale
and a zero per group of inputs), FP8's are float32 per channel. A GPTQ act-order checkpoint's
layers also hold their input permutation (int64, one per input column). Where the device has no
kernel for a scheme (FP8 on CPU) the loaded projections are float instead: see ``linear.py``.
"""

from __future__ import annotations

from mistral_serve.model.config import ModelConfig
from mistral_serve.model.quantization.config import (
    INT4_ON_LOAD_GROUP_SIZE,
    QUANTIZATION_METHODS,
    parse_checkpoint_quantization,
)
from mistral_serve.model.quantization.embedding import quantizes_embedding

_SCALE_BYTES = 2  # bfloat16
_PERM_BYTES = 8  # int64 act-order index


def projection_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of the fused projections of one decoder layer."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]


def _projection_bytes(n: int, k: int, method: str, group_size: int, act_order: bool) -> float:
    if method == "int8":
        return n * k + n * _SCALE_BYTES
    if method == "fp8":
        return n * k + n * 4
    # int4, awq, gptq: 4-bit q + a scale and a zero per group (+ the act-order permutation)
    return n * k / 2 + (k // group_size) * n * 2 * _SCALE_BYTES + (k * _PERM_BYTES if act_order else 0)


def embedding_bytes(config: ModelConfig, method: str, dtype_bytes: int) -> int:
    """The input embedding table (which a tied lm_head shares) under ``method``."""
    v, h = config.vocab_size, config.hidden_size
    if method != "none" and quantizes_embedding(config):
        return v * h + v * _SCALE_BYTES
    return v * h * dtype_bytes


def weight_bytes(config: ModelConfig, method: str, dtype_bytes: int) -> int:
    """All weights of ``config`` quantized by ``method`` ('none': none). AWQ / GPTQ take their
    group size and act-order from the checkpoint's quantization_config when ``config`` has one
    (else group size 128, no act-order, as the presets are planned)."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {method!r} is not one of {QUANTIZATION_METHODS}")
    total = config.num_parameters() * dtype_bytes
    if method == "none":
        return total
    checkpoint = parse_checkpoint_quantization(config.raw)
    if checkpoint is not None and checkpoint.method == method:
        group_size, act_order = checkpoint.group_size, checkpoint.desc_act
    else:
        group_size, act_order = INT4_ON_LOAD_GROUP_SIZE, False
    layers = config.num_hidden_layers
    for n, k in projection_shapes(config):
        total += layers * (_projection_bytes(n, k, method, group_size, act_order) - n * k * dtype_bytes)
    total += embedding_bytes(config, method, dtype_bytes) - config.vocab_size * config.hidden_size * dtype_bytes
    return int(total)
