"""The interface between the decoder and an attention implementation.

A backend owns three things, so that the decoder never knows which one runs:

* the KV pool's layout (``kv_cache_shape``): one K and one V tensor per layer;
* the per-step metadata (``build_metadata``), built once per step on the host from the step's
  ``StepGeometry`` and shared by every layer;
* through that metadata, the KV-cache write (``StepMetadata.write_kv``) and the attention
  call (``StepMetadata.attend``) each layer makes.

Backends: ``attention.TorchBackend`` (portable SDPA, CPU and CUDA) and
``attention_flashinfer.FlashInferBackend`` (CUDA, fp16/bf16); ``attention_select`` picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from mistral_serve.model.step_layout import StepGeometry

KVCache = tuple[torch.Tensor, torch.Tensor]


class StepMetadata(ABC):
    """One step's attention state, shared by all layers. ``cos``/``sin`` ([T, 1, head_dim / 2])
    are the RoPE tables at each token's position, set by the model runner."""

    cos: torch.Tensor | None
    sin: torch.Tensor | None

    @abstractmethod
    def write_kv(self, kv_cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's new keys/values ``k``/``v`` [T, KVH, D] in one layer's cache."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
               scale: float) -> torch.Tensor:
        """Attention of the flat queries q [T, H, D] → [T, H, D], after ``write_kv``."""


@dataclass
class StepLayout:
    """A backend's ``build_metadata`` result: the flat-batch order of the sequences (indices
    into the step's inputs), each token's position on the device, and the metadata (RoPE
    tables not yet set)."""

    order: list[int]
    positions: torch.Tensor  # [T], on the device
    meta: StepMetadata


class AttentionBackend(ABC):
    """Builds a step's metadata for one model (heads, block size, window fixed at start)."""

    name: ClassVar[str]
    # Whether ``build_metadata(..., graph_size=P)`` returns static-address metadata that a
    # captured CUDA graph can replay (``engine.cuda_graphs``).
    supports_decode_graphs: ClassVar[bool] = False

    def __init__(self, block_size: int, sliding_window: int | None, device: torch.device) -> None:
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.device = device

    @abstractmethod
    def kv_cache_shape(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's K (and V) tensor holding ``num_blocks`` blocks."""

    @abstractmethod
    def build_metadata(self, geom: StepGeometry, graph_size: int | None = None) -> StepLayout:
        """The step's metadata. ``graph_size``: the step is a decode-only batch padded to a
        captured CUDA-graph size; only backends with ``supports_decode_graphs`` accept it."""
