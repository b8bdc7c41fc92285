"""``mistral-serve bench routing``: multi-turn chats over HTTP against two LLMReplicas, with
cache-aware routing and then without it (``replicas.prefix_cache_routing: false``), one
server after the other, same conversations. Reports TTFT and the share of prompt tokens the
replicas found cached.

Each conversation sends its turns one after another, streaming ``/v1/completions`` with
token-id prompts from ``bench.workload.multi_turn_workload`` (turn t extends turn t-1 by a
stand-in reply and a user message), with ``--think-s`` between a reply and the next turn (a
person reading, and longer than the routing stats period, so the replicas' newest blocks are
advertised). Conversations run concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from load_tests.client import RequestRecord, send_request
from load_tests.stats import percentiles
from mistral_serve.bench.measure import cpu_model
from mistral_serve.bench.serve import _stop, start_ours
from mistral_serve.bench.workload import multi_turn_workload


async def run_conversations(base_url: str, model: str, conversations: list[list[list[int]]], max_tokens: int,
                            think_s: float) -> list[RequestRecord]:
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    records: list[RequestRecord] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()

        async def chat(c: int, turns: list[list[int]]) -> None:
            for t, prompt in enumerate(turns):
                rec = RequestRecord(c * 1000 + t, f"turn{t}", None, 0.0, len(prompt), max_tokens)
                records.append(rec)
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                await send_request(session, url, body, rec, endpoint="completions", t0=t0, timeout_s=600)
                await asyncio.sleep(think_s)

        await asyncio.gather(*(chat(c, turns) for c, turns in enumerate(conversations)))
    return records


def summarize_turns(records: list[RequestRecord]) -> dict:
    ok = [r for r in records if r.outcome == "ok"]
    later = [r for r in ok if r.phase != "turn0"]
    ttft = percentiles([r.ttft_s for r in later], (50, 99))
    first = percentiles([r.ttft_s for r in ok if r.phase == "turn0"], (50,))
    prompt = sum(r.prompt_tokens or 0 for r in later)
    cached = sum(r.cached_tokens or 0 for r in later)
    return {"requests": len(records), "ok": len(ok), "later_turns": len(later),
            "ttft_p50_s": ttft[50], "ttft_p99_s": ttft[99], "first_turn_ttft_p50_s": first[50],
            "later_turn_prompt_tokens": prompt, "later_turn_cached_tokens": cached,
            "later_turn_cached_share": cached / prompt if prompt else None}


def _start(port: int, routing: bool, max_model_len: int, log: Path):
    # Two engines on the machine's cores: one torch thread and a fractional Ray CPU each.
    args = json.dumps({"replicas": {"prefix_cache_routing": routing}, "engine": {"num_threads": 1}})
    return start_ours(port, log, ["--replicas", "2", "--num-cpus", "0.5", "--max-model-len", str(max_model_len),
                                  "--metrics-port", "0", "--args", args])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mistral-serve bench routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=1024, help="ids before the first user message")
    p.add_argument("--turn-len", type=int, default=64, help="ids of each stand-in reply and each user message")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--think-s", type=float, default=2.0)
    p.add_argument("--port", type=int, default=18400)
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    wl = multi_turn_workload(a.conversations, a.turns, a.system_len, a.turn_len, a.turn_len, a.max_tokens)
    conversations = [wl.prompt_token_ids[c * a.turns:(c + 1) * a.turns] for c in range(a.conversations)]
    max_len = max(map(len, wl.prompt_token_ids)) + a.max_tokens + 16
    out_dir = Path(a.json).parent if a.json else Path(".")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "workload": wl.source, "think_s": a.think_s, "replicas": 2,
                    "command": " ".join(["mistral-serve", "bench", "routing", *argv])}
    for routing in (True, False):
        name = "cache_aware" if routing else "queue_depth_only"
        proc = _start(a.port, routing, max_len, out_dir / f"bench-routing-{name}.log")
        try:
            url = f"http://127.0.0.1:{a.port}"
            asyncio.run(run_conversations(url, "tiny", [[list(range(100, 400))]], a.max_tokens, 0))  # warm-up
            report[name] = summarize_turns(asyncio.run(run_conversations(url, "tiny", conversations, a.max_tokens,
                                                                         a.think_s)))
        finally:
            _stop(proc)
        print(name, json.dumps(report[name]), flush=True)
    on, off = report["cache_aware"]["ttft_p50_s"], report["queue_depth_only"]["ttft_p50_s"]
    report["ttft_p50_improvement"] = off / on if on and off else None
    text = json.dumps(report, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0
