"""``LLMReplica``: one async engine per replica (per GPU in production).

The Router calls ``generate`` through a streaming DeploymentHandle with token ids it already
validated. The replica answers with few, fat messages, because each message crosses Ray
(and then the proxy) at a cost that would dominate a per-token stream:

- streaming requests: the first message as soon as the first token exists (TTFT is not
  delayed), then one message per pacing interval holding every token produced in between
  (stream_pacing.py: one step's tokens at low load, more per message as streams multiply,
  so the replica's total message rate stays bounded);
- non-streaming requests: one message at the first token (the Router's queue timeout needs
  to know the request started) and one at the end.

The engine applies the pacing: its core reports at the pacing interval (``set_report_interval``)
and ``AsyncLLM.generate`` (``interval_s``) merges what arrives early, so this event loop wakes
once per message, not once per engine step.

Cancelling the call (client disconnect, router deadline) aborts the request in the engine,
which frees its KV blocks at once and returns the compute it used, billed to its tenant.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from typing import Any

from ray import serve

from mistral_serve.engine.async_engine import AsyncLLM, EngineDeadError, RequestError
from mistral_serve.serving.config import AppArgs, resolve_model
from mistral_serve.serving.cost import BusyIdleMeter, request_cost_usd
from mistral_serve.serving.stream_pacing import StreamPacer
from mistral_serve.serving.wire import Delta, Final, GenerateRequest, ReplicaError

logger = logging.getLogger("ray.serve")

ABORT_TIMEOUT_S = 2.0  # an abort resolves within one engine step; a wedged engine never answers


class _Choice:
    """One choice's text, tokens and logprobs since its last message."""

    __slots__ = ("text", "num_tokens", "logprobs", "finish_reason", "finish_sent")

    def __init__(self, want_logprobs: bool) -> None:
        self.text: list[str] = []
        self.num_tokens = 0
        self.logprobs: list | None = [] if want_logprobs else None
        self.finish_reason: str | None = None
        self.finish_sent = False

    def take(self) -> tuple[str, int, list | None]:
        """(text, number of tokens, logprobs or None) since the last take."""
        out = ("".join(self.text), self.num_tokens, self.logprobs)
        if self.logprobs is not None:
            self.logprobs = []
        self.text, self.num_tokens = [], 0
        return out


class _Accumulator:
    """Merges engine deltas of one request (its n choices) into outgoing messages."""

    def __init__(self, logprobs: int | None, tokenizer, n: int = 1, prompt_logprobs: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.k = logprobs or 0
        self.prompt_k = prompt_logprobs or 0
        self.choices = [_Choice(logprobs is not None) for _ in range(n)]
        self.finish_reason: str | None = None
        self.metrics = None
        self.finished = False
        self.prompt_tokens = 0
        self.cached_tokens: int | None = None  # n > 1: the least of the choices' (the first computed the prompt)
        self.prompt_logprobs: list | None = None  # formatted, until a message carries them
        self.aborted = None  # the engine's final output of a request we aborted

    def add(self, item) -> None:
        if isinstance(item, BaseException):
            raise item
        out = item
        self.prompt_tokens = len(out.prompt_token_ids)
        cached = out.num_cached_tokens
        self.cached_tokens = cached if self.cached_tokens is None else min(self.cached_tokens, cached)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = [_format_logprobs(t, e, self.tokenizer, self.prompt_k)
                                    for t, e in zip(out.prompt_token_ids, out.prompt_logprobs)]
        for c in out.outputs:
            ch = self.choices[c.index]
            ch.text.append(c.text)
            ch.num_tokens += len(c.token_ids)
            if ch.logprobs is not None and c.logprobs:
                for tok, entry in zip(c.token_ids, c.logprobs):
                    ch.logprobs.append(_format_logprobs(tok, entry, self.tokenizer, self.k))
            if c.finish_reason is not None:
                ch.finish_reason = c.finish_reason
        if out.finished:
            self.finished = True
            self.finish_reason = out.outputs[-1].finish_reason
            self.metrics = out.metrics

    def take(self) -> tuple[str, int, list | None]:
        """(text, number of tokens, logprobs or None) of the one choice (n == 1) since the last take."""
        return self.choices[0].take()

    def take_prompt_logprobs(self) -> list | None:
        out, self.prompt_logprobs = self.prompt_logprobs, None
        return out

    def deltas(self) -> list[Delta]:
        """What came in since the last messages: one Delta (n == 1), or one per choice with new
        tokens or a new end (n > 1), the first of them carrying the prompt logprobs."""
        if len(self.choices) == 1:
            return [Delta(*self.take(), prompt_logprobs=self.take_prompt_logprobs())]
        out = []
        for i, ch in enumerate(self.choices):
            ends = ch.finish_reason is not None and not ch.finish_sent
            if ch.num_tokens or ends:
                ch.finish_sent = ch.finish_sent or ends
                out.append(Delta(*ch.take(), index=i, finish_reason=ch.finish_reason if ends else None,
                                 prompt_logprobs=None if out else self.take_prompt_logprobs()))
        return out


def _format_logprobs(token: int, entry: dict[int, float] | None, tokenizer, k: int) -> tuple:
    """(token text, its logprob, [(text, logprob)] of the top k). The sampler's entry holds the
    chosen token plus the top k, which may include the chosen one: the k best of it are the
    top k either way."""
    text = tokenizer.decode([token], skip_special_tokens=False)
    if not entry:
        return (text, None, [])
    top = sorted(entry.items(), key=lambda kv: -kv[1])[:k] if k else []
    return (text, entry.get(token), [(tokenizer.decode([t], skip_special_tokens=False), lp) for t, lp in top])


@serve.deployment(name="LLMReplica")
class LLMReplica:
    async def __init__(self, args: dict) -> None:
        self.args = AppArgs.model_validate(args)
        self.model_dir = resolve_model(self.args.model)
        t0 = time.monotonic()
        r = self.args.replicas
        self.pacer = StreamPacer(r.stream_interval_ms / 1000.0, max(r.stream_interval_ms, r.stream_max_interval_ms) / 1000.0,
                                 r.stream_messages_per_s)
        self.engine = AsyncLLM(self.args.engine_args(str(self.model_dir)), report_interval_s=self.pacer.min_interval_s)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.model_name = self.args.model_name
        self.stall_timeout_s = self.args.replicas.stall_timeout_s
        self.price = self.args.cost.gpu_price_usd_per_hour
        self._ongoing = 0
        # Set once the engine loop died or stalled: in-flight requests were failed, new ones are
        # refused (the Router retries them elsewhere) and check_health fails until Serve replaces us.
        self._failed: str | None = None
        self._recent_prompts: collections.deque | None = (
            collections.deque(maxlen=64) if self.args.replicas.test_hooks else None)
        self._meter = BusyIdleMeter()
        self._last = {"prompt_tokens": 0, "generation_tokens": 0, "num_preemptions": 0, "prefix_cache_queries": 0,
                      "prefix_cache_hits": 0}
        self.metrics = None
        try:
            from mistral_serve.serving.metrics import EngineMetrics

            self.metrics = EngineMetrics(self.model_name, self.max_model_len, self.engine.quantization)
            self.metrics.set_prices(self.price, self.args.cost.reference_price_usd_per_1m_output_tokens)
        except Exception:  # noqa: BLE001 - metrics must never keep a replica from serving
            logger.exception("LLMReplica: metrics disabled")
        self._metrics_task = asyncio.get_running_loop().create_task(self._metrics_loop())
        s = self.engine.stats()
        logger.info("LLMReplica ready: model=%s dir=%s max_model_len=%d max_num_seqs=%d kv_blocks=%d (%.1fs)",
                    self.model_name, self.model_dir, self.max_model_len, s.batch_capacity, s.kv_blocks_total,
                    time.monotonic() - t0)

    # ---- requests -----------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest):
        """Async generator of wire messages (wire.py): ``Delta``s, then one ``Final``; or a
        ``ReplicaError`` instead, which the Router maps onto an HTTP status (or a retry)."""
        rid = req.request_id
        if self._failed is not None:
            yield ReplicaError("replica_failed", f"The model replica failed: {self._failed}", _replica_id())
            return
        if self._recent_prompts is not None:
            self._recent_prompts.append((rid, list(req.prompt_token_ids)))
        params = req.sampling
        try:
            params.validate()  # the Router built and validated it; unpickling skips __post_init__
        except (TypeError, ValueError) as exc:
            yield ReplicaError("invalid_request", str(exc))
            return
        stream = bool(req.stream)
        acc = _Accumulator(params.logprobs, self.tokenizer, params.n, params.prompt_logprobs)
        outputs = self.engine.generate(req.prompt_token_ids, params, rid, req.priority, stream=stream,
                                       interval_s=self.pacer.interval_s)
        messages = self._messages(rid, outputs, acc, stream)
        self._ongoing += 1
        failed = False
        try:
            async for msg in messages:
                yield msg
        except RequestError as exc:
            failed = True
            yield ReplicaError("context_length" if exc.kind == "context_length" else "invalid_request", str(exc))
        except EngineDeadError as exc:
            failed = True
            yield ReplicaError("replica_failed", f"The model replica failed: {exc}", _replica_id())
        finally:
            self._ongoing -= 1
            # No-ops when finished. On a disconnect or deadline (Serve cancels this call, or
            # closes it at a yield) _messages aborts the request in the engine, which frees its KV
            # blocks at once and returns the compute used so far: billed to the tenant here, as
            # the Router is gone by then.
            await messages.aclose()
            await outputs.aclose()
            if not acc.finished and not failed and self.metrics is not None:
                self.metrics.finished("abort", None)
                aborted = acc.aborted
                if aborted is not None and aborted.metrics is not None and req.tenant:
                    self.metrics.bill_aborted(req.tenant, request_cost_usd(aborted.metrics.compute_seconds,
                                                                           self.price))

    async def _messages(self, rid: str, outputs, acc: _Accumulator, stream: bool):
        """Messages of one request, one per engine output (the engine paced them): streaming,
        the first token, then a message per interval, and the last as soon as the request ends;
        non-streaming, the first token (the Router's start signal), then the final message. A
        pump task owns the engine stream so that our own cancellation does not cancel it: on an
        early exit we abort the request ourselves first, which returns its final output (its
        compute), then stop the pump."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for out in outputs:
                    queue.put_nowait(out)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - delivered to the consumer below
                queue.put_nowait(exc)

        task = asyncio.get_running_loop().create_task(pump())
        if stream:
            self.pacer.opened()
            self.engine.set_report_interval(self.pacer.interval_s())
        try:
            while True:
                acc.add(await queue.get())
                _drain(queue, acc)
                if acc.finished:
                    for msg in self._final_messages(acc):
                        yield msg
                    return
                for msg in acc.deltas():
                    yield msg
        finally:
            if stream:
                self.pacer.closed()
                self.engine.set_report_interval(self.pacer.interval_s())
            if not task.done():
                if not acc.finished and self._failed is None:
                    with contextlib.suppress(Exception):  # a wedged engine must not hold us here
                        acc.aborted = await asyncio.wait_for(self.engine.abort(rid), ABORT_TIMEOUT_S)
                task.cancel()  # (if still running) aborts the request without waiting
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _final_messages(self, acc: _Accumulator) -> list[Delta | Final]:
        """The last messages: n == 1, the Final with the last tokens; n > 1, the choices' last
        Deltas, then a Final holding only the usage and the bill."""
        if len(acc.choices) == 1:
            text, num_tokens, logprobs = acc.take()
            deltas = []
        else:
            deltas, text, num_tokens, logprobs = acc.deltas(), "", 0, None
        m = acc.metrics
        compute = m.compute_seconds if m is not None else 0.0
        gen = m.num_generation_tokens if m is not None else 0
        prompt = m.num_prompt_tokens if m is not None else acc.prompt_tokens
        if self.metrics is not None:
            self.metrics.finished(acc.finish_reason or "stop", m)
        finish = acc.finish_reason if len(acc.choices) == 1 else None
        final = Final(text, num_tokens, logprobs, finish, prompt, gen, request_cost_usd(compute, self.price),
                      prompt_logprobs=acc.take_prompt_logprobs(), cached_tokens=acc.cached_tokens or 0)
        return [*deltas, final]

    # ---- Serve hooks --------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve marks the replica unhealthy (and replaces it) when this raises: the engine
        loop died, or it has work and has not finished a step in ``stall_timeout_s``. The first
        failure also fails every in-flight request at once (a wedged engine would hold them until
        Serve's graceful-shutdown timeout): not-yet-started ones are retried by the Router."""
        if self._failed is None:
            try:
                self.engine.check_health(self.stall_timeout_s)
                return
            except EngineDeadError as exc:
                self._failed = str(exc)
                logger.error("LLMReplica unhealthy, failing in-flight requests: %s", exc)
                self.engine.fail(EngineDeadError(f"replica unhealthy: {exc}"))
        raise EngineDeadError(self._failed)

    def record_routing_stats(self) -> dict[str, Any]:
        """Read by LeastQueueDepthRouter (request_router.py) in every caller of this deployment;
        a plain dict, as Ray carries it, keyed like ``EngineStats`` where it holds its figures."""
        s = self.engine.stats()
        block_size, stride, keys = self.engine.prefix_routing_keys()
        return {
            "prefix_block_size": block_size,  # cache-aware routing (request_router.py)
            "prefix_stride": stride,
            "prefix_keys": keys,
            "num_waiting": s.num_waiting,
            "num_running": s.num_running,
            "kv_usage": s.kv_usage,
            "batch_capacity": s.batch_capacity,
            "ongoing": self._ongoing,
            "failed": self._failed is not None or not s.alive,  # routed to last (request_router.py)
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (Ray 2.60), for a queue-depth autoscaling policy
        (autoscaling.py); plain floats, as Ray aggregates them, keyed like ``EngineStats``."""
        s = self.engine.stats()
        cap = max(1, s.batch_capacity)
        return {
            "num_waiting": float(s.num_waiting),
            "num_running": float(s.num_running),
            "kv_usage": float(s.kv_usage),
            "batch_capacity": float(cap),
            "queue_depth_per_capacity": float(s.num_waiting + s.num_running) / cap,
        }

    # ---- introspection (tests, operators) -----------------------------------------------------

    async def stats(self) -> dict:
        """The engine's ``EngineStats`` plus what only the replica knows, as a plain dict: a
        caller (tests, operators) reads it without importing the engine."""
        return {**dataclasses.asdict(self.engine.stats()), "ongoing": self._ongoing, "replica_id": _replica_id(),
                "model": self.model_name, "max_model_len": self.max_model_len,
                "asyncio_tasks": len(asyncio.all_tasks())}

    # ---- test hooks (replicas.test_hooks: true; off by default; DeploymentHandle only) -----------

    def _require_test_hooks(self) -> None:
        if not self.args.replicas.test_hooks:
            raise PermissionError("test hooks are disabled (replicas.test_hooks is false)")

    async def inject_fault(self, kind: str, after_steps: int = 0, seconds: float = 600.0) -> str:
        """``raise``: the engine loop raises after ``after_steps`` more steps (it dies, as on a
        CUDA error); ``wedge``: the loop blocks for ``seconds`` before its next step (no progress);
        ``clear``: remove the hook. Returns this replica's id."""
        self._require_test_hooks()
        if kind not in ("raise", "wedge", "clear"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self.engine.inject_fault(kind, after_steps, seconds)
        logger.warning("LLMReplica: test fault %r injected", kind)
        return _replica_id()

    async def recent_prompts(self) -> dict:
        """The prompt token ids of the last 64 requests as received here, by request id."""
        self._require_test_hooks()
        return {"replica_id": _replica_id(), "prompts": dict(self._recent_prompts or ())}

    async def model_info(self) -> dict:
        return {"model": self.model_name, "max_model_len": self.max_model_len, "dir": str(self.model_dir)}

    async def _metrics_loop(self) -> None:
        interval = self.args.replicas.metrics_interval_s
        while True:
            try:
                self._export_metrics()
            except Exception:  # noqa: BLE001
                logger.exception("LLMReplica: metrics export failed")
            await asyncio.sleep(interval)

    def _export_metrics(self) -> None:
        s = self.engine.stats()
        has_work = s.num_running + s.num_waiting > 0 or self._ongoing > 0
        busy, idle = self._meter.sample(s.busy_seconds, has_work)
        m = self.metrics
        if m is None:
            return
        m.set_engine_gauges(s)
        m.set_prices(self.price, self.args.cost.reference_price_usd_per_1m_output_tokens)
        for key, counter in (("prompt_tokens", m.prompt_tokens), ("generation_tokens", m.generation_tokens),
                             ("num_preemptions", m.preemptions), ("prefix_cache_queries", m.prefix_queries),
                             ("prefix_cache_hits", m.prefix_hits)):
            value = getattr(s, key)
            m.add(counter, value - self._last[key])
            self._last[key] = value
        m.add(m.busy, busy)
        m.add(m.idle, idle)
        m.add(m.idle_cost, request_cost_usd(idle, self.price))

    def __del__(self) -> None:
        try:
            self._metrics_task.cancel()
            self.engine.shutdown()
        except Exception:  # noqa: BLE001
            pass


def _drain(queue: asyncio.Queue, acc: _Accumulator) -> None:
    while not queue.empty() and not acc.finished:
        acc.add(queue.get_nowait())


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001
        return "local"
