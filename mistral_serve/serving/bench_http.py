"""HTTP-path throughput vs the offline engine on the shared workload (64 concurrent requests).

    python -m mistral_serve.serving.bench_http [--workload /work/shared/bench/workload-64.json]

Both sides run the same engine configuration on the same model with the same requests:
prompt token ids from the workload, greedy, ``ignore_eos`` (an extra body field over HTTP),
``max_tokens`` per request from the file, so every run produces exactly the same tokens.

Order, so both see the same machine state: offline runs → start a local Ray + the app (one
LLMReplica) → HTTP runs (all requests at once, non-streaming, like the vLLM online client in
/work/shared/bench/vllm-cpu) → stop Ray → offline runs again. The offline baseline is the
mean of the two offline medians. Prints one JSON line ``RESULT {...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

DEFAULT_WORKLOAD = "/work/shared/bench/workload-64.json"


def engine_config(a: argparse.Namespace) -> dict:
    return {"device": "cpu", "dtype": "float32", "max_num_seqs": a.max_num_seqs,
            "max_num_batched_tokens": a.max_num_batched_tokens, "kv_cache_memory_bytes": a.kv_mib << 20,
            "num_threads": a.threads}


def offline_runs(model_dir: str, w: dict, engine: dict, runs: int) -> list[float]:
    from mistral_serve import LLM, SamplingParams

    llm = LLM(model_dir, **engine)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in w["max_tokens"]]
    llm.generate(w["prompt_token_ids"][:4], params[:4])  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        res = llm.generate(w["prompt_token_ids"], params)
        wall = time.perf_counter() - t
        n = sum(len(r.outputs[0].token_ids) for r in res)
        assert n == sum(w["max_tokens"]), n
        out.append(n / wall)
        print("OFFLINE", json.dumps({"out_tok": n, "wall_s": round(wall, 3), "out_tok_per_s": round(n / wall, 1)}),
              flush=True)
    del llm
    return out


async def _http_once(url: str, model: str, w: dict) -> tuple[int, float]:
    import aiohttp

    async def one(session, ids, n):
        body = {"model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        async with session.post(url, json=body) as r:
            j = await r.json()
            assert r.status == 200, j
            return j["usage"]["completion_tokens"]

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as s:
        t = time.perf_counter()
        res = await asyncio.gather(*[one(s, p, n) for p, n in zip(w["prompt_token_ids"], w["max_tokens"])])
        return sum(res), time.perf_counter() - t


def http_runs(w: dict, engine: dict, runs: int, warmup: int, ray_cpus: int) -> list[float]:
    from mistral_serve.serving.local import free_port, start_local, stop_local

    args = {"model": "tiny", "engine": engine,
            "replicas": {"num_replicas": 1, "num_cpus": 1},
            "router": {"num_cpus": 0.25},
            "admission": {"api_keys_env": None, "max_waiting_requests": 1024, "queue_timeout_s": 600}}
    server = start_local(args, port=free_port(), num_cpus=ray_cpus)
    out = []
    try:
        url = server.base_url + "/v1/completions"
        for i in range(warmup + runs):
            n, wall = asyncio.run(_http_once(url, server.model, w))
            assert n == sum(w["max_tokens"]), n
            timed = i >= warmup
            print("HTTP", json.dumps({"out_tok": n, "wall_s": round(wall, 3), "out_tok_per_s": round(n / wall, 1),
                                      "timed": timed}), flush=True)
            if timed:
                out.append(n / wall)
    finally:
        stop_local()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mistral_serve.serving.bench_http", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default=DEFAULT_WORKLOAD)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the engine (both sides)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-mib", type=int, default=256)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--skip-second-offline", action="store_true")
    a = p.parse_args(argv)
    w = json.loads(Path(a.workload).read_text())
    from mistral_serve.model.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    engine = engine_config(a)
    off1 = offline_runs(model_dir, w, engine, a.runs)
    http = http_runs(w, engine, a.runs, a.warmup, a.ray_cpus)
    off2 = [] if a.skip_second_offline else offline_runs(model_dir, w, engine, a.runs)
    offline = statistics.mean([statistics.median(off1)] + ([statistics.median(off2)] if off2 else []))
    result = {
        "workload": a.workload, "requests": len(w["max_tokens"]), "output_tokens": sum(w["max_tokens"]),
        "engine": engine,
        "offline_median_tok_per_s": [round(statistics.median(off1), 1)] + (
            [round(statistics.median(off2), 1)] if off2 else []),
        "http_median_tok_per_s": round(statistics.median(http), 1),
        "http_over_offline": round(statistics.median(http) / offline, 3),
    }
    print("RESULT", json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
