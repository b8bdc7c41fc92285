"""Build the embedded default model: a tiny random-weight checkpoint of Mistral 7B's architecture.

It is written exactly as a Hugging Face checkpoint directory (config.json, model.safetensors,
generation_config.json, tokenizer files) so the engine loads it through the same code path as
``mistralai/Mistral-7B-Instruct-v0.3``. The tokenizer is the real Mistral v3 sentencepiece
model shipped inside the ``mistral-common`` wheel. Same seed → byte-identical weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

V3_TOKENIZER = "mistral_instruct_tokenizer_240323.model.v3"

# Mistral 7B scaled down: same vocab, GQA ratio 4:1, RoPE theta 1e6, head_dim 32.
TINY_SHAPE = {
    "vocab_size": 32768,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "head_dim": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def v3_tokenizer_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / V3_TOKENIZER


def tiny_config(
    arch: str = "mistral",
    sliding_window: int | None = 128,
    kv_heads: int = 2,
    rope_scaling: str | None = None,
) -> dict:
    """config.json contents in the format of the published checkpoints."""
    if arch not in ("mistral", "llama"):
        raise ValueError("arch must be 'mistral' or 'llama'")
    cfg = dict(TINY_SHAPE, num_key_value_heads=kv_heads, torch_dtype="float32")
    if arch == "mistral":
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=sliding_window)
    else:
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False)
        if sliding_window:
            raise ValueError("Llama models have no sliding window")
    if rope_scaling == "llama3":
        cfg["rope_scaling"] = dict(LLAMA31_ROPE_SCALING)
    elif rope_scaling is not None:
        raise ValueError("rope_scaling must be None or 'llama3'")
    return cfg


def random_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """HF-named tensors drawn N(0, 0.02) (transformers' initializer_range); norms are ones."""
    gen = torch.Generator().manual_seed(seed)
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    weights = {"model.embed_tokens.weight": normal(v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        weights[p + "self_attn.q_proj.weight"] = normal(heads * d, h)
        weights[p + "self_attn.k_proj.weight"] = normal(kv * d, h)
        weights[p + "self_attn.v_proj.weight"] = normal(kv * d, h)
        weights[p + "self_attn.o_proj.weight"] = normal(h, heads * d)
        weights[p + "mlp.gate_proj.weight"] = normal(i, h)
        weights[p + "mlp.up_proj.weight"] = normal(i, h)
        weights[p + "mlp.down_proj.weight"] = normal(h, i)
        weights[p + "input_layernorm.weight"] = torch.ones(h)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(h)
    weights["model.norm.weight"] = torch.ones(h)
    weights["lm_head.weight"] = normal(v, h)
    return weights


def write_tokenizer(out: Path, mistral_common_files: bool) -> None:
    """The v3 sentencepiece model as both mistral-common and HF tokenizer files.

    ``tokenizer.model.v3`` is what the Mistral repos ship for mistral-common; the HF files
    (tokenizer.json etc.) come from transformers' own sentencepiece conversion, as in the
    published repos, so the HF reference and the engine see the same vocabulary.
    """
    from transformers import AutoTokenizer

    spm = v3_tokenizer_path()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(spm, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False})
        )
        AutoTokenizer.from_pretrained(tmp).save_pretrained(str(out))
    shutil.copy(spm, out / "tokenizer.model")
    if mistral_common_files:
        shutil.copy(spm, out / "tokenizer.model.v3")


def build_tiny_model(
    out: str | Path,
    arch: str = "mistral",
    sliding_window: int | None = 128,
    kv_heads: int = 2,
    seed: int = 0,
    rope_scaling: str | None = None,
    quantize: str | None = None,
    desc_act: bool = False,
) -> Path:
    """Write the checkpoint directory and return its path. ``quantize`` ('awq' or 'gptq',
    ``desc_act`` for GPTQ act-order) writes the projections in that published format, with
    its ``quantization_config`` in config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(arch, sliding_window, kv_heads, rope_scaling)
    weights = random_weights(cfg, seed)
    if quantize is not None:
        from mistral_serve.model.quantization.export import prequantize

        weights, cfg["quantization_config"] = prequantize(weights, quantize, desc_act=desc_act, seed=seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n"
    )
    write_tokenizer(out, mistral_common_files=(arch == "mistral"))
    return out


def default_cache_dir() -> Path:
    """Where ``mistral-serve serve`` builds the embedded model on first use."""
    import os

    root = os.environ.get("MISTRAL_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mistral-serve"
    )
    return Path(root)


TINY_MODEL_NAME = "tiny-mistral-v3"


def ensure_tiny_model(cache_dir: str | Path | None = None) -> Path:
    """The embedded default model (seed 0, window 128), built once into the cache.

    Built in a temporary sibling directory and renamed into place, so a crash or a
    concurrent builder never leaves a half-written checkpoint behind.
    """
    target = Path(cache_dir or default_cache_dir()) / f"{TINY_MODEL_NAME}-seed0"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    build_tiny_model(staging)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target
