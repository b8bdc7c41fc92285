"""Tests of the load generator (``load_tests/``, ``mistral-serve load``).

Two kinds:

* Unit tests of the generator (no Ray, no model): the statistics, arrival, workload, report and
  sampler code, and whole runs against ``FakeOpenAIServer`` below, a small OpenAI-compatible
  streaming server written for these tests (aiohttp.web on 127.0.0.1, port 0).  It answers 429
  (or 503) with ``Retry-After`` when more than ``capacity`` requests are open and counts what it
  received, so the generator's accounting is checked against an independent count.  They test
  the *generator*, not mistral-serve.
* Live tests (``test_live_*``): a short run of each scenario against a real local server of the
  tiny model, from the session fixture ``live_server`` (tests/conftest.py).  They skip when that
  fixture is not defined.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import os
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from load_tests import cli
from load_tests.arrivals import RateSchedule, arrival_times, interarrival_cv
from load_tests.client import RequestRecord, parse_retry_after, send_request
from load_tests.report import write_markdown
from load_tests.runner import api_root, endpoint_url
from load_tests.sampler import parse_metrics, process_rss
from load_tests.stats import SLO, find_saturation, in_flight_at, percentiles, slope, summarize, timeline
from load_tests.workload import DEFAULT_WORKLOAD, Workload, build_body, load_workload_file, parse_range

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:  # pragma: no cover
    HAVE_MPL = False

REQUIRED_SUMMARY_KEYS = ("sent", "ok", "rejected", "errors", "ttft_p50_s", "ttft_p99_s", "itl_p50_s",
                         "itl_p99_s", "e2e_p99_s", "output_tok_per_s")


# ============================================================================================
# A fake OpenAI-compatible streaming server (for unit tests of the generator only)


class FakeOpenAIServer:
    """Streams ``max_tokens`` tokens (``tokens_per_chunk`` per SSE chunk) after ``ttft_s``, one
    chunk every ``chunk_s``; then a usage chunk (with ``cost_usd``) and ``data: [DONE]``.
    More than ``capacity`` open requests -> ``reject_status`` (429) with ``Retry-After``.
    ``break_every=k``: every k-th request's stream stops without [DONE].  ``fail_every=k``:
    every k-th request answers 500.  ``hang``: stream one chunk, then never finish."""

    def __init__(self, *, capacity: int = 1000, ttft_s: float = 0.02, chunk_s: float = 0.005,
                 tokens_per_chunk: int = 1, reject_status: int = 429, retry_after: str = "1",
                 break_every: int = 0, fail_every: int = 0, hang: bool = False,
                 cost_per_token: float = 1e-6, model: str = "fake-model") -> None:
        self.capacity = capacity
        self.ttft_s, self.chunk_s, self.tpc = ttft_s, chunk_s, tokens_per_chunk
        self.reject_status, self.retry_after = reject_status, retry_after
        self.break_every, self.fail_every, self.hang = break_every, fail_every, hang
        self.cost_per_token = cost_per_token
        self.model = model
        self.active = 0
        self.received = 0
        self.counts = {"ok": 0, "rejected": 0, "failed": 0, "broken": 0}
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self._ready = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "FakeOpenAIServer":
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self._ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        try:
            fut.result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return self.base_url + "/metrics"

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/metrics", self._metrics)
        # cancel handlers whose client went away (the hang mode), and do not wait long on exit
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self.loop.run_forever()

    # -- handlers -----------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        replicas = 1 + (self.active > 2)
        waiting = max(0, self.active - 2)
        lines = ["# HELP ray_serve_deployment_replica_healthy Healthy replicas.",
                 "# TYPE ray_serve_deployment_replica_healthy gauge"]
        lines += [f'ray_serve_deployment_replica_healthy{{application="llm",deployment="LLMReplica",'
                  f'replica="r{i}"}} 1.0' for i in range(replicas)]
        lines += ['ray_serve_deployment_replica_healthy{application="llm",deployment="Router",replica="x"} 1.0',
                  "# TYPE ray_mistral_serve_num_requests_waiting gauge",
                  f'ray_mistral_serve_num_requests_waiting{{model_name="{self.model}"}} {waiting}',
                  "# TYPE ray_mistral_serve_num_requests_running gauge",
                  f'ray_mistral_serve_num_requests_running{{model_name="{self.model}"}} {self.active - waiting}',
                  "# TYPE ray_mistral_serve_kv_cache_usage_perc gauge",
                  f'ray_mistral_serve_kv_cache_usage_perc{{model_name="{self.model}"}} {min(1.0, self.active / 8)}',
                  "# TYPE ray_mistral_serve_router_requests_admitted_total counter",
                  f'ray_mistral_serve_router_requests_admitted_total{{model_name="{self.model}",tenant="a"}} '
                  f'{self.received - self.counts["rejected"]}',
                  "# TYPE ray_mistral_serve_router_requests_rejected_total counter",
                  f'ray_mistral_serve_router_requests_rejected_total{{model_name="{self.model}",tenant="a",'
                  f'reason="queue_full"}} {self.counts["rejected"]}',
                  "# TYPE process_resident_memory_bytes gauge",
                  f"process_resident_memory_bytes {100e6 + self.received * 1000}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, chat=True)

    async def _stream(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.received += 1
        n = self.received
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.active >= self.capacity:
            self.counts["rejected"] += 1
            return web.json_response(
                {"error": {"message": "server overloaded, retry later", "type": "overloaded_error",
                           "param": None, "code": "queue_full"}},
                status=self.reject_status, headers={"Retry-After": self.retry_after})
        if self.fail_every and n % self.fail_every == 0:
            self.counts["failed"] += 1
            return web.json_response({"error": {"message": "boom", "type": "internal_error", "param": None,
                                                "code": None}}, status=500)
        self.active += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            max_tokens = int(body.get("max_tokens", 16))
            prompt = body.get("prompt") if not chat else body["messages"][-1]["content"]
            ptoks = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
            obj = "chat.completion.chunk" if chat else "text_completion"
            if chat:  # role-only first chunk, as OpenAI sends: must not count as the first token
                await resp.write(_sse({"object": obj, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                                   "finish_reason": None}]}))
            await asyncio.sleep(self.ttft_s)
            sent = 0
            while sent < max_tokens:
                k = min(self.tpc, max_tokens - sent)
                sent += k
                text = " tok" * k
                last = sent >= max_tokens
                choice = ({"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text})
                choice["finish_reason"] = "length" if last else None
                await resp.write(_sse({"object": obj, "model": self.model, "choices": [choice]}))
                if self.hang:
                    await asyncio.sleep(3600)
                if self.break_every and n % self.break_every == 0 and sent >= max_tokens // 2:
                    self.counts["broken"] += 1
                    return resp  # stream ends without usage and [DONE]
                if not last:
                    await asyncio.sleep(self.chunk_s)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": ptoks, "completion_tokens": sent, "total_tokens": ptoks + sent,
                         "cost_usd": sent * self.cost_per_token}
                await resp.write(_sse({"object": obj, "choices": [], "usage": usage}))
            await resp.write(b"data: [DONE]\n\n")
            self.counts["ok"] += 1
            return resp
        finally:
            self.active -= 1


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _check_report(rep: dict, out: Path) -> dict:
    """Invariants every report must satisfy."""
    s = rep["summary"]
    for k in REQUIRED_SUMMARY_KEYS:
        assert k in s, k
    assert s["sent"] == s["ok"] + s["rejected"] + s["errors"]
    assert s["accounting_balanced"] is True
    assert len(rep["requests"]) == sum(p["summary"]["sent"] for p in rep["phases"])
    for p in rep["phases"]:
        ps = p["summary"]
        assert ps["sent"] == ps["ok"] + ps["rejected"] + ps["errors"], p["name"]
    for name in ("ttft", "itl", "e2e", "tpot"):
        vals = [s[f"{name}_p{p}_s"] for p in (50, 90, 99)]
        if vals[0] is not None:
            assert vals[0] <= vals[1] <= vals[2], (name, vals)
    if s["ok"]:
        assert s["ttft_p50_s"] > 0 and s["output_tok_per_s"] > 0
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["summary"]["sent"] == s["sent"]
    assert "# Load test" in (out / "report.md").read_text()
    if HAVE_MPL:
        assert rep["plots"], "no plots written"
        for p in rep["plots"]:
            data = (out / p).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, p
    return s


def _run(*args: str) -> dict:
    return cli.run(list(args))


# ============================================================================================
# Unit tests: arrivals


def test_poisson_arrivals_count_and_cv():
    sched = RateSchedule.constant(50.0, 40.0)
    ts = list(arrival_times(sched, kind="poisson", seed=1))
    assert all(b > a for a, b in zip(ts, ts[1:])) and 0 <= ts[0] and ts[-1] < 40
    assert abs(len(ts) - 2000) < 4 * np.sqrt(2000)
    assert 0.9 < interarrival_cv(ts) < 1.1
    assert ts == list(arrival_times(sched, kind="poisson", seed=1))  # seeded


def test_constant_arrivals_exact():
    ts = list(arrival_times(RateSchedule.constant(4.0, 10.0), kind="constant"))
    assert len(ts) == 40
    assert interarrival_cv(ts) < 0.01
    assert abs(ts[0] - 0.125) < 0.01


def test_rate_schedule_triangle_and_parse():
    s = RateSchedule.triangle(1.0, 9.0, 20.0)
    assert s.rate(0) == 1.0 and s.rate(10) == 9.0 and s.rate(20) == 1.0 and s.rate(5) == 5.0
    assert s.expected_count() == pytest.approx(100.0)
    assert s.expected_count(10) == pytest.approx(50.0)
    p = RateSchedule.parse("0:1, 10:9,20:1")
    assert p.points == s.points
    ts = list(arrival_times(s, kind="poisson", seed=3))
    first, second = sum(t < 5 for t in ts), sum(7.5 <= t < 12.5 for t in ts)
    assert second > first  # more arrivals near the peak
    with pytest.raises(ValueError):
        RateSchedule(((1.0, 1.0), (2.0, 1.0)))


# ============================================================================================
# Unit tests: workload


def test_workload_file_format_and_cycle():
    if not DEFAULT_WORKLOAD.exists():
        pytest.skip(f"shared workload not found at {DEFAULT_WORKLOAD}")
    prompts, outs = load_workload_file(DEFAULT_WORKLOAD)
    assert len(prompts) == len(outs) == 64
    w = Workload("workload")
    specs = [w.next() for _ in range(65)]
    assert specs[0].prompt == prompts[0] and specs[0].max_tokens == outs[0]
    assert specs[64].prompt == prompts[0]  # cycles
    assert sum(s.prompt_len for s in specs[:64]) == sum(map(len, prompts))
    t = Workload("workload", prompt_format="text").next()
    assert isinstance(t.prompt, str) and len(t.prompt.split()) == len(prompts[0])


def test_workload_distributions():
    f = Workload("fixed", prompt_len=12, output_len=7).next()
    assert f.prompt_len == 12 and len(f.prompt) == 12 and f.max_tokens == 7
    assert all(1000 <= t < 32000 for t in f.prompt)
    u = [Workload("uniform", prompt_len="4:9", output_len="2:3", seed=s).next() for s in range(50)]
    assert {x.prompt_len for x in u} <= set(range(4, 10)) and {x.max_tokens for x in u} <= {2, 3}
    lt = Workload("longtail", prompt_len=100, output_len=50, max_prompt_len=400, max_output_len=300, seed=0)
    specs = [lt.next() for _ in range(2000)]
    p = np.array([s.prompt_len for s in specs])
    assert p.max() <= 400 and p.min() >= 1
    assert 70 < np.median(p) < 140 and np.mean(p) > np.median(p)  # right-skewed
    assert parse_range("16:256", (1, 1)) == (16, 256) and parse_range(None, (3, 4)) == (3, 4)
    with pytest.raises(ValueError):
        parse_range("9:3", (1, 1))


def test_build_body():
    spec = Workload("fixed", prompt_len=3, output_len=5).next()
    b = build_body(spec, endpoint="completions", model="m")
    assert b["prompt"] == spec.prompt and b["stream"] is True and b["max_tokens"] == 5
    assert b["stream_options"] == {"include_usage": True} and b["ignore_eos"] is True
    c = build_body(Workload("fixed", prompt_len=3, prompt_format="text").next(), endpoint="chat", model="m",
                   ignore_eos=False)
    assert c["messages"][0]["role"] == "user" and "ignore_eos" not in c and "prompt" not in c


def test_urls():
    assert api_root("http://h:1/") == "http://h:1/v1" == api_root("http://h:1/v1")
    assert endpoint_url("http://h:1", "chat") == "http://h:1/v1/chat/completions"
    assert endpoint_url("http://h:1/v1/", "completions") == "http://h:1/v1/completions"


# ============================================================================================
# Unit tests: statistics


def _rec(i, outcome="ok", start=0.0, ttft=0.1, itl=(0.01, 0.02), out=3, status=200, cost=None, ra=None):
    r = RequestRecord(id=i, phase="p", scheduled_s=None, start_s=start, prompt_len=4, max_tokens=out)
    r.outcome, r.status, r.retry_after_s, r.cost_usd = outcome, status, ra, cost
    if outcome == "ok":
        r.ttft_s, r.itl_s = ttft, list(itl)
        r.e2e_s = ttft + sum(itl)
        r.output_tokens, r.prompt_tokens, r.usage_reported = out, 4, True
    else:
        r.e2e_s = 0.001
    r.end_s = start + r.e2e_s
    return r


def test_percentiles_ordered_and_empty():
    p = percentiles([5, 1, 3, 2, 4] * 20)
    assert p[50] <= p[90] <= p[99] and p[50] == 3.0
    assert percentiles([]) == {50: None, 90: None, 99: None}


def test_summarize_counts_goodput_and_cost():
    recs = [_rec(0, ttft=0.5, cost=3e-6), _rec(1, ttft=2.0, cost=3e-6),  # second misses TTFT SLO
            _rec(2, itl=(0.01, 0.5), cost=3e-6),  # misses ITL SLO
            _rec(3, "rejected", status=429, ra=1.5), _rec(4, "rejected", status=503, ra=2.0),
            _rec(5, "error", status=500)]
    recs[5].error, recs[5].error_type = "boom", None
    s = summarize(recs, SLO(ttft_s=1.0, itl_p99_s=0.1), window=(0.0, 10.0))
    assert (s["sent"], s["ok"], s["rejected"], s["errors"]) == (6, 3, 2, 1)
    assert s["rejected_429"] == 1 and s["rejected_503"] == 1 and s["accounting_balanced"]
    assert s["good"] == 1 and s["goodput_req_per_s"] == pytest.approx(0.1)
    assert s["output_tok_per_s"] == pytest.approx(0.9) and s["req_per_s"] == pytest.approx(0.3)
    assert s["cost_usd_total"] == pytest.approx(9e-6)
    assert s["cost_per_1m_output_tokens_usd"] == pytest.approx(1.0)
    assert s["cost_per_1m_tokens_usd"] == pytest.approx(9e-6 / 21 * 1e6, rel=1e-4)
    assert s["retry_after_p50_s"] == pytest.approx(1.75)
    assert s["error_rate"] == pytest.approx(1 / 6, abs=1e-6) and s["rejection_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
    assert s["status_counts"] == {"200": 3, "429": 1, "500": 1, "503": 1}
    assert summarize([])["sent"] == 0


def test_timeline_and_in_flight():
    recs = [_rec(i, start=i * 0.5, ttft=0.1, itl=(0.2,) * 4, out=5) for i in range(10)]  # e2e 0.9 s
    assert in_flight_at(recs, [0.05, 0.6, 100]) == [1, 2, 0]
    tl = timeline(recs, bin_s=1.0)
    assert len(tl) == 6
    assert sum(r["output_tok_per_s"] for r in tl) == pytest.approx(50.0)  # tokens conserved (bin 1 s)
    assert sum(r["ok_per_s"] for r in tl) == 10
    assert sum(r["in_flight"] for r in tl) == pytest.approx(9.0)  # 10 requests x 0.9 s, bin 1 s
    assert tl[0]["in_flight"] == pytest.approx(1.4)  # [0, 0.9] and [0.5, 1.4] overlap bin 0


def test_slope():
    ts = np.arange(0, 100, 1.0)
    s = slope(ts, 5 + 2 * ts)
    assert s["per_s"] == pytest.approx(2) and s["per_h"] == pytest.approx(7200) and s["r2"] == pytest.approx(1)
    assert slope([0, 1], [1, 2]) is None


def test_find_saturation():
    def step(off, tok, good, rej=0.0):
        return {"offered": off, "mode": "rate", "output_tok_per_s": tok, "req_per_s": tok / 10,
                "goodput_req_per_s": good, "rejection_rate": rej, "error_rate": 0.0}

    growing = [step(1, 10, 1), step(2, 20, 2), step(4, 40, 4)]
    assert find_saturation(growing)["found"] is False
    flat = growing + [step(8, 42, 4)]
    r = find_saturation(flat)
    assert r["found"] and r["index"] == 2 and r["offered"] == 4 and "grew" in r["reason"]
    collapse = growing + [step(8, 60, 1)]
    assert find_saturation(collapse)["index"] == 2 and "goodput" in find_saturation(collapse)["reason"]
    shed = growing + [step(8, 80, 8, rej=0.3)]
    assert find_saturation(shed)["index"] == 2
    first = find_saturation([step(1, 10, 1, rej=0.5)])
    assert first["found"] and first["index"] is None and first["capacity_req_per_s"] == 1.0


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert 8 <= parse_retry_after(date, now=now) <= 11
    assert parse_retry_after("soon") is None


def test_parse_metrics():
    text = """# TYPE ray_serve_deployment_replica_healthy gauge
ray_serve_deployment_replica_healthy{application="a",deployment="LLMReplica",replica="1"} 1.0
ray_serve_deployment_replica_healthy{application="a",deployment="LLMReplica",replica="2"} 1.0
ray_serve_deployment_replica_healthy{application="a",deployment="Router",replica="3"} 1.0
# TYPE ray_mistral_serve_num_requests_waiting gauge
ray_mistral_serve_num_requests_waiting{model_name="m",replica="1"} 3.0
ray_mistral_serve_num_requests_waiting{model_name="m",replica="2"} 1.0
# TYPE ray_mistral_serve_num_requests_running gauge
ray_mistral_serve_num_requests_running{model_name="m",replica="1"} 8.0
# TYPE ray_mistral_serve_kv_cache_usage_perc gauge
ray_mistral_serve_kv_cache_usage_perc{model_name="m",replica="1"} 0.25
ray_mistral_serve_kv_cache_usage_perc{model_name="m",replica="2"} 0.75
# TYPE ray_mistral_serve_router_requests_rejected_total counter
ray_mistral_serve_router_requests_rejected_total{model_name="m",tenant="t",reason="queue_full"} 5.0
ray_mistral_serve_router_requests_rejected_total{model_name="m",tenant="t",reason="rate_limit"} 2.0
# TYPE ray_component_rss_mb gauge
ray_component_rss_mb{Component="ray::ServeReplica"} 150.0
"""
    m = parse_metrics(text)
    assert m["replicas"] == 2 and m["waiting"] == 4 and m["running"] == 8 and m["queue_depth"] == 12
    assert m["kv_usage"] == pytest.approx(0.5) and m["kv_usage_max"] == 0.75
    assert m["rejected_total"] == 7 and m["admitted_total"] is None
    assert m["ray_rss_bytes"] == pytest.approx(150e6)
    v = parse_metrics("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 2\n", prefix="vllm:")
    assert v["waiting"] == 2 and v["replicas"] is None


def test_process_rss():
    r = process_rss(os.getpid())
    assert r["rss_bytes"] and r["rss_bytes"] > 1e6


# ============================================================================================
# Unit tests of the generator against the fake server: single requests


async def _one(url, body, endpoint="completions", timeout=10.0):
    async with aiohttp.ClientSession() as s:
        rec = RequestRecord(id=0, phase="t", scheduled_s=None, start_s=0.0, prompt_len=1, max_tokens=1)
        return await send_request(s, url, body, rec, endpoint=endpoint, t0=time.perf_counter(), timeout_s=timeout)


def test_client_measures_stream():
    with FakeOpenAIServer(ttft_s=0.05, chunk_s=0.01, tokens_per_chunk=2) as srv:
        r = asyncio.run(_one(srv.base_url + "/v1/completions",
                             {"model": "m", "prompt": [1, 2, 3], "max_tokens": 9, "stream": True,
                              "stream_options": {"include_usage": True}}))
    assert r.outcome == "ok" and r.status == 200 and r.error is None
    assert r.output_tokens == 9 and r.prompt_tokens == 3 and r.usage_reported
    assert r.chunks == 5 and len(r.itl_s) == 4  # 2 tokens per chunk: ITL is per chunk
    # Four 10 ms gaps; one may read short when the kernel hands two chunks over in one read.
    assert 0.045 <= r.ttft_s < 1.0 and all(g >= 0 for g in r.itl_s) and sum(r.itl_s) >= 0.03
    assert r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-3
    assert r.cost_usd == pytest.approx(9e-6) and r.finish_reason == "length"
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 8)


def test_client_chat_role_chunk_is_not_first_token():
    with FakeOpenAIServer(ttft_s=0.1) as srv:
        r = asyncio.run(_one(srv.base_url + "/v1/chat/completions",
                             {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                              "stream": True}, endpoint="chat"))
    assert r.outcome == "ok" and r.ttft_s >= 0.09
    assert not r.usage_reported and r.output_tokens == 3  # fallback: content chunks


def test_client_rejection_error_and_broken_stream():
    body = {"model": "m", "prompt": [1], "max_tokens": 4, "stream": True}
    with FakeOpenAIServer(capacity=0, reject_status=503, retry_after="7") as srv:
        r = asyncio.run(_one(srv.base_url + "/v1/completions", body))
    assert r.outcome == "rejected" and r.status == 503 and r.retry_after_s == 7.0
    assert r.error == "server overloaded, retry later" and r.server_error_type == "overloaded_error"
    with FakeOpenAIServer(fail_every=1) as srv:
        r = asyncio.run(_one(srv.base_url + "/v1/completions", body))
    assert r.outcome == "error" and r.status == 500 and r.error_type == "http_500"
    with FakeOpenAIServer(break_every=1) as srv:
        r = asyncio.run(_one(srv.base_url + "/v1/completions", body))
    assert r.outcome == "error" and r.status == 200 and r.error_type == "incomplete_stream"
    with FakeOpenAIServer(hang=True) as srv:
        r = asyncio.run(_one(srv.base_url + "/v1/completions", body, timeout=0.5))
    assert r.outcome == "error" and r.error_type == "timeout" and r.ttft_s is not None


def test_client_connection_refused():
    with FakeOpenAIServer() as srv:
        url = srv.base_url + "/v1/completions"
    r = asyncio.run(_one(url, {"model": "m", "prompt": [1], "max_tokens": 1, "stream": True}))
    assert r.outcome == "error" and r.status == 0 and r.error_type == "connection"


# ============================================================================================
# Unit tests of the generator against the fake server: whole scenarios through the CLI

FAST = ("--dist", "fixed", "--prompt-len", "8", "--output-len", "6", "--no-progress")


def test_steady_open_loop_light_rate_no_errors(tmp_path):
    with FakeOpenAIServer() as srv:
        rep = _run("steady", "--base-url", srv.base_url, "--duration", "2", "--rate", "10", "--out",
                   str(tmp_path), *FAST)
        received = srv.received
    s = _check_report(rep, tmp_path)
    assert s["errors"] == 0 and s["rejected"] == 0 and s["ok"] == s["sent"] == received
    assert 8 <= s["sent"] <= 35  # Poisson(20)
    assert rep["meta"]["model"] == "fake-model"  # discovered from /v1/models
    assert s["output_tokens"] == 6 * s["ok"] and s["cost_per_1m_output_tokens_usd"] == pytest.approx(1.0)
    assert rep["meta"]["wall_s"] < 2 + 5
    assert {"latency_vs_time.png", "throughput_vs_time.png"} <= set(rep["plots"]) or not HAVE_MPL
    assert len(rep["requests"]) == s["sent"] and rep["requests"][0]["ttft_s"] > 0


def test_steady_closed_loop_chat_and_request_cap(tmp_path):
    with FakeOpenAIServer() as srv:
        rep = _run("steady", "--base-url", srv.base_url, "--duration", "5", "--concurrency", "3",
                   "--endpoint", "chat", "--max-requests", "25", "--api-key", "sekret", "--out", str(tmp_path),
                   "--model", "given", *FAST)
        body, headers = srv.bodies[0], srv.headers[0]
    s = _check_report(rep, tmp_path)
    assert s["sent"] == 25 and s["ok"] == 25  # request budget stops the run early
    assert rep["meta"]["wall_s"] < 4.5  # stopped by the request budget, not the duration
    assert body["model"] == "given" and isinstance(body["messages"][0]["content"], str)
    assert headers["Authorization"] == "Bearer sekret"
    assert "sekret" not in (tmp_path / "report.json").read_text()


def test_overload_accounting_against_server_count(tmp_path):
    """429s with Retry-After under 10x load: every request is accounted for, and the generator's
    count matches what the server received."""
    with FakeOpenAIServer(capacity=4, ttft_s=0.05, chunk_s=0.01) as srv:
        rep = _run("overload", "--base-url", srv.base_url, "--duration", "3", "--rate", "10",
                   "--metrics-url", srv.metrics_url, "--out", str(tmp_path), *FAST)
        received, counts = srv.received, dict(srv.counts)
    s = _check_report(rep, tmp_path)
    assert rep["scenario"]["overload_rate"] == pytest.approx(100.0)
    acc = rep["scenario"]["accounting"]
    assert acc["balanced"] and acc["sent"] == s["sent"]
    assert s["rejected"] > 0 and s["rejected"] == s["rejected_429"] == counts["rejected"]
    assert s["ok"] == counts["ok"] and s["errors"] == 0
    assert received == s["sent"]
    assert s["retry_after_p50_s"] == 1.0
    assert rep["scenario"]["server_counters"]["rejected_total"] == counts["rejected"]
    md = (tmp_path / "report.md").read_text()
    assert "No request lost" in md and "balanced" in md


def test_overload_measures_saturation_and_counts_errors(tmp_path):
    with FakeOpenAIServer(capacity=6, break_every=7, fail_every=11) as srv:
        rep = _run("overload", "--base-url", srv.base_url, "--duration", "3", "--probe-duration", "1",
                   "--probe-concurrency", "4", "--factor", "3", "--out", str(tmp_path), *FAST)
        received, counts = srv.received, dict(srv.counts)
    s = _check_report(rep, tmp_path)
    assert rep["scenario"]["saturation_source"].startswith("measured")
    assert [p["name"] for p in rep["phases"]] == ["probe", "overload"]
    whole = rep["scenario"]["accounting"]["whole_run"]
    assert whole["sent"] == received and whole["accounting_balanced"]
    assert s["errors"] > 0 and set(s["error_kinds"]) <= {"incomplete_stream", "http_500"}
    total_err = sum(p["summary"]["errors"] for p in rep["phases"])
    assert total_err == counts["broken"] + counts["failed"]


def test_sweep_finds_saturation(tmp_path):
    """A server that admits 2 requests at a time saturates around 2 / e2e req/s."""
    with FakeOpenAIServer(capacity=2, ttft_s=0.05, chunk_s=0.02) as srv:
        rep = _run("sweep", "--base-url", srv.base_url, "--duration", "6", "--rates", "2,4,8,16,32,64",
                   "--arrival", "constant", "--out", str(tmp_path), *FAST)
    _check_report(rep, tmp_path)
    sat = rep["scenario"]["saturation"]
    assert sat["found"] and sat["index"] is not None and 1 <= len(rep["phases"]) <= 6
    assert len(rep["scenario"]["curve"]) == len(rep["phases"])
    if HAVE_MPL:
        assert "latency_throughput.png" in rep["plots"]
    assert "Saturation point" in (tmp_path / "report.md").read_text()


def test_sweep_closed_loop_levels(tmp_path):
    with FakeOpenAIServer() as srv:
        rep = _run("sweep", "--base-url", srv.base_url, "--duration", "3", "--concurrency", "4",
                   "--out", str(tmp_path), *FAST)
    _check_report(rep, tmp_path)
    assert rep["scenario"]["levels"] == [1, 2, 4] and rep["scenario"]["mode"] == "concurrency"


def test_ramp_samples_replicas_and_queue(tmp_path):
    with FakeOpenAIServer(ttft_s=0.1, chunk_s=0.05) as srv:
        rep = _run("ramp", "--base-url", srv.base_url, "--duration", "3", "--rate", "20",
                   "--metrics-url", srv.metrics_url, "--sample-interval", "0.25", "--out", str(tmp_path), *FAST)
    _check_report(rep, tmp_path)
    sched = rep["scenario"]["schedule"]
    assert [round(r, 6) for _, r in sched] == [2.0, 20.0, 2.0]
    assert len(rep["samples"]) >= 6 and rep["scenario"]["replicas"]["max"] >= 1
    assert any(x["queue_depth"] for x in rep["samples"] if x.get("queue_depth") is not None)
    if HAVE_MPL:
        assert "replicas_queue.png" in rep["plots"]


def test_soak_reports_slopes(tmp_path):
    with FakeOpenAIServer() as srv:
        rep = _run("soak", "--base-url", srv.base_url, "--duration", "3", "--rate", "10", "--pid",
                   str(os.getpid()), "--metrics-url", srv.metrics_url, "--sample-interval", "0.25",
                   "--out", str(tmp_path), *FAST)
    _check_report(rep, tmp_path)
    slopes = rep["scenario"]["slopes"]
    assert {"rss_bytes", "kv_usage", "server_rss_bytes", "ttft_s"} <= set(slopes)
    assert slopes["server_rss_bytes"]["per_s"] > 0  # the fake's RSS grows with requests received
    if HAVE_MPL:
        assert "memory_kv.png" in rep["plots"]
    assert "Drift over the soak" in (tmp_path / "report.md").read_text()


def test_hard_deadline_cancels_in_flight(tmp_path):
    """A server that never finishes: the run still stops at duration + drain timeout and counts
    the cancelled requests as errors."""
    with FakeOpenAIServer(hang=True) as srv:
        t = time.perf_counter()
        rc = cli.main(["steady", "--base-url", srv.base_url, "--duration", "1", "--rate", "5",
                       "--drain-timeout", "0.5", "--out", str(tmp_path), "--fail-on-errors", *FAST])
        wall = time.perf_counter() - t
    rep = json.loads((tmp_path / "report.json").read_text())
    s = rep["summary"]
    assert rc == 1 and wall < 6
    assert s["ok"] == 0 and s["errors"] == s["sent"] > 0 and s["error_kinds"] == {"cancelled": s["sent"]}
    assert s["sent"] == s["ok"] + s["rejected"] + s["errors"]


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["ramp", "--base-url", "http://127.0.0.1:9", "--concurrency", "2"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["steady", "--base-url", "http://127.0.0.1:9", "--rate", "1", "--concurrency", "2"])
    with pytest.raises(SystemExit):
        cli.main(["steady", "--base-url", "http://x", "--dist", "workload", "--workload", str(tmp_path / "no.json")])
    # nothing listening: model discovery fails cleanly
    rc = cli.main(["steady", "--base-url", "http://127.0.0.1:9", "--duration", "1", "--out", str(tmp_path),
                   "--no-progress"])
    assert rc == 1 and "cannot reach" in capsys.readouterr().err


def test_markdown_without_plots(tmp_path):
    recs = [_rec(0), _rec(1, "rejected", status=429, ra=1.0)]
    rep = {"meta": {"scenario": "steady", "url": "u", "model": "m", "endpoint": "completions"},
           "summary": summarize(recs), "phases": [], "scenario": {}, "plots": []}
    text = write_markdown(rep, tmp_path).read_text()
    assert "| TTFT |" in text and "Errors and rejections" in text


def test_locustfile_imports():
    pytest.importorskip("locust")
    import importlib

    mod = importlib.import_module("load_tests.locustfile")
    assert hasattr(mod, "LLMUser")


# ============================================================================================
# Live tests: a short run of each scenario against a real local server of the tiny model


@pytest.fixture
def live(request):
    try:
        return request.getfixturevalue("live_server")
    except pytest.FixtureLookupError:
        pytest.skip("live_server fixture not available")


def _live_args(live, scenario, out, *extra):
    return [scenario, "--base-url", live.base_url, "--model", live.model, "--out", str(out),
            "--dist", "fixed", "--prompt-len", "16", "--output-len", "8", "--no-progress",
            "--request-timeout", "60", *extra]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_live_steady_light_rate_no_errors(live, tmp_path):
    rep = cli.run(_live_args(live, "steady", tmp_path, "--duration", "4", "--rate", "1"))
    s = _check_report(rep, tmp_path)
    assert s["sent"] >= 1 and s["errors"] == 0 and s["rejected"] == 0 and s["ok"] == s["sent"]
    assert s["usage_reported_frac"] == 1.0  # stream_options.include_usage honoured
    assert 0 < s["output_tokens"] <= 8 * s["ok"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_live_steady_chat(live, tmp_path):
    rep = cli.run(_live_args(live, "steady", tmp_path, "--duration", "3", "--concurrency", "2",
                             "--endpoint", "chat", "--max-requests", "6"))
    s = _check_report(rep, tmp_path)
    assert s["errors"] == 0 and s["ok"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_live_sweep(live, tmp_path):
    rep = cli.run(_live_args(live, "sweep", tmp_path, "--duration", "9", "--rates", "0.5,1,2"))
    _check_report(rep, tmp_path)
    assert 1 <= len(rep["phases"]) <= 3 and rep["scenario"]["curve"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_live_overload(live, tmp_path):
    rep = cli.run(_live_args(live, "overload", tmp_path, "--duration", "4", "--rate", "2",
                             "--drain-timeout", "60"))
    s = _check_report(rep, tmp_path)
    acc = rep["scenario"]["accounting"]
    assert acc["balanced"] and acc["sent"] == acc["ok"] + acc["rejected"] + acc["errors"] > 0
    # overload is answered by admission control (429/503), not by failures
    assert s["errors"] == 0, s["error_examples"]
    for r in rep["requests"]:
        if r["outcome"] == "rejected":
            assert r["status"] in (429, 503)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_live_ramp(live, tmp_path):
    extra = ["--metrics-url", live.metrics_url] if getattr(live, "metrics_url", None) else []
    rep = cli.run(_live_args(live, "ramp", tmp_path, "--duration", "6", "--rate", "3",
                             "--sample-interval", "1", *extra))
    _check_report(rep, tmp_path)
    if extra:
        assert rep["samples"], "metrics endpoint was not sampled"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_live_soak(live, tmp_path):
    extra = ["--metrics-url", live.metrics_url] if getattr(live, "metrics_url", None) else []
    rep = cli.run(_live_args(live, "soak", tmp_path, "--duration", "6", "--rate", "1",
                             "--sample-interval", "1", *extra))
    s = _check_report(rep, tmp_path)
    assert s["errors"] == 0
    assert "ttft_s" in rep["scenario"]["slopes"] or s["ok"] < 3
