"""AutoAWQ's GEMM checkpoint format (``quant_method: awq``, ``version: gemm``), as the
published AWQ repos of Mistral 7B store it.

Per linear layer with K inputs and N outputs, group size g:

- ``qweight`` int32 [K, N / 8]: eight 4-bit q of consecutive output columns per word, in
  AWQ's interleaved nibble order (column 8c + ORDER[i] in bits 4i..4i+3);
- ``qzeros`` int32 [K / g, N / 8]: the integer zero points, packed the same way;
- ``scales`` float16 [K / g, N].

Dequantization: ``w[n, k] = (q[k, n] - zero[k // g, n]) * scale[k // g, n]``.
"""

from __future__ import annotations

import torch

from mistral_serve.model.quantization.packing import pack_int4, unpack_int4
from mistral_serve.model.quantization.schemes import Int4Weight, quantize_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
TENSORS = ("qweight", "qzeros", "scales")


def decode(tensors: dict[str, torch.Tensor], group_size: int, name: str) -> Int4Weight:
    """One layer's AWQ tensors → the format-neutral int4 weight (exact: no value changes)."""
    qweight, qzeros, scales = (tensors[t] for t in TENSORS)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k % group_size:
        raise ValueError(f"{name}: AWQ qweight has {k} input rows, not a multiple of group_size {group_size}")
    groups = k // group_size
    if tuple(qzeros.shape) != (groups, n // 8) or tuple(scales.shape) != (groups, n):
        raise ValueError(f"{name}: AWQ shapes do not agree for group_size {group_size}: qweight "
                         f"{tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
    q = unpack_int4(qweight, AWQ_ORDER).T.contiguous()
    zero = unpack_int4(qzeros, AWQ_ORDER).T.contiguous()
    return Int4Weight(q.to(torch.uint8), zero.to(torch.uint8), scales.float().T.contiguous(), group_size)


def encode(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """A float weight [N, K] as AutoAWQ writes it (asymmetric, float16 scales)."""
    iw = quantize_int4(w, group_size, symmetric=False, scale_dtype=torch.float16)
    return {
        "qweight": pack_int4(iw.q.T.contiguous(), AWQ_ORDER),
        "qzeros": pack_int4(iw.zero.T.contiguous(), AWQ_ORDER),
        "scales": iw.scale.T.contiguous().to(torch.float16),
    }


def quantization_config(group_size: int) -> dict:
    """``config.json``'s quantization_config as AutoAWQ writes it."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}
