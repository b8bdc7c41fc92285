"""Prometheus series of docs/metrics.md, recorded with ``ray.serve.metrics`` inside the replicas.

Names here are without Ray's ``ray_`` prefix and the ``_total`` Ray appends to counters; a
scrape of Ray's metrics agent shows e.g. ``mistral_serve_prompt_tokens`` as
``ray_mistral_serve_prompt_tokens_total`` (verified on Ray 2.60.0, see docs/serving.md).
Serve adds ``application``, ``deployment`` and ``replica`` labels itself.

Histogram ``_sum`` series are approximations in Ray 2.60: a replica's histogram reaches the
metrics agent as bucket counts only, and the agent re-records one observation at each
bucket's midpoint (``OpenTelemetryMetricRecorder.record_histogram_aggregated_batch``), so a
7-token prompt adds 7.5 (bucket 5..10) to ``request_prompt_tokens_sum`` and an overflow adds
twice the last bound. ``_bucket`` and ``_count`` are exact. For the two token histograms,
whose sums are compared with the token counters, the replicas therefore also export the exact
sum as a counter (``EXACT_SUM_SERIES``): ``..._request_prompt_tokens_exact_sum_total`` equals
``prompt_tokens_total`` once no request is in flight (the counter counts prefill as it
happens, also of requests still running or aborted; the histogram counts finished requests).
"""

from __future__ import annotations

from collections.abc import Iterable

from mistral_serve.engine.stats import EngineStats

# vLLM's buckets (vllm/v1/metrics/loggers.py) so dashboards and habits carry over.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]
QUEUE_BUCKETS = LATENCY_BUCKETS
ROUTER_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                          240.0, 480.0, 960.0]

# Every series name of docs/metrics.md as it appears in Prometheus.
ENGINE_SERIES = [
    "ray_mistral_serve_num_requests_running",
    "ray_mistral_serve_num_requests_waiting",
    "ray_mistral_serve_kv_cache_usage_perc",
    "ray_mistral_serve_batch_capacity",
    "ray_mistral_serve_num_preemptions_total",
    "ray_mistral_serve_prefix_cache_queries_total",
    "ray_mistral_serve_prefix_cache_hits_total",
    "ray_mistral_serve_prompt_tokens_total",
    "ray_mistral_serve_generation_tokens_total",
    "ray_mistral_serve_request_success_total",
    "ray_mistral_serve_time_to_first_token_seconds",
    "ray_mistral_serve_inter_token_latency_seconds",
    "ray_mistral_serve_e2e_request_latency_seconds",
    "ray_mistral_serve_request_queue_time_seconds",
    "ray_mistral_serve_request_prompt_tokens",
    "ray_mistral_serve_request_generation_tokens",
]
ROUTER_SERIES = [
    "ray_mistral_serve_router_requests_admitted_total",
    "ray_mistral_serve_router_requests_rejected_total",
    "ray_mistral_serve_router_requests_in_flight",
    "ray_mistral_serve_router_request_latency_seconds",
    "ray_mistral_serve_router_soft_context_exceeded_total",
]
# Exact sums of the token histograms (see the module docstring), one per finished request.
EXACT_SUM_SERIES = [
    "ray_mistral_serve_request_prompt_tokens_exact_sum_total",
    "ray_mistral_serve_request_generation_tokens_exact_sum_total",
]
COST_SERIES = [
    "ray_mistral_serve_tokens_total",
    "ray_mistral_serve_cost_usd_total",
    "ray_mistral_serve_replica_busy_seconds_total",
    "ray_mistral_serve_replica_idle_seconds_total",
    "ray_mistral_serve_replica_idle_cost_usd_total",
    "ray_mistral_serve_gpu_price_usd_per_hour",
    "ray_mistral_serve_reference_price_usd_per_1m_tokens",
    "ray_mistral_serve_replica_quantization_info",
]


def token_buckets(max_len: int) -> list[float]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to max_len."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_len:
                return [float(x) for x in out]
            out.append(v)
        exp += 1


def _counter(name: str, description: str, tags: Iterable[str]):
    from ray.serve import metrics

    return metrics.Counter(name, description=description, tag_keys=tuple(tags))


def _gauge(name: str, description: str, tags: Iterable[str]):
    from ray.serve import metrics

    return metrics.Gauge(name, description=description, tag_keys=tuple(tags))


def _histogram(name: str, description: str, buckets: list[float], tags: Iterable[str]):
    from ray.serve import metrics

    return metrics.Histogram(name, description=description, boundaries=buckets, tag_keys=tuple(tags))


def _prime(counter, tags: dict) -> None:
    """Export a counter at 0 before its first event, so rate() and absent() work from the
    start. Ray's public ``inc`` refuses 0; ``_record`` is what it calls (Ray 2.60.0)."""
    try:
        counter._record(0, tags=tags)
    except Exception:  # noqa: BLE001 - cosmetic: the series then appears on its first increment
        pass


class EngineMetrics:
    """Recorded by each LLMReplica: engine gauges/counters, per-request histograms, idle cost."""

    def __init__(self, model_name: str, max_model_len: int, quantization: str = "none") -> None:
        m = ("model_name",)
        self.tags = {"model_name": model_name}
        # An info series (always 1): its quantization label joins onto the cost series by
        # model_name, so $/1M tokens compares replicas that differ only in their weights' format.
        self.quantization_info = _gauge("mistral_serve_replica_quantization_info",
                                        "1, labelled with the replica's weight quantization.",
                                        ("model_name", "quantization"))
        self.quantization_tags = {**self.tags, "quantization": quantization}
        self.quantization_info.set(1, tags=self.quantization_tags)
        self.running = _gauge("mistral_serve_num_requests_running", "Sequences in the running batch.", m)
        self.waiting = _gauge("mistral_serve_num_requests_waiting", "Requests waiting for the batch.", m)
        self.kv_usage = _gauge("mistral_serve_kv_cache_usage_perc", "KV blocks in use / total (0..1).", m)
        self.batch_capacity = _gauge("mistral_serve_batch_capacity", "The replica's max_num_seqs.", m)
        self.preemptions = _counter("mistral_serve_num_preemptions", "Preemptions by recompute.", m)
        self.prefix_queries = _counter("mistral_serve_prefix_cache_queries",
                                       "Prompt tokens looked up in the prefix cache at admission.", m)
        self.prefix_hits = _counter("mistral_serve_prefix_cache_hits", "Of those, tokens found cached.", m)
        self.prompt_tokens = _counter("mistral_serve_prompt_tokens", "Prompt tokens prefilled.", m)
        self.generation_tokens = _counter("mistral_serve_generation_tokens", "Tokens generated.", m)
        self.success = _counter("mistral_serve_request_success", "Finished requests by finish reason.",
                                ("model_name", "finished_reason"))
        self.ttft = _histogram("mistral_serve_time_to_first_token_seconds", "Arrival at the engine to first token.",
                               TTFT_BUCKETS, m)
        self.itl = _histogram("mistral_serve_inter_token_latency_seconds", "Gap between consecutive tokens.",
                              ITL_BUCKETS, m)
        self.e2e = _histogram("mistral_serve_e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS, m)
        self.queue_time = _histogram("mistral_serve_request_queue_time_seconds", "Arrival to first scheduled.",
                                     QUEUE_BUCKETS, m)
        buckets = token_buckets(max_model_len)
        self.prompt_len = _histogram("mistral_serve_request_prompt_tokens", "Prompt length per request.", buckets, m)
        self.gen_len = _histogram("mistral_serve_request_generation_tokens", "Output length per request.", buckets, m)
        # Ray exports histogram sums from bucket midpoints: the exact sums of the two above.
        self.prompt_len_sum = _counter("mistral_serve_request_prompt_tokens_exact_sum",
                                       "Exact sum of request_prompt_tokens (Ray's histogram _sum is approximate).", m)
        self.gen_len_sum = _counter("mistral_serve_request_generation_tokens_exact_sum",
                                    "Exact sum of request_generation_tokens (Ray's histogram _sum is approximate).", m)
        self.busy = _counter("mistral_serve_replica_busy_seconds", "Seconds the engine was stepping.", m)
        self.idle = _counter("mistral_serve_replica_idle_seconds", "Seconds up with nothing to do.", m)
        self.idle_cost = _counter("mistral_serve_replica_idle_cost_usd", "Idle seconds x GPU $/s.", m)
        self.gpu_price = _gauge("mistral_serve_gpu_price_usd_per_hour", "Price of one replica's GPU.", m)
        self.reference_price = _gauge("mistral_serve_reference_price_usd_per_1m_tokens",
                                      "Hosted-API reference price, output tokens.", m)
        # The same series the Router records per finished request; the replica adds the compute of
        # requests aborted by their client (the Router is gone by then). Tenants: from the Router.
        self.cost = _counter("mistral_serve_cost_usd", "Compute-seconds of requests x GPU $/s.",
                             ("model_name", "tenant"))
        for c in (self.preemptions, self.prefix_queries, self.prefix_hits, self.prompt_tokens, self.generation_tokens, self.busy, self.idle, self.idle_cost,
                  self.prompt_len_sum, self.gen_len_sum):
            _prime(c, self.tags)
        for reason in ("stop", "length", "abort"):
            _prime(self.success, {**self.tags, "finished_reason": reason})

    def set_prices(self, gpu_usd_per_hour: float, reference_usd_per_1m: float | None) -> None:
        self.gpu_price.set(gpu_usd_per_hour, tags=self.tags)
        if reference_usd_per_1m is not None:
            self.reference_price.set(reference_usd_per_1m, tags=self.tags)

    def set_engine_gauges(self, stats: EngineStats) -> None:
        # Re-set every loop: Ray evicts a gauge not set again within a few export intervals.
        self.quantization_info.set(1, tags=self.quantization_tags)
        self.running.set(stats.num_running, tags=self.tags)
        self.waiting.set(stats.num_waiting, tags=self.tags)
        self.kv_usage.set(stats.kv_usage, tags=self.tags)
        self.batch_capacity.set(stats.batch_capacity, tags=self.tags)

    def add(self, counter, value: float) -> None:
        if value > 0:
            counter.inc(value, tags=self.tags)

    def bill_aborted(self, tenant: str, cost_usd: float) -> None:
        if cost_usd > 0:
            self.cost.inc(cost_usd, tags={**self.tags, "tenant": tenant})

    def finished(self, reason: str, metrics) -> None:
        """One finished request (``RequestMetrics`` or None for an abort we did not see end)."""
        self.success.inc(1, tags={**self.tags, "finished_reason": reason})
        if metrics is None:
            return
        t = self.tags
        if metrics.ttft is not None:
            self.ttft.observe(metrics.ttft, tags=t)
        if metrics.e2e is not None:
            self.e2e.observe(metrics.e2e, tags=t)
        if metrics.queue_time is not None:
            self.queue_time.observe(metrics.queue_time, tags=t)
        for gap in metrics.inter_token_latencies:
            self.itl.observe(gap, tags=t)
        self.prompt_len.observe(metrics.num_prompt_tokens, tags=t)
        self.gen_len.observe(metrics.num_generation_tokens, tags=t)
        self.add(self.prompt_len_sum, metrics.num_prompt_tokens)
        self.add(self.gen_len_sum, metrics.num_generation_tokens)


class RouterMetrics:
    """Recorded by each Router replica: admission, in-flight, latency, tokens and cost by tenant."""

    def __init__(self, model_name: str, tenants: Iterable[str], soft_context_policy: str | None = None) -> None:
        self.model = model_name
        self.admitted = _counter("mistral_serve_router_requests_admitted", "Requests that passed admission.",
                                 ("model_name", "tenant"))
        self.rejected = _counter("mistral_serve_router_requests_rejected", "Rejected requests by reason.",
                                 ("model_name", "tenant", "reason"))
        self.in_flight = _gauge("mistral_serve_router_requests_in_flight", "Admitted and not yet finished.",
                                ("model_name",))
        self.latency = _histogram("mistral_serve_router_request_latency_seconds", "Whole HTTP request at the router.",
                                  ROUTER_LATENCY_BUCKETS, ("model_name", "status_code"))
        self.tokens = _counter("mistral_serve_tokens", "Tokens billed.", ("model_name", "tenant", "kind"))
        self.cost = _counter("mistral_serve_cost_usd", "Compute-seconds of requests x GPU $/s.",
                             ("model_name", "tenant"))
        self.soft_context = _counter("mistral_serve_router_soft_context_exceeded",
                                     "Requests above the soft context limit (warned or rejected).",
                                     ("model_name", "tenant", "policy"))
        self.in_flight.set(0, tags={"model_name": model_name})
        for tenant in tenants:
            _prime(self.admitted, {"model_name": model_name, "tenant": tenant})
            if soft_context_policy:
                _prime(self.soft_context, {"model_name": model_name, "tenant": tenant, "policy": soft_context_policy})

    def admit(self, tenant: str) -> None:
        self.admitted.inc(1, tags={"model_name": self.model, "tenant": tenant})

    def reject(self, tenant: str | None, reason: str) -> None:
        # Unauthenticated rejections carry an empty tenant (a label Prometheus treats as absent).
        self.rejected.inc(1, tags={"model_name": self.model, "tenant": tenant or "", "reason": reason})

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n, tags={"model_name": self.model})

    def observe_latency(self, seconds: float, status: int) -> None:
        self.latency.observe(seconds, tags={"model_name": self.model, "status_code": str(status)})

    def bill(self, tenant: str, prompt_tokens: int, generation_tokens: int, cost_usd: float | None,
             cached_tokens: int = 0) -> None:
        """``cached_tokens``: of ``prompt_tokens``, those served from the prefix cache (kind
        ``cached_prompt``, a subset of kind ``prompt``; their cost is the compute they took)."""
        if prompt_tokens > 0:
            self.tokens.inc(prompt_tokens, tags={"model_name": self.model, "tenant": tenant, "kind": "prompt"})
        if cached_tokens > 0:
            self.tokens.inc(cached_tokens, tags={"model_name": self.model, "tenant": tenant, "kind": "cached_prompt"})
        if generation_tokens > 0:
            self.tokens.inc(generation_tokens, tags={"model_name": self.model, "tenant": tenant, "kind": "generation"})
        if cost_usd:
            self.cost.inc(cost_usd, tags={"model_name": self.model, "tenant": tenant})

    def soft_context_exceeded(self, tenant: str, policy: str) -> None:
        self.soft_context.inc(1, tags={"model_name": self.model, "tenant": tenant, "policy": policy})
