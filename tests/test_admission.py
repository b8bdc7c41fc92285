"""Admission control without Ray: keys → tenants, token buckets, the waiting-queue bound, the
context-length policy."""

from __future__ import annotations

import hashlib
import math

import pytest

from mistral_serve.serving.admission import (
    ANONYMOUS,
    AdmissionError,
    KeyStore,
    Limits,
    QueueGate,
    TenantLimiter,
    WAIT_TARGET,
    TokenBucket,
    bearer_token,
    check_context,
    context_length_message,
    hash_key,
    load_key_file,
    parse_key_lines,
)
from mistral_serve.serving.config import AdmissionConfig
from mistral_serve.serving.tenants import build_tenants


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- keys -------------------------------------------------------------------------------------------


def test_key_store_hashes_and_matches_in_constant_time_loop():
    store = KeyStore([("acme", hash_key("k1")), ("beta", hash_key("k2")), ("acme", hash_key("k3"))])
    assert store.lookup("k1") == "acme" and store.lookup("k3") == "acme" and store.lookup("k2") == "beta"
    assert store.lookup("k4") is None and store.lookup("") is None
    # nothing but digests is kept
    assert all(len(d) == 32 for d, _ in store._entries)
    assert b"k1" not in b"".join(d for d, _ in store._entries)


def test_same_key_for_two_tenants_is_a_config_error():
    with pytest.raises(ValueError, match="two tenants"):
        KeyStore([("a", hash_key("k")), ("b", hash_key("k"))])


@pytest.mark.parametrize("text", [
    "acme:k1\nbeta:k2\n# comment\n",
    "acme:k1, beta:k2",
    '{"acme": "k1", "beta": ["k2"]}',
    "acme: k1\nbeta:\n  - k2\n",
])
def test_key_sources_formats(text):
    pairs = parse_key_lines(text, "test")
    assert sorted(pairs) == sorted([("acme", hash_key("k1")), ("beta", hash_key("k2"))])


def test_key_given_as_digest_and_bad_lines():
    digest = hashlib.sha256(b"secret").hexdigest()
    assert parse_key_lines(f"acme:sha256:{digest}", "x") == [("acme", digest)]
    with pytest.raises(ValueError, match="64 hex"):
        parse_key_lines("acme:sha256:abc", "x")
    with pytest.raises(ValueError, match="tenant:key"):
        parse_key_lines("no-separator-here", "x")


def test_build_tenants_from_config_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("filetenant:fk\n")
    cfg = AdmissionConfig.model_validate({
        "tenants": [{"name": "cfg", "api_keys": ["ck"], "requests_per_minute": 5}],
        "api_keys_env": "KEYS", "api_keys_file": str(f),
        "default_limits": {"name": "default", "tokens_per_minute": 1000},
    })
    store, limits, anon = build_tenants(cfg, environ={"KEYS": "envtenant:ek"})
    assert store.lookup("ck") == "cfg" and store.lookup("ek") == "envtenant" and store.lookup("fk") == "filetenant"
    assert limits["cfg"].requests_per_minute == 5
    assert limits["envtenant"].tokens_per_minute == 1000 and limits["filetenant"].tokens_per_minute == 1000
    assert anon is False and ANONYMOUS not in limits
    # no keys anywhere: auth is off and everybody is "anonymous"
    store, limits, anon = build_tenants(AdmissionConfig(api_keys_env=None), environ={})
    assert len(store) == 0 and anon is True and set(limits) == {ANONYMOUS}
    with pytest.raises(ValueError, match="reserved"):
        build_tenants(AdmissionConfig(api_keys_env="K"), environ={"K": "anonymous:x"})
    assert load_key_file(f) == [("filetenant", hash_key("fk"))]


@pytest.mark.parametrize("header,key", [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), (None, None), ("", None),
])
def test_bearer_token(header, key):
    assert bearer_token(header) == key


# ---- token buckets ------------------------------------------------------------------------------------


def test_token_bucket_refills_continuously_up_to_capacity():
    b = TokenBucket(60)  # one per second
    assert b.wait_for(60, 0) == 0
    b.take(60, 0)
    assert b.wait_for(1, 0) == pytest.approx(1.0)
    assert b.wait_for(10, 5) == pytest.approx(5.0)
    assert b.wait_for(61, 5) == math.inf
    b.refill(10_000)
    assert b.tokens == 60


def test_limiter_requests_per_minute_and_retry_after():
    clock = Clock()
    lim = TenantLimiter({"a": Limits(requests_per_minute=3), "b": Limits(requests_per_minute=100)}, clock=clock)
    assert all(lim.reserve("a", 10).ok for _ in range(3))
    d = lim.reserve("a", 10)
    assert not d.ok and d.reason == "rate_limit" and d.retry_after_s == pytest.approx(20.0)
    assert lim.reserve("b", 10).ok  # per tenant
    clock.t += 20
    assert lim.reserve("a", 10).ok
    with pytest.raises(AdmissionError) as info:
        d.raise_if_rejected()
    assert info.value.status == 429 and info.value.headers() == {"Retry-After": "20"}
    assert info.value.body()["error"]["type"] == "rate_limit_error"


def test_limiter_tokens_reserved_and_refunded():
    clock = Clock()
    lim = TenantLimiter({"t": Limits(tokens_per_minute=1000)}, clock=clock)
    assert lim.reserve("t", 600).ok  # prompt + max_tokens
    d = lim.reserve("t", 600)
    assert not d.ok and d.reason == "token_limit" and d.retry_after_s == pytest.approx(12.0)
    lim.refund("t", 500)  # the first request used only 100 of its 600
    assert lim.reserve("t", 600).ok
    too_big = lim.reserve("t", 1001)
    assert not too_big.ok and too_big.retry_after_s is None and "too large" in too_big.message
    # a rejected reservation takes nothing: neither the request nor the tokens
    lim2 = TenantLimiter({"t": Limits(requests_per_minute=2, tokens_per_minute=100)}, clock=clock)
    assert not lim2.reserve("t", 101).ok and not lim2.reserve("t", 101).ok
    assert lim2.reserve("t", 100).ok
    # refunds never exceed capacity
    lim2.refund("t", 10_000)
    assert lim2.snapshot()["t"]["tokens"] == 100


def test_limiter_share_for_router_replicas_without_shared_state():
    clock = Clock()
    lim = TenantLimiter({"t": Limits(requests_per_minute=10)}, clock=clock)
    lim.set_share(0.5)  # two routers: each admits half
    assert sum(lim.reserve("t", 1).ok for _ in range(10)) == 5
    lim.set_share(1.0)  # back to one router: the bucket keeps its (empty) fill level
    assert not lim.reserve("t", 1).ok


def test_unknown_or_unlimited_tenants_pass():
    lim = TenantLimiter({"free": Limits()})
    assert lim.reserve("free", 10**9).ok and lim.reserve("nobody", 10**9).ok


# ---- the waiting queue ----------------------------------------------------------------------------------


def test_queue_gate_bounds_requests_and_tokens():
    clock = Clock()
    gate = QueueGate(max_requests=2, max_tokens=100, min_retry_after_s=1, clock=clock)
    assert gate.try_enter(60).ok and gate.try_enter(30).ok
    d = gate.try_enter(1)
    assert not d.ok and d.reason == "queue_full" and d.retry_after_s >= 1
    gate.leave(60, started=True)
    d = gate.try_enter(80)  # 30 + 80 > 100 tokens
    assert not d.ok and "prompt tokens" in d.message
    assert gate.try_enter(70).ok
    gate.leave(30, started=False)
    gate.leave(70, started=False)
    assert gate.waiting_requests == 0 and gate.waiting_tokens == 0
    assert gate.try_enter(10_000).ok  # a single request larger than the token bound is not starved


def test_queue_gate_share_and_retry_after_estimate():
    clock = Clock()
    gate = QueueGate(max_requests=10, max_tokens=None, min_retry_after_s=1, max_retry_after_s=30, clock=clock)
    gate.share = 0.5
    assert sum(gate.try_enter(1).ok for _ in range(10)) == 5
    assert gate.retry_after() == 30  # nothing has started yet: the longest wait
    for _ in range(5):
        clock.t += 0.5  # requests start at 2/s
        gate.leave(1, started=True)
        gate.try_enter(1)
    assert 1 <= gate.retry_after() < 30


def test_queue_gate_time_bound_follows_the_start_rate():
    """With max_wait_s the queue holds what starts within that time at the recent rate, and a
    stall (nothing starting) reads as a falling rate, so the bound tightens."""
    clock = Clock()
    gate = QueueGate(max_requests=1000, max_tokens=None, clock=clock, max_wait_s=2.0)
    assert all(gate.try_enter(1).ok for _ in range(50))  # no start seen yet: only the count bound
    for _ in range(100):  # 10 starts/s, one new arrival per start
        clock.t += 0.1
        gate.leave(1, started=True)
        gate.try_enter(1)
    while gate.waiting_requests:
        gate.leave(1, started=False)
    rate = gate.start_rate()
    assert rate == pytest.approx(10.0)  # bias-corrected: no pull toward zero from the start
    admitted = 0
    while gate.try_enter(1).ok:
        admitted += 1
    assert abs(admitted - WAIT_TARGET * 2.0 * rate) <= 1  # (waiting + 1) / rate <= 0.8 x 2 s
    d = gate.try_enter(1)
    assert d.reason == "queue_full" and "wait about" in d.message and d.retry_after_s >= 1
    gate.leave(1, started=False)
    assert gate.try_enter(1).ok  # room again for one
    gate.leave(1, started=False)
    clock.t += 4.0  # nothing starts for 4 s: the rate reads <= 0.25/s
    assert gate.start_rate() <= 0.25 and not gate.try_enter(1).ok


def test_queue_gate_time_bound_trips_within_a_second_of_a_flood():
    """A flood must not fill the count bound before the start rate is known: ~1 s of backlog
    observations arm the time bound, and a backlog in which nothing started for longer than
    the bound is refused even before that."""
    clock = Clock()
    gate = QueueGate(max_requests=1000, max_tokens=None, clock=clock, max_wait_s=1.0)
    for _ in range(10):  # 1 s of a flood: 40 arrivals per 0.1 s, 5 starts per 0.1 s
        clock.t += 0.1
        for _ in range(5):
            if gate.waiting_requests:
                gate.leave(1, started=True)
        for _ in range(40):
            gate.try_enter(1)
    assert gate.start_rate() == pytest.approx(50.0, rel=0.2)
    assert gate.waiting_requests <= 1.0 * 50 * 1.3  # about one second of starts waits, not 1000
    refused = gate.try_enter(1)
    assert not refused.ok and "wait about" in refused.message

    stalled = QueueGate(max_requests=1000, max_tokens=None, clock=clock, max_wait_s=1.0)
    assert all(stalled.try_enter(1).ok for _ in range(20))  # no start seen yet: only the count bound
    clock.t += 1.5  # nothing started in 1.5 s > the bound
    assert not stalled.try_enter(1).ok


def test_queue_gate_time_bound_spares_free_batch_slots():
    """While admitted requests fit the engines' batches and the oldest waiting one has waited
    under half the objective, a slow-looking start rate (the batch's own prefill) refuses
    nothing; once the batches are full the time bound applies."""
    clock = Clock()
    gate = QueueGate(max_requests=1000, max_tokens=None, clock=clock, max_wait_s=1.0)
    gate.batch_slots = 64
    assert all(gate.try_enter(1).ok for _ in range(64))  # a burst of one batch
    for _ in range(4):  # its prefill starts 4 per 0.1 s: ~48 waiting at 40/s, over 1 s
        clock.t += 0.1
        for _ in range(4):
            gate.leave(1, started=True)
    for _ in range(4):  # 4 finish; their clients send again at once: free slots, admitted
        gate.finish()
        assert gate.try_enter(1).ok
    assert gate.in_flight == 64
    refused = gate.try_enter(1)  # batches full: the time bound refuses
    assert not refused.ok and "wait about" in refused.message
    gate.leave(1, started=False)  # an admitted one gave up before starting: a slot is free again
    assert gate.in_flight == 63 and gate.try_enter(1).ok


def test_queue_gate_free_slots_do_not_hide_a_long_prefill_backlog():
    """A flood into a large batch (128 slots) on a slow engine: once the oldest waiting request
    has waited half the objective, free slots no longer admit, and past the objective even a
    fast-looking start rate does not."""
    clock = Clock()
    gate = QueueGate(max_requests=1000, max_tokens=None, clock=clock, max_wait_s=2.0)
    gate.batch_slots = 128
    admitted = started = 0
    for _ in range(30):  # 3 s: 6 arrivals and 2 starts per 0.1 s (20 starts/s, the batch not full)
        clock.t += 0.1
        for _ in range(2):
            if gate.waiting_requests:
                gate.leave(1, started=True)
                started += 1
        admitted += sum(gate.try_enter(1).ok for _ in range(6))
    assert gate.in_flight < 128  # free slots were left all along
    # Admitted requests wait about waiting / 20 s: the backlog stays near the 2 s objective's 40,
    # not the ~86 that sparing every free slot would have let in by the time the batch filled.
    assert gate.waiting_requests <= 2.0 * 20 * 1.25
    assert admitted == started + gate.waiting_requests and admitted < 128

    stuck = QueueGate(max_requests=1000, max_tokens=None, clock=clock, max_wait_s=2.0)
    stuck.batch_slots = 128
    assert stuck.try_enter(1).ok
    clock.t += 2.5  # the one waiting request has not started in 2.5 s
    refused = stuck.try_enter(1)
    assert not refused.ok and "has not started yet" in refused.message


def test_queue_gate_full_batches_wait_for_finishes_not_prefill_starts():
    """Starts at prefill speed while a batch fills say nothing about when a slot frees: once
    the batches are full the wait reads from the finish rate."""
    clock = Clock()
    gate = QueueGate(max_requests=1000, max_tokens=None, clock=clock, max_wait_s=2.0)
    gate.batch_slots = 32
    for _ in range(20):  # 2 s of steady traffic: one finishes and one arrives every 0.25 s
        clock.t += 0.25
        assert gate.try_enter(1).ok
        gate.leave(1, started=True)
        gate.finish()
    assert gate.finish_rate() == pytest.approx(4.0, rel=0.1)
    for _ in range(4):  # a flood fills the batch: 10 arrivals and 8 starts per 0.1 s
        clock.t += 0.1
        for _ in range(10):
            gate.try_enter(1)
        for _ in range(8):
            if gate.waiting_requests:
                gate.leave(1, started=True)
    assert gate.in_flight >= 32 and gate.start_rate() > 50
    admitted = 0
    while gate.try_enter(1).ok:
        admitted += 1
    # At 4 finishes/s a 2 s objective holds about 8 waiting requests, whatever the starts said.
    assert gate.waiting_requests <= 2.0 * 4 + 1


def test_queue_gate_time_bound_ignores_light_load():
    """Requests that start with nobody else waiting say nothing about capacity: after a light
    load (or an idle minute) a burst is bounded by the count bound only."""
    clock = Clock()
    gate = QueueGate(max_requests=1000, max_tokens=None, clock=clock, max_wait_s=1.0)
    for _ in range(20):  # one request every 2 s, each alone in the queue
        assert gate.try_enter(1).ok
        clock.t += 2.0
        gate.leave(1, started=True)
    clock.t += 60.0
    assert gate.start_rate() == 0.0
    assert all(gate.try_enter(1).ok for _ in range(200))


# ---- context ----------------------------------------------------------------------------------------------


def test_context_length_exact_message():
    with pytest.raises(AdmissionError) as info:
        check_context(100, 30, 128, None, "reject", "prompt")
    e = info.value
    assert e.status == 400 and e.code == "context_length_exceeded" and e.param == "prompt"
    assert e.message == (
        "This model's maximum context length is 128 tokens. However, you requested 130 tokens (100 in the messages, "
        "30 in the completion). Please reduce the length of the messages or completion.")
    assert e.message == context_length_message(128, 100, 30)


def test_context_default_max_tokens_and_soft_policy():
    assert check_context(100, None, 128, None, "reject", "messages") == (28, None)
    with pytest.raises(AdmissionError):
        check_context(128, None, 128, None, "reject", "messages")
    with pytest.raises(AdmissionError) as info:
        check_context(90, 20, 128, 100, "reject", "prompt")
    assert info.value.code == "soft_context_limit_exceeded" and info.value.reason == "context_length"
    max_tokens, warning = check_context(90, 20, 128, 100, "warn", "prompt")
    assert max_tokens == 20 and "110 tokens" in warning
    assert check_context(50, 20, 128, 100, "warn", "prompt") == (20, None)
    with pytest.raises(AdmissionError, match="empty"):
        check_context(0, 5, 128, None, "warn", "prompt")


def test_error_body_shape_and_statuses():
    e = AdmissionError(503, "draining", reason="draining", retry_after_s=0.2)
    assert e.body() == {"error": {"message": "draining", "type": "service_unavailable_error", "param": None,
                                  "code": None}}
    assert e.headers() == {"Retry-After": "1"}  # at least one second, an integer
    with pytest.raises(AssertionError):
        AdmissionError(400, "x", reason="not-a-reason")
