"""The LLMReplica logic driven in-process (serving/in_process_replica.py), as the Router runs it
with ``router.colocate_engine``: a real engine on the tiny model, no Ray cluster.

Each scenario runs in a fresh interpreter: this pytest process may be connected to the session's
Ray cluster (tests/ray_fixtures.py), and a replica built here would export its metrics there,
under a model name no app of that cluster serves (tests/test_security.py checks those labels)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.serving.in_process_replica import InProcessCall, start_in_process_replica
from mistral_serve.serving.wire import Delta, Final, GenerateRequest

INTERVAL_MS = 3000.0  # a pacing interval far longer than the whole request


def _args(model_dir) -> dict:
    return {"model": str(model_dir),
            "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": 4, "max_model_len": 256,
                       "kv_cache_memory_bytes": 16 << 20},
            "replicas": {"stream_interval_ms": INTERVAL_MS, "stream_max_interval_ms": INTERVAL_MS}}


def _request(rid: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(rid, [1, 100, 200, 300], SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                   ignore_eos=True), stream=True)


def _in_fresh_process(scenario, model_dir):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run, scenario, str(model_dir)).result(timeout=240)


def _run(scenario, model_dir: str):
    return asyncio.run(scenario(model_dir))


async def _stream_to_the_end(model_dir: str):
    replica = await start_in_process_replica(_args(model_dir))
    try:
        t0 = time.monotonic()
        call = InProcessCall(replica, _request("r1", 6))
        messages = [await call.__anext__()]
        while not isinstance(messages[-1], Final):
            messages.append(await call.__anext__())
        return messages, time.monotonic() - t0
    finally:
        replica.engine.shutdown()


async def _cancel_after_the_first_token(model_dir: str):
    replica = await start_in_process_replica(_args(model_dir))
    try:
        call = InProcessCall(replica, _request("r2", 200))
        first = await call.__anext__()
        running = (await replica.stats())["num_running"]
        call.cancel()
        for _ in range(200):
            stats = await replica.stats()
            if stats["num_running"] == 0 and stats["ongoing"] == 0:
                break
            await asyncio.sleep(0.02)
        return first, running, stats
    finally:
        replica.engine.shutdown()


def test_stream_ends_without_waiting_out_the_pacing_interval(tiny_model_dir):
    """The first token goes at once; the last message goes when the request ends, not at the
    next pacing tick (a closed-loop client would otherwise wait for it with its slot held)."""
    messages, elapsed = _in_fresh_process(_stream_to_the_end, tiny_model_dir)
    assert isinstance(messages[0], Delta) and messages[0].num_tokens == 1
    assert sum(m.num_tokens for m in messages) == 6 and messages[-1].completion_tokens == 6
    assert elapsed < INTERVAL_MS / 1000 / 2, f"the final message waited for the pacing interval ({elapsed:.2f} s)"


def test_cancel_aborts_the_engine_request(tiny_model_dir):
    first, running, stats = _in_fresh_process(_cancel_after_the_first_token, tiny_model_dir)
    assert isinstance(first, Delta) and running == 1
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0 and stats["ongoing"] == 0, stats
    assert stats["generation_tokens"] < 200
