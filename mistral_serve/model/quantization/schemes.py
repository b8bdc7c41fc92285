"""The quantized-weight containers and the math that makes them from float weights.

Every scheme is defined by its dequantization, the one formula the kernels, the checkpoint
formats (AWQ, GPTQ) and the tests all agree on:

- ``Int8Weight``: per output channel, symmetric: ``w[n, k] = q[n, k] * scale[n]``,
  q in [-127, 127].
- ``Int4Weight``: group-wise along the input dimension, asymmetric with an integer zero point
  (AWQ's and GPTQ's convention): ``w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]`` with
  ``g = k // group_size``, q and zero in [0, 15]. GPTQ's act-order is carried as ``perm``: the
  stored columns are the original ones reordered so that groups are contiguous.
- ``Fp8Weight``: E4M3 values with a float32 scale per output channel:
  ``w[n, k] = float(q[n, k]) * scale[n]``.

Containers hold tensors (on the device being loaded) in the format-neutral layout above;
``linear.py`` turns them into a kernel's layout. Fused projections (q/k/v, gate/up) are built by
concatenating parts along the output dimension, which is exact because every scale is per
output row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The scale dtype of PyTorch's weight-only kernels (their vectorised CPU paths and the CUDA
# tinygemm kernel take bfloat16 activations, scales and zeros). Quantize-on-load rounds scales
# to it *before* computing q, so the kernel applies exactly the scale q was computed with.
KERNEL_SCALE_DTYPE = torch.bfloat16
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the int4 kernels accept


@dataclass
class _PerChannelWeight:
    """Quantized values [N, K] with one float32 scale per output channel [N]."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    @classmethod
    def cat(cls, parts: list) -> _PerChannelWeight:
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


class Int8Weight(_PerChannelWeight):
    """int8 values, symmetric."""


@dataclass
class Int4Weight:
    q: torch.Tensor  # uint8 [N, K], values 0..15, columns in kernel order (see perm)
    zero: torch.Tensor  # uint8 [N, K // group_size], values 0..15 (16: GPTQ v1's wrapped zero, see gptq.py)
    scale: torch.Tensor  # float32 [N, K // group_size]
    group_size: int
    # Act-order (GPTQ desc_act): stored column j is original input column perm[j]; None = identity.
    perm: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The float weight in the original input-column order."""
        g = self.group_size
        n, k = self.q.shape
        w = (self.q.float().view(n, k // g, g) - self.zero.float()[..., None]) * self.scale[..., None]
        w = w.view(n, k)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        first = parts[0]
        for p in parts[1:]:
            if p.group_size != first.group_size:
                raise ValueError("fused projections quantized with different group sizes")
            same_perm = (p.perm is None and first.perm is None) or (
                p.perm is not None and first.perm is not None and torch.equal(p.perm, first.perm))
            if not same_perm:
                raise ValueError("fused projections (q/k/v or gate/up) have different act-order permutations "
                                 "(g_idx); they share one input and must be permuted alike")
        return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.zero for p in parts]),
                          torch.cat([p.scale for p in parts]), first.group_size, first.perm)


class Fp8Weight(_PerChannelWeight):
    """float8_e4m3fn values."""


QuantizedWeight = Int8Weight | Int4Weight | Fp8Weight


def _rounded(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to the dtype the scale is stored in, never to zero (an all-zero row keeps q = 0)."""
    return scale.clamp(min=torch.finfo(dtype).tiny).to(dtype).float()


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Per-channel symmetric: scale = max|w_row| / 127 (rounded to the kernel's dtype first)."""
    w = w.float()
    scale = _rounded(w.abs().amax(dim=1) / 127.0, KERNEL_SCALE_DTYPE)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, symmetric: bool = False, scale_dtype: torch.dtype = KERNEL_SCALE_DTYPE
) -> Int4Weight:
    """Group-wise min/max: per group of ``group_size`` input columns, asymmetric
    scale = (max - min) / 15 and zero = round(-min / scale), so each group's range maps onto
    the 16 levels with 0.0 representable exactly; symmetric (GPTQ's ``sym``) uses the range
    [-max|w|, max|w|] and zero = 8. ``scale_dtype`` is the dtype scales are stored in (the
    kernel's bfloat16 on load; float16 for the AWQ/GPTQ checkpoint writers)."""
    n, k = w.shape
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        raise ValueError(f"int4 needs in_features ({k}) divisible by a group size in {INT4_GROUP_SIZES}, "
                         f"got group size {group_size}")
    wg = w.float().view(n, k // group_size, group_size)
    if symmetric:
        hi = wg.abs().amax(dim=-1)
        scale = _rounded(2 * hi / 15.0, scale_dtype)
        zero = torch.full_like(scale, 8.0)
    else:
        lo = wg.amin(dim=-1).clamp(max=0.0)
        hi = wg.amax(dim=-1).clamp(min=0.0)
        scale = _rounded((hi - lo) / 15.0, scale_dtype)
        zero = torch.round(-lo / scale).clamp_(0, 15)
    q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp_(0, 15)
    return Int4Weight(q.view(n, k).to(torch.uint8), zero.to(torch.uint8), scale, group_size)


def quantize_fp8(w: torch.Tensor) -> Fp8Weight:
    """E4M3 with a per-channel scale mapping max|w_row| onto the largest finite value (448)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(q, scale)
