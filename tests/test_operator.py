"""What a new operator meets when running ``mistral-serve serve`` and ``serve deploy``
(issue 14): a fixed metrics port, a stdlib-only start-up example, Ray bound to 127.0.0.1,
clean start/stop logs, fail-fast resource arithmetic, Ctrl-C while waiting, and the
documented ``ray start --head`` + ``serve deploy`` steps with Ray 2.60's token auth.

Ports: HTTP 9300-9399, metrics 9400-9499 (other Ray clusters on the machine use 8000-8100
and 18000-18200).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    exe = shutil.which("mistral-serve")
    return [exe, "serve"] if exe else [sys.executable, "-c", "import sys; from mistral_serve.cli import main; "
                                                             "sys.exit(main())", "serve"]


# ---- unit: no Ray -------------------------------------------------------------------------------


def test_cli_defaults_fixed_metrics_port_and_stdlib_example():
    from mistral_serve.serving.cli import CURL, DEFAULT_METRICS_PORT, parse_args

    assert parse_args([]).metrics_port == DEFAULT_METRICS_PORT == 8080
    text = CURL.format(model="tiny", url="http://127.0.0.1:9300", metrics="http://127.0.0.1:8080/metrics",
                       auth="", key="anything")
    assert "curl http://127.0.0.1:9300/v1/completions" in text
    assert "http://127.0.0.1:8080/metrics" in text
    assert "import openai" not in text and "from openai" not in text  # a plain install lacks it
    assert "pip install openai" in text and "optional" in text


def test_resource_arithmetic_message():
    from mistral_serve.serving.config import AppArgs
    from mistral_serve.serving.local import InsufficientResources, check_resources

    parsed = AppArgs.model_validate({"replicas": {"num_replicas": 1, "num_cpus": 2}})
    with pytest.raises(InsufficientResources) as info:
        check_resources(parsed, 2.0)
    assert "LLMReplica 1 x 2 + Router 1 x 0.25 = 2.25 CPUs needed" in str(info.value)
    assert "has 2" in str(info.value)
    check_resources(AppArgs.model_validate({"replicas": {"num_cpus": 1.75}}), 2.0)  # fits exactly
    auto = AppArgs.model_validate({"replicas": {"num_cpus": 1, "autoscaling": {"min_replicas": 2, "max_replicas": 4}}})
    with pytest.raises(InsufficientResources, match=r"LLMReplica 2 x 1 \+ Router 1 x 0.25 = 2.25"):
        check_resources(auto, 2.0)
    gpu = AppArgs.model_validate({"replicas": {"num_replicas": 2, "num_gpus": 1}})
    with pytest.raises(InsufficientResources, match=r"LLMReplica 2 x 1 = 2 GPUs needed, but .* has 1"):
        check_resources(gpu, 8.0, 1.0)


class _FakeMetric:
    def __init__(self, name, *args, **kwargs):
        self.name, self.values = name, []

    def inc(self, value, tags=None):
        assert value > 0
        self.values.append(value)

    def _record(self, value, tags=None):
        self.values.append(value)

    observe = set = _record


def test_token_histograms_export_exact_sums(monkeypatch):
    """Ray 2.60 rebuilds a histogram's _sum from bucket midpoints (7 tokens count 7.5): the exact
    sums travel as counters, equal to what the histograms observed."""
    from types import SimpleNamespace

    from mistral_serve.serving import metrics

    for fn in ("_counter", "_gauge"):
        monkeypatch.setattr(metrics, fn, lambda name, desc, tags: _FakeMetric(name))
    monkeypatch.setattr(metrics, "_histogram", lambda name, desc, buckets, tags: _FakeMetric(name))
    m = metrics.EngineMetrics("tiny", 2048)
    lengths = [(7, 3), (13, 16), (65, 1)]
    for prompt, gen in lengths:
        m.finished("stop", SimpleNamespace(ttft=0.1, e2e=0.2, queue_time=0.0, inter_token_latencies=[0.01],
                                           num_prompt_tokens=prompt, num_generation_tokens=gen))
    m.finished("abort", None)
    assert sum(m.prompt_len_sum.values) == sum(m.prompt_len.values) == 85
    assert sum(m.gen_len_sum.values) == sum(m.gen_len.values) == 20
    assert all(isinstance(v, int) for v in m.prompt_len_sum.values[1:])
    assert metrics.EXACT_SUM_SERIES == ["ray_mistral_serve_request_prompt_tokens_exact_sum_total",
                                        "ray_mistral_serve_request_generation_tokens_exact_sum_total"]


@pytest.mark.parametrize("flags, arithmetic", [
    ([], "Router holding the engine (replicas.num_cpus 2 + router.num_cpus 0.25) 1 x 2.25 = 2.25 CPUs needed"),
    (["--separate-replica"], "LLMReplica 1 x 2 + Router 1 x 0.25 = 2.25 CPUs needed"),
])
def test_impossible_num_cpus_fails_fast_with_the_arithmetic(flags, arithmetic):
    t0 = time.monotonic()
    proc = subprocess.run(_cli() + ["--num-cpus", "2", "--ray-cpus", "2", "--port", "9310", "--metrics-port", "9410",
                                    *flags], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert f"{arithmetic}, but the local Ray (num_cpus=2) has 2" in proc.stderr, proc.stderr
    assert elapsed < 30, elapsed  # mostly interpreter + import time; Ray is never started
    assert "Traceback" not in proc.stderr


# ---- live: the CLI as a user runs it ------------------------------------------------------------


def _tree(pid: int) -> set[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return {pid} | {c.pid for c in p.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


class _Reader:
    """Collects a subprocess's merged output on a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self._lock = proc, [], threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.text:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not printed (rc={self.proc.poll()}):\n{self.text}")
            time.sleep(0.2)


def _start_cli(*args: str) -> tuple[subprocess.Popen, _Reader]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli() + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return proc, _Reader(proc)


def _stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout_s: float = 90) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _wildcard_listeners(pids: set[int]) -> list[str]:
    import psutil

    out = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.ip in ("0.0.0.0", "::", ""):
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                name = "?"
            out.append(f"{c.laddr.ip}:{c.laddr.port} {name} pid={c.pid}")
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_serve_cli_binds_localhost_prints_metrics_and_reads_clean():
    pytest.importorskip("psutil")
    http_port, metrics_port = 9311, 9411
    proc, out = _start_cli("--port", str(http_port), "--metrics-port", str(metrics_port), "--max-model-len", "512",
                           "--kv-cache-memory-bytes", str(64 << 20))
    pids: set[int] = set()
    try:
        out.wait_for("Press Ctrl-C to stop.", 300)
        pids = _tree(proc.pid)
        assert len(pids) > 3  # gcs_server, raylet, agents, workers
        assert f"http://127.0.0.1:{metrics_port}/metrics" in out.text
        wild = _wildcard_listeners(pids)
        assert not wild, "Ray ports on all interfaces:\n" + "\n".join(wild)
        body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
            assert r.status == 200
    finally:
        # SIGTERM: what kill, systemd and Kubernetes send (Ctrl-C's SIGINT: the test below).
        # Ray's own SIGTERM handler once made this print a stack trace and abort (exit 134).
        rc = _stop(proc, signal.SIGTERM)
    assert rc == 0, out.text
    text = out.text
    assert "stopped." in text
    for noise in ("Connecting to existing Serve app", "will not be applied", "graceful_shutdown failed",
                  "metrics_interval_s", "Traceback", "SIGTERM received"):
        assert noise not in text, f"{noise!r} in the output:\n{text}"
    time.sleep(2)
    import psutil

    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left after stop: {left}"


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_while_waiting_for_replicas_stops_ray():
    """SIGINT while Serve still waits for the replicas (here: while Ray/Serve start) ends the
    wait, shuts Ray down and exits."""
    pytest.importorskip("psutil")
    proc, out = _start_cli("--port", "9312", "--metrics-port", "9412")
    try:
        out.wait_for("Started Serve", 180)  # inside start_local: Serve up, replicas not yet ready
        pids = _tree(proc.pid)
        t0 = time.monotonic()
        rc = _stop(proc, timeout_s=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Press Ctrl-C to stop." not in out.text or rc == 0
    assert rc in (0, 130), out.text
    assert time.monotonic() - t0 < 90
    time.sleep(2)
    import psutil

    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left after Ctrl-C: {left}\n{out.text}"


# ---- ray start --head + serve deploy, as README.md / docs/serving.md say --------------------------

GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 9350, 9351, 9352
NODE_MANAGER_PORT, OBJECT_MANAGER_PORT, RUNTIME_ENV_PORT = 9353, 9354, 9355
AGENT_GRPC_PORT, AGENT_HTTP_PORT, SERVE_HTTP_PORT = 9356, 9357, 9340
METRICS_PORT = 9450
WORKER_PORTS = (9360, 9399)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_start_then_serve_deploy_with_token_auth(tmp_path):
    """The documented steps: a token (here in a private file instead of ~/.ray/auth_token),
    RAY_AUTH_MODE=token exported for both ``ray start --head`` and ``serve deploy``. The
    repo-root serve_config.yaml is deployed unchanged but for its HTTP port (8000 is another
    engineer's range on shared machines)."""
    ray_exe, serve_exe = shutil.which("ray"), shutil.which("serve")
    if not ray_exe or not serve_exe:
        pytest.skip("ray / serve CLIs not on PATH")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    temp_dir = Path("/tmp") / f"ray-op-{os.getpid()}"  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    address = ["--address", f"http://127.0.0.1:{DASHBOARD_PORT}"]  # the default is :8265
    config = (REPO / "serve_config.yaml").read_text()
    assert re.search(r"^  port: 8000$", config, flags=re.M)
    (tmp_path / "serve_config.yaml").write_text(re.sub(r"^  port: 8000$", f"  port: {SERVE_HTTP_PORT}", config,
                                                       flags=re.M))
    start = [ray_exe, "start", "--head", f"--temp-dir={temp_dir}", f"--port={GCS_PORT}",
             f"--dashboard-port={DASHBOARD_PORT}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={CLIENT_PORT}", f"--node-manager-port={NODE_MANAGER_PORT}",
             f"--object-manager-port={OBJECT_MANAGER_PORT}", f"--runtime-env-agent-port={RUNTIME_ENV_PORT}",
             f"--dashboard-agent-grpc-port={AGENT_GRPC_PORT}", f"--dashboard-agent-listen-port={AGENT_HTTP_PORT}",
             f"--metrics-export-port={METRICS_PORT}", f"--min-worker-port={WORKER_PORTS[0]}",
             f"--max-worker-port={WORKER_PORTS[1]}", "--num-cpus=2", "--disable-usage-stats"]
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        # Without the token mode the CLI sends no token: the failure the issue reported.
        no_auth = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE",)}
        refused = subprocess.run([serve_exe, "status", *address], env=no_auth,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "uthentication" in refused.stdout + refused.stderr
        deployed = subprocess.run([serve_exe, "deploy", *address, str(tmp_path / "serve_config.yaml")], env=env,
                                  capture_output=True, text=True, timeout=180, cwd=REPO)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        deadline, last = time.monotonic() + 420, None
        body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4}).encode()
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{SERVE_HTTP_PORT}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    if r.status == 200:
                        assert json.loads(r.read())["choices"]
                        break
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
            time.sleep(2)
        else:
            status = subprocess.run([serve_exe, "status", *address], env=env, capture_output=True, text=True, timeout=60)
            raise AssertionError(f"no 200 from /v1/completions: {last!r}\n{status.stdout}{status.stderr}")
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30) as r:
            assert r.status == 200
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster(temp_dir: Path) -> None:
    """``ray stop`` for this cluster only. ``ray stop`` itself ends every Ray process on the
    machine (it matches process names, with no address or temp-dir option), which would take
    down other clusters sharing it; this ends the processes started with our ``--temp-dir``
    (GCS, raylet, dashboard, agents, monitors) and their children (the workers), SIGTERM first."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in p.info["cmdline"] or ()):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
