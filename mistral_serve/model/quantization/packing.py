"""Eight 4-bit values per int32, in a given nibble order: the packing both AWQ and GPTQ use."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [..., C] → int32 [..., 8 C]: output column 8c + order[i] is nibble i (bits 4i..4i+3)
    of packed column c."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed 4-bit tensors are int32, got {packed.dtype}")
    nibbles = (packed[..., None] >> _SHIFTS.to(packed.device)) & 0xF  # [..., C, 8], nibble i at index i
    inverse = sorted(range(8), key=lambda i: order[i])  # inverse[j] = the nibble holding value j
    return nibbles[..., inverse].flatten(-2)


def pack_int4(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``unpack_int4``: values in [0, 15], last dim a multiple of 8."""
    if values.shape[-1] % 8:
        raise ValueError(f"the packed dimension ({values.shape[-1]}) must be a multiple of 8")
    if values.min() < 0 or values.max() > 15:
        raise ValueError("4-bit values must lie in [0, 15]")
    v = values.to(torch.int64).unflatten(-1, (-1, 8))[..., list(order)]  # nibble i = value order[i]
    word = (v << _SHIFTS.to(values.device, torch.int64)).sum(dim=-1)
    # Two's complement: a word with the top nibble >= 8 is negative as int32.
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
