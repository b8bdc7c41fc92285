"""The GPTQ checkpoint format (``quant_method: gptq``, 4-bit) of AutoGPTQ / GPTQModel.

Per linear layer with K inputs and N outputs, group size g:

- ``qweight`` int32 [K / 8, N]: eight 4-bit q of consecutive *input* rows per word, in order
  (row 8r + i in bits 4i..4i+3);
- ``qzeros`` int32 [K / g, N / 8]: zero points of consecutive output columns, in order; the
  original ``gptq`` checkpoint_format stores zero - 1 (``gptq_v2`` stores zero);
- ``scales`` float16 [K / g, N];
- ``g_idx`` int32 [K]: the group of each input row. Without act-order it is k // g; with
  act-order (``desc_act``) rows were quantized in a permuted order, so groups are scattered.

Dequantization: ``w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``. For the
kernels, groups must be contiguous: act-order layers are stored with their input columns
sorted by group and carry that permutation, applied to the activations at run time.
"""

from __future__ import annotations

import torch

from mistral_serve.model.quantization.packing import pack_int4, unpack_int4
from mistral_serve.model.quantization.schemes import Int4Weight, quantize_int4

SEQUENTIAL = (0, 1, 2, 3, 4, 5, 6, 7)
TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _sorting_permutation(g_idx: torch.Tensor, group_size: int, name: str) -> torch.Tensor | None:
    """None when groups are already contiguous; else the stable sort of rows by group, which
    must yield exactly ``group_size`` rows per group (what GPTQ's act-order produces)."""
    k = g_idx.numel()
    contiguous = torch.arange(k, dtype=torch.int64, device=g_idx.device) // group_size
    g = g_idx.to(torch.int64)
    if torch.equal(g, contiguous):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], contiguous):
        raise ValueError(f"{name}: g_idx does not assign exactly {group_size} input rows to each of "
                         f"{k // group_size} groups; not a GPTQ act-order layout")
    return perm


def decode(tensors: dict[str, torch.Tensor], group_size: int, zero_offset: int, name: str) -> Int4Weight:
    """One layer's GPTQ tensors → the format-neutral int4 weight (exact: no value changes)."""
    qweight, qzeros, scales, g_idx = (tensors[t] for t in TENSORS)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if k % group_size:
        raise ValueError(f"{name}: GPTQ qweight has {k} input rows, not a multiple of group_size {group_size}")
    groups = k // group_size
    if (tuple(qzeros.shape) != (groups, n // 8) or tuple(scales.shape) != (groups, n)
            or tuple(g_idx.shape) != (k,)):
        raise ValueError(f"{name}: GPTQ shapes do not agree for group_size {group_size}: qweight "
                         f"{tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}, "
                         f"g_idx {tuple(g_idx.shape)}")
    q = unpack_int4(qweight.T.contiguous(), SEQUENTIAL)  # [N, K]
    # v1 adds the offset back without masking, as AutoGPTQ's kernels do (a stored 15 means 16).
    zero = (unpack_int4(qzeros, SEQUENTIAL) + zero_offset).T.contiguous()
    perm = _sorting_permutation(g_idx, group_size, name)
    if perm is not None:
        q = q[:, perm]
    return Int4Weight(q.to(torch.uint8).contiguous(), zero.to(torch.uint8), scales.float().T.contiguous(),
                      group_size, perm)


def encode(w: torch.Tensor, group_size: int, act_order_perm: torch.Tensor | None = None,
           zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """A float weight [N, K] as GPTQ writes it: symmetric (``sym: true``), float16 scales;
    with ``act_order_perm`` (perm[j] = the input row quantized j-th) the groups follow that
    order, as ``desc_act`` does."""
    k = w.shape[1]
    perm = torch.arange(k) if act_order_perm is None else act_order_perm.to(torch.int64)
    inverse = torch.argsort(perm)  # position of each original row in the quantization order
    iw = quantize_int4(w.float()[:, perm], group_size, symmetric=True, scale_dtype=torch.float16)
    q = iw.q[:, inverse]  # back to the original row order
    return {
        "qweight": pack_int4(q, SEQUENTIAL).T.contiguous(),  # [N, K/8] packed along K, stored [K/8, N]
        "qzeros": pack_int4(iw.zero.T.contiguous().to(torch.int64) - zero_offset, SEQUENTIAL),
        "scales": iw.scale.T.contiguous().to(torch.float16),
        "g_idx": (inverse // group_size).to(torch.int32),
    }


def quantization_config(group_size: int, desc_act: bool) -> dict:
    """``config.json``'s quantization_config as AutoGPTQ writes it (format v1)."""
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": True,
            "damp_percent": 0.01, "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq"}
