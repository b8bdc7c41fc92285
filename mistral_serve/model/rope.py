"""Rotary position embeddings, including Llama 3.1's ``rope_scaling`` of type ``llama3``.

The cos/sin tables are computed once in float32 for every position the engine may see and
then indexed by each token's absolute position, so a ragged batch needs no per-sequence work.
"""

from __future__ import annotations

import math

import torch

from mistral_serve.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling is None:
        return inv_freq
    return _llama3_scaling(inv_freq, config.rope_scaling)


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: stretch low frequencies by ``factor``, keep high ones, blend in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Holds cos/sin tables of shape [max_positions, head_dim / 2] in the model dtype (filled by
    build_tables): one entry per frequency, which HF's half-split layout uses for both halves."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config, self.max_positions, self.dtype = config, max_positions, dtype
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def build_tables(self, device: torch.device) -> None:
        """Compute the tables on ``device``; the loader calls it once the model is materialised."""
        inv_freq = inverse_frequencies(self.config)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        self.cos = freqs.cos().to(device=device, dtype=self.dtype)
        self.sin = freqs.sin().to(device=device, dtype=self.dtype)

    def tables_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim / 2] for the tokens' absolute positions (once per step)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] (HF's half-split layout, not interleaved pairs) with the half
    tables of ``tables_at``: x1 * cos - x2 * sin, x2 * cos + x1 * sin, each half written in
    place into one new tensor. HF's form (x * cos + cat(-x2, x1) * sin) makes five passes and
    two temporaries over [T, heads, D]: 6.9 ms against 1.9 ms for a 4,096-token prefill of the
    tiny model's 10 Q+K heads (2-vCPU AMD EPYC)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out
