"""``build_app(args)``: the Serve application — Router (ingress) → LLMReplica, plus the
AdmissionState replica that holds the tenants' token buckets for all routers. With
``router.colocate_engine`` there is no LLMReplica deployment: the Router runs the engine in its
own process (in_process_replica.py) and its actor takes the replica's CPUs, GPUs, runtime env
and health-check settings."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from mistral_serve.serving.config import AppArgs


def deployment_options(args: AppArgs) -> tuple[dict, dict]:
    """Options of the LLMReplica and Router deployments (a Serve config's `deployments:` wins)."""
    r = args.replicas
    actor = {"num_cpus": r.num_cpus}
    if r.num_gpus:
        actor["num_gpus"] = r.num_gpus
    runtime_env = dict(r.runtime_env or {})
    if r.worker_niceness is not None:
        # Read by each Ray worker when it starts: only the LLMReplica processes get it.
        runtime_env = _with_env_default(runtime_env, "RAY_worker_niceness", str(r.worker_niceness))
    if runtime_env:
        actor["runtime_env"] = runtime_env
    llm: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": args.replica_max_ongoing(),
        "max_queued_requests": args.replica_max_queued(),
        "health_check_period_s": r.health_check_period_s,
        "health_check_timeout_s": r.health_check_timeout_s,
        "graceful_shutdown_timeout_s": r.graceful_shutdown_timeout_s,
    }
    if r.autoscaling is not None:
        llm["autoscaling_config"] = r.autoscaling.ray_config(args.max_num_seqs)
    elif r.autoscaling_config:
        llm["autoscaling_config"] = r.autoscaling_config
    else:
        llm["num_replicas"] = r.num_replicas
    if r.request_router == "least_queue_depth":
        llm["request_router_config"] = RequestRouterConfig(
            request_router_class="mistral_serve.serving.request_router:LeastQueueDepthRouter",
            request_router_kwargs={"prefix_cache_routing": r.prefix_cache_routing},
            request_routing_stats_period_s=r.routing_stats_period_s,
            request_routing_stats_timeout_s=max(1.0, 5 * r.routing_stats_period_s),
        )
    else:
        llm["request_router_config"] = RequestRouterConfig(request_routing_stats_period_s=r.routing_stats_period_s)
    router = {
        "num_replicas": args.router.num_replicas,
        "max_ongoing_requests": args.router.max_ongoing_requests,
        "max_queued_requests": args.router.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=args.admission.retry_after_s),
        "ray_actor_options": {"num_cpus": args.router.num_cpus},
    }
    if args.router.colocate_engine:
        router["ray_actor_options"] = {**actor, "num_cpus": args.engine_process_cpus}
        for key in ("health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s"):
            router[key] = llm[key]
    if not args.router.user_code_thread:
        # Read by Serve when the Router's worker starts. With user code in its own thread, every
        # ASGI message of a stream crosses to Serve's loop (call_soon_threadsafe, a task and an
        # asyncio.wait each), and the two loops trade the GIL.
        options = router["ray_actor_options"]
        router["ray_actor_options"] = {**options, "runtime_env": _with_env_default(
            options.get("runtime_env"), "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")}
    return llm, router


def _with_env_default(runtime_env: dict | None, key: str, value: str) -> dict:
    """A copy of ``runtime_env`` whose ``env_vars`` hold ``key`` (a value set there already wins)."""
    out = dict(runtime_env or {})
    out["env_vars"] = {key: value, **(out.get("env_vars") or {})}
    return out


def build_app(args: dict | AppArgs | None = None) -> serve.Application:
    from mistral_serve.serving.replica import LLMReplica
    from mistral_serve.serving.admission_state import AdmissionState
    from mistral_serve.serving.router import Router

    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    plain = parsed.model_dump(mode="json")
    llm_opts, router_opts = deployment_options(parsed)
    llm = None if parsed.router.colocate_engine else LLMReplica.options(**llm_opts).bind(plain)
    state = AdmissionState.bind(plain) if parsed.admission.shared_state else None
    return Router.options(**router_opts).bind(llm, state, plain)
