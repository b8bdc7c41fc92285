"""Start and stop a local Ray + the app: shared by ``mistral-serve serve``, the HTTP benchmark
and the test fixture ``live_server``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
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


# Ray binds every port of a node (GCS, raylet, workers, metrics agent) to all interfaces unless
# the node's IP is 127.0.0.1, which ``ray.init`` never picks on Linux: it resolves a loopback
# ``_node_ip_address`` to the machine's address. Ray 2.60 only keeps 127.0.0.1 where
# ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off (ray/_private/services.py get_node_ip_address,
# the macOS/Windows single-machine mode), and then its gRPC servers and the metrics agent
# listen on 127.0.0.1 only. The HTTP proxy still listens where ``host`` says.
LOCALHOST_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Logged by serve.run() because it calls serve.start() again after ours (Ray 2.60): our
# http_options were applied by the first call, so on a fresh start the line is only noise.
_RESTART_NOISE = "Connecting to existing Serve app"


class InsufficientResources(RuntimeError):
    """The deployments ask for more CPUs/GPUs than the local Ray has: Serve would wait forever."""


def replica_demand(parsed) -> list[tuple[str, int, float, float]]:
    """(deployment, replicas at start, CPUs each, GPUs each) of ``build_app(parsed)``."""
    r = parsed.replicas
    if r.autoscaling is not None:
        n = r.autoscaling.initial_replicas if r.autoscaling.initial_replicas is not None else r.autoscaling.min_replicas
    elif r.autoscaling_config:
        cfg = r.autoscaling_config
        n = cfg.get("initial_replicas") if cfg.get("initial_replicas") is not None else cfg.get("min_replicas", 1)
    elif isinstance(r.num_replicas, int):
        n = r.num_replicas
    else:  # "auto": Ray's autoscaling defaults start at min_replicas = 1
        n = 1
    if parsed.router.colocate_engine:  # one Router holding the engine (app.py)
        name = f"Router holding the engine (replicas.num_cpus {r.num_cpus:g} + router.num_cpus {parsed.router.num_cpus:g})"
        out = [(name, 1, float(parsed.engine_process_cpus), float(r.num_gpus))]
    else:
        out = [("LLMReplica", int(n), float(r.num_cpus), float(r.num_gpus)),
               ("Router", parsed.router.num_replicas, float(parsed.router.num_cpus), 0.0)]
    if parsed.admission.shared_state:
        out.append(("AdmissionState", 1, 0.0, 0.0))  # num_cpus=0 (router.py)
    return out  # Serve's controller and proxy actors take 0 CPUs


def check_resources(parsed, cpus: float, gpus: float | None = None, source: str = "the local Ray") -> None:
    """Raise ``InsufficientResources`` with the arithmetic when the app cannot be placed."""
    demand = [d for d in replica_demand(parsed) if d[1] > 0]
    problems = []
    for kind, column, have in (("CPU", 2, cpus), ("GPU", 3, gpus)):
        if have is None:
            continue
        asks = [(d[0], d[1], d[column]) for d in demand if d[column] > 0]
        need = sum(n * each for _, n, each in asks)
        if need > have + 1e-4:  # Ray accounts resources in units of 1e-4
            terms = " + ".join(f"{name} {n} x {each:g}" for name, n, each in asks)
            problems.append(f"{terms} = {need:g} {kind}s needed, but {source} has {have:g}")
    if problems:
        raise InsufficientResources(
            "the app can never be placed: " + "; ".join(problems) + ". Lower the per-replica share "
            "(--num-cpus / replicas.num_cpus, router.num_cpus, --num-gpus) or the replica count, or give "
            "Ray more (--ray-cpus).")


# The Router answers HTTP itself on the user's port (Ray's direct ingress): the proxy hop, on
# every streamed message of every request, is gone. Measured with `mistral-serve bench serve
# --scenario burst` against one server through both ports: proxy CPU 25 -> 0.7 ms and Router CPU
# 42 -> 24 ms per request. Ray's proxy still starts (Ray disables a replica's own HTTP server
# along with it), on a spare localhost port. One Router only: with more, each takes a port of
# its own and a load balancer in front (Ray's HAProxy mode) would be needed; they keep the proxy.
# Further apps on the same cluster (tests deploy several) are reached through the proxy at their
# route prefix; their Routers take the next ports of the range. Ports are not quarantined and
# draining is not held open: no load balancer needs to notice a restarted Router here, and a
# stop must not wait Ray's 30 s draining floor.
DIRECT_INGRESS_EXTRA_PORTS = 15


def direct_ingress_env(port: int) -> dict[str, str]:
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1 + DIRECT_INGRESS_EXTRA_PORTS),  # exclusive
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def _set_env(values: dict[str, str]) -> None:
    """Set variables for every Ray process started from here, keeping what they replaced for
    ``_restore_env`` (the first value seen wins, so a second call cannot lose the original)."""
    for key, value in values.items():
        _previous_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value


def _bind_ray_to_localhost() -> None:
    from ray._private import ray_constants

    _set_env(LOCALHOST_RAY_ENV)
    global _previous_cluster_flag
    if _previous_cluster_flag is None:
        _previous_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: this process may have imported Ray already


_previous_env: dict[str, str | None] = {}
_previous_cluster_flag: bool | None = None


def _restore_env() -> None:
    global _previous_cluster_flag
    if _previous_cluster_flag is not None:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER, _previous_cluster_flag = _previous_cluster_flag, None
    while _previous_env:
        key, value = _previous_env.popitem()
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def serve_grpc_on_localhost() -> None:
    """Ray ``worker_process_setup_hook`` of a localhost-only cluster (``start_local``): Ray
    Serve 2.60 binds each replica's inter-deployment gRPC server to ``[::]:0`` (all
    interfaces, ray/serve/_private/replica.py ``_on_initialized``) whatever the node IP; this
    makes it 127.0.0.1, the node IP its callers use here."""
    try:
        from ray.serve._private import replica
    except Exception:  # noqa: BLE001 - not a Serve worker, or another Ray: leave it alone
        return
    original = replica.add_port_to_grpc_server
    if getattr(original, "_mistral_localhost", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._mistral_localhost = True
    replica.add_port_to_grpc_server = add_port


class _DropLine(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on host:port. SO_REUSEADDR as the servers themselves bind
    (asyncio, uvicorn): connections of a stopped server left in TIME_WAIT (~60 s after a load
    test) do not keep a restart from binding, so they must not fail this check either."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


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
    proxy_url: str = ""  # Ray's proxy: every app at its route prefix (== base_url without direct ingress)

    def stop(self) -> None:
        stop_local()


@contextlib.contextmanager
def _python_signal_handlers_kept():
    """Keep the process's Python SIGINT/SIGTERM handlers over ``ray.init``. Ray's core worker
    installs its C++ failure handler for SIGTERM in the driver: a plain ``kill``, systemd's or
    Kubernetes' stop then printed a stack trace and aborted the process (exit 134) instead of
    running the CLI's clean shutdown. Python keeps its own record of the handler, so setting it
    again puts its trampoline back. Only the main thread may set handlers (elsewhere: unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


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
    localhost_only: bool = True,
) -> LocalServer:
    """A fresh local Ray (dashboard off) with Serve on host:port running ``build_app(args)``.
    ``quiet_ray`` applies QUIET_RAY_ENV (unless those variables are already set).
    ``localhost_only`` binds Ray's own ports (GCS, raylet, workers, metrics) to 127.0.0.1.
    Raises ``InsufficientResources`` at once when the deployments cannot fit in ``num_cpus``
    (or in what Ray detected), instead of waiting for a replica that can never start."""
    import ray
    from ray import serve

    from mistral_serve.serving import build_app
    from mistral_serve.serving.config import AppArgs

    parsed = AppArgs.model_validate(args)
    if num_cpus is not None:  # before Ray starts: fail in milliseconds
        check_resources(parsed, num_cpus, None, source=f"the local Ray (num_cpus={num_cpus:g})")
    if port_in_use(port, host):  # Ray would move a direct-ingress Router to the next port, or fail the proxy
        raise OSError(f"port {port} on {host} is already in use (another server, or one still stopping; "
                      "choose another with --port)")
    if metrics_port and port_in_use(metrics_port):
        raise OSError(f"metrics port {metrics_port} is already in use (choose another with --metrics-port)")
    metrics_port = metrics_port or free_port()
    system_config = {}
    if metrics_report_interval_ms:
        system_config["metrics_report_interval_ms"] = metrics_report_interval_ms
    if parsed.replicas.worker_niceness is not None:
        # Every worker, not only the replicas: the proxy and the Router are on every token's
        # path and answer every refusal. With the engine at 0 and them at Ray's 15 they got ~3%
        # of a busy core, and a 10x overload (`mistral-serve load overload`) left ~450 requests
        # in front of them, unanswered, while refusals lagged by seconds.
        system_config["worker_niceness"] = parsed.replicas.worker_niceness
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    if quiet_ray:  # inherited by the raylet and every Ray worker it starts
        for key, value in QUIET_RAY_ENV.items():
            os.environ.setdefault(key, value)
    runtime_env = None
    direct = parsed.router.direct_ingress and parsed.router.num_replicas == 1
    if direct:
        _set_env(direct_ingress_env(port))
    if localhost_only:
        _bind_ray_to_localhost()
        # Job-wide, so inherited by the Serve controller, proxies and every replica.
        runtime_env = {"worker_process_setup_hook": f"{__name__}.serve_grpc_on_localhost"}
    with _python_signal_handlers_kept():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _metrics_export_port=metrics_port,
            _system_config=system_config or None,
            runtime_env=runtime_env,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        have = ray.cluster_resources()
        check_resources(parsed, have.get("CPU", 0.0), have.get("GPU", 0.0))
        proxy_port = free_port(host) if direct else port
        serve.start(http_options={"host": host, "port": proxy_port})
        serve_logger = logging.getLogger("ray.serve")
        quiet = _DropLine(_RESTART_NOISE)
        serve_logger.addFilter(quiet)
        try:
            serve.run(build_app(parsed), name=app_name, route_prefix="/", blocking=False)
        finally:
            serve_logger.removeFilter(quiet)
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
        proxy_url=f"http://{_client_host(host)}:{proxy_port}",
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
    """Delete the Serve apps (their replicas drain within graceful_shutdown_timeout_s), then
    stop the local Ray, which ends Serve's controller and proxies with it. Not
    ``serve.shutdown()``: in Ray 2.60 its controller kills itself while the call is pending and
    the driver logs "Task ServeController.graceful_shutdown failed ... will be retried"."""
    import ray

    try:
        if not ray.is_initialized():
            return
        try:
            _delete_apps()
        finally:
            ray.shutdown()
    finally:
        _restore_env()


def _delete_apps() -> None:
    from ray import serve
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
    except Exception:  # noqa: BLE001 - Serve never started (start failed early)
        return
    try:
        names = list(serve.status().applications)
        if names:
            client.delete_apps(names, blocking=True)
    except Exception:  # noqa: BLE001 - the cluster is going away anyway
        pass
