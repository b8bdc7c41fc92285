"""Session-scoped live server: one local Ray cluster (dashboard off) running the app with two
LLMReplica replicas of the embedded tiny model on CPU, behind real HTTP.

``live_server`` yields a ``LocalServer`` (mistral_serve/serving/local.py) with
``base_url``, ``model``, ``metrics_url`` (Ray's Prometheus endpoint), ``app_name``, ``args``
and ``api_keys`` (tenant -> key) for the tenants configured below. Requests without a key are
served as tenant ``anonymous`` (unlimited), so load tests need no key.

Enabled in tests/conftest.py with ``pytest_plugins = ["ray_fixtures"]``.
"""

from __future__ import annotations

import hashlib
import os

import pytest

TEST_KEYS = {"alpha": "sk-test-alpha-0123456789", "beta": "sk-test-beta-0123456789", "gamma": "sk-test-gamma-0123"}
MAX_MODEL_LEN = 512
SOFT_LIMIT = 448
MAX_NUM_SEQS = 4
NUM_REPLICAS = 2
MAX_BODY_BYTES = 64 * 1024
MAX_WAITING = 8


def live_server_args() -> dict:
    return {
        "model": "tiny",
        "engine": {
            "device": "cpu",
            "dtype": "float32",
            "max_num_seqs": MAX_NUM_SEQS,
            "max_model_len": MAX_MODEL_LEN,
            "kv_cache_memory_bytes": 64 << 20,
            "num_threads": 1,
        },
        # Autoscaled as in production (queue-depth policy, serving/autoscaling.py), pinned at
        # NUM_REPLICAS so tests see a fixed count; Ray then also exports its autoscaling gauges.
        "replicas": {"num_replicas": NUM_REPLICAS, "num_cpus": 0.5, "stall_timeout_s": 60,
                     "autoscaling": {"min_replicas": NUM_REPLICAS, "max_replicas": NUM_REPLICAS},
                     "health_check_period_s": 2, "routing_stats_period_s": 1},
        "router": {"num_replicas": 1, "num_cpus": 0.25, "status_poll_interval_s": 1},
        "admission": {
            "api_keys_env": None,
            "allow_anonymous": True,
            "tenants": [
                {"name": "alpha", "api_keys": [TEST_KEYS["alpha"]], "requests_per_minute": 10000},
                {"name": "beta", "api_keys": [TEST_KEYS["beta"]], "requests_per_minute": 3},
                # stored as a digest only, as a production config would
                {"name": "gamma", "api_keys": ["sha256:" + hashlib.sha256(TEST_KEYS["gamma"].encode()).hexdigest()],
                 "tokens_per_minute": 400},
            ],
            "max_body_bytes": MAX_BODY_BYTES,
            "soft_max_context_tokens": SOFT_LIMIT,
            "soft_context_policy": "reject",
            "max_waiting_requests": MAX_WAITING,
            "queue_timeout_s": 60,
            "request_timeout_s": 120,
        },
        "cost": {"gpu_price_usd_per_hour": 2.49, "reference_price_usd_per_1m_output_tokens": 0.25},
    }


FAULT_APP = "faults"


def fault_server_args() -> dict:
    """A second app for destructive tests (tests/test_reliability.py, test_security.py): small
    batches so requests queue, fast health checks, a short stall timeout, the test hooks
    (LLMReplica.inject_fault / recent_prompts) and the opt-in redacted prompt log."""
    return {
        "model": "tiny",
        "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": 2, "max_model_len": MAX_MODEL_LEN,
                   "kv_cache_memory_bytes": 32 << 20, "num_threads": 1},
        "replicas": {"num_replicas": 2, "num_cpus": 0.1, "stall_timeout_s": 3, "health_check_period_s": 1,
                     "health_check_timeout_s": 5, "graceful_shutdown_timeout_s": 30, "routing_stats_period_s": 0.5,
                     "test_hooks": True},
        "router": {"num_replicas": 1, "num_cpus": 0.05, "status_poll_interval_s": 0.5},
        # Count bound only: these tests kill and wedge replicas on purpose, and the time bound
        # (max_queue_wait_s, on by default) would rightly refuse with 429 while nothing starts;
        # what they check is the retry and failure path (200 or 503).
        "admission": {"api_keys_env": None, "max_waiting_requests": 64, "max_queue_wait_s": None, "queue_timeout_s": 60,
                      "request_timeout_s": 120, "log_prompts": True},
    }


def deploy_app(live, name: str, args: dict, ready_replicas: int, timeout_s: float = 300.0):
    """Deploy ``build_app(args)`` as another application (route prefix ``/<name>``, reached
    through Ray's proxy) on the session cluster of ``live`` and wait until its router sees
    ``ready_replicas`` replicas."""
    from ray import serve

    from mistral_serve.serving import build_app
    from mistral_serve.serving.config import AppArgs
    from mistral_serve.serving.local import LocalServer, _wait_ready

    parsed = AppArgs.model_validate(args)
    serve.run(build_app(parsed), name=name, route_prefix=f"/{name}", blocking=False)
    base_url = f"{live.proxy_url}/{name}"
    _wait_ready(base_url + "/ready", timeout_s, ready_replicas)
    return LocalServer(base_url=base_url, model=parsed.model_name, metrics_url=live.metrics_url, host=live.host,
                       port=live.port, app_name=name, args=parsed.model_dump(mode="json"), proxy_url=live.proxy_url)


@pytest.fixture(scope="session")
def fault_server(live_server):
    """The ``faults`` app (fault_server_args) beside ``live_server`` on the same cluster."""
    from ray import serve

    server = deploy_app(live_server, FAULT_APP, fault_server_args(), ready_replicas=2)
    try:
        yield server
    finally:
        try:
            serve.delete(FAULT_APP)
        except Exception:  # noqa: BLE001 - the cluster may already be going away
            pass


@pytest.fixture(scope="session")
def live_server():
    pytest.importorskip("ray")
    from mistral_serve.serving.local import free_port, start_local, stop_local

    os.environ.pop("MISTRAL_SERVE_API_KEYS", None)
    server = start_local(live_server_args(), port=free_port(), num_cpus=2, metrics_report_interval_ms=1000)
    server.api_keys = dict(TEST_KEYS)
    try:
        yield server
    finally:
        stop_local()
