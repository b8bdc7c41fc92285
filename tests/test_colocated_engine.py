"""The engine in the Router's process (``router.colocate_engine``, the `mistral-serve serve`
default with one replica): same answers as separate LLMReplica replicas, client disconnects abort
the engine request, errors keep OpenAI's shape.

A ``colocated`` app beside the session's ``live_server`` app (tests/ray_fixtures.py), on the same
cluster, reached through Ray's proxy."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import pytest

from ray_fixtures import MAX_MODEL_LEN, deploy_app, live_server_args

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

APP = "colocated"


@pytest.fixture(scope="module")
def colocated(live_server):
    from ray import serve

    args = live_server_args()
    args["replicas"] = {"num_replicas": 1, "num_cpus": 0.1, "stall_timeout_s": 60}
    args["router"] = {"num_replicas": 1, "num_cpus": 0.05, "colocate_engine": True}
    server = deploy_app(live_server, APP, args, ready_replicas=1)
    try:
        yield server
    finally:
        serve.delete(APP, _blocking=True)


def _post(server, body: dict, path: str = "/v1/completions") -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=120)


def _stream_text(server, body: dict) -> str:
    r = requests.post(server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=120, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    text = ""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += choice["text"]
    return text


def _engine_stats() -> dict:
    from ray import serve

    return serve.get_app_handle(APP).replica_stats.remote().result(timeout_s=30)


def test_no_llm_replica_deployment_and_the_same_greedy_answers(live_server, colocated):
    from ray import serve

    deployments = serve.status().applications[APP].deployments
    assert "LLMReplica" not in deployments and "Router" in deployments
    body = {"model": live_server.model, "prompt": "Count to ten:", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    separate = _post(live_server, body).json()
    here = _post(colocated, body).json()
    assert here["choices"][0]["text"] == separate["choices"][0]["text"]
    assert here["usage"]["completion_tokens"] == 12 and here["usage"]["cost_usd"] > 0
    assert _stream_text(colocated, body) == separate["choices"][0]["text"]
    chat = _post(colocated, {"model": live_server.model, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4}, "/v1/chat/completions")
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1


def test_errors_keep_the_openai_shape(colocated):
    too_long = _post(colocated, {"model": colocated.model, "prompt": [5] * (MAX_MODEL_LEN + 1), "max_tokens": 1})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    bad = _post(colocated, {"model": colocated.model, "prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_disconnect_aborts_the_engine_request(colocated):
    u = urllib.parse.urlparse(colocated.base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", u.path + "/v1/completions",
                 json.dumps({"model": colocated.model, "prompt": "Write a long essay", "max_tokens": 400,
                             "ignore_eos": True, "stream": True}), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: the request runs in the engine
    stats = _engine_stats()
    assert stats["num_running"] == 1 and stats["kv_usage"] > 0 and stats["ongoing"] == 1, stats
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 20
    while True:
        stats = _engine_stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_usage"] == 0 and stats["ongoing"] == 0:
            break
        assert time.monotonic() < deadline, f"engine request not aborted after the disconnect: {stats}"
        time.sleep(0.3)
    assert stats["generation_tokens"] < 400  # aborted, not run to its end
