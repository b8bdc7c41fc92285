"""Locust alternative to ``mistral-serve load`` for users who prefer Locust's UI and
distributed workers.  Locust is an optional extra (``pip install 'mistral-serve[locust]'``).

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 \\
        --users 16 --spawn-rate 4 --run-time 60s --headless \\
        --model tiny-mistral --endpoint completions --prompt-len 128 --output-len 64

Each user streams requests back to back (closed loop; add ``--wait`` seconds between them).
Reported in Locust's statistics:
    POST /v1/completions (or /v1/chat/completions)   whole request, send -> [DONE] (end-to-end)
    TTFT <path>     a custom entry fired with ``events.request.fire``: time to the first content chunk
    TPOT <path>     mean time per output token after the first (from ``usage.completion_tokens``)
Rejections (429/503) are failures with the status and Retry-After in the message; the user then
waits Retry-After seconds (capped by ``--max-retry-wait``).

Uses ``HttpUser`` (requests): with chunked transfer encoding, ``iter_lines`` yields each SSE
line as it arrives, which keeps TTFT honest.  (FastHttpUser's ``iter_content`` waits for a full
read buffer, which would delay the first token.)  Standalone: imports nothing from the project.
"""
from __future__ import annotations

import json
import random
import time

from locust import HttpUser, between, events, task


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny-mistral", help="model id sent in every request")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt length (token ids / words)")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens")
    parser.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                        help="completions only; chat always sends text")
    parser.add_argument("--workload", default="", help="workload JSON (prompt_token_ids, max_tokens): "
                                                       "overrides the lengths, cycled per user")
    parser.add_argument("--api-key", default="", help="Bearer token")
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos=true")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds between a user's requests")
    parser.add_argument("--max-retry-wait", type=float, default=5.0, help="cap on the Retry-After wait")


_WORDS = ("the of and to in is that for it as was with be by on not this are or from at which model "
          "server request token batch cache memory latency throughput queue replica stream").split()


class LLMUser(HttpUser):
    wait_time = between(0, 0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.model = getattr(o, "model", "tiny-mistral")
        self.endpoint = getattr(o, "endpoint", "completions")
        self.path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        self.prompt_len = getattr(o, "prompt_len", 128)
        self.output_len = getattr(o, "output_len", 64)
        self.text = getattr(o, "prompt_format", "ids") == "text" or self.endpoint == "chat"
        self.ignore_eos = not getattr(o, "no_ignore_eos", False)
        self.wait_s = getattr(o, "wait", 0.0)
        self.max_retry_wait = getattr(o, "max_retry_wait", 5.0)
        key = getattr(o, "api_key", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.workload = None
        path = getattr(o, "workload", "")
        if path:
            with open(path) as f:
                w = json.load(f)
            outs = w["max_tokens"]
            outs = outs if isinstance(outs, list) else [outs] * len(w["prompt_token_ids"])
            self.workload = list(zip(w["prompt_token_ids"], outs))
        self.rng = random.Random()
        self.i = self.rng.randrange(1 << 16)

    def _body(self) -> dict:
        if self.workload:
            ids, out = self.workload[self.i % len(self.workload)]
            self.i += 1
        else:
            ids, out = [self.rng.randrange(1000, 32000) for _ in range(self.prompt_len)], self.output_len
        body = {"model": self.model, "max_tokens": out, "stream": True, "temperature": 0.0,
                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        prompt = " ".join(self.rng.choice(_WORDS) for _ in ids) if self.text else ids
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def _fire(self, kind: str, ms: float) -> None:
        events.request.fire(request_type=kind, name=self.path, response_time=ms, response_length=0,
                            exception=None, context={})

    @task
    def stream(self) -> None:
        t0 = time.perf_counter()
        first = None
        tokens = chunks = 0
        done = False
        retry_wait = 0.0
        with self.client.post(self.path, json=self._body(), headers=self.headers, stream=True,
                              catch_response=True, name=self.path) as resp:
            if resp.status_code in (429, 503):
                ra = resp.headers.get("Retry-After")
                try:
                    retry_wait = min(float(ra), self.max_retry_wait) if ra else 0.0
                except ValueError:
                    retry_wait = 1.0
                resp.failure(f"rejected {resp.status_code} (Retry-After: {ra})")
            elif resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            else:
                nbytes = 0
                try:
                    for raw in resp.iter_lines():
                        nbytes += len(raw) + 1
                        line = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else raw.strip()
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(payload)
                        if "error" in chunk and not chunk.get("choices"):
                            raise RuntimeError(f"error in stream: {chunk['error']}")
                        choices = chunk.get("choices") or []
                        if choices:
                            c = choices[0]
                            content = (c.get("delta") or {}).get("content") if self.endpoint == "chat" else c.get("text")
                            if content:
                                chunks += 1
                                if first is None:
                                    first = time.perf_counter()
                        if chunk.get("usage"):
                            tokens = chunk["usage"].get("completion_tokens") or 0
                except Exception as e:  # noqa: BLE001 - reported as a Locust failure
                    resp.failure(f"{type(e).__name__}: {e}")
                else:
                    if not done:
                        resp.failure("stream ended without data: [DONE]")
                    else:
                        resp.success()
                # with stream=True Locust timed only the headers: report the whole stream instead
                resp.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
                resp.request_meta["response_length"] = nbytes
        end = time.perf_counter()
        if first is not None and done:
            self._fire("TTFT", (first - t0) * 1000)
            n = tokens or chunks
            if n > 1:
                self._fire("TPOT", (end - first) / (n - 1) * 1000)
        if retry_wait > 0:
            time.sleep(retry_wait)  # gevent-patched: yields to other users
        if self.wait_s > 0:
            time.sleep(self.wait_s)
