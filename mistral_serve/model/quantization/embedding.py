"""The input embedding table of a quantized model: int8 rows with one scale per row.

Why it is quantized: with 4-bit projections, Mistral 7B's two bf16 vocabulary matrices
(32768 x 4096 each) are 13% of its weights, and the input table alone puts int4 at 4.25 GB,
over the 4.2 GB the model should fit in. int8 halves the table (-0.13 GB) at an error far
below the model's: a token's embedding is read once, as the input of the residual stream,
and its relative RMS error (0.0087 for Gaussian rows of 4096) is one rounding against the
int4 projections (~0.10 each) the token then passes through. A lookup reads only the batch's
rows, so this saves memory, not decode bandwidth.

Why only the input table: the vocabulary projection (lm_head) writes the logits directly,
with no normalisation after it, and every published 4-bit format (AWQ, GPTQ) and vLLM keep it
in the model dtype; so it stays float here too. A table tied to the lm_head (Llama 3.2's
``tie_word_embeddings``) therefore stays float as well: quantizing it would quantize the head.

The format is ``Int8Weight`` (per output channel = per row of the [vocab, hidden] table,
symmetric, bfloat16 scale): ``row[v] = q[v] * scale[v]``. The lookup is an ``index_select``
of int8 rows and one multiply, the same ops on CPU (no ISA-specific kernel: AVX2 and AVX-512
alike) and CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral_serve.model.config import ModelConfig
from mistral_serve.model.quantization.schemes import KERNEL_SCALE_DTYPE, Int8Weight, quantize_int8


def quantizes_embedding(config: ModelConfig) -> bool:
    """Whether a quantized model of ``config`` (any method) holds its input embedding as int8:
    yes unless the table is tied to the lm_head, which stays in the model dtype."""
    return not config.tie_word_embeddings


class Int8Embedding(nn.Module):
    """Token ids [...] → rows [..., hidden] in ``dtype``, dequantized from int8 at lookup."""

    def __init__(self, w: Int8Weight, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = w.q.shape
        self.dtype = dtype
        self.register_buffer("qweight", w.q.to(device).contiguous())
        self.register_buffer("scales", w.scale.to(device, KERNEL_SCALE_DTYPE))

    @classmethod
    def from_float(cls, weight: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Int8Embedding:
        """The table of a float [vocab, hidden] embedding, quantized on ``device`` (fast on a GPU)."""
        return cls(quantize_int8(weight.to(device)), device, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        # int8 x bfloat16 is exact in float32; one rounding to the model dtype, as the float
        # table's own storage would have (a float16 model never sees a bfloat16 scale).
        rows = self.qweight.index_select(0, ids).float() * self.scales.index_select(0, ids).float()[:, None]
        return rows.to(self.dtype).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"
