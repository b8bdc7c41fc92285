"""Linear layers for CPU inference with weights pre-packed once into oneDNN's blocked layout.

``F.linear`` on CPU goes to MKL's sgemm, which re-packs the weight into its internal panel
format on every call; at decode batch sizes (one row per running sequence) that repacking is a
large share of the step. oneDNN's matmul with a weight reordered ahead of time skips it: on 2
cores, float32, measured interleaved, with results equal to within float32 rounding (max error
vs a float64 reference 3.5e-6, MKL's 2.1e-6):

- vocabulary projection 256→32768: 64 rows 9.4 → 5.6 ms, 8 rows 3.9 → 1.5 ms, against the best
  MKL layout found (weight pre-transposed and cut into cache-sized column blocks; plain
  F.linear is slower still, 16 ms at 64 rows);
- layer GEMMs (256→1536, 768→256, 256→384) at 64 and 2,048 rows: 1.1-1.4× faster than F.linear.

The MLP's gate/up projection also fuses its activation into the matmuls (oneDNN post-ops):
gate with ``swish`` (= SiLU), up with a ``mul`` by that result, so silu(gate) * up never makes
extra passes over [tokens, 2 × intermediate] tensors: 1.8× faster at 8,855 rows (a whole
prefill of the shared workload), 1.15-1.3× at 64-2,048 rows.

This is the kernel vLLM's CPU backend uses for its linear layers. The op is the one PyTorch's
own compiler (Inductor, ``freezing``) emits for CPU linear layers; it exists in every x86 build
of the pinned torch. Which dtypes oneDNN can pack depends on the CPU, not on the build: bfloat16 needs AVX-512
(BW/VL/DQ) or AVX-NE-CONVERT, float16 AVX512-FP16 or AVX-NE-CONVERT, and machines of this
project's kind come with either an Intel Xeon (AVX-512) or an AMD EPYC (AVX2 only), where
packing a bf16 weight raises. ``can_pack`` therefore asks oneDNN itself, once per dtype, by
packing a tiny weight; a dtype it refuses keeps plain ``nn.Linear`` (ATen's own kernels, which
run every dtype on every x86 CPU), with one warning. ``ONEDNN_MAX_CPU_ISA=AVX2`` reproduces
an AVX2-only CPU on an AVX-512 one (tests/test_cpu_linear.py).
"""

from __future__ import annotations

import functools
import logging
import os

# oneDNN keeps one primitive per (shape, post-op) it has run, 1,024 of them by default, and
# builds one for every new shape: a step's row count is the step's token count, and a first
# seen row count costs a packed linear ~0.85 ms more (1.41 against 0.56 ms for 1,000-1,100
# rows, 256 -> 384, 2-vCPU AMD EPYC), ~18 ms over a step of the tiny model's 21 calls. Cycling
# through more shapes than the cache holds rebuilds them again and again (1,500 row counts:
# 2.2 ms per call on the second pass at the default capacity, 0.40 ms at 4,096). Read once, at
# oneDNN's first primitive: set before any packed layer runs, unless the user chose a value.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

import torch  # noqa: E402 - after the variable oneDNN reads
from torch import nn  # noqa: E402

logger = logging.getLogger(__name__)

# A model with packed layers runs every step on a multiple of this many token rows (zero
# rows past the step's tokens; decoder.DecoderModel), so prefill and mixed steps meet at most
# max_num_batched_tokens / 32 shapes, all built within the first steps, instead of a new one
# per step. The padding costs < 32 rows of matmul (< 1.6% of a 2,048-token step).
PACKED_ROW_BUCKET = 32


class PackedLinear(nn.Module):
    """A bias-free ``nn.Linear`` replacement holding only the packed weight (no second copy)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")


class PackedSiluGateUp(nn.Module):
    """silu(x W_gate^T) * (x W_up^T) from a fused [2 × intermediate, hidden] gate/up weight, as two
    packed matmuls whose post-ops apply the SiLU and the product."""

    def __init__(self, gate_up_weight: torch.Tensor) -> None:
        super().__init__()
        gate, up = gate_up_weight.detach().chunk(2, dim=0)
        self.register_buffer("packed_gate", torch.ops.mkldnn._reorder_linear_weight(gate.contiguous(), None))
        self.register_buffer("packed_up", torch.ops.mkldnn._reorder_linear_weight(up.contiguous(), None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.ops.mkldnn._linear_pointwise(x, self.packed_gate, None, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.packed_up, None, "mul")


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear layers of ``dtype`` on ``device`` get oneDNN-packed weights."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and _onednn_packs(dtype)


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), None)
        return True
    except RuntimeError as exc:
        logger.warning("oneDNN cannot pack %s weights on this CPU (%s); using plain linear layers", dtype,
                       str(exc).splitlines()[0])
        return False


def pack_linear_layers(
    model: nn.Module,
    skip: set[nn.Module] = frozenset(),
    silu_gate_up: type[nn.Linear] | None = None,
) -> None:
    """Swap, in place, every bias-free plain ``nn.Linear`` under ``model`` (except those in
    ``skip``) for a ``PackedLinear``, and every module of type ``silu_gate_up`` (a fused gate/up
    projection whose forward returns silu(gate) * up) for a ``PackedSiluGateUp``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.bias is not None or child in skip:
                continue
            if silu_gate_up is not None and isinstance(child, silu_gate_up):
                setattr(parent, name, PackedSiluGateUp(child.weight))
            elif type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child.weight))
