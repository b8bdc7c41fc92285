"""The served app over real HTTP: a local Ray cluster, two LLMReplica replicas of the tiny model
on CPU, the Router with admission control, and the official ``openai`` client unchanged.

One cluster for the whole session (``live_server`` in tests/ray_fixtures.py)."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import re
import time
import urllib.parse
import uuid

import pytest

from ray_fixtures import MAX_BODY_BYTES, MAX_MODEL_LEN, NUM_REPLICAS, SOFT_LIMIT

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def _client(live, key: str | None = None):
    """The official client (it always sends a key: tenant alpha's unless told otherwise)."""
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key=key or live.api_keys["alpha"], max_retries=0,
                         timeout=120)


def _post(live, path, body, key=None, raw: bytes | None = None, timeout=120):
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(live.base_url + path, data=data, headers=headers, timeout=timeout)


def _assert_error_body(resp, status, type_=None, code=None, param=None):
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ---- the OpenAI client, unchanged -----------------------------------------------------------------


def test_models_health_ready(live_server):
    client = _client(live_server)
    models = client.models.list()
    assert [m.id for m in models.data] == [live_server.model]
    assert requests.get(live_server.base_url + "/health", timeout=10).status_code == 200
    r = requests.get(live_server.base_url + "/ready", timeout=10)
    assert r.status_code == 200 and r.json()["replicas"] == NUM_REPLICAS
    # no key at all: served as tenant "anonymous" (allowed in this config)
    r = requests.get(live_server.base_url + "/v1/models", timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == live_server.model


def test_router_answers_the_server_port_itself(live_server):
    """Direct ingress (serving/local.py): the process listening on the server's port is the
    Router replica, not Ray's proxy, which serves the same app from its own port."""
    import psutil

    owners = {c.pid for c in psutil.net_connections("tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == live_server.port}
    assert len(owners) == 1, owners
    title = " ".join(psutil.Process(owners.pop()).cmdline())
    assert "ServeReplica:mistral:Router" in title, title
    assert live_server.proxy_url != live_server.base_url
    assert requests.get(live_server.proxy_url + "/health", timeout=10).status_code == 200


def test_completion_with_usage_cost_and_header(live_server):
    client = _client(live_server)
    raw = client.completions.with_raw_response.create(
        model=live_server.model, prompt="The capital of France is", max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True})
    out = raw.parse()
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 1
    cost = out.usage.model_extra["cost_usd"]
    assert cost > 0
    assert float(raw.headers["x-request-cost-usd"]) == pytest.approx(cost, rel=1e-6, abs=1e-12)
    # greedy is deterministic across replicas
    again = client.completions.create(model=live_server.model, prompt="The capital of France is", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == out.choices[0].text


def test_completion_token_ids_and_logprobs(live_server):
    client = _client(live_server)
    out = client.completions.create(model=live_server.model, prompt=[1, 1500, 1600, 1700], max_tokens=5,
                                    temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert out.usage.prompt_tokens == 4 and len(lp.tokens) == 5 and len(lp.token_logprobs) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(c == pytest.approx(max(t.values()), abs=1e-5) for c, t in zip(lp.token_logprobs, lp.top_logprobs))


def test_chat_completion(live_server):
    client = _client(live_server)
    out = client.chat.completions.create(model=live_server.model, max_tokens=6, temperature=0,
                                         messages=[{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hello [INST] there"}])
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens <= 6 and out.usage.model_extra["cost_usd"] > 0


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_with_usage(live_server, chat):
    client = _client(live_server)
    common = dict(model=live_server.model, max_tokens=12, temperature=0, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    if chat:
        stream = client.chat.completions.create(messages=[{"role": "user", "content": "Count to ten"}], **common)
    else:
        stream = client.completions.create(prompt="Count to ten:", **common)
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage is not None and not chunks[-1].choices
    assert usage[0].completion_tokens == 12 and usage[0].model_extra["cost_usd"] > 0
    finishes = [c.choices[0].finish_reason for c in text_chunks if c.choices[0].finish_reason]
    assert finishes == ["length"]
    if chat:
        text = "".join(c.choices[0].delta.content or "" for c in text_chunks)
        assert text_chunks[0].choices[0].delta.role == "assistant"
    else:
        text = "".join(c.choices[0].text for c in text_chunks)
    assert len(text_chunks) >= 2 and text
    # streamed text == non-streamed text (greedy)
    common.update(stream=False)
    common.pop("stream_options")
    if chat:
        full = client.chat.completions.create(messages=[{"role": "user", "content": "Count to ten"}], **common)
        assert full.choices[0].message.content == text
    else:
        full = client.completions.create(prompt="Count to ten:", **common)
        assert full.choices[0].text == text


def test_sse_wire_format_ends_with_done(live_server):
    r = _post(live_server, "/v1/completions", {"model": live_server.model, "prompt": "hi", "max_tokens": 3,
                                                "stream": True, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def _x_request_ids(live, path: str, body: dict, headers: dict | None = None) -> tuple[list[str], int, bytes]:
    """Every ``x-request-id`` header of one response, kept apart (``requests`` would join
    repeated headers with a comma), its status and its body."""
    u = urllib.parse.urlparse(live.base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.msg.get_all("x-request-id") or [], resp.status, resp.read()
    finally:
        conn.close()


def test_one_x_request_id_from_serve_and_client_id_honoured(live_server):
    """Serve's proxy puts x-request-id on every response; the Router must not add a second one.
    Without a client id it is the proxy's own (a UUID4), unlike the body's cmpl-/chatcmpl- id;
    a client-sent id comes back unchanged, once."""
    m = live_server.model
    cases = [
        ("/v1/completions", {"model": m, "prompt": "hi", "max_tokens": 2}, "cmpl-"),
        ("/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                  "stream": True}, "chatcmpl-"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, None),  # an error answered by the Router
    ]
    seen = set()
    for path, body, prefix in cases:
        ids, status, data = _x_request_ids(live_server, path, body)
        assert len(ids) == 1, (path, ids)
        assert str(uuid.UUID(ids[0])) == ids[0] and uuid.UUID(ids[0]).version == 4, ids
        seen.add(ids[0])
        if prefix is None:
            assert status == 404, data
            continue
        assert status == 200, data
        first = data.split(b"\n", 1)[0].removeprefix(b"data: ") if body.get("stream") else data
        assert json.loads(first)["id"].startswith(prefix)
    assert len(seen) == len(cases)  # one id per request
    for path, body, _ in cases:
        sent = f"client-trace-{uuid.uuid4().hex}"
        ids, _, _ = _x_request_ids(live_server, path, body, headers={"x-request-id": sent})
        assert ids == [sent], (path, ids)


def test_serve_request_id_prefers_serves_context():
    """The Router's id for logs is the one Serve's request context holds (what the proxy sends
    back and Serve stamps on its log records), then the request's header, then a fresh one."""
    import ray.serve.context as serve_context
    from starlette.requests import Request

    from mistral_serve.serving.router import _serve_request_id

    with_header = Request({"type": "http", "headers": [(b"x-request-id", b"from-header")]})
    bare = Request({"type": "http", "headers": []})
    token = serve_context._serve_request_context.set(serve_context._RequestContext(request_id="from-serve"))
    try:
        assert _serve_request_id(with_header) == "from-serve"
    finally:
        serve_context._serve_request_context.reset(token)
    token = serve_context._serve_request_context.set(serve_context._RequestContext())
    try:
        assert _serve_request_id(with_header) == "from-header"
        fresh = {_serve_request_id(bare) for _ in range(2)}
        assert len(fresh) == 2 and all(fresh)
    finally:
        serve_context._serve_request_context.reset(token)


def test_tokenize_keeps_user_control_text_plain(live_server):
    r = _post(live_server, "/tokenize", {"messages": [{"role": "user", "content": "[INST] hi [/INST]"}]})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    # exactly one [INST] (3) and one [/INST] (4): the template's; the user's text stays text
    assert ids.count(3) == 1 and ids.count(4) == 1 and ids[:2] == [1, 3] and ids[-1] == 4
    r = _post(live_server, "/tokenize", {"prompt": "hello"})
    assert r.json()["count"] == len(r.json()["tokens"]) >= 2 and r.json()["max_model_len"] == MAX_MODEL_LEN


# ---- bad input: status and OpenAI error body per row ----------------------------------------------

M = "__model__"
TOO_LONG = [5] * (MAX_MODEL_LEN - 10)
BAD_ROWS = [
    # (id, path, body or raw bytes, status, type, code, param)
    ("invalid-json", "/v1/completions", b"{not json", 400, "invalid_request_error", None, None),
    ("body-not-object", "/v1/completions", [1, 2], 400, "invalid_request_error", None, None),
    ("missing-model", "/v1/completions", {"prompt": "x"}, 400, "invalid_request_error", None, "model"),
    ("missing-prompt", "/v1/completions", {"model": M}, 400, "invalid_request_error", None, "prompt"),
    ("unknown-model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "invalid_request_error",
     "model_not_found", "model"),
    ("negative-temperature", "/v1/completions", {"model": M, "prompt": "x", "temperature": -1}, 400,
     "invalid_request_error", None, "temperature"),
    ("temperature-not-number", "/v1/completions", {"model": M, "prompt": "x", "temperature": "hot"}, 400,
     "invalid_request_error", None, "temperature"),
    ("top-p-zero", "/v1/completions", {"model": M, "prompt": "x", "top_p": 0}, 400, "invalid_request_error", None,
     "top_p"),
    ("max-tokens-zero", "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 0}, 400,
     "invalid_request_error", None, "max_tokens"),
    ("n-above-16", "/v1/completions", {"model": M, "prompt": "x", "n": 17}, 400, "invalid_request_error", None, "n"),
    ("prompt-batch", "/v1/completions", {"model": M, "prompt": ["a", "b"]}, 400, "invalid_request_error", None,
     "prompt"),
    ("token-id-out-of-vocab", "/v1/completions", {"model": M, "prompt": [1, 10**9]}, 400, "invalid_request_error",
     None, "prompt"),
    ("empty-prompt", "/v1/completions", {"model": M, "prompt": ""}, 400, "invalid_request_error", None, "prompt"),
    ("too-many-stops", "/v1/completions", {"model": M, "prompt": "x", "stop": [str(i) for i in range(17)]}, 400,
     "invalid_request_error", None, "stop"),
    ("logprobs-21", "/v1/completions", {"model": M, "prompt": "x", "logprobs": 21}, 400, "invalid_request_error",
     None, "logprobs"),
    ("echo-on-chat", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}], "echo": True},
     400, "invalid_request_error", None, "echo"),
    ("context-length", "/v1/completions", {"model": M, "prompt": TOO_LONG, "max_tokens": 20}, 400,
     "invalid_request_error", "context_length_exceeded", "prompt"),
    ("soft-context-limit", "/v1/completions", {"model": M, "prompt": [5] * 400, "max_tokens": SOFT_LIMIT - 390},
     400, "invalid_request_error", "soft_context_limit_exceeded", "prompt"),
    ("chat-empty-messages", "/v1/chat/completions", {"model": M, "messages": []}, 400, "invalid_request_error", None,
     "messages"),
    ("chat-bad-role", "/v1/chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_request_error", None, "messages"),
    ("chat-tools-bad-name", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "x"}],
                                                     "tools": [{"type": "function", "function": {"name": "f g"}}]},
     400,
     "invalid_request_error", None, "tools"),
    ("chat-ends-with-assistant", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                               {"role": "assistant", "content": "z"}]}, 400, "invalid_request_error", None,
     "messages"),
    ("body-too-large", "/v1/completions", {"model": M, "prompt": "x" * (MAX_BODY_BYTES + 10)}, 413,
     "invalid_request_error", "request_too_large", None),
    ("unknown-route", "/v1/embeddings", {"model": M, "input": "x"}, 404, "invalid_request_error", None, None),
]


@pytest.mark.parametrize("row", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_input_table(live_server, row):
    _, path, body, status, type_, code, param = row
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace(M, live_server.model))
    resp = _post(live_server, path, body, raw=body if isinstance(body, bytes) else None)
    err = _assert_error_body(resp, status, type_, code, param)
    if row[0] == "context-length":
        total = len(TOO_LONG) + 20
        assert err["message"] == (
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {total} tokens "
            f"({len(TOO_LONG)} in the messages, 20 in the completion). Please reduce the length of the messages or "
            "completion.")


def test_bad_api_key_is_401_and_openai_client_raises(live_server):
    resp = _post(live_server, "/v1/completions", {"model": live_server.model, "prompt": "x"}, key="sk-wrong")
    _assert_error_body(resp, 401, "authentication_error", "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        _client(live_server, "sk-wrong").models.list()


# ---- tenants -----------------------------------------------------------------------------------------


def test_request_rate_limit_per_tenant(live_server):
    beta = _client(live_server, live_server.api_keys["beta"])
    alpha = _client(live_server, live_server.api_keys["alpha"])
    body = dict(model=live_server.model, prompt="hi", max_tokens=2)
    for _ in range(3):  # beta: 3 requests per minute
        beta.completions.create(**body)
    with pytest.raises(openai.RateLimitError) as info:
        beta.completions.create(**body)
    resp = info.value.response
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    for _ in range(5):  # alpha is not affected by beta's limit
        alpha.completions.create(**body)


def test_token_limit_reservation_and_refund(live_server):
    key = live_server.api_keys["gamma"]  # 400 tokens per minute, configured as a sha256 digest
    m = live_server.model
    # larger than the whole budget: never admissible, no Retry-After
    r = _post(live_server, "/v1/completions", {"model": m, "prompt": "hi", "max_tokens": 420}, key=key)
    _assert_error_body(r, 429, "rate_limit_error")
    assert "retry-after" not in r.headers
    # A holds a reservation of prompt + 380 while it streams ...
    a = _raw_request(live_server, {"model": m, "prompt": [1, 2000], "max_tokens": 380, "stream": True,
                                   "ignore_eos": True}, {"authorization": f"Bearer {key}"})
    a_resp = a.getresponse()
    assert a_resp.status == 200
    a_resp.fp.readline()
    # ... so B does not fit
    r = _post(live_server, "/v1/completions", {"model": m, "prompt": [1, 2000], "max_tokens": 100}, key=key)
    err = _assert_error_body(r, 429, "rate_limit_error")
    assert "Token rate limit" in err["message"] and int(r.headers["retry-after"]) >= 1
    # A disconnects: its unused tokens are refunded at once (refill alone would take ~13 s)
    a.sock.shutdown(2)
    a.close()
    deadline = time.monotonic() + 8
    while True:
        r = _post(live_server, "/v1/completions", {"model": m, "prompt": [1, 2000], "max_tokens": 100}, key=key)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200, r.text


# ---- overload, disconnects, draining ----------------------------------------------------------------------


def test_overload_rejects_with_retry_after_and_loses_nothing(live_server):
    n = 48
    body = {"model": live_server.model, "prompt": "Tell me a story", "max_tokens": 8, "ignore_eos": True}

    def one(_):
        r = _post(live_server, "/v1/completions", body, timeout=180)
        return r.status_code, r.headers.get("retry-after"), r.json()

    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    statuses = [s for s, _, _ in results]
    assert len(results) == n and set(statuses) <= {200, 429}, statuses
    rejected = [(ra, b) for s, ra, b in results if s == 429]
    ok = [b for s, _, b in results if s == 200]
    assert rejected, "no request was rejected: the bounded queue did not engage"
    assert ok, "no request was admitted"
    for ra, b in rejected:
        assert ra is not None and int(ra) >= 1 and b["error"]["type"] == "rate_limit_error"
    assert all(b["usage"]["completion_tokens"] == 8 and b["choices"][0]["finish_reason"] == "length" for b in ok)


def test_full_queue_refuses_before_reading_the_body(live_server):
    """While the waiting queue is full the Router answers 429 before it reads and validates a
    body (under a flood that work is what starves the engine): a malformed body then gets 429,
    and 400 again once the queue has room. A one-slot app makes "full" deterministic: request A
    runs, request B waits behind it, and the queue holds one."""
    from ray import serve
    from ray_fixtures import deploy_app, fault_server_args

    args = fault_server_args()
    args["engine"]["max_num_seqs"] = 1
    args["replicas"].update(num_replicas=1, test_hooks=False)
    args["admission"].update(max_waiting_requests=1, log_prompts=False)
    app = deploy_app(live_server, "onequeue", args, ready_replicas=1)
    try:
        router = serve.get_deployment_handle("Router", "onequeue")
        long = {"model": app.model, "prompt": "Tell me a story", "max_tokens": 480, "ignore_eos": True}
        def wait_until(in_flight: int, waiting: int) -> None:
            deadline = time.monotonic() + 30
            while True:
                snap = router.admission_snapshot.remote().result(timeout_s=10)
                if snap["in_flight"] == in_flight and snap["waiting_requests"] == waiting:
                    return
                assert time.monotonic() < deadline and not any(c.done() for c in calls), snap
                time.sleep(0.05)

        with cf.ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(_post, app, "/v1/completions", long, None, None, 180)]
            wait_until(in_flight=1, waiting=0)  # A started: it holds the only engine slot for seconds
            calls.append(pool.submit(_post, app, "/v1/completions", long, None, None, 180))
            wait_until(in_flight=2, waiting=1)  # B waits behind A: the queue (one) is full
            full = _post(app, "/v1/completions", None, raw=b"{not json")
            statuses = [c.result().status_code for c in calls]
        assert statuses == [200, 200], statuses
        _assert_error_body(full, 429, "rate_limit_error")
        assert "waiting to start" in full.json()["error"]["message"] and int(full.headers["retry-after"]) >= 1
        _assert_error_body(_post(app, "/v1/completions", None, raw=b"{not json"), 400, "invalid_request_error")
    finally:
        serve.delete("onequeue", _blocking=True)


def _replica_stats(live) -> dict[str, dict]:
    """Each LLMReplica's own report (its ``record_routing_stats``), read from every replica
    actor directly: a request through a handle would always go to the least loaded one."""
    import ray

    prefix = f"SERVE_REPLICA::{live.app_name}#LLMReplica#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    refs = {n: ray.get_actor(n, namespace="serve").record_routing_stats.remote() for n in names}
    return {n: ray.get(r, timeout=30) for n, r in refs.items()}


def _raw_request(live, body: dict, headers: dict | None = None) -> http.client.HTTPConnection:
    u = urllib.parse.urlparse(live.base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json", **(headers or {})})
    return conn


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_aborts_and_frees_kv(live_server, stream):
    body = {"model": live_server.model, "prompt": "Write a very long essay", "max_tokens": 400, "ignore_eos": True,
            "stream": stream}
    conn = _raw_request(live_server, body)
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200
        resp.fp.readline()  # the first event
    # the request is running in an engine and holds KV blocks
    deadline = time.monotonic() + 30
    while True:
        stats = _replica_stats(live_server)
        if any(s["num_running"] > 0 and s["kv_usage"] > 0 for s in stats.values()):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 20
    while True:
        stats = _replica_stats(live_server)
        if all(s["kv_usage"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0 and s["ongoing"] == 0
               for s in stats.values()):
            break
        assert time.monotonic() < deadline, f"KV not freed after disconnect: {stats}"
        time.sleep(0.3)
    assert len(stats) == NUM_REPLICAS
    # the aborted request's compute is billed to its tenant by the replica (the Router is gone)
    deadline = time.monotonic() + 20
    while True:
        billed = [line for line in _scrape(live_server.metrics_url).get("ray_mistral_serve_cost_usd_total", [])
                  if 'deployment="LLMReplica"' in line and 'tenant="anonymous"' in line]
        if billed and float(billed[0].rsplit(" ", 1)[1]) > 0:
            break
        assert time.monotonic() < deadline, "aborted compute not billed"
        time.sleep(1)


def test_draining_returns_503_with_retry_after(live_server):
    from ray import serve

    router = serve.get_app_handle(live_server.app_name)
    assert router.set_draining.remote(True).result(timeout_s=30) is True
    try:
        r = _post(live_server, "/v1/completions", {"model": live_server.model, "prompt": "x", "max_tokens": 2})
        _assert_error_body(r, 503, "service_unavailable_error")
        assert int(r.headers["retry-after"]) >= 1
        assert requests.get(live_server.base_url + "/ready", timeout=10).status_code == 503
        assert requests.get(live_server.base_url + "/health", timeout=10).status_code == 200
    finally:
        router.set_draining.remote(False).result(timeout_s=30)
    assert requests.get(live_server.base_url + "/ready", timeout=10).status_code == 200


# ---- metrics ------------------------------------------------------------------------------------------


def _scrape(url: str) -> dict[str, list[str]]:
    text = requests.get(url, timeout=10).text
    series: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("ray_mistral_serve_"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            series.setdefault(name, []).append(line)
    return series


def test_metrics_endpoint_has_engine_router_and_cost_series(live_server):
    from mistral_serve.serving.metrics import COST_SERIES, ENGINE_SERIES, ROUTER_SERIES

    alpha = _client(live_server, live_server.api_keys["alpha"])
    alpha.completions.create(model=live_server.model, prompt="metrics please", max_tokens=4,
                             extra_body={"ignore_eos": True})
    _post(live_server, "/v1/completions", {"model": "nope", "prompt": "x"})  # a rejection (unknown_model)

    def present(series):
        names = set(series)
        return [n for n in ENGINE_SERIES + ROUTER_SERIES + COST_SERIES
                if n not in names and n + "_bucket" not in names]

    deadline = time.monotonic() + 30
    seen: dict[str, list[str]] = {}
    while True:
        # Ray evicts a gauge whose export is late (two intervals), so collect over a few scrapes
        series = _scrape(live_server.metrics_url)
        for name, lines in series.items():
            seen.setdefault(name, []).extend(lines)
        series = seen
        missing = present(series)
        alpha_cost = [s for s in series.get("ray_mistral_serve_cost_usd_total", []) if 'tenant="alpha"' in s]
        rejected = [s for s in series.get("ray_mistral_serve_router_requests_rejected_total", [])
                    if 'reason="unknown_model"' in s]
        if not missing and alpha_cost and rejected:
            break
        assert time.monotonic() < deadline, f"missing after 30 s: {missing}; alpha cost {alpha_cost}"
        time.sleep(1)
    tokens = series["ray_mistral_serve_tokens_total"]
    assert any('kind="generation"' in s and 'tenant="alpha"' in s for s in tokens)
    assert any('kind="prompt"' in s for s in tokens)
    success = series["ray_mistral_serve_request_success_total"]
    assert any('finished_reason="length"' in s and 'model_name="tiny"' in s for s in success)
    # Serve's labels are there to aggregate by
    assert all('deployment="LLMReplica"' in s for s in series["ray_mistral_serve_kv_cache_usage_perc"])
    assert all('deployment="Router"' in s for s in series["ray_mistral_serve_router_requests_in_flight"])
    # tenant labels only from configured tenants (or empty for unauthenticated rejections)
    tenants = set(re.findall(r'tenant="([^"]*)"', "\n".join(sum(series.values(), []))))
    assert tenants <= {"alpha", "beta", "gamma", "anonymous", ""}, tenants
