"""The ``Router`` ingress: the OpenAI routes over FastAPI, and the path of one request.

A request goes: auth and the cheap refusals (draining, a full queue: before its body is read)
→ preprocessing (preprocess.py: body → ``PreparedRequest``) → admission (tickets.py:
``admit()`` → a ``Ticket``) → the replica client (replica_client.py: a ``GenerateRequest`` to
an LLMReplica, its typed messages back) → the response (responses.py: one body, or SSE). The
ticket is released exactly once, whatever the way out: finished, error, deadline, or client
disconnect (Serve cancels the handler; the release cancels the replica call, which aborts the
engine request). Replica counts come from cluster_status.py.

No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at
import, and a string ``Request`` would become a required query parameter (422).
"""

import asyncio
import logging
import os
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_serve.model.config import ModelConfig
from mistral_serve.serving.admission import ANONYMOUS, AdmissionError, QueueGate, bearer_token
from mistral_serve.serving.cluster_status import ROUTER_DEPLOYMENT, ClusterStatus
from mistral_serve.serving.config import AppArgs, resolve_tokenizer_dir, router_max_model_len
from mistral_serve.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    models_response,
)
from mistral_serve.serving.preprocess import PreparedRequest, Preprocessor, read_json
from mistral_serve.serving.redact import redact
from mistral_serve.serving.in_process_replica import in_process_calls, start_in_process_replica
from mistral_serve.serving.replica_client import ReplicaCall, ReplicaClient, ray_calls
from mistral_serve.serving.responses import ResponseShape, SSEStream, collect
from mistral_serve.serving.tenants import build_tenants
from mistral_serve.serving.tickets import Admission, Ticket
from mistral_serve.serving.wire import GenerateRequest
from mistral_serve.tokenizer import load_tokenizer

logger = logging.getLogger("ray.serve")

api = FastAPI(title="mistral-serve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: "Not found.", 405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(message, "invalid_request_error", code=str(exc.status_code)), exc.status_code)


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


def _bodiless_if_head(request: Request, response: Response) -> Response:
    """The answer to a HEAD request: the GET answer's status and headers, without its body."""
    if request.method != "HEAD":
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(status_code=response.status_code, headers=headers)


def _serve_request_id(request: Request) -> str:
    """The id of this request as Ray Serve knows it: the client's ``x-request-id`` if it sent
    one, else one Serve made. Serve adds it as ``x-request-id`` to every response and stamps it
    on its log records and on our handle calls to LLMReplica, so our logs use it too, and the
    Router never sets that header itself (a second value would reach the client). Ray has no
    public getter for it (2.60): the private request context first, then the request's header,
    then a fresh id outside Serve (unit tests)."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except (ImportError, AttributeError):
        rid = ""
    return rid or request.headers.get("x-request-id") or uuid.uuid4().hex


def _abandon(call: ReplicaCall, ticket: Ticket) -> None:
    """A streamed response that was never iterated (client gone before it started) is
    collected: cancel its call and release its ticket."""
    if not ticket.released:
        if not ticket.finished:
            call.cancel()
        ticket.release()


@serve.deployment(name=ROUTER_DEPLOYMENT)
@serve.ingress(api)
class Router:
    async def __init__(self, llm: DeploymentHandle | None, state: DeploymentHandle | None, args: dict) -> None:
        """``llm``: the LLMReplica deployment, or None with ``router.colocate_engine`` (the engine
        then runs in this process: in_process_replica.py)."""
        self.args = AppArgs.model_validate(args)
        adm = self.adm = self.args.admission
        self.model_name = self.args.model_name
        tok_dir = resolve_tokenizer_dir(self.args.model)
        config = ModelConfig.from_dir(tok_dir)
        self.max_model_len = router_max_model_len(self.args, config.max_position_embeddings)
        self.tokenizer = load_tokenizer(tok_dir)
        self.pre = Preprocessor(self.model_name, self.tokenizer, config.vocab_size, self.max_model_len, adm)
        self.keys, limits, self.allow_anonymous = build_tenants(adm)
        self.auth_enabled = len(self.keys) > 0
        gate = QueueGate(None, adm.max_waiting_tokens, adm.retry_after_s, max_wait_s=adm.max_queue_wait_s)
        replicas = self.args.replicas.num_replicas
        self._size_gate(gate, replicas if isinstance(replicas, int) else 1)
        self.metrics = None
        try:
            from mistral_serve.serving.metrics import RouterMetrics

            self.metrics = RouterMetrics(self.model_name, sorted(limits),
                                         adm.soft_context_policy if adm.soft_max_context_tokens else None)
        except Exception:  # noqa: BLE001 - metrics must never keep the router from serving
            logger.exception("Router: metrics disabled")
        self.admission = Admission(gate, limits, state if adm.shared_state else None, self.metrics)
        # The in-process replica (router.colocate_engine), started last: a bad argument above
        # fails before an engine is built.
        self.local_replica = await start_in_process_replica(args) if llm is None else None
        open_call = ray_calls(llm) if llm is not None else in_process_calls(self.local_replica)
        self.replicas = ReplicaClient(open_call, adm, gate.retry_after)
        self.draining = False
        self._manual_drain = False
        self._created = int(time.time())
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001
            app_name = None
        self.cluster = ClusterStatus(app_name, self._on_cluster_change, engine_in_process=self.local_replica is not None)
        self._poll_task = asyncio.get_running_loop().create_task(self._status_loop())
        logger.info("Router ready: model=%s max_model_len=%d tenants=%s auth=%s anonymous=%s shared_state=%s",
                    self.model_name, self.max_model_len, sorted(limits), self.auth_enabled,
                    self.allow_anonymous, self.admission.state is not None)

    # ---- routes -------------------------------------------------------------------------------

    # GET and HEAD: load balancers probe with HEAD, which must answer the same status with no body.
    @api.api_route("/health", methods=["GET", "HEAD"])
    async def health(self, request: Request) -> Response:
        return _bodiless_if_head(request, JSONResponse({"status": "ok"}))

    @api.api_route("/ready", methods=["GET", "HEAD"])
    async def ready(self, request: Request) -> Response:
        if self.cluster.ready_replicas is None:
            await self.cluster.poll()
        if self.draining:
            response = self._error(AdmissionError(503, "The server is draining.", reason="draining",
                                                  retry_after_s=self.adm.retry_after_s), count=False)
        elif not self.cluster.ready_replicas:
            response = self._error(AdmissionError(503, "No model replica is ready.", reason="no_replica",
                                                  retry_after_s=self.adm.retry_after_s), count=False)
        else:
            response = JSONResponse({"status": "ready", "replicas": self.cluster.ready_replicas})
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
            return JSONResponse(self.pre.tokenize(await read_json(request, self.adm.max_body_bytes)))
        except AdmissionError as exc:
            return self._error(exc, tenant=tenant)

    @api.post("/detokenize", openapi_extra=_json_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> Response:
        tenant = None
        try:
            tenant = self._authenticate(request)
            return JSONResponse(self.pre.detokenize(await read_json(request, self.adm.max_body_bytes)))
        except AdmissionError as exc:
            return self._error(exc, tenant=tenant)

    @api.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def check_health(self) -> None:
        """Serve's health check: with the engine in this process, the replica's (a dead or
        wedged engine fails it, and Serve replaces this Router and its engine)."""
        if self.local_replica is not None:
            await self.local_replica.check_health()

    # ---- operator hooks (via a handle: serve.get_app_handle(app).set_draining.remote(True)) --

    async def set_draining(self, draining: bool) -> bool:
        self._manual_drain = bool(draining)
        self._refresh_draining()
        return self.draining

    async def replica_stats(self) -> dict:
        """With the engine in this process: ``LLMReplica.stats`` of it (what a separate replica
        answers through its own handle)."""
        if self.local_replica is None:
            raise RuntimeError("the engine runs in LLMReplica replicas: ask their handle for stats")
        return await self.local_replica.stats()

    async def admission_snapshot(self) -> dict:
        snap = await self.admission.snapshot()
        snap.update(ready_replicas=self.cluster.ready_replicas, num_routers=self.cluster.num_routers,
                    draining=self.draining, asyncio_tasks=len(asyncio.all_tasks()))
        return snap

    # ---- the request path ---------------------------------------------------------------------

    async def _serve(self, request: Request, chat: bool) -> Response:
        t0 = time.monotonic()
        serve_request_id = _serve_request_id(request)
        tenant: str | None = None
        ticket: Ticket | None = None
        response: Response | None = None
        try:
            self._refresh_draining()
            if self.draining:
                raise AdmissionError(503, "The server is draining; retry on another instance.", reason="draining",
                                     retry_after_s=self.adm.retry_after_s)
            tenant = self._authenticate(request)
            refused = self.admission.gate.refusal()
            if refused is not None:
                refused.raise_if_rejected()
            prepared = self.pre.prepare(await read_json(request, self.adm.max_body_bytes), chat)
            if prepared.context_warning and self.metrics:
                self.metrics.soft_context_exceeded(tenant, "warn")
            if self.cluster.ready_replicas == 0:
                raise AdmissionError(503, "No model replica is ready; retry shortly.", reason="no_replica",
                                     retry_after_s=self.adm.retry_after_s)
            ids = prepared.prompt_token_ids
            ticket = await self.admission.admit(tenant, len(ids), prepared.reserve_tokens)
            ticket.request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            ticket.serve_request_id = serve_request_id
            if self.adm.log_prompts:
                ticket.prompt_log = redact(self.tokenizer.decode(ids, skip_special_tokens=False))
                ticket.completion_log = []
            response = await self._respond(prepared, ticket, t0)
            if prepared.context_warning:
                response.headers["x-context-warning"] = prepared.context_warning
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
                    ticket.release()
                if self.metrics:
                    self.metrics.observe_latency(time.monotonic() - t0, response.status_code if response else 499)

    async def _respond(self, prepared: PreparedRequest, ticket: Ticket, t0: float) -> Response:
        gen_req = GenerateRequest(
            request_id=ticket.request_id,
            prompt_token_ids=prepared.prompt_token_ids,
            sampling=prepared.sampling,
            stream=prepared.stream,
            priority=self.admission.priority(ticket.tenant),
            tenant=ticket.tenant,  # the replica bills compute of requests aborted by their client
        )
        deadline = t0 + self.adm.request_timeout_s
        start_deadline = min(deadline, time.monotonic() + self.adm.queue_timeout_s)
        call = await self.replicas.start(gen_req, start_deadline, ticket.serve_request_id)
        ticket.mark_started()
        shape = ResponseShape(gen_req.request_id, self.model_name, int(time.time()), prepared)
        if prepared.stream:
            body = self._stream(SSEStream(call, ticket, shape, deadline), t0)
            # If the response is never iterated (client gone before it starts), the generator's
            # finally never runs: release the ticket and cancel the call when it is collected.
            weakref.finalize(body, _abandon, call, ticket)
            # No x-request-id here or below: Serve adds it (_serve_request_id).
            return StreamingResponse(body, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        try:
            out = await collect(call, ticket, shape, deadline)
        except BaseException:
            call.cancel()
            raise
        return JSONResponse(out, headers={"x-request-cost-usd": f"{ticket.cost_usd or 0:.12f}"})

    async def _stream(self, sse: SSEStream, t0: float):
        ticket = sse.ticket
        status = 200
        try:
            async for line in sse.events():
                yield line
            if sse.error is not None:
                status = sse.error.status
                if self.metrics:
                    self.metrics.reject(ticket.tenant, sse.error.reason)
        except BaseException:
            status = 499  # client went away (cancelled) or a bug: either way the stream ends here
            raise
        finally:
            if not ticket.finished:
                sse.call.cancel()  # aborts the engine request, frees its KV blocks
            ticket.release()
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

    def _error(self, exc: AdmissionError, tenant: str | None = None, count: bool = True) -> JSONResponse:
        if count and self.metrics:
            self.metrics.reject(tenant, exc.reason)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    def _refresh_draining(self) -> None:
        file_drain = bool(self.adm.drain_file) and os.path.exists(self.adm.drain_file)
        self.draining = self._manual_drain or file_drain

    def _size_gate(self, gate: QueueGate, replicas: int) -> None:
        """The batch slots of ``replicas`` LLMReplicas and the waiting bound (default: two batches each)."""
        gate.batch_slots = self.args.max_num_seqs * replicas
        gate.max_requests = self.adm.max_waiting_requests or 2 * gate.batch_slots

    def _on_cluster_change(self) -> None:
        """After a status poll: the gate follows the ready replicas, this Router's share of the
        bounds follows the Routers, and the drain file is read."""
        if self.cluster.ready_replicas:
            self._size_gate(self.admission.gate, self.cluster.ready_replicas)
        self.admission.set_router_share(1.0 / self.cluster.num_routers)
        self._refresh_draining()

    async def _status_loop(self) -> None:
        while True:
            await self.cluster.poll()
            if self.metrics:  # re-export: Ray drops a gauge not refreshed for two export intervals
                self.metrics.set_in_flight(self.admission.in_flight)
            await asyncio.sleep(self.args.router.status_poll_interval_s)

    def __del__(self) -> None:
        try:
            self._poll_task.cancel()
        except Exception:  # noqa: BLE001
            pass
