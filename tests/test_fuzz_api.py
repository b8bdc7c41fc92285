"""Bad input against the live server (real Ray Serve, real HTTP):

- schemathesis fuzzes every operation of the Router's OpenAPI schema (``api.openapi()``; the
  request bodies are the pydantic models of openai_protocol.py) in positive and negative
  mode for a bounded number of examples each: never a 5xx, every error in OpenAI's shape, every
  stream well formed. Generation is kept cheap by capping max_tokens-like fields at 8 in the
  fuzzed requests (huge values are covered by the table below).
- a table of hostile inputs: oversized bodies (declared and chunked), deeply nested JSON,
  invalid UTF-8, huge n / max_tokens / logprobs, negative and non-finite sampling values, too
  many or too long stop strings, token ids out of range: a clear 4xx each, never a crash.

``FUZZ_EXAMPLES`` (env, default 100) sets the examples per operation and mode.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import urllib.parse

import pytest

from ray_fixtures import MAX_BODY_BYTES, MAX_MODEL_LEN

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
CAPPED = ("max_tokens", "max_completion_tokens", "min_tokens")
COUNTS: dict[str, dict[str, int]] = {}


def _router_schema(model: str) -> dict:
    from mistral_serve.serving.router import api

    schema = copy.deepcopy(api.openapi())
    bodies = {path: schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
              for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")}
    # Sharper than the pydantic models (model: any string; messages: any objects), so that positive
    # examples get past the model and role checks and reach the tokenizer and the engine.
    for path, body in bodies.items():
        model_schema = {"type": "string", "enum": [model]}
        body["properties"]["model"] = model_schema if path.startswith("/v1/") else {"anyOf": [model_schema,
                                                                                             {"type": "null"}]}
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                              "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}}}
    messages = {"type": "array", "minItems": 1, "maxItems": 4, "items": message}
    bodies["/v1/chat/completions"]["properties"]["messages"] = messages
    bodies["/v1/completions"]["properties"]["prompt"] = {"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 32767}}]}
    bodies["/tokenize"]["properties"]["messages"] = {"anyOf": [messages, {"type": "null"}]}
    bodies["/detokenize"]["properties"]["tokens"] = {"type": "array",
                                                     "items": {"type": "integer", "minimum": 0, "maximum": 32767}}
    # n: always 2..4 in positive examples, and echo always present on completions, so that
    # examples are served with several choices and with echo (cheap under _cap); n = 1 / null is
    # every other test's default, and negative mode, the hostile table and the 400 tests cover
    # the values outside.
    for path in ("/v1/completions", "/v1/chat/completions"):
        bodies[path]["properties"]["n"] = {"type": "integer", "minimum": 2, "maximum": 4}
        bodies[path]["required"] = [*bodies[path].get("required", []), "n"]
    bodies["/v1/completions"]["required"].append("echo")
    return schema


def _operations(model: str):
    schema = schemathesis.openapi.from_dict(_router_schema(model))
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


OPERATION_IDS = ["GET /health", "HEAD /health", "GET /ready", "HEAD /ready", "GET /v1/models", "POST /tokenize",
                 "POST /detokenize", "POST /v1/completions", "POST /v1/chat/completions"]


def _cap(body):
    """Keep fuzzed generations short (ints only: wrong types still go through as generated). A
    chat request without max_tokens asks for the rest of the context, which the live server's
    soft limit (policy reject) refuses: give those 8, so that chat examples can be served."""
    if isinstance(body, dict):
        for key in CAPPED:
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 8:
                body[key] = 8
        if "messages" in body and "model" in body and body.get("max_tokens") is None \
                and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 8
    return body


def check_openai_response(status: int, content_type: str, content: bytes, what: str) -> None:
    assert status < 500, f"{what}: {status} {content[:300]!r}"
    if content_type.startswith("text/event-stream"):
        assert status == 200, what
        events = [e for e in content.decode().split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]", (what, events[-2:])
        for e in events[:-1]:
            assert e.startswith("data: "), (what, e)
            obj = json.loads(e[len("data: "):])
            if "error" in obj:
                check_error_shape(obj, what)
        return
    obj = json.loads(content)
    if status >= 400:
        check_error_shape(obj, what)


def check_error_shape(obj, what: str) -> None:
    assert isinstance(obj, dict) and set(obj) == {"error"}, (what, obj)
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"}, (what, err)
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), (what, err)
    assert err["param"] is None or isinstance(err["param"], str), (what, err)
    assert err["code"] is None or isinstance(err["code"], str), (what, err)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("operation", OPERATION_IDS)
def test_schemathesis_fuzz(live_server, operation, mode):
    ops = _operations(live_server.model)
    assert set(ops) == set(OPERATION_IDS), sorted(ops)  # the schema lists every route
    op = ops[operation]
    if mode is GenerationMode.NEGATIVE and op.method.upper() in ("GET", "HEAD"):
        pytest.skip("GET and HEAD routes take no input to violate")
    session = requests.Session()
    counts = COUNTS.setdefault(operation, {})
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    served: dict[str, int] = {"n>1": 0, "echo": 0}  # the issue-11 fields, served (200)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case):
        if case.body is not None and not isinstance(case.body, (bytes, str)):
            case.body = _cap(case.body)
        resp = case.call(base_url=live_server.base_url, session=session, timeout=120)
        ctype = (resp.headers.get("content-type") or [""])[0]
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        if resp.status_code == 200 and isinstance(case.body, dict):
            n = case.body.get("n")
            served["n>1"] += isinstance(n, (int, float)) and not isinstance(n, bool) and n > 1
            served["echo"] += case.body.get("echo") is True
        if op.method.upper() == "HEAD":  # the GET answer's status, no body
            assert resp.status_code == 200 and resp.content == b"", (operation, resp.status_code)
            return
        check_openai_response(resp.status_code, ctype, resp.content, f"{operation} {str(case.body)[:300]}")
        if resp.status_code >= 400:
            msg = json.loads(resp.content)["error"]["message"]
            key = re.sub(r"\d+|'[^']*'|`[^`]*`", "_", msg)[:60]
            errors[key] = errors.get(key, 0) + 1

    fuzz()
    counts[mode.value] = sum(statuses.values())
    top = sorted(errors.items(), key=lambda kv: -kv[1])[:4]
    print(f"\nfuzz {operation} [{mode.value}]: {sum(statuses.values())} requests, statuses "
          f"{dict(sorted(statuses.items()))}; served {served}; top errors {top}")
    if op.method.upper() == "POST":
        assert sum(statuses.values()) >= EXAMPLES // 2, statuses
        if mode is GenerationMode.POSITIVE and operation != "POST /tokenize":
            assert statuses.get(200, 0) >= 1, f"no fuzzed request was served: {statuses}"
        if mode is GenerationMode.POSITIVE and operation.endswith("completions") and EXAMPLES >= 50:
            assert served["n>1"] >= 1, f"no fuzzed request with n > 1 was served: {served}"
            if operation == "POST /v1/completions":
                assert served["echo"] >= 1, f"no fuzzed request with echo was served: {served}"


# ---- hand-written hostile inputs ------------------------------------------------------------------

M = "__model__"
BAD_INPUTS = [
    # (id, path, raw body bytes or JSON-able object, status, param)
    ("nested-json-30k", "/v1/completions", b"[" * 30_000 + b"]" * 30_000, 400, None),
    ("nested-json-in-field", "/v1/completions",
     b'{"model": "__model__", "prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, None),
    ("nested-messages", "/v1/chat/completions",
     b'{"model": "__model__", "messages": [{"role": "user", "content": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000
     + b"}]}", 400, None),
    ("nested-300-levels", "/v1/chat/completions",
     b'{"model": "__model__", "messages": [{"role": "user", "content": ' + b"[" * 300 + b"]" * 300 + b"}]}", 400,
     "messages"),
    ("invalid-utf8", "/v1/completions", b'{"model": "__model__", "prompt": "\xff\xfe\xc3\x28"}', 400, None),
    ("invalid-utf8-tokenize", "/tokenize", b'{"prompt": "\xed\xa0\x80"}', 400, None),
    ("lone-surrogate-escape", "/v1/completions", b'{"model": "__model__", "prompt": "\\ud800", "max_tokens": 1}',
     400, None),
    ("surrogate-pair-escape-ok", "/v1/completions",
     b'{"model": "__model__", "prompt": "\\ud83d\\ude00", "max_tokens": 1}', 200, None),
    ("huge-n", "/v1/completions", {"model": M, "prompt": "x", "n": 10**9}, 400, "n"),
    ("n-2^70", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "n": 2**70}, 400, "n"),
    ("n-max-with-huge-max-tokens", "/v1/completions", {"model": M, "prompt": "x", "n": 16, "max_tokens": 10**9}, 400,
     "prompt"),
    ("echo-huge-logprobs", "/v1/completions", {"model": M, "prompt": "x", "echo": True, "logprobs": 10**6}, 400,
     "logprobs"),
    ("detokenize-huge-id", "/detokenize", {"tokens": [2**70]}, 400, "tokens"),
    ("huge-max-tokens", "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 10**12}, 400, "prompt"),
    ("huge-max-tokens-2^70", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**70}, 400, "messages"),
    ("huge-max-completion-tokens", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9}, 400, "messages"),
    ("negative-max-tokens", "/v1/completions", {"model": M, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("huge-logprobs", "/v1/completions", {"model": M, "prompt": "x", "logprobs": 10**6}, 400, "logprobs"),
    ("huge-top-logprobs", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "logprobs": True,
      "top_logprobs": 10**6}, 400, "logprobs"),
    ("negative-temperature", "/v1/completions", {"model": M, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("negative-top-k", "/v1/completions", {"model": M, "prompt": "x", "top_k": -3}, 400, "top_k"),
    ("negative-min-tokens", "/v1/completions", {"model": M, "prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ("negative-repetition-penalty", "/v1/completions", {"model": M, "prompt": "x", "repetition_penalty": -1}, 400,
     "repetition_penalty"),
    ("penalty-out-of-range", "/v1/completions", {"model": M, "prompt": "x", "presence_penalty": 1e300}, 400,
     "presence_penalty"),
    ("negative-seed", "/v1/completions", {"model": M, "prompt": "x", "seed": -1}, 400, "seed"),
    ("huge-seed", "/v1/completions", {"model": M, "prompt": "x", "seed": 2**80}, 400, "seed"),
    ("nan-temperature", "/v1/completions", b'{"model": "__model__", "prompt": "x", "temperature": NaN}', 400,
     "temperature"),
    ("nan-top-p", "/v1/chat/completions",
     b'{"model": "__model__", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "top_p": NaN}', 400,
     "top_p"),
    ("inf-presence-penalty", "/v1/completions",
     b'{"model": "__model__", "prompt": "x", "presence_penalty": Infinity}', 400, "presence_penalty"),
    ("neg-inf-frequency-penalty", "/v1/completions",
     b'{"model": "__model__", "prompt": "x", "frequency_penalty": -Infinity}', 400, "frequency_penalty"),
    ("nan-min-p", "/v1/completions", b'{"model": "__model__", "prompt": "x", "min_p": NaN}', 400, "min_p"),
    ("nan-repetition-penalty", "/v1/completions",
     b'{"model": "__model__", "prompt": "x", "repetition_penalty": NaN}', 400, "repetition_penalty"),
    ("too-many-stops", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stop": ["s"] * 1000}, 400,
     "stop"),
    ("empty-stop-string", "/v1/completions", {"model": M, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("huge-stop-string", "/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2, "stop": "z" * 60_000}, None,
     None),
    ("stop-not-strings", "/v1/completions", {"model": M, "prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ("stop-token-id-out-of-vocab", "/v1/completions",
     {"model": M, "prompt": "x", "max_tokens": 2, "stop_token_ids": [10**12, -1]}, 400, "stop_token_ids"),
    ("negative-token-id", "/v1/completions", {"model": M, "prompt": [1, -7]}, 400, "prompt"),
    ("float-token-id", "/v1/completions", {"model": M, "prompt": [1, 2.5]}, 400, "prompt"),
    ("tokenize-ids-out-of-vocab", "/tokenize", {"prompt": [10**15]}, 400, "prompt"),
    ("prompt-too-long-for-context", "/v1/completions", {"model": M, "prompt": [5] * (MAX_MODEL_LEN + 1)}, 400,
     "prompt"),
    ("messages-not-list", "/v1/chat/completions", {"model": M, "messages": "hi"}, 400, "messages"),
    ("message-content-number", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": 5}]},
     400, "messages"),
    ("image-part", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages"),
    ("body-null", "/v1/completions", b"null", 400, None),
    ("body-string", "/v1/chat/completions", b'"hello"', 400, None),
    ("empty-body", "/v1/completions", b"", 400, None),
    ("model-not-string", "/v1/completions", {"model": ["a"], "prompt": "x"}, 400, "model"),
]


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_hostile_input_is_a_clear_4xx(live_server, row):
    name, path, body, status, param = row
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    raw = raw.replace(b"__model__", live_server.model.encode())
    r = requests.post(live_server.base_url + path, data=raw, headers={"content-type": "application/json"},
                      timeout=120)
    if status is None:  # acceptable either way, but never a 5xx
        assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    else:
        assert r.status_code == status, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        check_error_shape(body, name)
        if param is not None:
            assert body["error"]["param"] == param, body
    assert requests.get(live_server.base_url + "/ready", timeout=30).status_code == 200  # still serving


def _raw_http(live, head: bytes, body_chunks: list[bytes], timeout: float = 60) -> tuple[int, bytes]:
    u = urllib.parse.urlparse(live.base_url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered early and closed
        data = b""
        while b"\r\n\r\n" not in data:
            part = s.recv(65536)
            if not part:
                break
            data += part
        head_part, _, rest = data.partition(b"\r\n\r\n")
        status = int(head_part.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head_part.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(rest) < length:
            part = s.recv(65536)
            if not part:
                break
            rest += part
        return status, rest


def test_oversized_bodies_declared_and_chunked(live_server):
    big = json.dumps({"model": live_server.model, "prompt": "x" * (4 * MAX_BODY_BYTES)}).encode()
    # declared: refused from the Content-Length header
    r = requests.post(live_server.base_url + "/v1/completions", data=big, timeout=60,
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # chunked, no Content-Length: refused once the running size passes the limit
    chunks = [big[i:i + 8192] for i in range(0, len(big), 8192)]
    wire = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"]
    status, body = _raw_http(live_server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", wire)
    assert status == 413, (status, body[:200])
    check_error_shape(json.loads(body), "chunked")
    # a lying Content-Length (small) with a larger body is cut at the declared size: a JSON error
    status, body = _raw_http(live_server, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 10\r\nConnection: close\r\n\r\n", [b'{"prompt": "abcdef"}'])
    assert 400 <= status < 500, (status, body[:200])
    assert requests.get(live_server.base_url + "/ready", timeout=30).status_code == 200
