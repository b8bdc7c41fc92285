"""Capacity math against the published figures for Mistral 7B."""

from __future__ import annotations

import json
import subprocess
import sys

from mistral_serve import capacity
from mistral_serve.model.config import ModelConfig


def test_mistral_7b_figures():
    cfg = ModelConfig.from_dict(capacity.PRESETS["mistral-7b-v0.3"])
    assert abs(cfg.num_parameters() - 7.248e9) < 0.01e9
    assert cfg.kv_bytes_per_token(2) == 128 * 1024  # 128 KiB per token in bf16 with GQA
    assert cfg.kv_bytes_per_token(2, gqa=False) == 512 * 1024
    p = capacity.plan(cfg, "v0.3", capacity.GPUS["H100-80GB"], 2, 32768)
    assert 4.2 < p.decode_floor_ms < 4.5  # 14.5 GB / 3.35 TB/s
    assert p.max_seqs_without_gqa * 4 <= p.max_seqs + 4


def test_sliding_window_multiplies_concurrency():
    v01 = ModelConfig.from_dict(capacity.PRESETS["mistral-7b-v0.1"])
    p = capacity.plan(v01, "v0.1", capacity.GPUS["H100-80GB"], 2, 32768)
    assert p.kv_tokens_per_seq == 4096 + 16  # ceil(4096/16)+1 blocks
    assert p.max_seqs >= 7 * p.max_seqs_without_window


def test_plan_cli_json():
    out = subprocess.run([sys.executable, "-m", "mistral_serve.cli", "plan", "--model",
                          "mistralai/Mistral-7B-Instruct-v0.3", "--gpu", "H100-80GB", "--dtype", "bf16", "--json"],
                         check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    assert data["kv_bytes_per_token"] == 131072 and data["max_model_len"] == 32768


def test_engine_sizes_its_pool_with_the_same_math(tiny_model_dir):
    from mistral_serve import LLM

    budget = 3 * 1024 * 1024
    llm = LLM(str(tiny_model_dir), kv_cache_memory_bytes=budget, block_size=16)
    cfg = ModelConfig.from_dir(tiny_model_dir)
    # The budget's blocks less the model runner's scratch block, which the block manager never hands out.
    assert llm.engine.block_manager.num_blocks == capacity.kv_blocks_for_budget(cfg, budget, 16, 4) - 1
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in llm.engine.runner.kv_caches)
    assert kv_bytes <= budget
