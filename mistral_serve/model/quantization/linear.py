"""Quantized linear layers over PyTorch's own kernels, and the choice of layer per device.

Kernels (all in the pinned torch; no extra dependency):

- int8: ``torch._weight_int8pack_mm`` (int8 weight [N, K], per-channel scales).
- int4: on CPU ``aten._convert_weight_to_int4pack_for_cpu`` + ``torch._weight_int4pack_mm_for_cpu``;
  on CUDA ``torch._convert_weight_to_int4pack`` + ``torch._weight_int4pack_mm`` (tinygemm,
  sm80+). Both take group-wise scales and zeros as ``[K / g, N, 2]`` with the dequantization
  ``(q - 8) * scale + zero'``; ours is ``(q - z) * scale``, so ``zero' = (8 - z) * scale``.
- fp8: ``torch._scaled_mm`` with row-wise scales (a per-token scale for the activations,
  a per-channel one for the weight), on CUDA GPUs with FP8 tensor cores (compute
  capability 8.9+: Ada, Hopper).

Activations are cast to bfloat16 at the kernel and its output back to the model's dtype:
on CPU these kernels are vectorised for bfloat16 only (a float32 input takes a scalar path,
measured 50-150x slower than float32 oneDNN), and the CUDA int4 and row-wise FP8 kernels
accept bfloat16 only. The model around them (norms, attention, KV cache, the float32
vocabulary projection) keeps its dtype.

Where a scheme has no working kernel on the device (fp8 on CPU: ``_scaled_mm`` runs there
but as a reference loop, ~100x slower than float32), the weights are dequantized at load into
a plain ``nn.Linear`` (which ``cpu_linear`` then packs with oneDNN) and a warning says so:
numerics follow the quantized weights, memory and speed do not.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from mistral_serve.model.quantization.schemes import (
    FP8_MAX,
    KERNEL_SCALE_DTYPE,
    Fp8Weight,
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
)

logger = logging.getLogger(__name__)
COMPUTE_DTYPE = torch.bfloat16


class _QuantizedLinear(nn.Module):
    """Bias-free linear over [..., K] inputs; subclasses implement ``_matmul`` on 2-D bfloat16."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(_QuantizedLinear):
    def __init__(self, w: Int8Weight, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = w.q.shape
        self.register_buffer("qweight", w.q.to(device).contiguous())
        self.register_buffer("scales", w.scale.to(device, KERNEL_SCALE_DTYPE))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self.scales)


class Int4Linear(_QuantizedLinear):
    # tinygemm's inner k-tiles on CUDA (torchao's default; K must be a multiple of 16 x this).
    CUDA_INNER_K_TILES = 8

    def __init__(self, w: Int4Weight, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = w.q.shape
        self.group_size = w.group_size
        q = w.q.to(device)
        if device.type == "cuda":
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # uint8 [N, K/2], even column high
            packed = torch._convert_weight_to_int4pack(pairs, self.CUDA_INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        zero = (8.0 - w.zero.float()) * w.scale
        self.register_buffer("scales_and_zeros",
                             torch.stack([w.scale.T, zero.T], dim=-1).to(device, KERNEL_SCALE_DTYPE).contiguous())
        self.register_buffer("perm", None if w.perm is None else w.perm.to(device))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if x.is_cuda:
            return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)


class Fp8Linear(_QuantizedLinear):
    """W8A8 FP8: the weight is E4M3 with per-channel scales; each call quantizes the
    activations per token (row) with a dynamic scale max|x_row| / 448."""

    def __init__(self, w: Fp8Weight, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = w.q.shape
        self.register_buffer("qweight", w.q.to(device).contiguous())  # [N, K]; .t() is column-major
        self.register_buffer("scale", w.scale.to(device, torch.float32)[None, :].contiguous())  # [1, N]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / FP8_MAX  # [M, 1]
        xq = (xf / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scale, out_dtype=COMPUTE_DTYPE)


class QuantizedSiluGateUp(nn.Module):
    """silu(gate) * up over a quantized fused [2 x intermediate, hidden] gate/up projection."""

    def __init__(self, inner: _QuantizedLinear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.inner(x).chunk(2, dim=-1)
        return F.silu(gate) * up


_LAYERS: dict[type, type[_QuantizedLinear]] = {Int8Weight: Int8Linear, Int4Weight: Int4Linear, Fp8Weight: Fp8Linear}
SCHEME_NAMES = {Int8Weight: "int8", Int4Weight: "int4", Fp8Weight: "fp8"}


def _probe_weight(kind: type) -> QuantizedWeight:
    """A small weight of each scheme, shaped to meet every kernel's alignment (N, K mult. of 128)."""
    n = k = 128
    if kind is Int8Weight:
        return Int8Weight(torch.ones(n, k, dtype=torch.int8), torch.ones(n))
    if kind is Int4Weight:
        return Int4Weight(torch.full((n, k), 9, dtype=torch.uint8), torch.full((n, 1), 8, dtype=torch.uint8),
                          torch.ones(n, 1), 128)
    return Fp8Weight(torch.ones(n, k).to(torch.float8_e4m3fn), torch.ones(n))


@functools.cache
def kernel_unavailable(kind: type, device: torch.device) -> str | None:
    """Why ``kind`` has no usable kernel on ``device`` (None: it has one). Asked of the device
    once, by running the real layer on a small weight and checking the result, so a kernel
    missing from this build or this GPU generation is found at load, not mid-request."""
    if kind is Fp8Weight:
        if device.type != "cuda":
            return "no FP8 matmul kernel on CPU (torch._scaled_mm runs there only as a slow reference)"
        if torch.cuda.get_device_capability(device) < (8, 9):
            return f"FP8 needs compute capability 8.9+ (this GPU: {torch.cuda.get_device_capability(device)})"
    try:
        layer = _LAYERS[kind](_probe_weight(kind), device)
        y = layer(torch.ones(4, 128, device=device))
        if not torch.allclose(y.float().cpu(), torch.full((4, 128), 128.0), rtol=1e-2):
            return f"the {SCHEME_NAMES[kind]} kernel returned wrong values on {device}"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


@functools.cache
def _warn_dequantized(scheme: str, device: torch.device, dtype: torch.dtype, reason: str) -> None:
    logger.warning("%s: %s on %s; its weights are dequantized to %s at load (the numerics of %s, but neither "
                   "its memory saving nor its speed)", scheme, reason, device, dtype, scheme)


def build_linear(w: QuantizedWeight, device: torch.device, dtype: torch.dtype, silu_gate_up: bool,
                 float_gate_up: type[nn.Linear]) -> nn.Module:
    """The layer for one (fused) projection: the scheme's kernel where the device has one,
    otherwise a float ``nn.Linear`` (``float_gate_up`` for the gate/up projection) holding the
    dequantized weight, with a warning."""
    kind = type(w)
    reason = kernel_unavailable(kind, device)
    if reason is None:
        layer = _LAYERS[kind](w, device)
        return QuantizedSiluGateUp(layer) if silu_gate_up else layer
    _warn_dequantized(SCHEME_NAMES[kind], device, dtype, reason)
    n, k = w.q.shape
    cls = float_gate_up if silu_gate_up else nn.Linear
    with torch.device("meta"):
        layer = cls(k, n, bias=False)
    layer.weight = nn.Parameter(w.dequantize().to(device, dtype), requires_grad=False)
    return layer
