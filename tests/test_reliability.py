"""Faults against the real local Ray Serve app (tiny model, CPU), on the ``faults`` and ``drain``
applications beside ``live_server`` (tests/ray_fixtures.py), so nothing here disturbs it:

- a replica killed mid-stream (``ray.kill`` of its actor): streams end with an SSE error event
  and [DONE], requests that had not started are retried on the other replica, none hangs, Serve
  replaces the replica; the time to recovery is measured;
- the engine raising inside a step (test hook ``LLMReplica.inject_fault``): the affected
  requests fail with a 503 OpenAI error, the health check fails, Serve replaces the replica,
  the other replica keeps serving;
- a wedged engine loop: the replica's health check fails within ``stall_timeout_s``, the
  router's readiness count drops within a bound, its queued requests are served elsewhere;
- client disconnects while running and while still queued: engines abort, KV back to 0;
- graceful drain, redeploy and shutdown: 503 + Retry-After for new requests, in-flight
  requests finish within ``graceful_shutdown_timeout_s``.

Measured times are printed (run with ``-s``) and collected in ``MEASURED``."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from ray_fixtures import FAULT_APP, deploy_app

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

MEASURED: dict[str, float] = {}


# ---- helpers -----------------------------------------------------------------------------------


def _llm_actors(app: str) -> dict[str, object]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#LLMReplica#"
    actors = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(prefix):
            try:
                actors[a["name"]] = ray.get_actor(a["name"], namespace="serve")
            except ValueError:  # listed, then died before the lookup: a replica being replaced
                continue
    return actors


def _replica_stats(app: str) -> dict[str, dict]:
    import ray

    out = {}
    for name, actor in _llm_actors(app).items():
        try:
            out[name] = ray.get(actor.record_routing_stats.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a replica going away
            pass
    return out


def _running(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "LLMReplica" not in status.deployments:
        return 0
    return int(status.deployments["LLMReplica"].replica_states.get("RUNNING", 0))


def _wait(cond, timeout: float, what: str, interval: float = 0.1) -> float:
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"{what} not reached within {timeout:.0f} s"
        time.sleep(interval)


def _healthy(app: str, n: int, timeout: float = 120) -> None:
    """n replicas RUNNING, all of them up (no replica left over from an earlier fault)."""
    _wait(lambda: _running(app) == n and len(_replica_stats(app)) == n
          and not any(s.get("failed") for s in _replica_stats(app).values()), timeout, f"{n} healthy replicas")


def _error_shape(obj: dict) -> dict:
    assert set(obj) == {"error"} and set(obj["error"]) == {"message", "type", "param", "code"}, obj
    assert obj["error"]["message"]
    return obj["error"]


class Call(threading.Thread):
    """One HTTP request on its own thread; records status, headers, body or SSE events."""

    def __init__(self, base_url: str, body: dict, path: str = "/v1/completions", timeout: float = 120) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.timeout = base_url + path, body, timeout
        self.status: int | None = None
        self.headers: dict = {}
        self.json: dict | None = None
        self.events: list = []
        self.first_event = threading.Event()
        self.error: BaseException | None = None
        self.t_start = self.t_end = 0.0

    def run(self) -> None:
        self.t_start = time.monotonic()
        try:
            with requests.post(self.url, json=self.body, stream=bool(self.body.get("stream")),
                               timeout=self.timeout) as r:
                self.status, self.headers = r.status_code, dict(r.headers)
                if self.body.get("stream") and r.status_code == 200:
                    for line in r.iter_lines():
                        if not line:
                            continue
                        data = line.decode()[len("data: "):]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.first_event.set()
                else:
                    self.json = r.json()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.t_end = time.monotonic()
            self.first_event.set()

    @property
    def stream_error(self) -> dict | None:
        errs = [e for e in self.events if isinstance(e, dict) and "error" in e]
        return errs[0] if errs else None

    def check_stream_complete(self, max_tokens: int) -> None:
        assert self.error is None and self.status == 200, (self.status, self.error)
        assert self.events[-1] == "[DONE]" and self.stream_error is None, self.events[-3:]
        text_events = [e for e in self.events[:-1] if e.get("choices")]
        assert text_events[-1]["choices"][0]["finish_reason"] == "length"

    def check_stream_failed_cleanly(self) -> None:
        """An SSE error event in OpenAI's shape, then [DONE], then the stream closed."""
        assert self.error is None and self.status == 200, (self.status, self.error)
        err = self.stream_error
        assert err is not None, self.events[-3:]
        e = _error_shape(err)
        assert e["type"] == "service_unavailable_error", e
        assert self.events[-1] == "[DONE]" and self.events[-2] is err

    def check_ok(self, max_tokens: int) -> None:
        assert self.error is None and self.status == 200, (self.status, self.error, self.json)
        assert self.json["usage"]["completion_tokens"] == max_tokens
        assert self.json["choices"][0]["finish_reason"] == "length"


def _body(live, max_tokens: int, stream: bool = False, prompt: str = "Tell me a long story") -> dict:
    return {"model": live.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def _start(calls: list[Call]) -> list[Call]:
    for c in calls:
        c.start()
    return calls


def _join(calls: list[Call], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for c in calls:
        c.join(max(0.0, deadline - time.monotonic()))
    hung = [c.body for c in calls if c.is_alive()]
    assert not hung, f"{len(hung)} requests still unanswered after {timeout:.0f} s"


# ---- faults --------------------------------------------------------------------------------------


def test_replica_killed_mid_stream(fault_server):
    """Kill one LLMReplica actor while it streams and holds queued requests."""
    import ray

    app, live = FAULT_APP, fault_server
    _healthy(app, 2)
    max_tokens = 150
    streams = _start([Call(live.base_url, _body(live, max_tokens, stream=True)) for _ in range(2)])
    for s in streams:
        assert s.first_event.wait(60)
    plain = _start([Call(live.base_url, _body(live, max_tokens)) for _ in range(6)])
    # 8 requests, 2 replicas x (2 running + 2 waiting): wait until a replica holds queued work
    victim = None

    def queued() -> bool:
        nonlocal victim
        stats = _replica_stats(app)
        busy = [n for n, s in stats.items() if s["num_waiting"] >= 1 and s["num_running"] == 2]
        victim = busy[0] if busy else None
        return victim is not None

    _wait(queued, 60, "a replica with queued requests")
    time.sleep(0.3)  # its running requests have produced tokens (started)
    stats = _replica_stats(app)[victim]
    running, waiting = stats["num_running"], stats["num_waiting"]
    actor = _llm_actors(app)[victim]
    t_kill = time.monotonic()
    ray.kill(actor, no_restart=True)

    calls = streams + plain
    _join(calls, 120)  # none hangs
    failed = 0
    for s in streams:
        if s.stream_error is not None:
            s.check_stream_failed_cleanly()
            failed += 1
        else:
            s.check_stream_complete(max_tokens)
    first_ok_after_kill = None
    for c in plain:
        assert c.error is None and c.status in (200, 503), (c.status, c.error)
        if c.status == 503:
            e = _error_shape(c.json)
            assert e["type"] == "service_unavailable_error" and int(c.headers["retry-after"]) >= 1
            failed += 1
        else:
            c.check_ok(max_tokens)
            if c.t_end > t_kill:
                first_ok_after_kill = min(first_ok_after_kill or 1e9, c.t_end - t_kill)
    # Only the victim's started requests may fail; its queued ones were retried elsewhere.
    assert 1 <= failed <= running, (failed, running, waiting)
    assert sum(c.status == 200 and c.stream_error is None for c in calls) >= len(calls) - running

    _wait(lambda: _running(app) == 2 and victim not in _llm_actors(app) and len(_llm_actors(app)) == 2,
          90, "replacement replica RUNNING")
    t_replaced = time.monotonic() - t_kill
    after = _start([Call(live.base_url, _body(live, 8)) for _ in range(4)])
    _join(after, 60)
    for c in after:
        c.check_ok(8)
    _healthy(app, 2)
    MEASURED.update(kill_first_success_s=first_ok_after_kill or float("nan"), kill_replica_replaced_s=t_replaced,
                    kill_failed=failed, kill_victim_running=running, kill_victim_waiting=waiting)
    print(f"\nreplica kill: victim had {running} running / {waiting} waiting; {failed} started requests failed, "
          f"{len(calls) - failed} answered 200; first success after kill {first_ok_after_kill:.2f} s; "
          f"replacement RUNNING after {t_replaced:.1f} s")


def test_engine_fault_fails_affected_requests_and_replica_is_replaced(fault_server):
    from ray import serve

    app, live = FAULT_APP, fault_server
    _healthy(app, 2)
    handle = serve.get_deployment_handle("LLMReplica", app)
    victim_tag = handle.inject_fault.remote("raise", after_steps=4).result(timeout_s=30)
    victim = next(n for n in _llm_actors(app) if n.endswith("#" + victim_tag))
    max_tokens = 40
    failed: list[Call] = []
    t_fault = None
    for _ in range(4):  # until a request lands on the victim (the router spreads them)
        calls = _start([Call(live.base_url, _body(live, max_tokens, stream=True)) for _ in range(4)])
        _join(calls, 90)
        for c in calls:
            if c.stream_error is not None:
                c.check_stream_failed_cleanly()  # a 500-class (503) OpenAI error, then [DONE]
                failed.append(c)
            else:
                c.check_stream_complete(max_tokens)
        if failed:
            t_fault = min(c.t_end for c in failed)
            break
    assert failed, "no request reached the faulty replica"
    # The other replica keeps serving while the faulty one is detected and replaced: the dead
    # replica refuses work at once and the router retries it elsewhere.
    statuses = []
    while victim in _llm_actors(app) and time.monotonic() - t_fault < 60:
        c = Call(live.base_url, _body(live, 4))
        c.run()
        c.check_ok(4)
        statuses.append(c.status)
    assert victim not in _llm_actors(app), "Serve did not stop the replica whose health check fails"
    t_stopped = time.monotonic() - t_fault
    _wait(lambda: _running(app) == 2 and len(_llm_actors(app)) == 2, 90, "replacement replica RUNNING")
    t_replaced = time.monotonic() - t_fault
    _healthy(app, 2)
    MEASURED.update(engine_fault_replica_stopped_s=t_stopped, engine_fault_replaced_s=t_replaced)
    print(f"\nengine fault: {len(failed)} streams failed with 503; {len(statuses)} requests served meanwhile; "
          f"faulty replica stopped after {t_stopped:.1f} s, replaced after {t_replaced:.1f} s")


def test_wedged_engine_goes_unready_within_bound(fault_server):
    import ray
    from ray import serve

    app, live = FAULT_APP, fault_server
    cfg = live.args["replicas"]
    _healthy(app, 2)
    handle = serve.get_deployment_handle("LLMReplica", app)
    victim_tag = handle.inject_fault.remote("wedge", seconds=300).result(timeout_s=30)
    victim = next(n for n in _llm_actors(app) if n.endswith("#" + victim_tag))
    actor = _llm_actors(app)[victim]
    max_tokens = 30
    t0 = time.monotonic()
    calls = _start([Call(live.base_url, _body(live, max_tokens, stream=i % 2 == 0)) for i in range(6)])

    def replica_unhealthy() -> bool:
        try:
            ray.get(actor.check_health.remote(), timeout=5)
            return False
        except Exception:  # noqa: BLE001 - the health check raised (or the actor is gone)
            return True

    t_unhealthy = _wait(replica_unhealthy, 30, "failed health check", interval=0.2)

    def ready_count() -> int | None:
        r = requests.get(live.base_url + "/ready", timeout=10)
        return r.json().get("replicas") if r.status_code == 200 else 0

    t_unready = _wait(lambda: ready_count() == 1, 60, "router readiness 1 replica", interval=0.2)
    bound_health = cfg["stall_timeout_s"] + cfg["health_check_period_s"] + 2
    bound_ready = cfg["stall_timeout_s"] + 3 * cfg["health_check_period_s"] + cfg["health_check_timeout_s"] + 3
    assert t_unhealthy <= bound_health, (t_unhealthy, bound_health)
    assert t_unready <= bound_ready, (t_unready, bound_ready)
    # Requests stuck behind the wedge never started: failed at the first health-check failure and
    # retried on the other replica, long before the graceful-shutdown timeout.
    _join(calls, 60)
    for c in calls:
        if c.body["stream"]:
            c.check_stream_complete(max_tokens)
        else:
            c.check_ok(max_tokens)
    slowest = max(c.t_end for c in calls) - t0
    assert slowest < cfg["graceful_shutdown_timeout_s"], slowest
    _healthy(app, 2)
    t_replaced = time.monotonic() - t0
    MEASURED.update(wedge_health_fails_s=t_unhealthy, wedge_unready_s=t_unready, wedge_slowest_request_s=slowest)
    print(f"\nwedged engine: health check failing after {t_unhealthy:.1f} s (bound {bound_health:.0f}), readiness "
          f"down after {t_unready:.1f} s (bound {bound_ready:.0f}); all 6 requests 200, slowest {slowest:.1f} s; "
          f"replaced after {t_replaced:.1f} s")


def _router_snapshot(app: str) -> dict:
    from ray import serve

    return serve.get_app_handle(app).admission_snapshot.remote().result(timeout_s=30)


def test_disconnects_running_and_queued_abort_everything(fault_server):
    """Clients drop streaming and non-streaming requests, some running, some still queued:
    the engines abort them, KV goes back to 0 and the router holds no ticket."""
    app, live = FAULT_APP, fault_server
    _healthy(app, 2)
    u = urllib.parse.urlparse(live.base_url)
    conns = []
    for i in range(8):  # 2 replicas x 2 running, the rest queued
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        body = _body(live, 400, stream=i % 2 == 0)
        conn.request("POST", u.path + "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        conns.append(conn)
    _wait(lambda: sum(s["num_waiting"] for s in _replica_stats(app).values()) >= 1
          and sum(s["num_running"] for s in _replica_stats(app).values()) == 4, 60, "running and queued requests")
    # the last requests may still be crossing the proxy when the replicas already show the queue
    _wait(lambda: _router_snapshot(app)["in_flight"] == 8, 30, "all 8 requests in flight at the router")
    for conn in conns:
        conn.sock.shutdown(2)
        conn.close()

    def all_clear() -> bool:
        stats = _replica_stats(app)
        snap = _router_snapshot(app)
        return len(stats) == 2 and snap["in_flight"] == 0 and snap["waiting_requests"] == 0 and all(
            s["kv_usage"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0 and s["ongoing"] == 0
            for s in stats.values())

    t = _wait(all_clear, 30, "engines idle and KV freed after disconnects", interval=0.3)
    print(f"\ndisconnects: 8 requests (4 running, 4 queued) aborted, KV 0 after {t:.1f} s")


# ---- drain, redeploy, shutdown -----------------------------------------------------------------


DRAIN_APP = "drain"


def _drain_args(drain_file: Path, version: int = 0) -> dict:
    from ray_fixtures import fault_server_args

    args = fault_server_args()
    args["replicas"].update(num_replicas=1, graceful_shutdown_timeout_s=20, test_hooks=False,
                            stream_interval_ms=10 + version)  # a new version: Serve replaces the replicas
    args["engine"]["max_num_seqs"] = 4
    args["admission"].update(drain_file=str(drain_file), retry_after_s=2, log_prompts=False)
    return args


def test_drain_redeploy_and_shutdown(live_server, tmp_path):
    from ray import serve

    from mistral_serve.serving import build_app

    drain_file = tmp_path / "draining"
    live = deploy_app(live_server, DRAIN_APP, _drain_args(drain_file), ready_replicas=1)
    grace = live.args["replicas"]["graceful_shutdown_timeout_s"]
    max_tokens = 300  # several seconds: the requests outlive the start of each stop
    try:
        # 1. Drain (what the pod's preStop does): new requests 503 + Retry-After, /ready 503,
        #    in-flight requests finish.
        inflight = _start([Call(live.base_url, _body(live, max_tokens, stream=True)),
                           Call(live.base_url, _body(live, max_tokens))])
        assert inflight[0].first_event.wait(60)
        drain_file.touch()
        r = requests.post(live.base_url + "/v1/completions", json=_body(live, 4), timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 2, (r.status_code, r.headers)
        assert _error_shape(r.json())["type"] == "service_unavailable_error"
        _wait(lambda: requests.get(live.base_url + "/ready", timeout=10).status_code == 503, 10, "/ready 503")
        _join(inflight, grace)
        inflight[0].check_stream_complete(max_tokens)
        inflight[1].check_ok(max_tokens)
        drain_file.unlink()
        r = requests.post(live.base_url + "/v1/completions", json=_body(live, 4), timeout=60)
        assert r.status_code == 200, r.text

        # 2. Redeploy (a new version replaces every replica): in-flight requests on the old
        #    replicas finish; new requests meanwhile get 200 or 503 + Retry-After, nothing else.
        inflight = _start([Call(live.base_url, _body(live, max_tokens, stream=True)),
                           Call(live.base_url, _body(live, max_tokens))])
        assert inflight[0].first_event.wait(60)
        t_redeploy = time.monotonic()
        redeploy = threading.Thread(target=serve.run, daemon=True, args=(build_app(_drain_args(drain_file, 1)),),
                                    kwargs={"name": DRAIN_APP, "route_prefix": f"/{DRAIN_APP}", "blocking": False})
        redeploy.start()
        during: list[Call] = []
        while (redeploy.is_alive() or any(c.is_alive() for c in inflight)) and time.monotonic() - t_redeploy < 120:
            c = Call(live.base_url, _body(live, 2), timeout=60)
            c.run()
            during.append(c)
            time.sleep(0.2)
        redeploy.join(1)
        assert not redeploy.is_alive()
        t_redeployed = time.monotonic() - t_redeploy
        _join(inflight, 1)
        inflight[0].check_stream_complete(max_tokens)
        inflight[1].check_ok(max_tokens)
        assert max(c.t_end for c in inflight) - t_redeploy <= grace
        for c in during:
            assert c.error is None and c.status in (200, 503), (c.status, c.error, c.json)
            if c.status == 503:
                assert int(c.headers["retry-after"]) >= 1 and _error_shape(c.json)
        assert sum(c.status == 200 for c in during) >= 1
        _wait(lambda: requests.post(live.base_url + "/v1/completions", json=_body(live, 2),
                                    timeout=60).status_code == 200, 60, "served after redeploy", interval=0.5)

        # 3. Shutdown: drain first, then delete the app while requests are in flight; they finish
        #    within the graceful-shutdown timeout.
        inflight = _start([Call(live.base_url, _body(live, max_tokens, stream=True)),
                           Call(live.base_url, _body(live, max_tokens))])
        assert inflight[0].first_event.wait(60)
        drain_file.touch()
        r = requests.post(live.base_url + "/v1/completions", json=_body(live, 4), timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 2
        assert all(c.is_alive() for c in inflight), "requests finished before the shutdown began"
        t_delete = time.monotonic()
        serve.delete(DRAIN_APP, _blocking=True)
        t_deleted = time.monotonic() - t_delete
        _join(inflight, 5)
        inflight[0].check_stream_complete(max_tokens)
        inflight[1].check_ok(max_tokens)
        assert t_deleted <= grace + 10, t_deleted
        MEASURED.update(redeploy_s=t_redeployed, shutdown_s=t_deleted)
        print(f"\ndrain/redeploy/shutdown: redeploy done in {t_redeployed:.1f} s with {len(during)} requests "
              f"meanwhile ({sum(c.status == 503 for c in during)} got 503 + Retry-After); delete with requests in "
              f"flight took {t_deleted:.1f} s (grace {grace:.0f} s)")
    finally:
        if DRAIN_APP in serve.status().applications:
            serve.delete(DRAIN_APP)
