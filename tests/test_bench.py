"""The benchmark harness runs every engine on the same workload and reports consistent JSON."""

from __future__ import annotations

import json
import subprocess
import sys

from mistral_serve.bench.workload import load_workload, synthetic_workload


def test_reference_workload_recipe_matches_the_shared_file():
    recipe = synthetic_workload(64, 0)
    assert recipe.prompt_tokens == 8855 and recipe.output_tokens == 4691
    shared = load_workload()
    if shared.source.endswith(".json"):
        assert shared.prompt_token_ids == recipe.prompt_token_ids and shared.max_tokens == recipe.max_tokens


def test_bench_engine_against_both_baselines(tiny_model_dir, tmp_path):
    # One thread and four requests: this checks the harness, not speed, and must stay quick even
    # beside the idle Ray cluster other test modules keep up on the same 2 cores.
    small = synthetic_workload(4, seed=3)
    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps({"prompt_token_ids": small.prompt_token_ids, "max_tokens": small.max_tokens}))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_serve.cli", "bench", "engine", "--model", str(tiny_model_dir),
         "--workload", str(wl), "--runs", "1", "--threads", "1", "--baseline", "hf-static", "--baseline", "hf-cb", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    names = [r["engine"] for r in report["results"]]
    assert names == ["mistral-serve", "hf-static", "hf-cb"]
    for r in report["results"]:
        assert r["output_tokens"] == small.output_tokens  # every engine credited the same tokens
        assert r["output_tok_per_s"] > 0 and r["peak_rss_mib"] > 0
        assert r["ttft_p50_s"] <= r["ttft_p99_s"] and r["itl_p50_s"] <= r["itl_p99_s"]
    assert report["results"][1]["ours_vs_this"] > 0
    assert "mistral-serve" in proc.stdout and "hf-static" in proc.stdout
