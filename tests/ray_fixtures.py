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
        "replicas": {"num_replicas": NUM_REPLICAS, "num_cpus": 0.5, "stall_timeout_s": 60,
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
