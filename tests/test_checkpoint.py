"""The embedded tiny model and the HF checkpoint loading path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_serve import LLM, SamplingParams
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.loader import resolve_model_dir
from mistral_serve.model.tiny import build_tiny_model


def test_tiny_model_shape(tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir)
    assert cfg.vocab_size == 32768 and cfg.num_attention_heads // cfg.num_key_value_heads == 4
    assert cfg.rope_theta == 1e6 and cfg.sliding_window == 128 and cfg.model_type == "mistral"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer.model", "tokenizer.model.v3", "tokenizer_config.json"):
        assert (tiny_model_dir / name).is_file(), name


def test_tiny_model_is_deterministic_per_seed(tmp_path):
    a = load_file(str(build_tiny_model(tmp_path / "a", seed=7) / "model.safetensors"))
    b = load_file(str(build_tiny_model(tmp_path / "b", seed=7) / "model.safetensors"))
    c = load_file(str(build_tiny_model(tmp_path / "c", seed=8) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_cli_tiny_model(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "mistral_serve.cli", "tiny-model", str(out), "--arch", "llama",
                    "--kv-heads", "8", "--seed", "3"], check=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 8


def test_sharded_checkpoint_loads_identically(tiny_model_dir, tmp_path):
    """Split the weights over two shards with an index file, as the 7B repos are published."""
    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    one = LLM(str(tiny_model_dir)).generate(["Hello there"], params)[0].outputs[0].token_ids
    two = LLM(str(sharded)).generate(["Hello there"], params)[0].outputs[0].token_ids
    assert one == two


def test_tied_embeddings(tmp_path):
    model = build_tiny_model(tmp_path / "tied", seed=4)
    tensors = load_file(str(model / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (model / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(model))
    m = llm.engine.runner.model
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()
    from hf_reference import hf_greedy

    prompt = list(range(100, 120))
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0] \
        .outputs[0].token_ids == hf_greedy(model, prompt, 15)


def test_missing_and_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_dict({"model_type": "gpt2"})
