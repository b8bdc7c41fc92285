"""Admission tickets: ``Admission.admit()`` lets a request in (the waiting-queue gate, then the
tenant's token budget) and returns a ``Ticket``; ``Ticket.release()`` gives everything back
exactly once, whatever the path out (finished, error, deadline, client gone): the queue slot,
the unused reserved tokens, the in-flight count, and the bill.

The tenant budgets live in the ``AdmissionState`` deployment when there are several Routers
(admission_state.py); when it cannot be reached, this Router falls back to its own share of
them for 10 s at a time. No HTTP here, and Ray only through that handle.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from mistral_serve.serving.admission import Decision, Limits, QueueGate, TenantLimiter
from mistral_serve.serving.redact import redact
from mistral_serve.serving.wire import Delta, Final

logger = logging.getLogger("ray.serve")

SHARED_STATE_TIMEOUT_S = 2.0
SHARED_STATE_RETRY_S = 10.0  # after a failed call, use the local share this long before trying again


@dataclass
class Ticket:
    """One admitted request's accounting, from admission to its one release."""

    admission: Admission = field(repr=False)
    tenant: str
    prompt_tokens: int
    reserved_tokens: int
    reserved_in_shared_state: bool
    started: bool = False  # the replica sent its first message: the request left the waiting queue
    released: bool = False
    finished: bool = False  # the Final arrived: nothing is left to cancel
    generated: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the replica's prefix cache
    cost_usd: float | None = None
    request_id: str = ""  # the engine's request id, also the response body's ``id``
    serve_request_id: str = ""  # Serve's / the client's x-request-id, for logs
    prompt_log: str | None = None  # only with admission.log_prompts (redacted)
    completion_log: list[str] | None = None

    def absorb(self, msg: Delta | Final) -> None:
        """Count a replica message: tokens so far, and from the Final the exact usage and bill."""
        self.generated += msg.num_tokens
        if self.completion_log is not None:
            self.completion_log.append(msg.text)
        if isinstance(msg, Final):
            self.generated = msg.completion_tokens
            self.cached_tokens = msg.cached_tokens
            self.cost_usd = msg.cost_usd

    def mark_started(self) -> None:
        if not self.started:
            self.started = True
            self.admission.gate.leave(self.prompt_tokens, started=True)

    def release(self) -> None:
        """Exactly once per ticket; later calls do nothing."""
        if not self.released:
            self.released = True
            self.admission.settle(self)


class Admission:
    """This Router's admission: the waiting-queue gate, the tenants' budgets, the in-flight count."""

    def __init__(self, gate: QueueGate, limits: dict[str, Limits], state: Any | None, metrics: Any | None) -> None:
        self.gate = gate
        self.limits = limits
        self.local_limiter = TenantLimiter(limits)
        self.state = state  # the AdmissionState handle, or None (one Router: budgets are local)
        self.metrics = metrics
        self.in_flight = 0
        self._state_retry_at = 0.0
        self._background: set[asyncio.Task] = set()

    def priority(self, tenant: str) -> int:
        return self.limits.get(tenant, Limits()).priority

    def set_router_share(self, share: float) -> None:
        """This Router's share of the bounds when several Routers run (1 / their number)."""
        self.gate.share = share
        if abs(self.local_limiter.share - share) > 1e-9:
            self.local_limiter.set_share(share)

    async def admit(self, tenant: str, prompt_tokens: int, reserve_tokens: int) -> Ticket:
        """Raises ``AdmissionError`` (429/503 with Retry-After) when the request may not wait."""
        self.gate.try_enter(prompt_tokens).raise_if_rejected()
        try:
            decision, shared = await self._reserve(tenant, reserve_tokens)
            decision.raise_if_rejected()
        except BaseException:
            self.gate.leave(prompt_tokens, started=False)
            raise
        ticket = Ticket(self, tenant, prompt_tokens, reserve_tokens, shared)
        self.in_flight += 1
        if self.metrics:
            self.metrics.admit(tenant)
            self.metrics.set_in_flight(self.in_flight)
        return ticket

    def settle(self, ticket: Ticket) -> None:
        """``Ticket.release``'s work: queue slot, refund, in-flight, log, bill."""
        if not ticket.started:
            self.gate.leave(ticket.prompt_tokens, started=False)
        else:
            self.gate.finish()
        unused = ticket.reserved_tokens - ticket.prompt_tokens - ticket.generated
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

    async def snapshot(self) -> dict:
        shared = None
        if self.state is not None:
            try:
                shared = await self.state.snapshot.remote()
            except Exception:  # noqa: BLE001
                shared = None
        return {"waiting_requests": self.gate.waiting_requests, "waiting_tokens": self.gate.waiting_tokens,
                "in_flight": self.in_flight, "local_buckets": self.local_limiter.snapshot(), "shared_buckets": shared}

    async def _reserve(self, tenant: str, tokens: int) -> tuple[Decision, bool]:
        lim = self.limits.get(tenant)
        if lim is None or (lim.requests_per_minute is None and lim.tokens_per_minute is None):
            return Decision(True), False
        if self.state is not None and time.monotonic() >= self._state_retry_at:
            try:
                result = await asyncio.wait_for(self.state.reserve.remote(tenant, tokens), SHARED_STATE_TIMEOUT_S)
                return Decision(**result), True
            except Exception:  # noqa: BLE001 - fall back to this router's share of the limits
                logger.warning("AdmissionState unreachable; using this router's share of the tenant limits")
                self._state_retry_at = time.monotonic() + SHARED_STATE_RETRY_S
        return self.local_limiter.reserve(tenant, tokens), False

    async def _shared_refund(self, tenant: str, tokens: int) -> None:
        try:
            await self.state.refund.remote(tenant, tokens)
        except Exception as exc:  # noqa: BLE001
            logger.warning("refund to AdmissionState failed (%s); refunding this router's share", type(exc).__name__)
            self.local_limiter.refund(tenant, tokens)

    def _spawn(self, coro: Coroutine) -> None:
        # A fresh context: not the request's, whose cancellation (client gone) Serve propagates
        # to every handle call made in it, which would cancel this refund too.
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False
