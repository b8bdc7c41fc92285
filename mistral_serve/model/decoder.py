"""The Mistral / Llama decoder (RMSNorm, RoPE, GQA attention over a paged cache, SiLU-gated MLP).

Every layer works on a flat ragged batch of T tokens ([T, hidden]): many sequences, prefill
chunks and decode tokens mixed, no padding. Q/K/V and gate/up are fused into one matmul each
at load time (fewer, larger GEMMs); weights keep their Hugging Face names on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral_serve.model.attention_backend import KVCache, StepMetadata
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementation, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache,
        meta: StepMetadata,
    ) -> torch.Tensor:
        rows = x.shape[0]
        t = meta.cos.shape[0]  # the step's tokens; rows past them are DecoderModel's padding
        qkv = self.qkv_proj(x)[:t]
        # Q and K heads rotate together: one RoPE pass over [T, heads + kv_heads, D].
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), meta.cos, meta.sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        # The attention backend owns both the cache write and the attention (attention_backend.py).
        meta.write_kv(kv_cache, k, v)
        out = meta.attend(q, k, v, kv_cache, self.scale).view(t, self.q_size)
        if rows != t:
            out = F.pad(out, (0, 0, 0, rows - t))
        return self.o_proj(out)


class SiluGateUp(nn.Linear):
    """The fused gate/up projection ([2 × intermediate, hidden]); calling it returns
    silu(gate) * up. The activation lives with the projection so a backend can fuse the two
    (``cpu_linear.PackedSiluGateUp``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = super().forward(x).chunk(2, dim=-1)
        return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = SiluGateUp(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Token ids [T] (positions travel in the attention metadata) → logits of the rows that sample."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.quantization = "none"  # the loader sets the method its projections were built with
        # Token rows per step are padded to a multiple of this (the loader sets it for oneDNN-
        # packed layers: cpu_linear.PACKED_ROW_BUCKET). Padding rows are zeros and stay zeros.
        self.row_bucket = 1
        self.rope = RotaryEmbedding(config, max_positions, dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_caches: list[KVCache],
        meta: StepMetadata,
        logits_index: torch.Tensor,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        pad = -x.shape[0] % self.row_bucket
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, kv_cache, meta)
        # Only the last token of each sequence that samples this step needs the vocab projection.
        x = self.norm(x[logits_index])
        return self.lm_head(x).float()
