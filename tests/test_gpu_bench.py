"""``mistral-serve bench gpu`` and bench/gpu/check.sh: what can be checked without a GPU (the
HBM-floor arithmetic, the full-shape config, the script's syntax, the decode-timing loop end to
end on the tiny shape), plus one CUDA-only check that check.sh runs on a GPU machine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mistral_serve.bench import gpu
from mistral_serve.capacity import GPUS
from mistral_serve.model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
MISTRAL_7B_V03_PARAMS = 7_248_023_552  # the published checkpoint's tensor count


def test_full_shape_config_is_mistral_7b_v03():
    cfg = ModelConfig.from_dict(gpu.full_shape_dict())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (4096, 32, 32, 8, 128, 14336, 32768)
    assert cfg.sliding_window is None and cfg.rope_theta == 1e6 and cfg.torch_dtype == "bfloat16"
    assert cfg.num_parameters() == MISTRAL_7B_V03_PARAMS  # ~7.25B, from the config arithmetic


def test_full_shape_module_has_the_counted_parameters():
    """The same count from the real module, built on the meta device (nothing allocated)."""
    from mistral_serve.model.decoder import DecoderModel

    cfg = ModelConfig.from_dict(gpu.full_shape_dict())
    with torch.device("meta"):
        model = DecoderModel(cfg, 1024, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == MISTRAL_7B_V03_PARAMS


def test_hbm_floor_mistral_7b_bf16():
    cfg = ModelConfig.from_dict(gpu.full_shape_dict())
    h200, h100 = GPUS["H200-141GB"], GPUS["H100-80GB"]
    assert h200.bandwidth_bytes_per_s == 4.8e12 and h100.bandwidth_bytes_per_s == 3.35e12
    # All weights: 14.5 GB / 4.8 TB/s = 3.0 ms (what `mistral-serve plan` reports) ...
    assert MISTRAL_7B_V03_PARAMS * 2 / h200.bandwidth_bytes_per_s * 1e3 == pytest.approx(3.02, abs=0.01)
    # ... a decode step reads all but the embedding table (32768 x 4096 x 2 B = 0.27 GB): 2.96 ms.
    assert gpu.weight_bytes_per_decode_step(cfg, 2) == (MISTRAL_7B_V03_PARAMS - 32768 * 4096) * 2
    assert gpu.decode_floor_ms(cfg, 2, 0, h200.bandwidth_bytes_per_s) == pytest.approx(2.964, abs=0.001)
    assert gpu.decode_floor_ms(cfg, 2, 0, h100.bandwidth_bytes_per_s) == pytest.approx(4.247, abs=0.001)
    # K/V: 2 x 32 layers x 8 heads x 128 x 2 B = 128 KiB a token; batch 64 at 8K reads 68.7 GB.
    assert cfg.kv_bytes_per_token(2) == 131072
    assert gpu.decode_floor_ms(cfg, 2, 64 * 8192, h200.bandwidth_bytes_per_s) == pytest.approx(
        2.964 + 64 * 8192 * 131072 / 4.8e12 * 1e3, abs=0.001)
    # 8 sequences at 16K: as many K/V bytes as 64 at 2K.
    assert gpu.decode_floor_ms(cfg, 2, 8 * 16384, h200.bandwidth_bytes_per_s) == pytest.approx(6.543, abs=0.001)


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H200", "H200-141GB"),
    ("NVIDIA H100 80GB HBM3", "H100-80GB"),
    ("NVIDIA H100 PCIe", "H100-PCIe-80GB"),
    ("NVIDIA H100 NVL", "H100-NVL-94GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA L40S", "L40S-48GB"),
    ("NVIDIA L4", "L4-24GB"),
    ("NVIDIA A10G", "A10G-24GB"),
])
def test_detect_gpu(name, key):
    assert gpu.detect_gpu(name) == GPUS[key]


def test_unknown_gpu_has_no_floor():
    assert gpu.detect_gpu("Tesla T4") is None
    rows = [{"batch": 1, "ms_per_step_median": 5.0, "kv_tokens_per_step": 10}]
    gpu.add_floors(rows, ModelConfig.from_dict(gpu.full_shape_dict()), 2, None)
    assert rows[0]["floor_ms"] is None and rows[0]["ratio_to_floor"] is None


def test_check_sh_parses():
    script = REPO / "bench" / "gpu" / "check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in ("MISTRAL_SERVE_TEST_DEVICE=cuda", "MISTRAL_SERVE_ATTENTION_BACKEND=torch", "--no-deps",
                   "mistral_serve.bench.gpu", "--smoke", "timeout"):
        assert needle in text


def test_random_model_is_built_without_a_checkpoint():
    from mistral_serve.model.loader import build_random_model

    cfg = ModelConfig.from_dict(gpu.tiny_shape_dict())
    model = build_random_model(cfg, torch.float32, torch.device("cpu"), 64, seed=0)
    assert torch.equal(model.norm.weight, torch.ones(cfg.hidden_size))
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    again = build_random_model(cfg, torch.float32, torch.device("cpu"), 64, seed=0)
    assert torch.equal(model.embed_tokens.weight, again.embed_tokens.weight)  # seeded


def test_bench_gpu_end_to_end_on_cpu_tiny(tmp_path):
    """The whole command on the tiny shape: decode timing (a batch too big for the KV pool is
    skipped, not run), floors against a given bandwidth, prefill, a 2-request workload."""
    workload = tmp_path / "wl.json"
    workload.write_text(json.dumps({"prompt_token_ids": [[1000 + i for i in range(8)], [2000, 2001, 2002]],
                                    "max_tokens": [4, 3]}))
    out = tmp_path / "report.json"
    kv_bytes = 100 * 16 * ModelConfig.from_dict(gpu.tiny_shape_dict()).kv_bytes_per_token(4)  # 100 blocks
    rc = gpu.main(["--device", "cpu", "--shape", "tiny", "--batches", "1,2,64", "--contexts", "32",
                   "--steps", "2", "--warmup-steps", "1", "--long-context", "48", "--long-batch", "2",
                   "--prefill", "2x16", "--workload", str(workload), "--workload-runs", "1",
                   "--kv-cache-memory-bytes", str(kv_bytes), "--bandwidth-tbs", "1.0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["errors"] == {}
    assert report["model"]["parameters"] == ModelConfig.from_dict(gpu.tiny_shape_dict()).num_parameters()
    rows = {r["batch"]: r for r in report["decode"]}
    assert set(rows) == {1, 2, 64} and "skipped" in rows[64]
    for b in (1, 2):
        r = rows[b]
        assert r["steps"] == 2 and r["ms_per_step_median"] > 0
        assert r["mean_context_tokens"] > 32 and r["kv_tokens_per_step"] == pytest.approx(b * r["mean_context_tokens"])
        assert r["floor_ms"] == pytest.approx((r["weight_bytes_per_step"] + r["kv_bytes_per_step"]) / 1e12 * 1e3)
        assert r["ratio_to_floor"] == pytest.approx(r["ms_per_step_median"] / r["floor_ms"])
    assert "prefill_of_this_context" in rows[2]
    assert [r["batch"] for r in report["long"]] == [2] and report["long"][0]["context"] == 48
    assert report["prefill"]["prompts"] == 2 and report["prefill"]["tok_per_s_best"] > 0
    assert report["workload"]["output_tokens"] == 7
    assert report["machine"]["cpu"] and report["machine"]["torch"] == torch.__version__


def test_smoke_on_cpu_tiny(tmp_path):
    out = tmp_path / "smoke.json"
    assert gpu.main(["--device", "cpu", "--shape", "tiny", "--smoke", "--json", str(out)]) == 0
    smoke = json.loads(out.read_text())["smoke"]
    assert smoke["ok"] and smoke["output_lengths"] == [16, 16] and smoke["logits_finite"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu/check.sh runs it)")
def test_prefill_logits_close_to_hf_on_device(tiny_model_dir):
    """test_engine_vs_hf's prefill-logits check with the engine on CUDA (float32), its logits
    moved to the CPU for the comparison with HF's."""
    from hf_reference import hf_logits, random_prompts
    from mistral_serve import LLM, SamplingParams

    prompts = random_prompts(3, 30, 200, seed=1)
    llm = LLM(str(tiny_model_dir), device="cuda", dtype="float32", kv_cache_memory_bytes=2**30)
    engine = llm.engine
    seqs = [engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=1)) for i, p in enumerate(prompts)]
    plan = engine.scheduler.schedule()
    engine.runner.zero_new_blocks(engine.block_manager.num_touched)
    inputs = engine.runner.prepare(plan.scheduled)
    inputs.logits_index = torch.arange(sum(len(p) for p in prompts), device="cuda")
    logits = engine.runner.execute(inputs).cpu()
    start = 0
    for p in prompts:
        torch.testing.assert_close(logits[start:start + len(p)], hf_logits(tiny_model_dir, p), atol=1e-4, rtol=1e-4)
        start += len(p)
    for s in seqs:
        engine.abort_request(s.request_id)
