"""Builds a model's quantized linear layers (and int8 embedding table) while the checkpoint
streams past, one layer at a time.

The decoder's projections (fused q/k/v, o, fused gate/up, down in every layer) are replaced on
the meta device by placeholders before the model is materialised, so their float weights are
never allocated. ``accept`` takes each checkpoint tensor that belongs to one of them; once
every tensor of a projection has arrived, its parts are quantized (a float checkpoint) or
decoded and repacked (AWQ / GPTQ), fused, moved to the device, and the placeholder is swapped
for the kernel's layer, after which the float parts are dropped. Host memory therefore holds
the quantized model plus at most the pending parts of the layers in flight (one layer's worth
with the usual name-sorted shards), never a second full copy.

The input embedding table goes the same way (``embedding.py``: int8 per row, unless tied to
the lm_head), for every method: a pre-quantized AWQ / GPTQ checkpoint stores it in float16
like any other, so its model holds the same bytes as one quantized on load.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from mistral_serve.model.quantization import awq, gptq
from mistral_serve.model.quantization.config import QuantizationConfig
from mistral_serve.model.quantization.embedding import Int8Embedding, quantizes_embedding
from mistral_serve.model.quantization.linear import build_linear
from mistral_serve.model.quantization.schemes import (
    Fp8Weight,
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

# Our (fused) projection → its Hugging Face parts, in the order they are stacked.
PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
GATE_UP = "mlp.gate_up_proj"
EMBEDDING = "model.embed_tokens.weight"
logger = logging.getLogger(__name__)
_HF_NAME = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(\w+)$")


class _Pending(nn.Module):
    """Stands in for a projection (or the embedding) until its weights have arrived; calling it is a bug."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("quantized layer was never loaded from the checkpoint")


def _part_decoder(qc: QuantizationConfig) -> tuple[tuple[str, ...], Callable[[dict, str], QuantizedWeight]]:
    """The tensor names one HF projection has in this checkpoint, and how they become a weight."""
    if qc.method == "awq":
        return awq.TENSORS, lambda t, name: awq.decode(t, qc.group_size, name)
    if qc.method == "gptq":
        return gptq.TENSORS, lambda t, name: gptq.decode(t, qc.group_size, qc.zero_offset, name)
    quantize = _on_load_quantizer(qc)
    return ("weight",), lambda t, name: quantize(t["weight"])


def _on_load_quantizer(qc: QuantizationConfig) -> Callable[[torch.Tensor], QuantizedWeight]:
    if qc.prequantized:
        raise ValueError(f"{qc.method} weights come from a checkpoint; on-load quantization is int8, int4 or fp8")
    return {"int8": quantize_int8, "int4": lambda w: quantize_int4(w, qc.group_size), "fp8": quantize_fp8}[qc.method]


_CAT = {Int8Weight: Int8Weight.cat, Int4Weight: Int4Weight.cat, Fp8Weight: Fp8Weight.cat}


class QuantizedLayerLoader:
    def __init__(self, model: nn.Module, qc: QuantizationConfig, device: torch.device, dtype: torch.dtype,
                 float_gate_up: type[nn.Linear]) -> None:
        """Swap every projection of ``model`` (still on the meta device), and its embedding
        unless tied, for a placeholder."""
        self.qc, self.device, self.dtype, self.float_gate_up = qc, device, dtype, float_gate_up
        self.suffixes, self.decode = _part_decoder(qc)
        self.model = model
        # (layer, our projection) → {HF part: {tensor suffix: tensor}}
        self.pending: dict[tuple[int, str], dict[str, dict[str, torch.Tensor]]] = {}
        self.shapes: dict[tuple[int, str], list[tuple[int, int]]] = {}
        # Checkpoint bytes held for projections not yet built, now and at most (logged by finish).
        self.pending_bytes = 0
        self.peak_pending_bytes = 0
        for i, layer in enumerate(model.layers):
            for ours, parts in PROJECTIONS.items():
                parent_name, leaf = ours.split(".")
                parent = getattr(layer, parent_name)
                fused: nn.Linear = getattr(parent, leaf)
                self.shapes[(i, ours)] = self._part_shapes(fused, len(parts), ours)
                self.pending[(i, ours)] = {p: {} for p in parts}
                setattr(parent, leaf, _Pending())
        self.quantize_embedding = quantizes_embedding(model.config)
        if self.quantize_embedding:
            model.embed_tokens = _Pending()

    def _part_shapes(self, fused: nn.Linear, num_parts: int, ours: str) -> list[tuple[int, int]]:
        cfg = self.model.config
        k = fused.in_features
        if ours == "self_attn.qkv_proj":
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            return [(q, k), (kv, k), (kv, k)]
        return [(fused.out_features // num_parts, k)] * num_parts

    def accept(self, hf_name: str, tensor: torch.Tensor) -> bool:
        """Take ``tensor`` if it belongs to a quantized projection or table (True), else leave it (False)."""
        if hf_name == EMBEDDING and self.quantize_embedding:
            self._build_embedding(tensor)
            return True
        m = _HF_NAME.match(hf_name)
        if m is None:
            return False
        layer, block, proj, suffix = int(m[1]), m[2], m[3], m[4]
        part = f"{block}.{proj}"
        ours = next((o for o, parts in PROJECTIONS.items() if part in parts), None)
        if ours is None:
            return False
        key = (layer, ours)
        if key not in self.pending:
            if key in self.shapes:
                raise ValueError(f"{hf_name}: tensor after its layer was complete (duplicate in the checkpoint?)")
            raise KeyError(f"unexpected tensor {hf_name!r}: the model has no layer {layer}")
        if suffix not in self.suffixes:
            expected = ", ".join(self.suffixes)
            raise ValueError(f"{hf_name}: a {self.qc.method} checkpoint stores {expected} for each linear layer, "
                             f"not {suffix!r}" + (" (is this a float checkpoint with a stale quantization_config?)"
                                                  if suffix == "weight" else ""))
        self.pending[key][part][suffix] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        self.peak_pending_bytes = max(self.peak_pending_bytes, self.pending_bytes)
        if all(len(t) == len(self.suffixes) for t in self.pending[key].values()):
            self._build(key)
        return True

    def _build_embedding(self, tensor: torch.Tensor) -> None:
        if not self._embedding_pending():
            raise ValueError(f"{EMBEDDING}: a second copy in the checkpoint")
        cfg = self.model.config
        if tuple(tensor.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"{EMBEDDING}: checkpoint shape {tuple(tensor.shape)} != model "
                             f"{(cfg.vocab_size, cfg.hidden_size)}")
        self.model.embed_tokens = Int8Embedding.from_float(tensor, self.device, self.dtype)

    def _embedding_pending(self) -> bool:
        return isinstance(self.model.embed_tokens, _Pending)

    def _build(self, key: tuple[int, str]) -> None:
        layer, ours = key
        parts = self.pending.pop(key)
        weights = []
        for (name, tensors), shape in zip(parts.items(), self.shapes[key]):
            hf = f"model.layers.{layer}.{name}"
            self.pending_bytes -= sum(t.numel() * t.element_size() for t in tensors.values())
            # Quantize / repack where the layer will live (on a GPU that is the fast place).
            tensors = {s: t.to(self.device) for s, t in tensors.items()}
            if self.suffixes == ("weight",) and tuple(tensors["weight"].shape) != shape:
                raise ValueError(f"{hf}.weight: checkpoint shape {tuple(tensors['weight'].shape)} != model {shape}")
            w = self.decode(tensors, hf)
            if tuple(w.q.shape) != shape:
                raise ValueError(f"{hf}: {self.qc.method} weight decodes to shape {tuple(w.q.shape)}, "
                                 f"the model needs {shape}")
            weights.append(w)
        fused = _CAT[type(weights[0])](weights) if len(weights) > 1 else weights[0]
        parent_name, leaf = ours.split(".")
        parent = getattr(self.model.layers[layer], parent_name)
        setattr(parent, leaf, build_linear(fused, self.device, self.dtype, ours == GATE_UP, self.float_gate_up))

    def finish(self) -> None:
        """Every projection (and the quantized embedding) must have been built; name what is missing otherwise."""
        if self._embedding_pending():
            raise ValueError(f"checkpoint lacks {EMBEDDING}")
        if self.pending:
            (layer, ours), parts = next(iter(self.pending.items()))
            missing = [f"model.layers.{layer}.{p}.{s}" for p, t in parts.items() for s in self.suffixes if s not in t]
            raise ValueError(f"checkpoint lacks {self.qc.method} tensors for {len(self.pending)} projections, "
                             f"e.g. {missing[:4]}")
        logger.info("%s: built %d quantized projections; at most %.1f MiB of checkpoint tensors were pending at once",
                    self.qc.method, len(self.shapes), self.peak_pending_bytes / 2**20)


def quantize_in_place(model: nn.Module, qc: QuantizationConfig, device: torch.device, dtype: torch.dtype,
                      float_gate_up: type[nn.Linear]) -> None:
    """Quantize the projections (and the untied embedding) of an already materialised float
    model (random weights for benchmarks), layer by layer, as a checkpoint load would.
    Quantizing a fused weight equals fusing quantized parts: every scale is per output row."""
    quantize = _on_load_quantizer(qc)
    if quantizes_embedding(model.config):
        model.embed_tokens = Int8Embedding.from_float(model.embed_tokens.weight.detach(), device, dtype)
    for layer in model.layers:
        for ours in PROJECTIONS:
            parent_name, leaf = ours.split(".")
            parent = getattr(layer, parent_name)
            weight = quantize(getattr(parent, leaf).weight.detach())
            setattr(parent, leaf, build_linear(weight, device, dtype, ours == GATE_UP, float_gate_up))
