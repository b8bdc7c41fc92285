"""The replica client: one request's call to an LLMReplica, through a streaming handle
(``ray_calls``) or in the Router's process (in_process_replica.py), as an async iterator of
typed wire messages (wire.py), with deadlines and Ray's errors mapped to ``AdmissionError``s in
OpenAI's error shape.

A replica that fails before the request's first message costs the client nothing but time:
``ReplicaClient.start`` tries again on another replica (up to ``START_ATTEMPTS``), avoiding the
ones that said they failed. After the first message nothing is retried: tokens reached the
client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from mistral_serve.serving.admission import AdmissionError
from mistral_serve.serving.config import AdmissionConfig
from mistral_serve.serving.wire import Delta, Final, GenerateRequest, ReplicaError

logger = logging.getLogger("ray.serve")

# Tries of a request on the replicas before its first token. The backoffs (0.2, 0.4, ... s; 2 s
# in all) outlast one routing-stats period, after which a failed replica is routed to last
# (request_router.py).
START_ATTEMPTS = 5


class ReplicaFailedError(AdmissionError):
    """A replica failure (503 ``no_replica``): the one kind of error retried on another replica,
    safe while nothing reached the client. ``failed_replica``: the failed replica's id when it
    said so, for the retry to avoid it."""

    def __init__(self, message: str, *, retry_after_s: float | None, failed_replica: str | None = None) -> None:
        super().__init__(503, message, reason="no_replica", retry_after_s=retry_after_s)
        self.failed_replica = failed_replica


class ReplicaCall:
    """A started call: its first message, then ``next()`` until a ``Final``."""

    def __init__(self, client: ReplicaClient, gen, first: Delta | Final) -> None:
        self._client = client
        self._gen = gen
        self.first = first

    async def next(self, deadline: float) -> Delta | Final:
        return await self._client.receive(self._gen, deadline)

    def cancel(self) -> None:
        """Cancel the replica call, which aborts the engine request and frees its KV blocks."""
        self._gen.cancel()


class MessageStream(Protocol):
    """One started replica call, as Serve's streaming ``DeploymentResponseGenerator`` is one."""

    def __anext__(self): ...  # awaitable: the next wire message

    def cancel(self) -> None: ...


def ray_calls(llm: DeploymentHandle) -> Callable[[GenerateRequest], MessageStream]:
    """The call opener for an LLMReplica deployment: a streaming ``generate`` call per request."""
    return llm.options(stream=True).generate.remote  # made once: options() builds a new handle


class ReplicaClient:
    def __init__(self, open_call: Callable[[GenerateRequest], MessageStream], admission: AdmissionConfig,
                 retry_after: Callable[[], float]) -> None:
        self._open_call = open_call
        self.adm = admission
        self._retry_after = retry_after  # the gate's Retry-After for overload refusals

    async def start(self, req: GenerateRequest, start_deadline: float, log_id: str) -> ReplicaCall:
        """Send ``req`` and wait for its first message (by ``start_deadline``: waiting longer
        means the server is overloaded), retrying on another replica if one fails first."""
        for attempt in range(1, START_ATTEMPTS + 1):
            gen = self._open_call(req)
            try:
                return ReplicaCall(self, gen, await self.receive(gen, start_deadline, queued=True))
            except ReplicaFailedError as exc:
                gen.cancel()
                backoff = 0.2 * attempt
                if attempt == START_ATTEMPTS or time.monotonic() + backoff >= start_deadline:
                    raise
                logger.warning("request %s id=%s: replica failed before the first token (%s); retrying on another "
                               "replica (attempt %d)", log_id, req.request_id, exc.message, attempt + 1)
                if exc.failed_replica:
                    # Until its failure reaches every caller's routing stats, the failed replica
                    # (idle, so it looks least loaded) would win the retry: request_router.py ranks
                    # the replicas named here last.
                    req.avoid_replicas.append(exc.failed_replica)
                await asyncio.sleep(backoff)
            except BaseException:
                gen.cancel()
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def receive(self, gen, deadline: float, queued: bool = False) -> Delta | Final:
        """The next message within the deadline, errors mapped to ``AdmissionError`` (a
        ``ReplicaFailedError`` when another replica may succeed)."""
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
                                     retry_after_s=self._retry_after()) from None
            raise AdmissionError(504, f"The request exceeded its deadline of {self.adm.request_timeout_s:g} s.",
                                 reason="deadline", code="deadline_exceeded") from None
        except StopAsyncIteration:
            raise ReplicaFailedError("The model replica ended the stream unexpectedly.",
                                     retry_after_s=self.adm.retry_after_s) from None
        except BackPressureError:
            raise AdmissionError(429, "The server is overloaded: the model replicas' queues are full.",
                                 reason="queue_full", retry_after_s=self._retry_after()) from None
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
