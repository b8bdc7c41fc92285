"""Admission control, free of Ray so it is unit-testable: API keys → tenants, token buckets
for requests/min and tokens/min, the bounded waiting queue, and the context-length policy.

The Router applies these in this order (docs/serving.md): draining → auth → body size →
parse/validate → model → context length (hard, then soft) → replica availability →
waiting-queue bound → tenant buckets. Every rejection is an ``AdmissionError`` carrying the
HTTP status, the OpenAI error body fields, the metrics ``reason`` and an optional
``Retry-After``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mistral_serve.engine.validation import context_length_message  # one wording, the engine's (OpenAI's)

ANONYMOUS = "anonymous"

# The `reason` label values of mistral_serve_router_requests_rejected_total (docs/metrics.md).
REASONS = (
    "invalid_request", "context_length", "auth", "body_too_large", "unknown_model", "rate_limit",
    "token_limit", "queue_full", "draining", "no_replica", "deadline",
)


class AdmissionError(Exception):
    """A request refused before (or instead of) generation; maps 1:1 onto an HTTP answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str,
        type: str | None = None,  # noqa: A002 - the OpenAI field name
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        assert reason in REASONS, reason
        self.status = status
        self.message = message
        self.reason = reason
        self.type = type or _default_type(status)
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def _default_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
        504: "timeout_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


# ---- API keys ---------------------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _digest_of(entry: str) -> str:
    """A key as written in config/env/file: plain text, or ``sha256:<hex>`` (store no secret)."""
    entry = entry.strip()
    if entry.startswith("sha256:"):
        digest = entry[len("sha256:"):].strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("an API key given as sha256:<hex> needs 64 hex digits")
        return digest
    if not entry:
        raise ValueError("empty API key")
    return hash_key(entry)


def parse_key_lines(text: str, source: str) -> list[tuple[str, str]]:
    """Keys from an environment variable or a mounted file, as (tenant, sha256 digest) pairs.

    Accepted forms: ``tenant:key`` pairs one per line or comma-separated (lines starting with
    ``#`` are comments), or a JSON/YAML mapping ``{tenant: key | [keys]}``. A key may be
    written ``sha256:<hex>`` so that no secret is stored at all.
    """
    text = text.strip()
    if not text:
        return []
    if text[0] == "{":
        try:
            return _pairs_from_mapping(json.loads(text), source)
        except ValueError as exc:
            raise ValueError(f"{source}: invalid JSON: {exc}") from None
    try:
        import yaml

        data = yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - not YAML: fall through to tenant:key lines
        data = None
    if isinstance(data, Mapping):
        return _pairs_from_mapping(data, source)
    pairs = []
    for raw in text.replace(",", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, key = line.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            raise ValueError(f"{source}: expected 'tenant:key', got a line without one")
        pairs.append((tenant.strip(), _digest_of(key)))
    return pairs


def _pairs_from_mapping(data, source: str) -> list[tuple[str, str]]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping of tenant -> key or list of keys")
    pairs = []
    for tenant, keys in data.items():
        for key in [keys] if isinstance(keys, str) else list(keys or []):
            pairs.append((str(tenant), _digest_of(str(key))))
    return pairs


def load_key_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """A file mounted from a Kubernetes Secret, in any form ``parse_key_lines`` accepts."""
    return parse_key_lines(Path(path).read_text(), str(path))


class KeyStore:
    """API key digests → tenant. Only sha256 digests are kept; a presented key is hashed and
    compared with ``hmac.compare_digest`` against every stored digest (no early exit), so
    timing reveals neither which tenant matched nor how much of a digest did."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._entries: list[tuple[bytes, str]] = []
        for tenant, digest in pairs:
            self.add(tenant, digest)

    def add(self, tenant: str, digest: str) -> None:
        raw = bytes.fromhex(digest)
        for existing, other in self._entries:
            if hmac.compare_digest(existing, raw) and other != tenant:
                raise ValueError(f"one API key is configured for two tenants ({other!r} and {tenant!r})")
        self._entries.append((raw, tenant))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tenants(self) -> set[str]:
        return {t for _, t in self._entries}

    def lookup(self, key: str) -> str | None:
        presented = hashlib.sha256(key.encode("utf-8")).digest()
        found = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# ---- token buckets ----------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """Capacity ``per_minute``, refilled continuously at ``per_minute / 60`` per second."""

    per_minute: float
    tokens: float = field(default=-1.0)
    updated: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.per_minute

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0

    def refill(self, now: float) -> None:
        if self.updated >= 0 and now > self.updated:
            self.tokens = min(self.per_minute, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(now, self.updated)

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available (0: now; inf: never, above capacity)."""
        self.refill(now)
        if amount > self.per_minute:
            return math.inf
        return max(0.0, (amount - self.tokens) / self.rate) if self.rate > 0 else math.inf

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.tokens -= amount

    def give(self, amount: float, now: float) -> None:
        self.refill(now)
        self.tokens = min(self.per_minute, self.tokens + amount)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    priority: int = 0


@dataclass
class Decision:
    ok: bool
    reason: str | None = None
    message: str | None = None
    retry_after_s: float | None = None

    def raise_if_rejected(self) -> None:
        if not self.ok:
            raise AdmissionError(429, self.message or "rate limited", reason=self.reason or "rate_limit",
                                 code="rate_limit_exceeded", retry_after_s=self.retry_after_s)


class TenantLimiter:
    """Token buckets per tenant. ``share`` scales every limit (a router replica's share when
    no shared state is used: 1 / number of router replicas)."""

    def __init__(self, limits: Mapping[str, Limits], share: float = 1.0,
                 clock=time.monotonic) -> None:
        self._limits = dict(limits)
        self._clock = clock
        self._share = share
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}
        self.set_share(share)

    def set_share(self, share: float) -> None:
        """Re-scale limits (router replica count changed); current fill levels scale along."""
        share = min(1.0, max(share, 1e-6))
        old = self._buckets
        self._share = share
        self._buckets = {}
        for tenant, lim in self._limits.items():
            rb = TokenBucket(lim.requests_per_minute * share) if lim.requests_per_minute else None
            tb = TokenBucket(lim.tokens_per_minute * share) if lim.tokens_per_minute else None
            if tenant in old:
                for new, prev in zip((rb, tb), old[tenant]):
                    if new is not None and prev is not None:
                        frac = prev.tokens / prev.per_minute if prev.per_minute else 1.0
                        new.tokens, new.updated = new.per_minute * frac, prev.updated
            self._buckets[tenant] = (rb, tb)

    @property
    def share(self) -> float:
        return self._share

    def reserve(self, tenant: str, tokens: int, now: float | None = None) -> Decision:
        """Take one request and ``tokens`` (prompt + max_tokens) from the tenant's buckets, or
        neither. Unknown tenants are unlimited (the router only passes configured ones)."""
        now = self._clock() if now is None else now
        rb, tb = self._buckets.get(tenant, (None, None))
        if tb is not None and tokens > tb.per_minute:
            return Decision(False, "token_limit",
                            f"Request too large for tenant {tenant!r}: it reserves {tokens} tokens (prompt + "
                            f"max_tokens) but the limit is {tb.per_minute:g} tokens per minute"
                            + ("" if self._share == 1 else " on this router replica")
                            + ". Lower max_tokens or the prompt length.", None)
        wait_r = rb.wait_for(1, now) if rb is not None else 0.0
        if wait_r > 0:
            return Decision(False, "rate_limit",
                            f"Rate limit reached for tenant {tenant!r}: {rb.per_minute:g} requests per minute. "
                            f"Retry in {math.ceil(wait_r)} s.", wait_r)
        wait_t = tb.wait_for(tokens, now) if tb is not None else 0.0
        if wait_t > 0:
            return Decision(False, "token_limit",
                            f"Token rate limit reached for tenant {tenant!r}: {tb.per_minute:g} tokens per minute "
                            f"(this request reserves {tokens}). Retry in {math.ceil(wait_t)} s.", wait_t)
        if rb is not None:
            rb.take(1, now)
        if tb is not None:
            tb.take(tokens, now)
        return Decision(True)

    def refund(self, tenant: str, tokens: int, now: float | None = None) -> None:
        """Give back reserved tokens a request did not use."""
        if tokens <= 0:
            return
        now = self._clock() if now is None else now
        _, tb = self._buckets.get(tenant, (None, None))
        if tb is not None:
            tb.give(tokens, now)

    def snapshot(self, now: float | None = None) -> dict:
        now = self._clock() if now is None else now
        out = {}
        for tenant, (rb, tb) in self._buckets.items():
            for b in (rb, tb):
                if b is not None:
                    b.refill(now)
            out[tenant] = {"requests": rb.tokens if rb else None, "tokens": tb.tokens if tb else None}
        return out


# ---- the bounded waiting queue ------------------------------------------------------------------


WAIT_TARGET = 0.8  # of max_wait_s: the expected wait a new request may have (QueueGate)


class QueueGate:
    """Admitted requests that have not produced their first token yet, in requests and prompt
    tokens: the work the replicas still have to start. Beyond either bound new requests are
    refused at once (429) with a ``Retry-After`` estimated from the rate at which waiting
    requests have recently been starting. Bounds are this router replica's share.

    ``max_wait_s`` bounds the queue in time instead: a request that would wait longer than that
    to start, at the recent start rate, is refused. Count bounds cannot keep a TTFT objective
    when throughput moves (longer prompts, fewer replicas, a slower machine); this one follows it.
    The expected wait is the larger of two readings: the waiting requests over the recent start
    rate (~1 s memory, so the fast starts of a filling batch stop counting within a second once
    the batch is full and starts follow completions), and how long the oldest waiting request
    has already waited (a lower bound kept without knowing which request leaves: the entry times
    of the newest ``waiting_requests`` entries). The second reads a stall or an estimate that
    lags at once, from what requests really waited.

    Once the batches are full a waiting request needs a running one to finish first, so the
    wait is also read from the rate at which started requests finish (~5 s memory): the starts
    of a batch that was filling came at prefill speed and say nothing about how soon a slot
    frees. Nothing finished yet (a fresh server whose first burst filled its batches) reads as
    no free slot soon, and the overflow is refused.

    A request that finds a free batch slot (``batch_slots``, the ready replicas' ``max_num_seqs``
    together, against the admitted requests still in flight) while the oldest waiting one has
    waited at most half the objective is admitted whatever the rate says: it starts with one
    of the next prefills, and refusing it would idle the engine. That keeps a burst of one
    batch (64 clients at once, 64 slots) from being refused while its own prefill makes the
    measured start rate look slow. Measured with defaults on 2 cores (``mistral-serve load
    overload``), sparing every free slot regardless let a 10x flood admit ~350 requests in its
    first 5 s, and the admitted ones' TTFT p50 reached 3 s against a 2 s objective.

    The objective is a TTFT bound for admitted requests, so the expected wait is held to
    ``WAIT_TARGET`` of it: the estimate is read from the recent past, and whatever it misses
    lands above the bound. With the Router answering HTTP itself (direct ingress), the same
    10x overload admitted ~40% more and TTFT p99 reached 2.10-2.30 s against 2 s when the
    expected wait was held to the whole objective."""

    def __init__(self, max_requests: int | None, max_tokens: int | None, min_retry_after_s: float = 1.0,
                 max_retry_after_s: float = 30.0, clock=time.monotonic, max_wait_s: float | None = None) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self.batch_slots: int | None = None  # engine batch slots of the ready replicas (Router sets it)
        self.in_flight = 0  # admitted and not yet finished, started or not
        self.share = 1.0
        self.min_retry_after_s = min_retry_after_s
        self.max_retry_after_s = max_retry_after_s
        self._clock = clock
        self.waiting_requests = 0
        self.waiting_tokens = 0
        # EWMA of starts per second, measured only while others wait (a backlog), so it reads the
        # replicas' capacity, not the arrival rate of a light load.
        # Bias-corrected (divided by the weight its observations carry), so the first
        # observations are not pulled toward zero. Each observation weighs by its gap, so a burst
        # of starts in one step reads as its true rate; the time bound needs only ~0.1 s of them
        # (a flood would fill a count bound within a second), or a backlog in which nothing has
        # started for longer than the bound itself.
        self._start_rate = 0.0
        self._rate_weight = 0.0
        self._last_start = -math.inf
        self._backlog_since = 0.0
        self._entered: collections.deque[float] = collections.deque()  # entry times, oldest first
        # The same kind of EWMA over finishes of started requests (every finish: they free slots).
        self._finish_rate = 0.0
        self._finish_weight = 0.0
        self._last_finish = -math.inf

    def _bound(self, value: int | None) -> float:
        return math.inf if value is None else max(1.0, value * self.share)

    def start_rate(self) -> float:
        """Recent starts per second under backlog; decays while a backlog sees nothing start, so
        a stalled engine reads slow."""
        measured = self._start_rate / self._rate_weight if self._rate_weight else 0.0
        if not self.waiting_requests:
            return measured
        since = max(self._last_start, self._backlog_since)
        return min(measured, 1.0 / max(self._clock() - since, 1e-3))

    def finish_rate(self) -> float:
        """Recent finishes per second of started requests; decays while none finishes."""
        measured = self._finish_rate / self._finish_weight if self._finish_weight else 0.0
        return min(measured, 1.0 / max(self._clock() - self._last_finish, 1e-3))

    def oldest_wait(self) -> float:
        """Seconds the oldest waiting request has waited, at least (0 with none waiting)."""
        return self._clock() - self._entered[0] if self._entered else 0.0

    def retry_after(self) -> float:
        rate = self.start_rate()
        estimate = self.waiting_requests / rate if rate > 0 else self.max_retry_after_s
        return min(self.max_retry_after_s, max(self.min_retry_after_s, estimate))

    def refusal(self, prompt_tokens: int = 0) -> Decision | None:
        """Why a request with this many prompt tokens would be refused now, else None. With the
        default 0 it checks what does not depend on the request, so the Router can refuse before
        reading and validating a body: under a flood, that work is what starves the engine."""
        if self.waiting_requests + 1 > self._bound(self.max_requests):
            return Decision(False, "queue_full",
                            f"The server is overloaded: {self.waiting_requests} requests are waiting to start. "
                            "Retry later.", self.retry_after())
        if self.waiting_requests and self.waiting_tokens + prompt_tokens > self._bound(self.max_tokens):
            return Decision(False, "queue_full",
                            f"The server is overloaded: {self.waiting_tokens} prompt tokens are waiting to start. "
                            "Retry later.", self.retry_after())
        if self.max_wait_s is None or not self.waiting_requests:
            return None
        oldest = self.oldest_wait()
        batches_full = self.batch_slots is not None and self.in_flight >= self._bound(self.batch_slots)
        if oldest > self.max_wait_s:
            return Decision(False, "queue_full", f"The server is overloaded: a request admitted {oldest:.1f} s ago "
                                                 "has not started yet. Retry later.", self.retry_after())
        if self.batch_slots is not None and not batches_full and oldest <= self.max_wait_s / 2:
            return None  # a free batch slot and a short prefill backlog: it starts within a few steps
        stalled_for = self._clock() - max(self._last_start, self._backlog_since)
        if self._rate_weight < 0.1 and stalled_for <= self.max_wait_s:
            return None  # under ~0.1 s of backlog observed and something started within the bound
        rate = self.start_rate()
        if batches_full:
            rate = min(rate, self.finish_rate())
        wait = max((self.waiting_requests + 1) / rate if rate > 0 else math.inf, oldest)
        if wait > WAIT_TARGET * self.max_wait_s:
            expected = f"about {wait:.1f} s" if math.isfinite(wait) else f"over {stalled_for:.1f} s (none started)"
            return Decision(False, "queue_full", f"The server is overloaded: a new request would wait {expected} "
                                                 "to start. Retry later.", self.retry_after())
        return None

    def try_enter(self, prompt_tokens: int) -> Decision:
        refused = self.refusal(prompt_tokens)
        if refused is not None:
            return refused
        if not self.waiting_requests:
            self._backlog_since = self._clock()
        self.waiting_requests += 1
        self.waiting_tokens += prompt_tokens
        self.in_flight += 1
        self._entered.append(self._clock())
        return Decision(True)

    def finish(self) -> None:
        """A request that had started (``leave(started=True)``) ended."""
        self.in_flight = max(0, self.in_flight - 1)
        now = self._clock()
        if self._last_finish > -math.inf:  # the first finish has no gap to measure
            gap = max(now - self._last_finish, 1e-3)
            alpha = min(1.0, gap / 5.0)  # ~5 s memory
            self._finish_rate = (1 - alpha) * self._finish_rate + alpha * (1.0 / gap)
            self._finish_weight = (1 - alpha) * self._finish_weight + alpha
        self._last_finish = now

    def leave(self, prompt_tokens: int, started: bool) -> None:
        """The request started (first token) or ended before starting."""
        backlog = self.waiting_requests > 1  # others were waiting while this one did
        self.waiting_requests = max(0, self.waiting_requests - 1)
        self.waiting_tokens = max(0, self.waiting_tokens - prompt_tokens)
        if self._entered:
            self._entered.popleft()  # keeps the newest entries: their oldest waited no longer than the true oldest
        if not started:
            self.in_flight = max(0, self.in_flight - 1)
        if started:
            now = self._clock()
            if backlog:
                gap = max(now - max(self._last_start, self._backlog_since), 1e-3)
                alpha = min(1.0, gap / 1.0)  # ~1 s memory
                self._start_rate = (1 - alpha) * self._start_rate + alpha * (1.0 / gap)
                self._rate_weight = (1 - alpha) * self._rate_weight + alpha
            self._last_start = now


# ---- context length -----------------------------------------------------------------------------


def check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                  soft_limit: int | None, soft_policy: str, param: str) -> tuple[int, str | None]:
    """Returns (effective max_tokens, soft-limit warning or None); raises AdmissionError."""
    if prompt_tokens == 0:
        raise AdmissionError(400, "The prompt is empty.", reason="invalid_request", param=param)
    if max_tokens is None:
        max_tokens = max_model_len - prompt_tokens
        if max_tokens < 1:
            raise AdmissionError(400, context_length_message(max_model_len, prompt_tokens, 1),
                                 reason="context_length", code="context_length_exceeded", param=param)
    if prompt_tokens + max_tokens > max_model_len:
        raise AdmissionError(400, context_length_message(max_model_len, prompt_tokens, max_tokens),
                             reason="context_length", code="context_length_exceeded", param=param)
    warning = None
    if soft_limit is not None and prompt_tokens + max_tokens > soft_limit:
        text = (f"This request uses {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion), above the recommended context of {soft_limit} tokens "
                "for this model; quality degrades past it.")
        if soft_policy == "reject":
            raise AdmissionError(400, text + " Reduce the prompt or max_tokens.", reason="context_length",
                                 code="soft_context_limit_exceeded", param=param)
        warning = text
    return max_tokens, warning
