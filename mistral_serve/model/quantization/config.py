"""Which quantization a model loads with: the ``quantization`` engine argument and the
checkpoint's ``config.json`` ``quantization_config``, validated before any weight is read.

On-load schemes (``int8``, ``int4``, ``fp8``) quantize a floating-point checkpoint.
Pre-quantized checkpoints (``awq``, ``gptq``) are detected from ``quantization_config`` as
the Hugging Face repos publish them; with the default ``quantization="none"`` such a
checkpoint loads with its own method, as vLLM does. Anything else is refused here, with the
supported alternatives named, rather than half-loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mistral_serve.model.quantization.schemes import INT4_GROUP_SIZES

QUANTIZATION_METHODS = ("none", "int8", "int4", "fp8", "awq", "gptq")
ON_LOAD_METHODS = ("int8", "int4", "fp8")
PREQUANTIZED_METHODS = ("awq", "gptq")
INT4_ON_LOAD_GROUP_SIZE = 128


class QuantizationConfigError(ValueError):
    """A quantization request or a checkpoint's quantization_config we cannot load."""


@dataclass(frozen=True)
class QuantizationConfig:
    method: Literal["int8", "int4", "fp8", "awq", "gptq"]
    group_size: int = INT4_ON_LOAD_GROUP_SIZE  # int4 / awq / gptq
    # GPTQ: act-order checkpoints carry a non-trivial g_idx; "gptq" (v1) stores zero - 1.
    desc_act: bool = False
    zero_offset: int = 0

    @property
    def prequantized(self) -> bool:
        return self.method in PREQUANTIZED_METHODS


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise QuantizationConfigError(message)


def _group_size(qc: dict[str, Any], method: str) -> int:
    g = qc.get("group_size", qc.get("q_group_size"))
    _require(isinstance(g, int) and not isinstance(g, bool),
             f"{method} quantization_config needs an integer group_size, got {g!r}")
    _require(g in INT4_GROUP_SIZES, f"{method} group_size {g} is not supported: the int4 kernels take "
             f"{INT4_GROUP_SIZES} (group_size -1, per-channel, is not supported)")
    return g


def _bits(qc: dict[str, Any], method: str) -> None:
    bits = qc.get("bits", qc.get("w_bit"))
    _require(bits == 4, f"{method} with bits={bits!r} is not supported (only 4-bit)")


def parse_checkpoint_quantization(raw_config: dict[str, Any]) -> QuantizationConfig | None:
    """The checkpoint's own quantization (None for a floating-point checkpoint)."""
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    _require(isinstance(qc, dict), f"quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    _require(isinstance(method, str), "quantization_config has no quant_method")
    method = method.lower()
    _require(method in PREQUANTIZED_METHODS,
             f"checkpoint quant_method {method!r} is not supported: pre-quantized checkpoints load from "
             f"{PREQUANTIZED_METHODS}; for a floating-point checkpoint use quantization={ON_LOAD_METHODS}")
    _bits(qc, method)
    group = _group_size(qc, method)
    not_converted = [m for m in (qc.get("modules_to_not_convert") or []) if m != "lm_head"]
    _require(not not_converted, f"{method} modules_to_not_convert={not_converted} is not supported "
             "(every decoder linear layer must be quantized)")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        _require(version == "gemm", f"AWQ version {version!r} is not supported (only 'gemm', AutoAWQ's default "
                 "and the layout of the published Mistral AWQ repos)")
        _require(qc.get("zero_point", True) is True, "AWQ with zero_point=false is not supported")
        return QuantizationConfig("awq", group)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    _require(fmt in ("gptq", "gptq_v2"), f"GPTQ checkpoint_format {fmt!r} is not supported ('gptq', 'gptq_v2')")
    desc_act = qc.get("desc_act", False)
    _require(isinstance(desc_act, bool), f"GPTQ desc_act must be true or false, got {desc_act!r}")
    _require(not qc.get("static_groups", False) or not desc_act,
             "GPTQ static_groups with desc_act is not supported")
    return QuantizationConfig("gptq", group, desc_act=desc_act, zero_offset=1 if fmt == "gptq" else 0)


def resolve_quantization(requested: str, raw_config: dict[str, Any]) -> QuantizationConfig | None:
    """The quantization to load with, from the engine argument and the checkpoint; None = float."""
    _require(requested in QUANTIZATION_METHODS,
             f"quantization {requested!r} is not one of {QUANTIZATION_METHODS}")
    checkpoint = parse_checkpoint_quantization(raw_config)
    if checkpoint is not None:
        _require(requested in ("none", checkpoint.method),
                 f"the checkpoint is already quantized with {checkpoint.method}; quantization={requested!r} "
                 f"applies to floating-point checkpoints (use 'none' or {checkpoint.method!r})")
        return checkpoint
    _require(requested not in PREQUANTIZED_METHODS,
             f"quantization={requested!r} needs a checkpoint whose config.json has a {requested} "
             "quantization_config; this one has none (use int4 to quantize a float checkpoint on load)")
    if requested == "none":
        return None
    return QuantizationConfig(requested)  # type: ignore[arg-type]
