"""Load a Hugging Face checkpoint (local directory or hub name) into ``DecoderModel``.

One path for every checkpoint: the embedded tiny model, ``mistralai/Mistral-7B-Instruct-v0.3``
and Llama 3.1 alike are a directory with ``config.json`` and ``*.safetensors`` (one file or
shards listed in ``model.safetensors.index.json``), tensors named as transformers names them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from mistral_serve.model.config import ModelConfig
from mistral_serve.model.cpu_linear import PACKED_ROW_BUCKET, can_pack, pack_linear_layers
from mistral_serve.model.decoder import DecoderModel, SiluGateUp
from mistral_serve.model.quantization.config import resolve_quantization
from mistral_serve.model.quantization.loading import QuantizedLayerLoader, quantize_in_place

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model*", "tekken.json"]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub repo id resolved through the HF cache.

    With ``HF_HUB_OFFLINE=1`` only the local cache is consulted, which is how air-gapped
    clusters run after pre-seeding the model cache volume.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"model {str(name_or_path)!r} is neither a checkpoint directory nor a hub repo id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=_HUB_PATTERNS))


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) over all shards, one tensor in memory at a time."""
    for file in _checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# HF per-projection names → (our fused parameter, position of the part in the fused matrix).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _part_rows(model: DecoderModel, fused: str, part: int) -> tuple[int, int]:
    """Row range of part ``part`` inside a fused weight."""
    cfg = model.config
    if fused == "qkv_proj":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        starts = [0, q, q + kv, q + 2 * kv]
    else:
        i = cfg.intermediate_size
        starts = [0, i, 2 * i]
    return starts[part], starts[part + 1]


def load_weights(model: DecoderModel, model_dir: Path, quantized: QuantizedLayerLoader | None = None) -> None:
    """Copy checkpoint tensors into the (already materialised) model, fusing as we go; the
    projections of a quantized model go to ``quantized``, which builds their layers."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for hf_name, tensor in iter_checkpoint(model_dir):
        if "rotary_emb" in hf_name:
            continue
        if quantized is not None and quantized.accept(hf_name, tensor):
            continue
        name = hf_name.removeprefix("model.")
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, part = _FUSED[parts[-2]]
            name = ".".join(parts[:-2] + [fused, parts[-1]])
            lo, hi = _part_rows(model, fused, part)
            target = params[name].data[lo:hi]
            loaded.add(f"{name}#{part}")
        elif name in params:
            target = params[name].data
            loaded.add(name)
        else:
            raise KeyError(f"unexpected tensor {hf_name!r} in checkpoint {model_dir}")
        if target.shape != tensor.shape:
            raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
        target.copy_(tensor)
    expected = set()
    for name in params:
        leaf = name.split(".")[-2]
        if leaf in ("qkv_proj", "gate_up_proj"):
            expected |= {f"{name}#{p}" for p in range(3 if leaf == "qkv_proj" else 2)}
        else:
            expected.add(name)
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        loaded.discard("lm_head.weight")
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensors: {sorted(missing)[:5]}…")
    if quantized is not None:
        quantized.finish()


def load_model(
    model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
    quantization: str = "none",
) -> DecoderModel:
    """Build the model without initialising random weights, then fill it from the checkpoint.

    ``quantization`` (the engine argument) or the checkpoint's own ``quantization_config``
    selects quantized projections; those are never materialised in float
    (``quantization.loading``), and the oneDNN packing below leaves them alone (it only swaps
    plain ``nn.Linear`` layers)."""
    qc = resolve_quantization(quantization, config.raw)
    with torch.device("meta"):
        model = DecoderModel(config, max_positions, dtype).to(dtype)
    quantized = QuantizedLayerLoader(model, qc, device, dtype, SiluGateUp) if qc is not None else None
    model.quantization = qc.method if qc is not None else "none"
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.build_tables(device)
    with torch.no_grad():
        load_weights(model, model_dir, quantized)
    _pack_for_cpu(model, config, device, dtype)
    return model.eval().requires_grad_(False)


def _pack_for_cpu(model: DecoderModel, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """oneDNN-packed linear layers where the CPU can pack ``dtype``, and the row bucketing
    their shape-keyed primitives need (``cpu_linear.PACKED_ROW_BUCKET``)."""
    if not can_pack(device, dtype):
        return
    # The tied head stays shared with the embedding table rather than packing a second copy.
    pack_linear_layers(model, skip={model.lm_head} if config.tie_word_embeddings else set(),
                       silu_gate_up=SiluGateUp)
    model.row_bucket = PACKED_ROW_BUCKET


def build_random_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int, seed: int = 0, std: float = 0.02,
    quantization: str = "none",
) -> DecoderModel:
    """The model of ``config`` with random weights drawn N(0, ``std``) directly on ``device``
    (norms are ones, like ``tiny.random_weights``), without a checkpoint: for benchmarks whose
    timing does not depend on weight values, e.g. Mistral 7B's full shape on a GPU without
    writing 14 GB of safetensors. Same layout and CPU packing as ``load_model``; takes the same
    arguments after ``model_dir``, so it can stand in for it. ``quantization`` (int8, int4,
    fp8) quantizes the projections after drawing them."""
    with torch.device("meta"):
        model = DecoderModel(config, max_positions, dtype).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.build_tables(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=gen)
        qc = resolve_quantization(quantization, config.raw)
        if qc is not None:
            quantize_in_place(model, qc, device, dtype, SiluGateUp)
            model.quantization = qc.method
    _pack_for_cpu(model, config, device, dtype)
    return model.eval().requires_grad_(False)
