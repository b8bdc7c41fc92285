"""The asyncio engine: streaming deltas, abort, disconnects, failures, stats."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from mistral_serve import EngineArgs, LLM, SamplingParams
from mistral_serve.engine import engine_core as core
from mistral_serve.engine.async_engine import AsyncLLM, EngineDeadError, RequestError


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncLLM(EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=64 << 20))
    yield eng
    eng.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_streams_match_offline_results(engine, tiny_model_dir):
    prompts = [f"Request number {i} says" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)

    async def one(i):
        ids, text = [], ""
        prompt_ids = engine.tokenizer.encode(prompts[i])
        async for out in engine.generate(prompts[i], params, f"s{i}"):
            # The core sends deltas without the prompt; every output still carries it.
            assert out.prompt_token_ids == prompt_ids
            ids += out.outputs[0].token_ids
            text += out.outputs[0].text
        assert out.finished and out.metrics.num_generation_tokens == 25
        assert out.metrics.ttft > 0 and out.metrics.compute_seconds > 0 and len(out.metrics.inter_token_latencies) == 24
        return ids, text

    async def all_():
        return await asyncio.gather(*(one(i) for i in range(6)))

    streamed = run(all_())
    offline = LLM(str(tiny_model_dir)).generate(prompts, params)
    assert [s[0] for s in streamed] == [o.outputs[0].token_ids for o in offline]
    assert [s[1] for s in streamed] == [o.outputs[0].text for o in offline]
    assert engine.stats().kv_blocks_used == 0


def test_non_streaming_mode_sends_first_and_merged_final(engine):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def collect(stream):
        return [o async for o in engine.generate("Tell me a story", params, f"ns-{stream}", stream=stream)]

    streamed = run(collect(True))
    whole = run(collect(False))
    assert len(streamed) == 30 and len(whole) == 2
    assert len(whole[0].outputs[0].token_ids) == 1 and whole[1].finished
    first, rest = whole
    first.merge(rest)
    assert first.outputs[0].token_ids == [t for o in streamed for t in o.outputs[0].token_ids]
    assert first.outputs[0].text == "".join(o.outputs[0].text for o in streamed)
    assert engine._streams == {}


def test_paced_stream_holds_deltas_between_intervals(engine):
    """With ``interval_s`` the reader thread merges the deltas of one interval into one output:
    the first token alone and at once, the end at once, every token exactly once in between."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    gaps: dict[str, list[float]] = {}

    async def collect(rid, interval_s):
        outs, times = [], []
        async for o in engine.generate("Tell me a story", params, rid, interval_s=interval_s):
            outs.append(o)
            times.append(time.monotonic())
        gaps[rid] = [b - a for a, b in zip(times[:-2], times[1:-1])]  # the last goes at once
        return outs

    every_step = run(collect("paced-0", None))
    paced = run(collect("paced-1", lambda: 0.03))
    held = run(collect("paced-2", lambda: 60.0))
    assert len(every_step) == 40
    assert 2 < len(paced) < 40 and len(paced[0].outputs[0].token_ids) == 1
    assert len(held) == 2 and held[-1].finished  # an interval longer than the request: first, then the end
    for outs in (paced, held):
        assert [t for o in outs for t in o.outputs[0].token_ids] == \
            [t for o in every_step for t in o.outputs[0].token_ids]
        assert all(o.prompt_token_ids == every_step[0].prompt_token_ids for o in outs)
    assert min(gaps["paced-1"]) >= 0.03 * 0.9, gaps  # no two paced outputs closer than the interval
    assert engine._streams == {}


def test_reports_carry_stats_at_a_requests_end_not_every_step(engine):
    """The stats go with a request's end and at most every STATS_REPORT_S in between (its start:
    test_abort_frees_blocks_at_once reads the blocks taken right after the first token)."""
    seen = []
    handle = engine._handle

    def recording(report):
        if isinstance(report, core.StepReport) and report.outputs:
            seen.append((report.stats, [(o.request_id, o.finished) for o in report.outputs]))
        return handle(report)

    async def scenario():
        params = SamplingParams(max_tokens=48, ignore_eos=True)
        return [o async for o in engine.generate("stats please", params, "stats-1")]  # a report per step

    # The reader thread, blocked on the pipe, already holds the old handler for one report: the
    # first one goes unrecorded.
    engine._handle = recording
    try:
        outs = run(scenario())
    finally:
        engine._handle = handle
    assert seen[-1][1] == [("stats-1", True)] and seen[-1][0] is not None  # the end
    assert any(stats is None for stats, _ in seen[:-1])  # steps in between: at most every STATS_REPORT_S
    assert engine.stats().generation_tokens >= sum(len(o.outputs[0].token_ids) for o in outs)


def test_abort_frees_blocks_at_once(engine):
    async def scenario():
        gen = engine.generate("a long story", SamplingParams(max_tokens=500, ignore_eos=True), "to-abort")
        await gen.__anext__()
        assert engine.stats().kv_blocks_used > 0
        final = await engine.abort("to-abort")
        assert engine.stats().kv_blocks_used == 0
        assert final.finished and final.outputs[0].finish_reason == "abort"
        assert final.metrics.compute_seconds > 0  # the work done so far can be billed
        assert await engine.abort("to-abort") is None
        rest = [o async for o in gen]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"

    run(scenario())


def test_consumer_going_away_aborts_the_request(engine):
    """A client disconnect cancels the consuming task; the request must not keep running."""

    async def scenario():
        async def consume():
            async for _ in engine.generate("hello", SamplingParams(max_tokens=1000, ignore_eos=True), "gone"):
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0

    run(scenario())


def test_invalid_requests_fail_before_queueing(engine):
    async def scenario():
        with pytest.raises(RequestError, match="maximum context length"):
            async for _ in engine.generate([5] * 10, SamplingParams(max_tokens=engine.max_model_len), "too-long"):
                pass
        with pytest.raises(RequestError, match="token ids"):
            async for _ in engine.generate([10**9], SamplingParams(max_tokens=2), "bad-id"):
                pass
        with pytest.raises(RequestError, match="stop_token_ids"):
            async for _ in engine.generate([5], SamplingParams(max_tokens=2, stop_token_ids=[10**12]), "bad-stop"):
                pass

    run(scenario())


def test_step_failure_fails_requests_and_health(tiny_model_dir):
    eng = AsyncLLM(EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20))

    async def scenario():
        eng.check_health()
        eng.inject_fault("raise")
        with pytest.raises(EngineDeadError, match="injected engine fault"):
            async for _ in eng.generate("hi", SamplingParams(max_tokens=5), "r"):
                pass
        with pytest.raises(EngineDeadError):
            eng.check_health()
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate("hi again", SamplingParams(max_tokens=5), "r2"):
                pass

    run(scenario())
    eng.shutdown()


def test_wedged_loop_fails_health_check(tiny_model_dir):
    eng = AsyncLLM(EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20))
    eng.inject_fault("wedge", seconds=10)

    async def scenario():
        gen = eng.generate("hi", SamplingParams(max_tokens=3), "stuck")
        task = asyncio.create_task(gen.__anext__())
        await asyncio.sleep(0.5)
        with pytest.raises(EngineDeadError, match="no progress"):
            eng.check_health(stall_timeout_s=0.2)
        eng.inject_fault("clear")
        await task
        eng.check_health(stall_timeout_s=0.2)
        await gen.aclose()

    run(scenario())
    eng.shutdown()



def test_core_coalesces_reports_without_losing_or_delaying_tokens(tiny_model_dir):
    """``report_interval_s``: the core sends the steps of one interval as one report (fewer
    outputs than tokens even when the caller takes every step), the first token alone, every
    token once and in order; an abort's answer carries the tokens the core still held."""
    eng = AsyncLLM(EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20), report_interval_s=0.05)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def scenario():
        outs = [o async for o in eng.generate("Tell me a story", params, "coalesced")]
        gen = eng.generate("a long story", SamplingParams(max_tokens=500, ignore_eos=True), "aborted")
        got = [await gen.__anext__()]
        await asyncio.sleep(0.3)
        got.append(await gen.__anext__())
        final = await eng.abort("aborted")
        got += [o async for o in gen]  # what was queued, then the abort's answer
        return outs, got, final

    outs, got, final = run(scenario())
    eng.shutdown()
    offline = LLM(str(tiny_model_dir)).generate(["Tell me a story"], params)[0]
    assert len(outs[0].outputs[0].token_ids) == 1 and 2 < len(outs) < 20
    assert [t for o in outs for t in o.outputs[0].token_ids] == offline.outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in outs) == offline.outputs[0].text
    assert got[-1].finished and got[-1].outputs[0].token_ids == final.outputs[0].token_ids
    assert final.finished and final.outputs[0].token_ids  # the core held tokens back: the answer has them
    assert sum(len(o.outputs[0].token_ids) for o in got) == final.metrics.num_generation_tokens


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_engine_built_in_a_loop_reads_reports_in_that_loop(tiny_model_dir, loop_kind):
    """Built inside a running loop (as a served replica builds it), the engine reads the core's
    pipe in that loop (no reader thread): streams, aborts and the core's death all arrive. Under
    uvloop (Ray Serve's loop), whose poll handle makes the pipe non-blocking, a report larger
    than one pipe write (prompt logprobs of a long prompt) still arrives whole."""

    async def scenario():
        threads = threading.active_count()
        eng = AsyncLLM(EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20))
        assert threading.active_count() == threads  # no reader thread
        # A report is read whole only from a blocking pipe: its header and its body, when over
        # 16 KiB, are two writes.
        assert os.get_blocking(eng._conn.fileno())
        big = [o async for o in eng.generate(list(range(5, 1500)), SamplingParams(max_tokens=2, prompt_logprobs=8),
                                             "big-report")]
        assert big[-1].finished and len(big[0].prompt_logprobs) == 1495
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        outs = [o async for o in eng.generate("Tell me a story", params, "in-loop")]
        gen = eng.generate("a long story", SamplingParams(max_tokens=500, ignore_eos=True), "abort-me")
        await gen.__anext__()
        final = await eng.abort("abort-me")
        assert final.finished and final.outputs[0].finish_reason == "abort"
        await gen.aclose()
        victim = eng.generate("another story", SamplingParams(max_tokens=5000, ignore_eos=True), "orphan")
        await victim.__anext__()
        eng._process.kill()
        with pytest.raises(EngineDeadError, match="exited"):
            async for _ in victim:
                pass
        eng.shutdown()
        return outs

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            outs = runner.run(scenario())
    else:
        outs = run(scenario())
    offline = LLM(str(tiny_model_dir)).generate(["Tell me a story"], SamplingParams(temperature=0, max_tokens=12,
                                                                                  ignore_eos=True))[0]
    assert [t for o in outs for t in o.outputs[0].token_ids] == offline.outputs[0].token_ids
