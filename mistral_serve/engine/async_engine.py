"""The asyncio face of the engine, for the serving layer.

The engine runs in a process of its own (``engine_core.py``: why, and the wire). Requests and
aborts go to it as commands on a pipe; a reader thread here takes each step's report and
hands its deltas to the event loop with one ``call_soon_threadsafe`` per step, not per token.

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
import threading
import time
from collections.abc import AsyncIterator

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


class AsyncLLM:
    def __init__(self, args: EngineArgs) -> None:
        # spawn, not fork: the owner may hold CUDA, Ray's threads or a running event loop.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=core.run_engine_core, args=(args, child_conn), daemon=True,
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
        # request id -> (its loop, its queue, streaming?, its prompt ids: put back on each output,
        # which the engine core sends without them)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool, list[int]]] = {}
        # Non-streaming requests: deltas after the first, merged until the request finishes.
        self._held: dict[str, RequestOutput | None] = {}
        self._aborts: dict[int, asyncio.Future] = {}
        self._abort_tokens = itertools.count()
        self._stopping = False
        self._error: BaseException | None = None
        self._reader = threading.Thread(target=self._read_reports, name="mistral-serve-engine-reader", daemon=True)
        self._reader.start()

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
    ) -> AsyncIterator[RequestOutput]:
        """Stream delta outputs of one request; raises RequestError for an invalid request.

        ``stream=False`` yields only two outputs: the first token (the start signal, e.g. for
        TTFT) and the rest merged by the reader thread at the end, sparing the event loop one
        wakeup per token for callers that want the whole answer anyway.
        """
        self._raise_if_dead()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        validate_request(ids, params, self._facts.vocab_size, self.max_model_len)  # fail fast, before queueing
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, queue, stream, ids)
        finished = False
        try:
            self._send(core.AddRequest(request_id, ids, params, priority))
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
            self._held.pop(request_id, None)
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
        self._conn.close()

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
        """The reader thread: every report from the core, until it fails or goes away."""
        try:
            while True:
                report = self._conn.recv()
                if isinstance(report, core.StepReport):
                    self._stats, self._progress_time = report.stats, report.progress_time
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
                    return
        except (EOFError, OSError):
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
            done.get_loop().call_soon_threadsafe(_resolve, done, output)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            loop, queue, streaming, out.prompt_token_ids = stream
            if not streaming:
                if out.request_id in self._held:  # the first output went out already
                    held = self._held[out.request_id]
                    if held is None:
                        self._held[out.request_id] = held = out
                    else:
                        held.merge(out)
                    if not out.finished:
                        continue
                    out = self._held.pop(out.request_id)
                else:
                    self._held[out.request_id] = None
            by_loop[loop].append((queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _dispatch_one(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream[0].call_soon_threadsafe(_deliver, [(stream[1], item)])


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
