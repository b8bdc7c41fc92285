"""Start and stop a local Ray + the app: shared by ``mistral-serve serve``, the HTTP benchmark
and the test fixture ``live_server``."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

APP_NAME = "mistral"

# Ray Serve background work, made less frequent for small CPU-only machines, where every
# wakeup of Ray's bookkeeping steals a core from the engine's OpenMP threads (docs/serving.md,
# "Performance"): the controller loop (default 0.1 s), Serve's own metrics cache flush
# (default 100 ms), and the event-loop monitor (default 5 s).
QUIET_RAY_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "60",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    base_url: str
    model: str
    metrics_url: str
    host: str
    port: int
    app_name: str = APP_NAME
    args: dict[str, Any] = field(default_factory=dict)
    api_keys: dict[str, str] = field(default_factory=dict)  # tenant -> plain key (tests)

    def stop(self) -> None:
        stop_local()


def start_local(
    args: dict[str, Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    metrics_port: int | None = None,
    metrics_report_interval_ms: int | None = None,
    app_name: str = APP_NAME,
    ready_timeout_s: float = 300.0,
    quiet_ray: bool = False,
) -> LocalServer:
    """A fresh local Ray (dashboard off) with Serve on host:port running ``build_app(args)``.
    ``quiet_ray`` applies QUIET_RAY_ENV (unless those variables are already set)."""
    import ray
    from ray import serve

    from mistral_serve.serving import build_app
    from mistral_serve.serving.config import AppArgs

    parsed = AppArgs.model_validate(args)
    metrics_port = metrics_port or free_port()
    system_config = {}
    if metrics_report_interval_ms:
        system_config["metrics_report_interval_ms"] = metrics_report_interval_ms
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    if quiet_ray:  # inherited by the raylet and every Ray worker it starts
        for key, value in QUIET_RAY_ENV.items():
            os.environ.setdefault(key, value)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config=system_config or None,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(parsed), name=app_name, route_prefix="/", blocking=False)
        want = parsed.replicas.num_replicas if isinstance(parsed.replicas.num_replicas, int) else 1
        _wait_ready(f"http://{_client_host(host)}:{port}/ready", ready_timeout_s, want)
    except BaseException:
        stop_local()
        raise
    return LocalServer(
        base_url=f"http://{_client_host(host)}:{port}",
        model=parsed.model_name,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        host=host,
        port=port,
        app_name=app_name,
        args=parsed.model_dump(mode="json"),
    )


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _wait_ready(url: str, timeout_s: float, replicas: int = 1) -> None:
    """Until the router answers /ready and sees ``replicas`` LLMReplica replicas running."""
    import json

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200 and json.loads(r.read()).get("replicas", 0) >= replicas:
                    return
        except Exception as exc:  # noqa: BLE001
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s: {last!r}")


def stop_local() -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
