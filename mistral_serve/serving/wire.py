"""The Router ↔ LLMReplica wire: what the Router sends to ``LLMReplica.generate`` and the
messages the replica streams back. Plain slotted dataclasses (Ray pickles them across the
handle; no validation layer on the per-message path), free of Ray so they are unit-testable.

A call yields zero or more ``Delta`` messages and then exactly one ``Final`` (streaming: one
``Delta`` at the first token, then one per pacing interval; non-streaming: one ``Delta`` at the
first token, the Router's start signal), or a ``ReplicaError`` instead, after which the stream ends.

``n > 1``: each message holds one choice (``index``); per interval one ``Delta`` per choice
with new tokens, a choice's end is the ``finish_reason`` of its last ``Delta``, and the
``Final`` carries no choice (empty text, no finish reason), only the request's usage and bill.
``prompt_logprobs`` (prompt logprobs were asked) rides on the first message only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mistral_serve.engine.sampling_params import SamplingParams

# Why a replica refused or failed a request. ``invalid_request`` / ``context_length``: the request
# itself (400; sending it again anywhere fails the same way). ``replica_failed``: this replica
# (engine loop dead or wedged; 503), safe to retry elsewhere while nothing reached the client.
ErrorKind = Literal["invalid_request", "context_length", "replica_failed"]
ERROR_KINDS: tuple[str, ...] = ("invalid_request", "context_length", "replica_failed")


@dataclass(slots=True)
class GenerateRequest:
    request_id: str  # the engine's request id, also the response body's ``id``
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    priority: int = 0
    tenant: str | None = None  # the replica bills compute of requests aborted by their client
    # Replica ids this (retried) request must not go back to unless nothing else is left: the ones
    # that failed it (request_router.py ranks them last).
    avoid_replicas: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Delta:
    """Tokens produced since the previous message."""

    text: str
    num_tokens: int
    logprobs: list | None = None  # (token text, logprob, [(text, logprob)] of the top k) per token
    index: int = 0  # the choice (n > 1)
    finish_reason: str | None = None  # n > 1: this choice ended (n == 1: on the Final)
    prompt_logprobs: list | None = None  # as ``logprobs``, per prompt token (the first: logprob None)


@dataclass(slots=True)
class Final:
    """The last message of a request: its last tokens plus the outcome and the bill."""

    text: str
    num_tokens: int
    logprobs: list | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # all n choices together
    cost_usd: float
    index: int = 0
    prompt_logprobs: list | None = None
    cached_tokens: int = 0  # prompt tokens whose KV the replica's prefix cache already held


@dataclass(slots=True)
class ReplicaError:
    kind: ErrorKind
    message: str  # client-facing
    replica: str | None = None  # the failed replica's id (replica_failed), for a retry to avoid it

    def __post_init__(self) -> None:
        if self.kind not in ERROR_KINDS:
            raise ValueError(f"unknown replica error kind {self.kind!r}")

    @property
    def retryable(self) -> bool:
        return self.kind == "replica_failed"

    @property
    def status(self) -> int:
        return 503 if self.retryable else 400


ReplicaMessage = Delta | Final | ReplicaError
