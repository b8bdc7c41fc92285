"""The asyncio face of the engine, for the serving layer.

The engine runs in one dedicated thread (``LLMEngine`` is single-threaded by design); PyTorch
releases the GIL inside kernels, so the event loop stays responsive while a step computes.
Requests and aborts cross into the engine thread through a command queue; each step's deltas
come back to the event loop with one ``call_soon_threadsafe`` per step, not per token.

``generate()`` is an async iterator of delta ``RequestOutput``s. Closing it early (a client
disconnect cancels the consuming task) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable

from mistral_serve.engine.args import EngineArgs
from mistral_serve.engine.block_manager import ROUTING_STRIDE
from mistral_serve.engine.llm_engine import LLMEngine, RequestError
from mistral_serve.engine.outputs import RequestOutput
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.stats import EngineStats

__all__ = ["AsyncLLM", "EngineDeadError", "RequestError"]


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step raised); in-flight requests cannot finish."""


class AsyncLLM:
    def __init__(self, args: EngineArgs) -> None:
        self.engine = LLMEngine(args)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self._commands: collections.deque[tuple] = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool]] = {}
        # Non-streaming requests: deltas after the first, merged until the request finishes.
        self._held: dict[str, RequestOutput | None] = {}
        self._stopping = False
        self._error: BaseException | None = None
        # Test-only fault injection (reliability tests): called before every step.
        self.before_step: Callable[[], None] | None = None
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mistral-serve-engine", daemon=True)
        self._thread.start()

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
        TTFT) and the rest merged in the engine thread at the end, sparing the event loop one
        wakeup per token for callers that want the whole answer anyway.
        """
        self._raise_if_dead()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.engine.validate_request(ids, params)  # fail fast in the caller, before queueing
        if params.structured_output is not None:
            # Compile the grammar (cached per spec) in a worker thread: the engine thread then
            # only copies the cached matcher, and no step waits on a compile.
            try:
                await asyncio.to_thread(self.engine.grammars.prepare, params.structured_output)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, queue, stream)
        self._send(("add", request_id, ids, params, priority))
        finished = False
        try:
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
            if not finished:
                self._send(("abort", request_id, None))

    async def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request; returns once its KV blocks are back in the pool, with its final
        output (``metrics.compute_seconds`` lets the caller bill the work done), or None if
        the request was unknown or already finished."""
        done = asyncio.get_running_loop().create_future()
        self._send(("abort", request_id, done))
        if not self._thread.is_alive():
            return None
        return await done

    @property
    def quantization(self) -> str:
        """The weights' format as loaded (``"none"`` for full precision), for the metrics label
        that lets $/1M tokens compare replicas differing only in it."""
        return self.engine.quantization

    def stats(self) -> EngineStats:
        """A copy of the engine's figures, cheap enough for every routing-stats poll; taken while
        the engine thread may be mid-step, so two figures can straddle one step."""
        return self.engine.stats.snapshot(alive=self._error is None and self._thread.is_alive(),
                                          seconds_since_progress=time.monotonic() - self.last_progress)

    def prefix_routing_keys(self) -> tuple[int, int, list[int]]:
        """(block size, stride, routing keys) of the prefixes this engine holds cached
        (``BlockManager.routing_keys``), for cache-aware routing across replicas."""
        bm = self.engine.block_manager
        return bm.block_size, ROUTING_STRIDE, bm.routing_keys()

    def check_health(self, stall_timeout_s: float = 30.0) -> None:
        """Raise if the loop died, or has work but made no step in ``stall_timeout_s``."""
        self._raise_if_dead()
        busy = self.engine.has_unfinished_requests() or bool(self._commands)
        if busy and time.monotonic() - self.last_progress > stall_timeout_s:
            raise EngineDeadError(f"engine made no progress for {stall_timeout_s:.0f}s with work pending")

    def fail(self, exc: BaseException) -> None:
        """Deliver ``exc`` to every in-flight request now: for an owner that judged the engine
        dead (e.g. a stalled loop), since a wedged loop would otherwise hold them indefinitely."""
        for request_id in list(self._streams):
            self._dispatch_one(request_id, exc)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- engine thread ----------------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake.set()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop stopped: {self._error!r}") from self._error
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    def _run(self) -> None:
        engine = self.engine
        try:
            engine.claim_cpu_threads()
            while not self._stopping:
                self._apply_commands()
                if not engine.has_unfinished_requests():
                    self.last_progress = time.monotonic()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                if self.before_step is not None:
                    self.before_step()
                outputs = engine.step()
                self.last_progress = time.monotonic()
                self._dispatch(outputs)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting clients
            self._error = exc
            self.fail(EngineDeadError(f"engine step failed: {exc!r}"))

    def _apply_commands(self) -> None:
        while self._commands:
            kind, request_id, *rest = self._commands.popleft()
            if kind == "add":
                ids, params, priority = rest
                try:
                    self.engine.add_request(request_id, ids, params, priority)
                except RequestError as exc:
                    self._dispatch_one(request_id, exc)
            else:
                out = self.engine.abort_request(request_id)
                done = rest[0]
                if out is not None:
                    self._dispatch([out])
                if done is not None:
                    done.get_loop().call_soon_threadsafe(_resolve, done, out)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            loop, queue, streaming = stream
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
