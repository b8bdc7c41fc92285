"""HTTP-path throughput vs the offline engine on the shared workload (64 concurrent requests).

    mistral-serve bench http [--workload /work/shared/bench/workload-64.json] [--no-stream] [--json F]

Both sides run the same engine configuration on the same model with the same requests:
prompt token ids from the workload, greedy, ``ignore_eos`` (an extra body field over HTTP),
``max_tokens`` per request from the file, so every run produces exactly the same tokens.

Order, so both see the same machine state (other processes share these 2 cores): offline runs
with Ray down → start a local Ray + the app (one replica, the engine in the Router's process as
`mistral-serve serve` runs it) → HTTP warm-up → N pairs of
(offline run with Ray idle, HTTP run: all requests at once, streamed as chat clients send them,
or with ``--no-stream`` one body each) → stop Ray → offline runs with Ray down again. Reports
the median of the paired ratios and the HTTP median over the Ray-down offline baseline.
Prints one JSON line ``RESULT {...}``.
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


class Offline:
    def __init__(self, model_dir: str, w: dict, engine: dict) -> None:
        from mistral_serve import LLM, SamplingParams

        self.w = w
        self.llm = LLM(model_dir, **engine)
        self.params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in w["max_tokens"]]
        self.llm.generate(w["prompt_token_ids"][:4], self.params[:4])  # warm-up

    def run(self, label: str) -> float:
        t = time.perf_counter()
        res = self.llm.generate(self.w["prompt_token_ids"], self.params)
        wall = time.perf_counter() - t
        n = sum(len(r.outputs[0].token_ids) for r in res)
        assert n == sum(self.w["max_tokens"]), n
        print(label, json.dumps({"out_tok": n, "wall_s": round(wall, 3), "out_tok_per_s": round(n / wall, 1)}),
              flush=True)
        return n / wall


async def _http_once(url: str, model: str, w: dict, stream: bool) -> tuple[int, float]:
    import aiohttp

    async def one(session, ids, n):
        body = {"model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": stream, "stream_options": {"include_usage": True} if stream else None}
        async with session.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            if not stream:
                return (await r.json())["usage"]["completion_tokens"]
            usage = None
            async for line in r.content:  # SSE: the usage chunk comes last, before [DONE]
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
            return usage["completion_tokens"]

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as s:
        t = time.perf_counter()
        res = await asyncio.gather(*[one(s, p, n) for p, n in zip(w["prompt_token_ids"], w["max_tokens"])])
        return sum(res), time.perf_counter() - t


def http_run(url: str, model: str, w: dict, label: str, stream: bool) -> float:
    n, wall = asyncio.run(_http_once(url, model, w, stream))
    assert n == sum(w["max_tokens"]), n
    print(label, json.dumps({"out_tok": n, "wall_s": round(wall, 3), "out_tok_per_s": round(n / wall, 1)}),
          flush=True)
    return n / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mistral-serve bench http", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default=DEFAULT_WORKLOAD)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the engine (both sides)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-mib", type=int, default=256)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--default-ray-intervals", action="store_true",
                   help="keep Ray Serve's default background intervals (local.QUIET_RAY_ENV otherwise)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="stream the HTTP responses (SSE, as chat clients do; default) or not")
    p.add_argument("--json", help="write the result here too")
    p.add_argument("--worker-niceness", default="0", help="the LLMReplica's nice value, or 'ray' for Ray's (15)")
    a = p.parse_args(argv)
    w = json.loads(Path(a.workload).read_text())
    from mistral_serve.bench.measure import cpu_model
    from mistral_serve.model.tiny import ensure_tiny_model
    from mistral_serve.serving.local import free_port, start_local, stop_local

    model_dir = str(ensure_tiny_model())
    engine = engine_config(a)
    offline = Offline(model_dir, w, engine)
    before = [offline.run("OFFLINE(ray down)") for _ in range(a.runs)]
    niceness = None if a.worker_niceness == "ray" else int(a.worker_niceness)
    args = {"model": "tiny", "engine": engine,
            "replicas": {"num_replicas": 1, "num_cpus": 1, "worker_niceness": niceness},
            "router": {"num_cpus": 0.25, "colocate_engine": True},  # as `mistral-serve serve` runs one replica
            "admission": {"api_keys_env": None, "max_waiting_requests": 1024, "queue_timeout_s": 600}}
    server = start_local(args, port=free_port(), num_cpus=a.ray_cpus, quiet_ray=not a.default_ray_intervals)
    pairs = []
    try:
        url = server.base_url + "/v1/completions"
        for _ in range(a.warmup):
            http_run(url, server.model, w, "HTTP(warm-up)", a.stream)
        for _ in range(a.runs):  # interleaved, so drift in machine load hits both sides alike
            off = offline.run("OFFLINE(ray idle)")
            pairs.append((off, http_run(url, server.model, w, "HTTP", a.stream)))
    finally:
        stop_local()
    after = [offline.run("OFFLINE(ray down)") for _ in range(a.runs)]
    med = statistics.median
    http = [h for _, h in pairs]
    down = statistics.mean([med(before), med(after)])
    result = {
        "workload": a.workload, "stream": a.stream, "cpu_model": cpu_model(), "requests": len(w["max_tokens"]), "output_tokens": sum(w["max_tokens"]),
        "engine": engine,
        "offline_ray_down_median_tok_per_s": [round(med(before), 1), round(med(after), 1)],
        "offline_ray_idle_tok_per_s": [round(o, 1) for o, _ in pairs],
        "http_tok_per_s": [round(h, 1) for h in http],
        "http_over_offline_paired_median": round(med([h / o for o, h in pairs]), 3),
        "http_median_over_offline_ray_down": round(med(http) / down, 3),
    }
    print("RESULT", json.dumps(result), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
