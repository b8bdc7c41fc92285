"""The asyncio face of the engine, for the serving layer.

The engine runs in a process of its own (``engine_core.py``: why, and the wire). Requests and
aborts go to it as commands on a pipe. Its reports are read by the event loop the engine was
built in (``add_reader`` on the pipe), or, built outside any loop (scripts, tests driving it
from several loops in turn), by a reader thread that hands each report's deltas to their
loops with one ``call_soon_threadsafe`` per report, not per token. The event loop reads them
itself in a server because every wakeup costs CPU, not for waking (12-40 µs on the 2-vCPU
machine) but because the woken code runs cold after the engine's threads had the cores
(engine_core.py): a report then wakes one thread, not two.

The reader also paces each request (``_Stream``): a delta that its caller would only
hold back (a streaming request whose next message is not due yet, a non-streaming request
that has started) is merged into the request's pending output there, and the event loop wakes
only for an output its caller will send; paced in the event loop instead, every report woke
every stream's tasks and timers to decide to wait (docs/serving.md, Performance).

``generate()`` is an async iterator of delta ``RequestOutput``s. Closing it early (a client
disconnect cancels the consuming task) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import multiprocessing
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mistral_serve.engine import engine_core as core
from mistral_serve.engine.args import EngineArgs
from mistral_serve.engine.block_manager import ROUTING_STRIDE
from mistral_serve.engine.llm_engine import RequestError, validate_request
from mistral_serve.engine.outputs import RequestOutput
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.stats import EngineStats
from mistral_serve.model.loader import resolve_model_dir
from mistral_serve.tokenizer import load_tokenizer

__all__ = ["AsyncLLM", "EngineDeadError", "RequestError"]

SHUTDOWN_TIMEOUT_S = 10.0


class EngineDeadError(RuntimeError):
    """The engine stopped (a step raised, or its process died); in-flight requests cannot finish."""


@dataclass(slots=True)
class _Stream:
    """One request's delivery: where its outputs go, and what the reader holds back.

    Read and written by the reader only, after ``generate`` registered it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list[int]  # put back on each output: the engine core sends them without it
    # The gap to keep between two outputs after the first; None: the whole rest at the end.
    interval_s: Callable[[], float] | None
    pending: RequestOutput | None = None  # deltas merged since the last delivery
    due: float = 0.0  # time.monotonic() from which the next output may go (0: the first, at once)


class AsyncLLM:
    def __init__(self, args: EngineArgs, report_interval_s: float = 0.0) -> None:
        """``report_interval_s``: how long the core may hold deltas nobody waits for before it
        reports them (engine_core.py, ``_Reporter``); set it to the smallest gap at which a
        caller sends a stream's messages. 0: a report per step."""
        # spawn, not fork: the owner may hold CUDA, Ray's threads or a running event loop.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        # The core spaces reports by up to this much, on its own clock: a stream whose message is
        # due within it goes with this report rather than a whole interval later.
        self._due_slack_s = report_interval_s
        self._report_interval_s = report_interval_s
        self._process = ctx.Process(target=core.run_engine_core, args=(args, child_conn, report_interval_s), daemon=True,
                                    name="mistral-serve-engine-core")
        self._process.start()
        child_conn.close()
        self.tokenizer = load_tokenizer(resolve_model_dir(args.model))
        started = self._receive_started()
        self._facts: core.CoreFacts = started.facts
        self.max_model_len = self._facts.max_model_len
        self._stats: EngineStats = started.stats
        self._progress_time = time.monotonic()
        self._routing_keys: list[int] = []
        self._send_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._aborts: dict[int, asyncio.Future] = {}
        self._abort_tokens = itertools.count()
        self._stopping = False
        self._error: BaseException | None = None
        self._loop = _running_loop()
        if self._loop is not None:
            self._loop.add_reader(self._conn.fileno(), self._on_readable)
            # uvloop's poll handle makes the fd non-blocking; a report over 16 KiB (routing keys,
            # prompt logprobs) is written as header then body, and a non-blocking read between the
            # two raised BlockingIOError, which read as a lost core (seen under Serve's burst).
            os.set_blocking(self._conn.fileno(), True)
        else:
            threading.Thread(target=self._read_reports, name="mistral-serve-engine-reader", daemon=True).start()

    def _receive_started(self) -> core.CoreStarted:
        try:
            started = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise EngineDeadError(f"the engine process exited while starting (exit code {self._process.exitcode})") \
                from None
        if started.error is not None:
            self._process.join(5)
            raise started.error
        return started

    # ---- public API (event loop side) ---------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        stream: bool = True,
        interval_s: Callable[[], float] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream delta outputs of one request; raises RequestError for an invalid request.

        The first output (the first token: the start signal, e.g. for TTFT) and the last go at
        once. In between, ``stream=True`` yields every step's delta, or with ``interval_s`` (a
        callable, read by the reader: the gap may follow the load) at most one output per
        ``interval_s()``, holding every delta since the previous one. ``stream=False`` yields only
        the first and, merged, the rest at the end: no event-loop wakeup per token for callers
        that want the whole answer anyway.
        """
        self._raise_if_dead()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        validate_request(ids, params, self._facts.vocab_size, self.max_model_len)  # fail fast, before queueing
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        interval = (interval_s or _every_step) if stream else None
        self._streams[request_id] = _Stream(asyncio.get_running_loop(), queue, ids, interval)
        finished = False
        try:
            self._send(core.AddRequest(request_id, ids, params, priority, interim=stream))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._error is None:
                with contextlib.suppress(EngineDeadError):  # a dead core holds no request
                    self._send(core.AbortRequest(request_id))

    async def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request; returns once its KV blocks are back in the pool, with its final
        output (``metrics.compute_seconds`` lets the caller bill the work done), or None if
        the request was unknown or already finished (or the engine is gone)."""
        if self._error is not None:
            return None
        token = next(self._abort_tokens)
        done = self._aborts[token] = asyncio.get_running_loop().create_future()
        try:
            self._send(core.AbortRequest(request_id, token))
            return await done
        except EngineDeadError:
            return None
        finally:
            self._aborts.pop(token, None)

    def set_report_interval(self, seconds: float) -> None:
        """The gap the core may now hold deltas nobody waits for (``__init__``'s
        ``report_interval_s``), for a caller whose streams' gap follows the load; a change of
        under a quarter is not sent (every command wakes the core's receiver)."""
        if abs(seconds - self._report_interval_s) > 0.25 * self._report_interval_s:
            self._report_interval_s = seconds
            with contextlib.suppress(EngineDeadError):
                self._send(core.SetReportInterval(seconds))

    def inject_fault(self, kind: str, after_steps: int = 0, seconds: float = 0.0) -> None:
        """Test hooks (``engine_core.InjectFault``): ``raise``, ``wedge``, ``slow`` or ``clear``."""
        if kind not in ("raise", "wedge", "slow", "clear"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self._send(core.InjectFault(kind, after_steps, seconds))

    @property
    def quantization(self) -> str:
        """The weights' format as loaded (``"none"`` for full precision), for the metrics label
        that lets $/1M tokens compare replicas differing only in it."""
        return self._facts.quantization

    def stats(self) -> EngineStats:
        """The engine's figures as of its latest report (one per step, or per heartbeat when
        idle), cheap enough for every routing-stats poll."""
        return dataclasses.replace(self._stats, alive=self._error is None and self._process.is_alive(),
                                   seconds_since_progress=time.monotonic() - self._progress_time)

    def prefix_routing_keys(self) -> tuple[int, int, list[int]]:
        """(block size, stride, routing keys) of the prefixes this engine holds cached
        (``BlockManager.routing_keys``), for cache-aware routing across replicas."""
        return self._facts.block_size, ROUTING_STRIDE, self._routing_keys

    def check_health(self, stall_timeout_s: float = 30.0) -> None:
        """Raise if the engine died, or has work but reported no progress in ``stall_timeout_s``."""
        self._raise_if_dead()
        if self._streams and time.monotonic() - self._progress_time > stall_timeout_s:
            raise EngineDeadError(f"engine made no progress for {stall_timeout_s:.0f}s with work pending")

    def fail(self, exc: BaseException) -> None:
        """Deliver ``exc`` to every in-flight request now: for an owner that judged the engine
        dead (e.g. a stalled loop), since a wedged loop would otherwise hold them indefinitely."""
        for request_id in list(self._streams):
            self._dispatch_one(request_id, exc)

    def shutdown(self) -> None:
        self._stopping = True
        try:
            self._send(core.Shutdown())
        except EngineDeadError:
            pass
        self._process.join(SHUTDOWN_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
        if self._loop is None:
            self._conn.close()
            return
        if _running_loop() is self._loop:
            self._loop.remove_reader(self._conn.fileno())
            self._conn.close()
        elif not self._loop.is_closed():  # called from another thread: the loop unregisters the pipe
            self._loop.call_soon_threadsafe(self._loop.remove_reader, self._conn.fileno())

    # ---- the pipe ---------------------------------------------------------------------------

    def _send(self, command) -> None:
        try:
            with self._send_lock:
                self._conn.send(command)
        except (OSError, ValueError) as exc:  # the core is gone (broken pipe, closed connection)
            raise EngineDeadError(f"the engine process is gone: {exc!r}") from None

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop stopped: {self._error!r}") from self._error
        if not self._process.is_alive():
            raise EngineDeadError(f"the engine process is not running (exit code {self._process.exitcode})")

    def _read_reports(self) -> None:
        """The reader thread (an engine built outside an event loop): every report, until the
        core fails or goes away."""
        try:
            while self._handle(self._conn.recv()):
                pass
        except (EOFError, OSError):
            self._lost()

    def _on_readable(self) -> None:
        """The event loop's reader: the reports waiting on the pipe."""
        # One report per call: the loop calls again while the pipe stays readable, and
        # ``Connection.poll`` would build a selector per report (~50 µs of a cold reader).
        try:
            if not self._handle(self._conn.recv()):
                self._loop.remove_reader(self._conn.fileno())
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            self._lost()

    def _handle(self, report) -> bool:
        """Apply one report; False once the core has failed (nothing more will come)."""
        if isinstance(report, core.StepReport):
            self._progress_time = report.progress_time
            if report.stats is not None:
                self._stats = report.stats
            if report.routing_keys is not None:
                self._routing_keys = report.routing_keys
            if report.outputs:
                self._dispatch(report.outputs)
        elif isinstance(report, core.RequestFailed):
            self._dispatch_one(report.request_id, report.error)
        elif isinstance(report, core.AbortDone):
            if report.output is not None:
                self._dispatch([report.output])
            self._resolve_abort(report.token, report.output)
        elif isinstance(report, core.CoreFailed):
            self._die(EngineDeadError(f"engine step failed: {report.error}"))
            return False
        return True

    def _lost(self) -> None:
        """The pipe closed: the core exited (or we shut it down)."""
        if not self._stopping:
            self._process.join(1)
            self._die(EngineDeadError(f"the engine process exited (exit code {self._process.exitcode})"))

    def _die(self, exc: EngineDeadError) -> None:
        self._error = exc
        self.fail(exc)
        for token in list(self._aborts):
            self._resolve_abort(token, None)

    def _resolve_abort(self, token: int, output: RequestOutput | None) -> None:
        done = self._aborts.get(token)
        if done is not None:
            self._call_in(done.get_loop(), _resolve, done, output)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand every output that may go now to its request's loop, one wakeup per loop; merge
        the others into their request's pending output (``_Stream``)."""
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for out in outputs:
            s = self._streams.get(out.request_id)
            if s is None:
                continue
            if s.pending is not None:
                s.pending.merge(out)
                out = s.pending
            if not out.finished and now < s.due:
                s.pending = out
                continue
            s.pending = None
            s.due = now + s.interval_s() - self._due_slack_s if s.interval_s is not None else math.inf
            out.prompt_token_ids = s.prompt_token_ids
            by_loop[s.loop].append((s.queue, out))
        for loop, items in by_loop.items():
            self._call_in(loop, _deliver, items)

    def _dispatch_one(self, request_id: str, item) -> None:
        s = self._streams.get(request_id)
        if s is not None:
            self._call_in(s.loop, _deliver, [(s.queue, item)])

    def _call_in(self, loop: asyncio.AbstractEventLoop, fn, *args) -> None:
        """Run ``fn(*args)`` in ``loop``: at once when we are running in it (the event loop's
        reader, or a caller on that loop), else through ``call_soon_threadsafe``."""
        if _running_loop() is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _every_step() -> float:
    return 0.0


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
