"""Typed arguments of the application builder ``mistral_serve.serving:build_app``.

The same dict comes from ``serve_config.yaml`` (``applications[].args``), from
``mistral-serve serve`` and from the tests. Groups: ``model``/``served_model_name``,
``engine`` (every ``EngineArgs`` field but ``model``), ``replicas`` (LLMReplica deployment),
``router`` (Router deployment), ``admission``, ``cost``. As a shorthand for config files,
engine fields and the two prices may also be written at the top level (``max_num_seqs: 8``,
``gpu_price_usd_per_hour: 2.49``); the explicit group wins when both are given.

Deployment options written under ``deployments:`` in a Serve config file (num_replicas,
max_ongoing_requests, autoscaling_config, ray_actor_options, ...) override what the builder
sets, as Serve always does; the Router reads the live replica counts, so its per-replica
shares stay right either way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mistral_serve.engine.args import EngineArgs
from mistral_serve.serving.autoscaling import QueueDepthAutoscaling

TINY_SENTINEL = "tiny"
_ENGINE_FIELDS = set(EngineArgs.model_fields) - {"model"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TenantConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="tenant label value in metrics")
    api_keys: list[str] = Field(default_factory=list,
                                description="keys in plain text (dev only) or as 'sha256:<hex>'")
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0, description="prompt + max_tokens reserved per request")
    priority: int = Field(0, description="engine priority (lower is scheduled first)")


class AdmissionConfig(_Strict):
    tenants: list[TenantConfig] = Field(default_factory=list)
    api_keys_env: str | None = Field("MISTRAL_SERVE_API_KEYS",
                                     description="env var with 'tenant:key' pairs (read in each Router replica)")
    api_keys_file: str | None = Field(None, description="file with 'tenant:key' lines / JSON / YAML (k8s Secret)")
    allow_anonymous: bool | None = Field(
        None, description="serve requests without a key as tenant 'anonymous' (default: only when no key is configured)")
    anonymous: TenantConfig = Field(default_factory=lambda: TenantConfig(name="anonymous"),
                                    description="limits of the anonymous tenant")
    default_limits: TenantConfig = Field(default_factory=lambda: TenantConfig(name="default"),
                                         description="limits of tenants that only appear in the env/file keys")
    max_body_bytes: int = Field(4 << 20, ge=1024)
    soft_max_context_tokens: int | None = Field(None, ge=1)
    soft_context_policy: Literal["reject", "warn"] = "warn"
    max_waiting_requests: int | None = Field(
        None, ge=1, description="admitted requests not yet started, all routers together (default: 2 x batch capacity)")
    max_waiting_tokens: int | None = Field(None, ge=1, description="their prompt tokens, all routers together")
    max_queue_wait_s: float | None = Field(
        2.0, gt=0, description="the TTFT objective of admitted requests: refuse (429) a request expected to wait "
                               "more than 0.8 of this to start (first token), at the recent rate of starts; the "
                               "count bounds are a backstop; null: count bounds only")
    retry_after_s: float = Field(1.0, gt=0, description="smallest Retry-After sent with 429/503")
    request_timeout_s: float = Field(600.0, gt=0, description="deadline of a whole request")
    queue_timeout_s: float = Field(60.0, gt=0, description="longest wait for the first token")
    shared_state: bool = Field(True, description="tenant buckets in one AdmissionState replica for all routers")
    drain_file: str | None = Field(None, description="while this file exists the router drains (503)")
    log_prompts: bool = Field(False, description="log each request's prompt and completion, redacted and truncated "
                                                 "(serving/redact.py); off: neither is ever logged")


class CostConfig(_Strict):
    gpu_price_usd_per_hour: float = Field(2.49, ge=0, description="price of one LLMReplica's accelerator")
    reference_price_usd_per_1m_output_tokens: float | None = Field(None, ge=0)


class ReplicaConfig(_Strict):
    """The LLMReplica deployment."""

    num_replicas: int | Literal["auto"] = 1
    autoscaling: QueueDepthAutoscaling | None = Field(
        None, description="autoscale on the engines' queue depth (serving/autoscaling.py); replaces num_replicas")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="raw Ray autoscaling_config (Ray's own policy unless it names one); not with `autoscaling`")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env of the replicas (env_vars, ...)")
    worker_niceness: int | None = Field(
        0, ge=0, le=19, description="nice value of the replica processes (Ray starts workers at 15, below its own "
                                    "daemons); 0 lets the engine outrank Ray's bookkeeping; `mistral-serve serve` "
                                    "gives it to every Ray worker, proxy and Router included (k8s/: the "
                                    "RAY_worker_niceness env); null keeps Ray's")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="default: max_num_seqs + max(2, max_num_seqs // 4), the engine's batch plus headroom")
    max_queued_requests: int | None = Field(
        None, description="Ray's per-caller queue bound, a backstop behind the router's (default: 4 x max_ongoing)")
    stream_interval_ms: float = Field(10.0, ge=0, description="min gap between streamed messages of one request")
    stream_max_interval_ms: float = Field(
        200.0, ge=0, description="max gap between streamed messages of one request, however many streams are open")
    stream_messages_per_s: float = Field(
        150.0, ge=0, description="streamed messages per second this replica aims at in all: with S open streams each "
                                 "sends at most every S / this seconds (between the min and max gap); 0: every step")
    stall_timeout_s: float = Field(60.0, gt=0, description="check_health fails after this long without a step")
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    request_router: Literal["least_queue_depth", "power_of_two"] = "least_queue_depth"
    routing_stats_period_s: float = Field(1.0, gt=0)
    prefix_cache_routing: bool = Field(
        True, description="least_queue_depth only: send a request to the replica whose prefix cache holds the "
                          "longest part of its prompt, unless that replica is half a batch deeper than the "
                          "shallowest (serving/request_router.py)")
    metrics_interval_s: float = Field(1.0, gt=0)
    graceful_shutdown_timeout_s: float = 60.0
    test_hooks: bool = Field(False, description="tests only: enables LLMReplica.inject_fault and recent_prompts "
                                                "(DeploymentHandle methods, never HTTP routes)")

    @model_validator(mode="after")
    def _one_autoscaling(self) -> ReplicaConfig:
        if self.autoscaling is not None and self.autoscaling_config:
            raise ValueError("replicas: set `autoscaling` (queue depth) or `autoscaling_config` (raw Ray), not both")
        return self


class RouterConfig(_Strict):
    """The Router (ingress) deployment."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)
    max_queued_requests: int = Field(
        1024, ge=1, description="queued at each proxy beyond max_ongoing: a backstop answered by Ray with 503")
    status_poll_interval_s: float = Field(2.0, gt=0)
    direct_ingress: bool = Field(
        True, description="`mistral-serve serve` with one Router: the Router answers HTTP on the server's port itself "
                          "(Ray's direct ingress), so streamed tokens skip the proxy hop; `serve deploy` and KubeRay keep "
                          "Ray's proxy")
    user_code_thread: bool = Field(
        False, description="run the Router's code in a thread of its own, as Ray Serve does by default; off (ours): "
                           "on the replica's main event loop (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0), which "
                           "saves a cross-thread hop per streamed message, 11-22% of the Router's CPU per request "
                           "(docs/serving.md)")
    colocate_engine: bool = Field(
        False, description="run the one engine inside the Router's process (serving/in_process_replica.py) instead "
                           "of an LLMReplica deployment: no Ray message per request or per streamed chunk, and the "
                           "Router's actor takes the replica's CPUs and GPUs. Needs one Router and one fixed "
                           "replica (no autoscaling); `mistral-serve serve` turns it on in that case, `serve deploy` "
                           "and KubeRay keep separate replicas")


class AppArgs(_Strict):
    model: str = Field(TINY_SENTINEL, description="'tiny' (embedded model), a checkpoint dir or a hub repo id")
    served_model_name: str | None = Field(None, description="id in /v1/models (default: `model` as given)")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineArgs fields except model")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    cost: CostConfig = Field(default_factory=CostConfig)

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        engine = dict(data.get("engine") or {})
        for key in list(data):
            if key in _ENGINE_FIELDS:
                engine.setdefault(key, data.pop(key))
        data["engine"] = engine
        cost = dict(data.get("cost") or {})
        for key in ("gpu_price_usd_per_hour", "reference_price_usd_per_1m_output_tokens"):
            if key in data:
                cost.setdefault(key, data.pop(key))
        if cost:
            data["cost"] = cost
        return data

    @model_validator(mode="after")
    def _check_engine(self) -> AppArgs:
        self.engine_args("placeholder")  # raises ValidationError for a bad engine field
        return self

    @model_validator(mode="after")
    def _check_colocation(self) -> AppArgs:
        if self.router.colocate_engine and not self.single_engine:
            raise ValueError("router.colocate_engine needs one Router and one replica without autoscaling "
                             "(router.num_replicas: 1, replicas.num_replicas: 1)")
        return self

    # ---- derived -------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def single_engine(self) -> bool:
        """One Router and one fixed replica (no autoscaling): nothing to route between, so the
        engine may run in the Router's process (``router.colocate_engine``)."""
        r = self.replicas
        return (self.router.num_replicas == 1 and r.num_replicas == 1 and r.autoscaling is None
                and not r.autoscaling_config)

    @property
    def engine_process_cpus(self) -> float:
        """The CPUs Ray reserves for the process that hosts the engine: the LLMReplica's, or,
        with ``router.colocate_engine``, the Router's, which then holds the replica's share too."""
        return self.replicas.num_cpus + (self.router.num_cpus if self.router.colocate_engine else 0.0)

    def engine_args(self, model_dir: str) -> EngineArgs:
        """The replica's engine arguments. A served engine's CPU threads default to the CPUs Ray
        reserves for the process hosting it (``engine_process_cpus`` rounded up, at least 1), not
        to every core as offline: the Router, the replica's own loop and Ray share the machine,
        and an engine whose OpenMP threads outnumber its cores stalls at every barrier a preempted
        thread holds (2-core machine, tiny model, burst of 128 streams, a separate LLMReplica:
        1 thread 1,607-1,658 output tok/s, 2 threads 1,347-1,500). With the engine in the
        Router's process (1 + 0.25 CPUs: 2 threads) the serving path leaves the second core
        mostly free and 2 threads win (docs/serving.md)."""
        engine = dict(self.engine)
        engine.setdefault("num_threads", max(1, math.ceil(self.engine_process_cpus - 1e-9)))
        return EngineArgs(model=str(model_dir), **engine)

    @property
    def max_num_seqs(self) -> int:
        return self.engine_args("x").max_num_seqs

    def replica_max_ongoing(self) -> int:
        if self.replicas.max_ongoing_requests:
            return self.replicas.max_ongoing_requests
        seqs = self.max_num_seqs
        return seqs + max(2, seqs // 4)

    def replica_max_queued(self) -> int:
        if self.replicas.max_queued_requests is not None:
            return self.replicas.max_queued_requests
        return 4 * self.replica_max_ongoing()


def resolve_model(model: str) -> Path:
    """The checkpoint directory (builds the embedded tiny model on first use)."""
    if model == TINY_SENTINEL:
        from mistral_serve.model.tiny import ensure_tiny_model

        return ensure_tiny_model()
    from mistral_serve.model.loader import resolve_model_dir

    return resolve_model_dir(model)


_TOKENIZER_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "tekken.json",
                       "special_tokens_map.json", "tokenizer.model*"]


def resolve_tokenizer_dir(model: str) -> Path:
    """What the Router needs (config.json and tokenizer files) without downloading weights."""
    if model == TINY_SENTINEL:
        return resolve_model(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=_TOKENIZER_PATTERNS))


def router_max_model_len(args: AppArgs, config_max_positions: int) -> int:
    """The engine's own rule (llm_engine.py): the configured length capped by the model's."""
    configured = args.engine.get("max_model_len")
    return min(configured or config_max_positions, config_max_positions)
