"""Queue-depth autoscaling of LLMReplica (mistral_serve/serving/autoscaling.py).

- The policy's arithmetic, and the policy run through Ray's own wrapper (delays, bounds,
  cold start) with a real ``AutoscalingContext``: fast, no cluster.
- The demo, for real: a second application (tiny model on CPU, batch capacity 2, 1..3
  replicas, short delays and look-back) on the session's Ray cluster (``live_server``, the
  one ``ray.init`` of the test session), a bounded load ramp of real HTTP requests to
  127.0.0.1 — light, then heavy, then none — and the replica count sampled from the Serve
  controller. Replicas must stay at 1 under light load, reach 3 while the queue is deep and
  return to 1 after it drains, each within a bounded time. The timeline is written to
  ``load_tests/results/autoscaling-timeline.json`` (docs/serving.md has a table of a run).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mistral_serve.serving.autoscaling import POLICY_IMPORT_PATH, QueueDepthAutoscaling, QueueDepthPolicy
from mistral_serve.serving.config import AppArgs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "load_tests" / "results" / "autoscaling-timeline.json"


# ---- the policy, no cluster ----------------------------------------------------------------------


def _stats(replicas: dict | None = None, **by_name):
    """per_replica metrics as Ray hands them to the policy: {metric: {replica: mean value}}
    from {replica: (waiting, running, capacity, kv_usage)}."""
    replicas = {**(replicas or {}), **by_name}
    out: dict[str, dict] = {}
    for rid, (waiting, running, cap, kv) in replicas.items():
        out.setdefault("num_waiting", {})[rid] = waiting
        out.setdefault("num_running", {})[rid] = running
        out.setdefault("batch_capacity", {})[rid] = cap
        out.setdefault("kv_usage", {})[rid] = kv
        out.setdefault("queue_depth_per_capacity", {})[rid] = (waiting + running) / cap
    return out


def test_policy_scales_on_queue_depth_relative_to_batch_capacity():
    p = QueueDepthPolicy(batch_capacity=8, target_utilization=1.0)
    # One replica, batch full and 8 waiting: two batches of demand -> 2 replicas.
    assert p.decide(1, _stats(a=(8, 8, 8, 0.5)), 0, 16)[0] == 2
    # Batch not full, nothing waiting: stays.
    assert p.decide(1, _stats(a=(0, 6, 8, 0.3)), 0, 6)[0] == 1
    # Requests queued at the handles (replicas at max_ongoing_requests) count as demand.
    assert p.decide(1, _stats(a=(2, 8, 8, 0.5)), 14, 24)[0] == 3  # (10 + 14) / 8 = 3
    assert QueueDepthPolicy(8, count_handle_queue=False).decide(1, _stats(a=(2, 8, 8, 0.5)), 14, 24)[0] == 2
    # The replica's own capacity wins over the kwarg (a replica with another max_num_seqs).
    assert p.decide(1, _stats(a=(4, 4, 4, 0.5)), 0, 8)[0] == 2


def test_policy_kv_bound_batch_counts_as_full():
    p = QueueDepthPolicy(batch_capacity=8, target_utilization=1.0, kv_full_threshold=0.9)
    # KV cache full with 4 running and 4 waiting: the batch cannot grow, 2 batches of demand.
    assert p.decide(1, _stats(a=(4, 4, 8, 0.97)), 0, 8)[0] == 2
    # Same queue with free KV: one batch (8 slots) absorbs it.
    assert p.decide(1, _stats(a=(4, 4, 8, 0.5)), 0, 8)[0] == 1


def test_policy_downscale_hysteresis():
    p = QueueDepthPolicy(batch_capacity=8, target_utilization=1.0, downscale_utilization=0.5)
    # 3 replicas, 1.2 batches of demand in all: down to ceil(1.2 / 0.5) = 3 -> keeps 3,
    assert p.decide(3, _stats(a=(0, 4, 8, 0), b=(0, 3, 8, 0), c=(0, 2.6, 8, 0)), 0, 9.6)[0] == 3
    # 0.8 batches -> 2; idle -> 0 (Ray keeps min_replicas).
    assert p.decide(3, _stats(a=(0, 3, 8, 0), b=(0, 2, 8, 0), c=(0, 1.4, 8, 0)), 0, 6.4)[0] == 2
    assert p.decide(3, _stats(a=(0, 0, 8, 0), b=(0, 0, 8, 0), c=(0, 0, 8, 0)), 0, 0)[0] == 0
    # Without reports yet: Serve's ongoing requests, in batches.
    assert p.decide(1, {}, 0, 20)[0] == 3


def test_policy_args_validate_and_build_ray_config():
    a = AppArgs.model_validate({"max_num_seqs": 8, "replicas": {"autoscaling": {
        "max_replicas": 3, "look_back_period_s": 4, "metrics_interval_s": 0.5, "target_utilization": 0.75}}})
    cfg = a.replicas.autoscaling.ray_config(a.max_num_seqs)
    assert cfg["policy"] == {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": {
        "batch_capacity": 8, "target_utilization": 0.75, "kv_full_threshold": 0.95, "count_handle_queue": True,
        "hold_while_starting_s": 300.0}}
    assert (cfg["min_replicas"], cfg["max_replicas"]) == (1, 3)
    for bad in ({"min_replicas": 3, "max_replicas": 2}, {"min_replicas": 0},
                {"look_back_period_s": 5, "metrics_interval_s": 10},
                {"target_utilization": 0.5, "downscale_utilization": 0.8}, {"bogus": 1}):
        with pytest.raises(ValueError):
            QueueDepthAutoscaling.model_validate(bad)
    with pytest.raises(ValueError, match="not both"):
        AppArgs.model_validate({"replicas": {"autoscaling": {}, "autoscaling_config": {"min_replicas": 1}}})


def test_policy_through_rays_wrapper_delays_and_bounds():
    """Ray's deployment autoscaler calls the policy through ``_apply_autoscaling_config``:
    our decision, then Ray's up/down delays; the controller clamps to min/max."""
    pytest.importorskip("ray")
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    spec = QueueDepthAutoscaling(max_replicas=3, upscale_delay_s=0.3, downscale_delay_s=0.6,
                                 look_back_period_s=2, metrics_interval_s=0.5)
    config = AutoscalingConfig(**spec.ray_config(batch_capacity=4))
    policy = _apply_autoscaling_config(_resolve_policy_callable(config.policy))
    dep = DeploymentID(name="LLMReplica", app_name="t")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(3)]

    def ctx(n_running, target, depth, state, handle_requests=None, config=config):
        stats = _stats({ids[i]: (max(0.0, depth - 4), min(4.0, depth), 4, 0.2) for i in range(n_running)})
        return AutoscalingContext(
            deployment_id=dep, deployment_name="LLMReplica", app_name="t", current_num_replicas=n_running,
            target_num_replicas=target, running_replicas=ids[:n_running],
            total_num_requests=depth * n_running if handle_requests is None else handle_requests,
            total_queued_requests=0.0, aggregated_metrics=stats, raw_metrics=None,
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3, policy_state=state,
            last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(), config=config)

    state: dict = {}
    n, state = policy(ctx(1, 1, 12, state))  # 3 batches deep: wants 3, but the delay holds
    assert n == 1
    time.sleep(0.35)
    n, state = policy(ctx(1, 1, 12, state))
    assert n == 3
    # Two of the three still starting while the one running reports little demand (the
    # Routers' admission caps it): the target holds, past the downscale delay.
    for _ in range(3):
        n, state = policy(ctx(1, 3, 1, state))
        assert n == 3
        time.sleep(0.3)
    n, state = policy(ctx(3, 3, 0, state))  # all running, drained: wants down, the delay holds
    assert n == 3
    time.sleep(0.65)
    n, state = policy(ctx(3, 3, 0, state))
    assert n == 1  # Ray never goes below 1 except 1 -> 0; the controller clamps to min_replicas
    assert state["queue_depth"]["reporting_replicas"] == 3.0
    # A replica that never starts does not pin the target past hold_while_starting_s.
    stuck = QueueDepthAutoscaling(max_replicas=3, downscale_delay_s=0, look_back_period_s=2, metrics_interval_s=0.5,
                                  hold_while_starting_s=0.3)
    stuck_config = AutoscalingConfig(**stuck.ray_config(batch_capacity=4))
    stuck_policy = _apply_autoscaling_config(_resolve_policy_callable(stuck_config.policy))
    n, state = stuck_policy(ctx(1, 3, 0, {}, config=stuck_config))
    assert n == 3
    time.sleep(0.35)
    n, state = stuck_policy(ctx(1, 3, 0, state, config=stuck_config))
    assert n == 1
    # Zero replicas and a request waiting at a handle: Ray's cold-start path, no delay.
    assert policy(ctx(0, 0, 0, {}, handle_requests=1.0))[0] == 1
    assert policy(ctx(0, 0, 0, {}, handle_requests=0.0))[0] == 0


# ---- the demo on a live cluster ------------------------------------------------------------------

APP = "autoscale-demo"  # served under /autoscale-demo beside the live_server app
MODEL = "tiny-autoscale"
CAPACITY = 2
MAX_REPLICAS = 3
UPSCALE_DELAY_S = 2.0
DOWNSCALE_DELAY_S = 6.0
LOOK_BACK_S = 3.0
MAX_TOKENS = 64
HEAVY_CLIENTS = 10
LIGHT_S = 8.0
UP_DEADLINE_S = 90.0  # replica starts take 15-35 s on a loaded 2-core machine
DOWN_DEADLINE_S = 60.0
MAX_REQUESTS = 1500


def demo_args() -> dict:
    return {
        "model": "tiny",
        "served_model_name": MODEL,
        "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": CAPACITY, "max_model_len": 256,
                   "kv_cache_memory_bytes": 16 << 20, "num_threads": 1},
        "replicas": {
            "num_cpus": 0.1,
            "health_check_period_s": 2,
            "routing_stats_period_s": 0.5,
            "graceful_shutdown_timeout_s": 5,
            "autoscaling": {
                "min_replicas": 1, "max_replicas": MAX_REPLICAS, "target_utilization": 1.0,
                "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": DOWNSCALE_DELAY_S,
                "look_back_period_s": LOOK_BACK_S, "metrics_interval_s": 0.5,
            },
        },
        "router": {"num_replicas": 1, "num_cpus": 0.1, "status_poll_interval_s": 0.5},
        "admission": {"api_keys_env": None, "allow_anonymous": True, "max_waiting_requests": 64,
                      "queue_timeout_s": 90, "request_timeout_s": 120},
        "cost": {"gpu_price_usd_per_hour": 2.49},
    }


class _Load:
    """Closed-loop HTTP clients against the demo app; bounded by MAX_REQUESTS and by stop()."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.body = json.dumps({"model": MODEL, "prompt": "Count slowly:", "max_tokens": MAX_TOKENS,
                                "ignore_eos": True, "temperature": 0}).encode()
        self.lock = threading.Lock()
        self.sent = self.ok = self.rejected = self.failed = 0
        self.active = 0
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def _one(self) -> float:
        """Sends one request; returns how long to back off (a refusal's Retry-After, else 0)."""
        req = urllib.request.Request(self.url, data=self.body, headers={"content-type": "application/json"})
        backoff = 0.0
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                json.loads(r.read())
                outcome = "ok"
        except urllib.error.HTTPError as exc:
            outcome = "rejected" if exc.code in (429, 503) else "failed"
            if outcome == "rejected":  # as a real client does: a refused request is retried later
                backoff = min(float(exc.headers.get("Retry-After") or 1.0), 2.0)
        except Exception:  # noqa: BLE001
            outcome = "failed"
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
        return backoff

    def _client(self, stop: threading.Event) -> None:
        with self.lock:
            self.active += 1
        try:
            while not stop.is_set():
                with self.lock:
                    if self.sent >= MAX_REQUESTS:
                        return
                    self.sent += 1
                stop.wait(self._one())
        finally:
            with self.lock:
                self.active -= 1

    def set_clients(self, n: int) -> None:
        while len(self.threads) > n:
            t, stop = self.threads.pop()
            stop.set()
        while len(self.threads) < n:
            stop = threading.Event()
            t = threading.Thread(target=self._client, args=(stop,), daemon=True)
            t.start()
            self.threads.append((t, stop))

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t, _ in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.threads = [(t, s) for t, s in self.threads if t.is_alive()]


class _Sampler(threading.Thread):
    """Replica states of the demo's LLMReplica from the Serve controller, every 0.5 s."""

    def __init__(self, load: _Load, t0: float) -> None:
        super().__init__(daemon=True)
        self.load, self.t0 = load, t0
        self.samples: list[dict] = []
        self.phase = "deploy"
        self.stop_event = threading.Event()

    def run(self) -> None:
        from ray import serve

        while not self.stop_event.is_set():
            try:
                dep = serve.status().applications[APP].deployments["LLMReplica"]
                states = {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}
                trigger = str(getattr(dep.status_trigger, "value", dep.status_trigger))
            except Exception:  # noqa: BLE001 - app being deployed/deleted
                states, trigger = {}, "unknown"
            with self.load.lock:
                load = {"clients": self.load.active, "sent": self.load.sent, "ok": self.load.ok,
                        "rejected": self.load.rejected, "failed": self.load.failed}
            self.samples.append({"t": round(time.monotonic() - self.t0, 2), "phase": self.phase,
                                 "running": states.get("RUNNING", 0), "starting": states.get("STARTING", 0),
                                 "stopping": states.get("STOPPING", 0), "trigger": trigger, **load})
            self.stop_event.wait(0.5)

    def running(self) -> int:
        return self.samples[-1]["running"] if self.samples else 0

    def wait_for(self, pred, timeout: float) -> float | None:
        """Seconds until pred(last sample) held, or None at the deadline."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.samples and pred(self.samples[-1]):
                return time.monotonic() - start
            time.sleep(0.25)
        return None


def _controller_log_mentions(text: str) -> bool:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return any(text in p.read_text(errors="replace") for p in logs.glob("controller_*.log"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replicas_follow_the_queue_up_and_down(live_server):
    from ray import serve

    from ray_fixtures import deploy_app

    t0 = time.monotonic()
    demo = deploy_app(live_server, APP, demo_args(), ready_replicas=1, timeout_s=120)
    load = _Load(demo.base_url + "/v1/completions")
    sampler = _Sampler(load, t0)
    sampler.start()
    result: dict = {"config": demo_args()["replicas"]["autoscaling"], "capacity": CAPACITY,
                    "max_tokens": MAX_TOKENS, "heavy_clients": HEAVY_CLIENTS,
                    "deploy_s": round(time.monotonic() - t0, 1)}
    try:
        assert sampler.wait_for(lambda s: s["running"] == 1, 30) is not None
        assert _controller_log_mentions(f"Using custom autoscaling policy '{POLICY_IMPORT_PATH}'")

        # Light: one sequential client keeps (waiting + running) / capacity <= 0.5: no upscale.
        sampler.phase = "light"
        load.set_clients(1)
        time.sleep(LIGHT_S)
        light = [s for s in sampler.samples if s["phase"] == "light"]
        assert load.ok >= 1, vars(load)
        assert max(s["running"] + s["starting"] for s in light) == 1, light

        # Heavy: HEAVY_CLIENTS concurrent requests = 5 batches of demand for one replica.
        sampler.phase = "heavy"
        t_heavy = time.monotonic()
        load.set_clients(HEAVY_CLIENTS)
        up = sampler.wait_for(lambda s: s["running"] >= MAX_REPLICAS, UP_DEADLINE_S)
        result["seconds_to_max_replicas"] = round(up, 1) if up is not None else None
        assert up is not None, f"did not reach {MAX_REPLICAS} replicas in {UP_DEADLINE_S}s: {sampler.samples[-8:]}"
        t_up = time.monotonic() - t0
        time.sleep(3.0)  # served at max for a moment: the count holds while the queue stays deep
        heavy_tail = [s for s in sampler.samples if s["phase"] == "heavy" and s["t"] >= t_up]
        assert heavy_tail and all(s["running"] == MAX_REPLICAS for s in heavy_tail), heavy_tail
        result["heavy_phase_s"] = round(time.monotonic() - t_heavy, 1)

        # Drain: stop the clients (in-flight requests finish), then wait for the downscale.
        sampler.phase = "drain"
        load.set_clients(0)
        load.join(60)
        assert not load.threads
        t_idle = time.monotonic()
        down = sampler.wait_for(lambda s: s["running"] == 1 and s["starting"] == 0 and s["stopping"] == 0,
                                DOWN_DEADLINE_S)
        result["seconds_idle_to_min_replicas"] = round(down, 1) if down is not None else None
        assert down is not None, f"did not return to 1 replica in {DOWN_DEADLINE_S}s: {sampler.samples[-8:]}"
        # Not before the downscale delay: the policy/delays, not a crash, removed the replicas.
        assert down >= DOWNSCALE_DELAY_S - 1.0, down
        time.sleep(1.0)
        result["idle_tail_s"] = round(time.monotonic() - t_idle, 1)
        assert load.failed == 0, vars(load)
        assert load.ok >= 20, vars(load)
    finally:
        load.set_clients(0)
        load.join(60)
        sampler.stop_event.set()
        sampler.join(5)
        result.update(requests={"sent": load.sent, "ok": load.ok, "rejected": load.rejected, "failed": load.failed},
                      timeline=sampler.samples)
        if os.environ.get("MISTRAL_SERVE_WRITE_RESULTS", "1") == "1":
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        try:
            serve.delete(APP)
        except Exception:  # noqa: BLE001
            pass
