"""The ``Router`` ingress (OpenAI API over FastAPI) and the ``AdmissionState`` deployment.

Per request the Router tokenizes, validates and admits (admission.py), then calls an
LLMReplica through a streaming handle and turns its messages into an OpenAI response or an
SSE stream. All accounting of an admitted request lives in one ``_Ticket`` released exactly
once, whatever the path out: finished, error, deadline, or client disconnect (Serve cancels
the handler; the ticket's cleanup cancels the replica call, which aborts the engine request).
"""

import asyncio
import contextvars
import dataclasses
import json
import logging
import os
import time
import uuid
import weakref
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_serve.engine import validation
from mistral_serve.engine.structured_output import StructuredOutputSpec
from mistral_serve.model.config import ModelConfig
from mistral_serve.serving.admission import (
    ANONYMOUS,
    AdmissionError,
    Decision,
    Limits,
    QueueGate,
    TenantLimiter,
    bearer_token,
    check_context,
)
from mistral_serve.serving.config import AppArgs, resolve_tokenizer_dir, router_max_model_len
from mistral_serve.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    best_choices,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    error_body,
    models_response,
    parse,
    usage_chunk,
    usage_dict,
    with_choices,
)
from mistral_serve.serving.redact import redact
from mistral_serve.serving.response_format import check_constraint, constraint_from_request
from mistral_serve.serving.tool_calls import ToolContext, encode_messages, prepare_tools
from mistral_serve.serving.tenants import build_tenants
from mistral_serve.serving.wire import Delta, Final, GenerateRequest, ReplicaError
from mistral_serve.tokenizer import load_tokenizer
from mistral_serve.tokenizer.tokenizer import MistralCommonTokenizer

logger = logging.getLogger("ray.serve")

LLM_DEPLOYMENT = "LLMReplica"
ROUTER_DEPLOYMENT = "Router"
# Tries of a request on the replicas before its first token: a replica that dies (actor killed,
# engine loop dead or wedged) before the request started costs the client nothing but time. The
# backoffs (0.2, 0.4, ... s; 2 s in all) outlast one routing-stats period, after which a failed
# replica is routed to last (request_router.py).
START_ATTEMPTS = 5

api = FastAPI(title="mistral-serve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: "Not found.", 405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(message, "invalid_request_error", code=str(exc.status_code)), exc.status_code)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _json_body(model) -> dict:
    """The OpenAPI request body of a route whose handler reads the body itself (``api.openapi()``;
    tests/test_fuzz_api.py fuzzes the live server from it). Pydantic's $defs are inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


class ReplicaFailedError(AdmissionError):
    """A replica failure (503 ``no_replica``): the one kind of error ``_run`` retries on another
    replica, safe while nothing reached the client. ``failed_replica``: the failed replica's id
    when it said so, for the retry to avoid it."""

    def __init__(self, message: str, *, retry_after_s: float | None, failed_replica: str | None = None) -> None:
        super().__init__(503, message, reason="no_replica", retry_after_s=retry_after_s)
        self.failed_replica = failed_replica


def _bodiless_if_head(request: Request, response: Response) -> Response:
    """The answer to a HEAD request: the GET answer's status and headers, without its body."""
    if request.method != "HEAD":
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(status_code=response.status_code, headers=headers)


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _serve_request_id(request: Request) -> str:
    """The id of this request as Ray Serve's HTTP proxy knows it: the client's ``x-request-id``
    if it sent one, else one the proxy made. The proxy adds it as ``x-request-id`` to every
    response and Serve stamps it on its log records and on our handle calls to LLMReplica, so our
    logs use it too, and the Router never sets that header itself (a second value would reach
    the client). Ray has no public getter for it (2.60): the private request context first,
    then the header the proxy put on the request, then a fresh id outside Serve (unit tests)."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except (ImportError, AttributeError):
        rid = ""
    return rid or request.headers.get("x-request-id") or uuid.uuid4().hex


# ---- shared tenant buckets ----------------------------------------------------------------------


@serve.deployment(name="AdmissionState", num_replicas=1, max_ongoing_requests=4096,
                  ray_actor_options={"num_cpus": 0})
class AdmissionState:
    """The tenants' token buckets, shared by every Router replica, so a tenant's limit holds
    whichever router its requests land on. One replica; if it is lost its replacement starts
    with full buckets, and routers fall back to their local share meanwhile."""

    def __init__(self, args: dict) -> None:
        cfg = AppArgs.model_validate(args).admission
        _, limits, _ = build_tenants(cfg)
        self.limiter = TenantLimiter(limits)

    async def reserve(self, tenant: str, tokens: int) -> dict:
        return dataclasses.asdict(self.limiter.reserve(tenant, tokens))

    async def refund(self, tenant: str, tokens: int) -> None:
        self.limiter.refund(tenant, tokens)

    async def snapshot(self) -> dict:
        return self.limiter.snapshot()


# ---- per-request accounting ---------------------------------------------------------------------


@dataclasses.dataclass
class _Ticket:
    tenant: str
    prompt_tokens: int
    reserved_tokens: int
    reserved_in_shared_state: bool
    started: bool = False
    released: bool = False
    generated: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the replica's prefix cache
    cost_usd: float | None = None
    finished: bool = False
    request_id: str = ""  # the engine's request id, also the response body's ``id`` (unique, ours)
    serve_request_id: str = ""  # Serve's / the client's x-request-id (_serve_request_id), for logs
    prompt_log: str | None = None  # only with admission.log_prompts (redacted)
    completion_log: list[str] | None = None


@serve.deployment(name=ROUTER_DEPLOYMENT)
@serve.ingress(api)
class Router:
    async def __init__(self, llm: DeploymentHandle, state: DeploymentHandle | None, args: dict) -> None:
        self.args = AppArgs.model_validate(args)
        adm = self.args.admission
        self.adm = adm
        self.model_name = self.args.model_name
        tok_dir = resolve_tokenizer_dir(self.args.model)
        self.tokenizer = load_tokenizer(tok_dir)
        config = ModelConfig.from_dir(tok_dir)
        self.vocab_size = config.vocab_size
        self.max_model_len = router_max_model_len(self.args, config.max_position_embeddings)
        self.keys, self.limits, self.allow_anonymous = build_tenants(adm)
        self.auth_enabled = len(self.keys) > 0
        self.local_limiter = TenantLimiter(self.limits)
        replicas = self.args.replicas.num_replicas
        self.gate = QueueGate(adm.max_waiting_requests or 2 * self.args.max_num_seqs * (
            replicas if isinstance(replicas, int) else 1), adm.max_waiting_tokens, adm.retry_after_s,
            max_wait_s=adm.max_queue_wait_s)
        self.gate.batch_slots = self.args.max_num_seqs * (replicas if isinstance(replicas, int) else 1)
        self.llm = llm
        self._llm_stream = llm.options(stream=True)  # made once: options() builds a new handle
        self.state = state if adm.shared_state else None
        self._state_retry_at = 0.0
        self.draining = False
        self._manual_drain = False
        self.ready_replicas: int | None = None
        self.num_routers = 1
        self.in_flight = 0
        self._background: set[asyncio.Task] = set()
        self._created = int(time.time())
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001
            self.app_name = None
        self.metrics = None
        try:
            from mistral_serve.serving.metrics import RouterMetrics

            self.metrics = RouterMetrics(self.model_name, sorted(self.limits),
                                         adm.soft_context_policy if adm.soft_max_context_tokens else None)
        except Exception:  # noqa: BLE001 - metrics must never keep the router from serving
            logger.exception("Router: metrics disabled")
        self._poll_task = asyncio.get_running_loop().create_task(self._status_loop())
        logger.info("Router ready: model=%s max_model_len=%d tenants=%s auth=%s anonymous=%s shared_state=%s",
                    self.model_name, self.max_model_len, sorted(self.limits), self.auth_enabled,
                    self.allow_anonymous, self.state is not None)

    # ---- routes -------------------------------------------------------------------------------

    # GET and HEAD: load balancers probe with HEAD, which must answer the same status with no body.
    @api.api_route("/health", methods=["GET", "HEAD"])
    async def health(self, request: Request) -> Response:
        return _bodiless_if_head(request, JSONResponse({"status": "ok"}))

    @api.api_route("/ready", methods=["GET", "HEAD"])
    async def ready(self, request: Request) -> Response:
        if self.ready_replicas is None:
            await self._poll_status()
        if self.draining:
            response = self._error(AdmissionError(503, "The server is draining.", reason="draining",
                                                  retry_after_s=self.adm.retry_after_s), count=False)
        elif not self.ready_replicas:
            response = self._error(AdmissionError(503, "No model replica is ready.", reason="no_replica",
                                                  retry_after_s=self.adm.retry_after_s), count=False)
        else:
            response = JSONResponse({"status": "ready", "replicas": self.ready_replicas})
        return _bodiless_if_head(request, response)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._authenticate(request)
        except AdmissionError as exc:
            return self._error(exc, tenant=None)
        return JSONResponse(models_response(self.model_name, self.max_model_len, self._created))

    @api.post("/tokenize", openapi_extra=_json_body(TokenizeRequest))
    async def tokenize(self, request: Request) -> Response:
        tenant = None
        try:
            tenant = self._authenticate(request)
            body = await self._read_json(request)
            req = parse(TokenizeRequest, body)
            if req.model is not None and req.model != self.model_name:
                raise self._unknown_model(req.model)
            if (req.prompt is None) == (req.messages is None):
                raise AdmissionError(400, "Give exactly one of 'prompt' or 'messages'.", reason="invalid_request",
                                     param="prompt")
            if req.messages is not None:
                chat = parse(ChatCompletionRequest, {"model": self.model_name, "messages": req.messages})
                ids = self._encode_chat(chat)
            elif isinstance(req.prompt, str):
                ids = self.tokenizer.encode(req.prompt, add_bos=req.add_special_tokens)
            else:
                ids = self._check_ids(list(req.prompt))
            return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len})
        except AdmissionError as exc:
            return self._error(exc, tenant=tenant)

    @api.post("/detokenize", openapi_extra=_json_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> Response:
        """vLLM's shape: ``{"tokens": [ids]}`` (optional ``model``) → ``{"prompt": text}``; special
        tokens are kept, so the ids of ``/tokenize`` come back as the exact text they encode."""
        tenant = None
        try:
            tenant = self._authenticate(request)
            req = parse(DetokenizeRequest, await self._read_json(request))
            if req.model is not None and req.model != self.model_name:
                raise self._unknown_model(req.model)
            if validation.bad_token_ids(req.tokens, self.vocab_size):
                raise AdmissionError(400, f"Token ids must be integers in [0, {self.vocab_size}).",
                                     reason="invalid_request", param="tokens")
            return JSONResponse({"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)})
        except AdmissionError as exc:
            return self._error(exc, tenant=tenant)

    @api.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    # ---- operator hooks (via a handle: serve.get_app_handle(app).set_draining.remote(True)) --

    async def set_draining(self, draining: bool) -> bool:
        self._manual_drain = bool(draining)
        self._refresh_draining()
        return self.draining

    async def admission_snapshot(self) -> dict:
        shared = None
        if self.state is not None:
            try:
                shared = await self.state.snapshot.remote()
            except Exception:  # noqa: BLE001
                shared = None
        return {"waiting_requests": self.gate.waiting_requests, "waiting_tokens": self.gate.waiting_tokens,
                "in_flight": self.in_flight, "ready_replicas": self.ready_replicas, "num_routers": self.num_routers,
                "draining": self.draining, "local_buckets": self.local_limiter.snapshot(), "shared_buckets": shared,
                "asyncio_tasks": len(asyncio.all_tasks())}

    # ---- the request path ---------------------------------------------------------------------

    async def _serve(self, request: Request, chat: bool) -> Response:
        t0 = time.monotonic()
        serve_request_id = _serve_request_id(request)
        tenant: str | None = None
        ticket: _Ticket | None = None
        response: Response | None = None
        try:
            self._refresh_draining()
            if self.draining:
                raise AdmissionError(503, "The server is draining; retry on another instance.", reason="draining",
                                     retry_after_s=self.adm.retry_after_s)
            tenant = self._authenticate(request)
            refused = self.gate.refusal()
            if refused is not None:
                refused.raise_if_rejected()
            body = await self._read_json(request)
            req = parse(ChatCompletionRequest if chat else CompletionRequest, body)
            req.check()
            if req.model != self.model_name:
                raise self._unknown_model(req.model)
            echo: str | None = None  # completions with echo: the prompt text, before each choice's text
            tools = prepare_tools(req.tools, req.tool_choice, req.parallel_tool_calls, self.tokenizer) if chat else None
            if chat:
                ids = self._encode_chat(req, tools)
                max_tokens, logprobs = req.effective_max_tokens, req.engine_logprobs
            else:
                prompt = req.single_prompt()
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
                max_tokens, logprobs = req.max_tokens, req.logprobs
                if req.echo:
                    echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(
                        ids, skip_special_tokens=req.skip_special_tokens)
            if max_tokens is not None and max_tokens < 1:
                raise AdmissionError(400, f"max_tokens must be >= 1, got {max_tokens}.", reason="invalid_request",
                                     param="max_tokens")
            param = "messages" if chat else "prompt"
            max_tokens, warning = check_context(len(ids), max_tokens, self.max_model_len,
                                                self.adm.soft_max_context_tokens, self.adm.soft_context_policy, param)
            if warning and self.metrics:
                self.metrics.soft_context_exceeded(tenant, "warn")
            # best_of > n ranks the sequences by cumulative logprob: the engine reports the chosen
            # tokens' logprobs even when the client did not ask (the response then omits them).
            ranked = None if chat else req.ranked
            # echo + logprobs: the prompt tokens' logprobs too, computed in the prefill
            params = req.sampling_params(max_tokens, 0 if ranked and logprobs is None else logprobs,
                                         logprobs if echo is not None else None)
            if validation.bad_token_ids(params.stop_token_ids, self.vocab_size):
                raise AdmissionError(400, validation.stop_ids_message(self.vocab_size), reason="invalid_request",
                                     param="stop_token_ids")
            params.structured_output = self._constraint(req, tools)
            if tools is not None and tools.mistral:
                params.skip_special_tokens = False  # the answer's [TOOL_CALLS] token must reach the parser
            if self.ready_replicas == 0:
                raise AdmissionError(503, "No model replica is ready; retry shortly.", reason="no_replica",
                                     retry_after_s=self.adm.retry_after_s)
            ticket = await self._admit(tenant, len(ids), len(ids) + params.n * max_tokens)
            gen_req = GenerateRequest(
                request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                prompt_token_ids=ids,
                sampling=params,
                stream=bool(req.stream),
                priority=self.limits.get(tenant, Limits()).priority,
                tenant=tenant,  # the replica bills compute of requests aborted by their client
            )
            ticket.request_id = gen_req.request_id
            ticket.serve_request_id = serve_request_id
            if self.adm.log_prompts:
                ticket.prompt_log = redact(self.tokenizer.decode(ids, skip_special_tokens=False))
                ticket.completion_log = []
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            response = await self._run(gen_req, ticket, chat, bool(req.stream), include_usage, t0, echo, tools,
                                       (ranked, logprobs is not None) if ranked else None)
            if warning:
                response.headers["x-context-warning"] = warning
            return response
        except AdmissionError as exc:
            if exc.code == "soft_context_limit_exceeded" and self.metrics and tenant:
                self.metrics.soft_context_exceeded(tenant, "reject")
            response = self._error(exc, tenant=tenant)
            return response
        finally:
            if not isinstance(response, StreamingResponse):
                # Streams record latency and release their ticket when the stream ends.
                if ticket is not None:
                    self._release(ticket)
                if self.metrics:
                    self.metrics.observe_latency(time.monotonic() - t0, response.status_code if response else 499)

    def _sync_gate_bound(self) -> None:
        """The default waiting bound follows the ready replicas (two batches each); set where the
        status poll learns their number, which is the only place it changes."""
        if self.ready_replicas:
            self.gate.max_requests = self.adm.max_waiting_requests or 2 * self.args.max_num_seqs * self.ready_replicas
            self.gate.batch_slots = self.args.max_num_seqs * self.ready_replicas

    async def _admit(self, tenant: str, prompt_tokens: int, reserve_tokens: int) -> _Ticket:
        self.gate.try_enter(prompt_tokens).raise_if_rejected()
        try:
            decision, shared = await self._reserve(tenant, reserve_tokens)
            decision.raise_if_rejected()
        except BaseException:
            self.gate.leave(prompt_tokens, started=False)
            raise
        ticket = _Ticket(tenant, prompt_tokens, reserve_tokens, shared)
        self.in_flight += 1
        if self.metrics:
            self.metrics.admit(tenant)
            self.metrics.set_in_flight(self.in_flight)
        return ticket

    async def _reserve(self, tenant: str, tokens: int) -> tuple[Decision, bool]:
        lim = self.limits.get(tenant)
        if lim is None or (lim.requests_per_minute is None and lim.tokens_per_minute is None):
            return Decision(True), False
        if self.state is not None and time.monotonic() >= self._state_retry_at:
            try:
                result = await asyncio.wait_for(self.state.reserve.remote(tenant, tokens), timeout=2.0)
                return Decision(**result), True
            except Exception:  # noqa: BLE001 - fall back to this router's share of the limits
                logger.warning("AdmissionState unreachable; using this router's share of the tenant limits")
                self._state_retry_at = time.monotonic() + 10.0
        return self.local_limiter.reserve(tenant, tokens), False

    def _mark_started(self, ticket: _Ticket) -> None:
        if not ticket.started:
            ticket.started = True
            self.gate.leave(ticket.prompt_tokens, started=True)

    def _release(self, ticket: _Ticket) -> None:
        """Exactly once per admitted request: queue slot, refund, in-flight, billing."""
        if ticket.released:
            return
        ticket.released = True
        if not ticket.started:
            self.gate.leave(ticket.prompt_tokens, started=False)
        else:
            self.gate.finish()
        used = ticket.prompt_tokens + ticket.generated
        unused = ticket.reserved_tokens - used
        if unused > 0:
            if ticket.reserved_in_shared_state and self.state is not None and _loop_running():
                self._spawn(self._shared_refund(ticket.tenant, unused))
            else:
                self.local_limiter.refund(ticket.tenant, unused)
        self.in_flight -= 1
        if ticket.prompt_log is not None:
            logger.info("request %s id=%s tenant=%s finished=%s prompt=%r completion=%r", ticket.serve_request_id,
                        ticket.request_id, ticket.tenant, ticket.finished, ticket.prompt_log,
                        redact("".join(ticket.completion_log or [])))
        if self.metrics:
            self.metrics.set_in_flight(self.in_flight)
            if ticket.started:
                self.metrics.bill(ticket.tenant, ticket.prompt_tokens, ticket.generated, ticket.cost_usd,
                                  ticket.cached_tokens)

    async def _shared_refund(self, tenant: str, tokens: int) -> None:
        try:
            await self.state.refund.remote(tenant, tokens)
        except Exception as exc:  # noqa: BLE001
            logger.warning("refund to AdmissionState failed (%s); refunding this router's share", type(exc).__name__)
            self.local_limiter.refund(tenant, tokens)

    def _spawn(self, coro) -> None:
        # A fresh context: not the request's, whose cancellation (client gone) Serve propagates
        # to every handle call made in it, which would cancel this refund too.
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run(self, gen_req: GenerateRequest, ticket: _Ticket, chat: bool, stream: bool, include_usage: bool,
                   t0: float, echo: str | None = None, tools: ToolContext | None = None,
                   best_of: tuple[int, bool] | None = None) -> Response:
        """``best_of``: (choices to return, the client asked for logprobs) when best_of > n."""
        deadline = t0 + self.adm.request_timeout_s
        start_deadline = min(deadline, time.monotonic() + self.adm.queue_timeout_s)
        for attempt in range(1, START_ATTEMPTS + 1):
            gen = self._llm_stream.generate.remote(gen_req)
            try:
                first = await self._next(gen, start_deadline, queued=True)
                break
            except ReplicaFailedError as exc:
                gen.cancel()
                backoff = 0.2 * attempt
                if attempt == START_ATTEMPTS or time.monotonic() + backoff >= start_deadline:
                    raise
                logger.warning("request %s id=%s: replica failed before the first token (%s); retrying on another "
                               "replica (attempt %d)", ticket.serve_request_id, gen_req.request_id, exc.message,
                               attempt + 1)
                if exc.failed_replica:
                    # Until its failure reaches every caller's routing stats, the failed replica
                    # (idle, so it looks least loaded) would win the retry: request_router.py ranks
                    # the replicas named here last.
                    gen_req.avoid_replicas.append(exc.failed_replica)
                await asyncio.sleep(backoff)
            except BaseException:
                gen.cancel()
                raise
        self._mark_started(ticket)
        rid, created = gen_req.request_id, int(time.time())
        if stream:
            body = self._stream(gen, first, ticket, rid, created, chat, include_usage, deadline, t0,
                                gen_req.sampling.n, echo, tools)
            # If the response is never iterated (client gone before it starts), the generator's
            # finally never runs: release the ticket and cancel the call when it is collected.
            weakref.finalize(body, self._abandon, gen, ticket)
            # No x-request-id here or below: Serve's proxy adds it (_serve_request_id).
            return StreamingResponse(body, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        n = gen_req.sampling.n
        # Per choice (n > 1: each message holds one, wire.py): texts, logprobs, finish reason.
        texts: list[list[str]] = [[] for _ in range(n)]
        lps: list[list] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        prompt_lps: list = []
        msg = first
        try:
            while True:
                self._absorb(ticket, msg)
                texts[msg.index].append(msg.text)
                lps[msg.index].extend(msg.logprobs or ())
                if msg.finish_reason is not None:
                    finish[msg.index] = msg.finish_reason
                if msg.prompt_logprobs is not None:
                    prompt_lps = msg.prompt_logprobs
                if isinstance(msg, Final):
                    break
                msg = await self._next(gen, deadline)
        except BaseException:
            gen.cancel()
            raise
        ticket.finished = True
        usage = usage_dict(ticket.prompt_tokens, ticket.generated, ticket.cost_usd, ticket.cached_tokens)
        want_lp = gen_req.sampling.logprobs is not None
        if best_of is not None:  # the n best of the sampled sequences, best first
            keep, want_lp = best_of
            order = best_choices(lps, keep)
            texts, lps, finish, n = [texts[i] for i in order], [lps[i] for i in order], [finish[i] for i in order], keep
        if chat:
            out = with_choices([chat_response(rid, self.model_name, created, "".join(texts[i]), finish[i],
                                              chat_logprobs(lps[i]) if want_lp else None, usage) for i in range(n)])
            if tools is not None:
                for choice in out["choices"]:
                    tools.apply_to_choice(choice)
        else:
            if echo is not None:  # the prompt, and its tokens' logprobs, before each choice's own
                texts = [[echo, *t] for t in texts]
                lps = [prompt_lps + entries for entries in lps]
            out = with_choices([completion_response(rid, self.model_name, created, "".join(texts[i]), finish[i],
                                                    completion_logprobs(lps[i]) if want_lp else None, usage)
                                for i in range(n)])
        return JSONResponse(out, headers={"x-request-cost-usd": f"{ticket.cost_usd or 0:.12f}"})

    async def _next(self, gen, deadline: float, queued: bool = False) -> Delta | Final:
        """The next replica message within the deadline, errors mapped to AdmissionError (a
        ReplicaFailedError when another replica may succeed)."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        timeout = deadline - time.monotonic()
        try:
            if timeout <= 0:
                raise TimeoutError
            # asyncio.timeout arms one timer; wait_for would wrap every message in a new Task.
            async with asyncio.timeout(timeout):
                msg = await gen.__anext__()
        except TimeoutError:
            if queued:
                raise AdmissionError(503, f"The request waited more than {self.adm.queue_timeout_s:g} s to start; "
                                     "the server is overloaded.", reason="deadline", code="queue_timeout",
                                     retry_after_s=self.gate.retry_after()) from None
            raise AdmissionError(504, f"The request exceeded its deadline of {self.adm.request_timeout_s:g} s.",
                                 reason="deadline", code="deadline_exceeded") from None
        except StopAsyncIteration:
            raise ReplicaFailedError("The model replica ended the stream unexpectedly.",
                                     retry_after_s=self.adm.retry_after_s) from None
        except BackPressureError:
            raise AdmissionError(429, "The server is overloaded: the model replicas' queues are full.",
                                 reason="queue_full", retry_after_s=self.gate.retry_after()) from None
        except DeploymentUnavailableError:
            raise AdmissionError(503, "No model replica is available.", reason="no_replica",
                                 retry_after_s=self.adm.retry_after_s) from None
        except (asyncio.CancelledError, AdmissionError):
            raise
        except Exception as exc:  # noqa: BLE001 - a replica died mid-request, Ray errors
            logger.warning("replica call failed: %s", type(exc).__name__)
            raise ReplicaFailedError("The model replica failed; retry the request.",
                                     retry_after_s=self.adm.retry_after_s) from None
        if isinstance(msg, ReplicaError):
            if msg.retryable:
                raise ReplicaFailedError(msg.message, retry_after_s=self.adm.retry_after_s, failed_replica=msg.replica)
            raise AdmissionError(msg.status, msg.message, reason=msg.kind,
                                 code="context_length_exceeded" if msg.kind == "context_length" else None)
        return msg

    def _abandon(self, gen, ticket: _Ticket) -> None:
        if not ticket.released:
            if not ticket.finished:
                gen.cancel()
            self._release(ticket)

    @staticmethod
    def _absorb(ticket: _Ticket, msg: Delta | Final) -> None:
        ticket.generated += msg.num_tokens
        if ticket.completion_log is not None:
            ticket.completion_log.append(msg.text)
        if isinstance(msg, Final):
            ticket.generated = msg.completion_tokens
            ticket.cached_tokens = msg.cached_tokens
            ticket.cost_usd = msg.cost_usd

    async def _stream(self, gen, first: Delta | Final, ticket: _Ticket, rid: str, created: int, chat: bool, include_usage: bool,
                   deadline: float, t0: float, n: int = 1, echo: str | None = None, tools: ToolContext | None = None):
        model = self.model_name
        status = 200
        # Tool calls (tool_calls.py): each choice's text goes through its own parser.
        parsers = [tools.stream() for _ in range(n)] if tools is not None and chat else None
        try:
            if chat:
                for i in range(n):
                    yield _sse_line(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None, None,
                                               index=i))
            msg = first
            if echo is not None:  # completions: each choice starts with the prompt (and its logprobs)
                plp = msg.prompt_logprobs
                for i in range(n):
                    yield _sse_line(completion_chunk(rid, model, created, echo, None,
                                                     completion_logprobs(plp) if plp else None, index=i))
            while True:
                self._absorb(ticket, msg)
                final = isinstance(msg, Final)
                lp = msg.logprobs
                # a choice ends on the Final (n == 1) or on its last Delta (n > 1, wire.py)
                ended = msg.finish_reason is not None or (final and n == 1)
                if parsers is not None:
                    parser = parsers[msg.index]
                    deltas = parser.feed(msg.text) + (parser.finish() if ended else [])
                    if lp and not deltas:
                        deltas = [{}]  # the logprobs still go out, with an empty delta
                    for j, delta in enumerate(deltas):
                        yield _sse_line(chat_chunk(rid, model, created, delta, None,
                                                   chat_logprobs(lp) if lp and j == 0 else None, index=msg.index))
                elif msg.text or lp or (ended and not chat):
                    if chat:
                        chunk = chat_chunk(rid, model, created, {"content": msg.text}, None,
                                           chat_logprobs(lp) if lp else None, index=msg.index)
                    else:
                        chunk = completion_chunk(rid, model, created, msg.text, msg.finish_reason if ended else None,
                                                 completion_logprobs(lp) if lp else None, index=msg.index)
                    yield _sse_line(chunk)
                if ended and chat:
                    reason = parsers[msg.index].finish_reason(msg.finish_reason) if parsers else msg.finish_reason
                    yield _sse_line(chat_chunk(rid, model, created, {}, reason, None, index=msg.index))
                if final:
                    ticket.finished = True
                    if include_usage:
                        usage = usage_dict(ticket.prompt_tokens, ticket.generated, ticket.cost_usd, ticket.cached_tokens)
                        obj = "chat.completion.chunk" if chat else "text_completion"
                        yield _sse_line(usage_chunk(rid, model, created, obj, usage))
                    break
                try:
                    msg = await self._next(gen, deadline)
                except AdmissionError as exc:
                    status = exc.status
                    if self.metrics:
                        self.metrics.reject(ticket.tenant, exc.reason)
                    yield _sse_line(exc.body())
                    break
            yield "data: [DONE]\n\n"
        except BaseException:
            status = 499  # client went away (cancelled) or a bug: either way the stream ends here
            raise
        finally:
            if not ticket.finished:
                gen.cancel()  # aborts the engine request, frees its KV blocks
            self._release(ticket)
            if self.metrics:
                self.metrics.observe_latency(time.monotonic() - t0, status)

    # ---- helpers ------------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> str:
        key = bearer_token(request.headers.get("authorization"))
        if not self.auth_enabled:
            return ANONYMOUS
        if key is None:
            if self.allow_anonymous:
                return ANONYMOUS
            raise AdmissionError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                                 reason="auth", code="invalid_api_key")
        tenant = self.keys.lookup(key)
        if tenant is None:
            raise AdmissionError(401, "Incorrect API key provided.", reason="auth", code="invalid_api_key")
        return tenant

    async def _read_json(self, request: Request) -> Any:
        limit = self.adm.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = AdmissionError(413, f"The request body is larger than {limit} bytes.", reason="body_too_large",
                                   code="request_too_large")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            # Strict UTF-8 (json.loads of bytes would let encoded surrogates through), then no lone
            # surrogate from a \ud800 escape either: the tokenizers cannot encode those.
            body = json.loads((b"".join(chunks) or b"null").decode("utf-8"))
            json.dumps(body, ensure_ascii=False).encode("utf-8")
            return body
        except (ValueError, RecursionError):  # UnicodeError is a ValueError; RecursionError: nesting
            raise AdmissionError(400, "We could not parse the JSON body of your request: it must be valid UTF-8 "
                                 "JSON, nested at most a few hundred levels.", reason="invalid_request") from None

    def _unknown_model(self, model: str) -> AdmissionError:
        return AdmissionError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                              reason="unknown_model", code="model_not_found", param="model")

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise AdmissionError(400, validation.EMPTY_PROMPT, reason="invalid_request", param="prompt")
        if validation.bad_token_ids(ids, self.vocab_size):
            raise AdmissionError(400, validation.prompt_ids_message(self.vocab_size), reason="invalid_request",
                                 param="prompt")
        return ids

    def _encode_chat(self, req: ChatCompletionRequest, tools: ToolContext | None = None) -> list[int]:
        messages = encode_messages(req.normalized_messages(), isinstance(self.tokenizer, MistralCommonTokenizer))
        try:
            return list(self.tokenizer.encode_chat(messages, tools.tools if tools is not None else None))
        except AdmissionError:
            raise
        except Exception as exc:  # noqa: BLE001 - mistral-common / chat template validation
            raise AdmissionError(400, f"Invalid messages: {exc}", reason="invalid_request",
                                 param="messages") from None

    @staticmethod
    def _constraint(req, tools: ToolContext | None) -> StructuredOutputSpec | None:
        """The request's decoding constraint: its response_format / vLLM extras, or the grammar
        of a call that tool_choice forces (not both)."""
        spec = constraint_from_request(req)
        if tools is not None and tools.forced is not None:
            if spec is not None:
                raise AdmissionError(400, "response_format cannot be combined with a tool_choice that forces a call.",
                                     reason="invalid_request", param="response_format")
            check_constraint(tools.forced, "tools")
            spec = tools.forced
        return spec

    def _error(self, exc: AdmissionError, tenant: str | None = None, count: bool = True) -> JSONResponse:
        if count and self.metrics:
            self.metrics.reject(tenant, exc.reason)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    def _refresh_draining(self) -> None:
        file_drain = bool(self.adm.drain_file) and os.path.exists(self.adm.drain_file)
        self.draining = self._manual_drain or file_drain

    async def _status_loop(self) -> None:
        while True:
            await self._poll_status()
            if self.metrics:  # re-export: Ray drops a gauge not refreshed for two export intervals
                self.metrics.set_in_flight(self.in_flight)
            await asyncio.sleep(self.args.router.status_poll_interval_s)

    async def _poll_status(self) -> None:
        """Replica counts from the controller: LLMReplica RUNNING (readiness, default queue
        bound) and Router RUNNING (this replica's share of the bounds)."""
        try:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name) if self.app_name else None
            if app is None:
                return
            deps = app.deployments
            if LLM_DEPLOYMENT in deps:
                self.ready_replicas = int(deps[LLM_DEPLOYMENT].replica_states.get("RUNNING", 0))
                self._sync_gate_bound()
            if ROUTER_DEPLOYMENT in deps:
                self.num_routers = max(1, int(deps[ROUTER_DEPLOYMENT].replica_states.get("RUNNING", 0)))
                share = 1.0 / self.num_routers
                self.gate.share = share
                if abs(self.local_limiter.share - share) > 1e-9:
                    self.local_limiter.set_share(share)
            self._refresh_draining()
        except Exception:  # noqa: BLE001 - keep the last known state
            logger.debug("serve.status() failed", exc_info=True)

    def __del__(self) -> None:
        try:
            self._poll_task.cancel()
        except Exception:  # noqa: BLE001
            pass
