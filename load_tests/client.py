"""One streamed request, measured from the client side.

Per request we record, from the SSE stream:
    ttft_s     send -> first chunk that carries content (text / delta.content); role-only and
               usage-only chunks do not count
    itl_s      gaps between consecutive content chunks (a chunk may carry several tokens, so
               this is per chunk, not per token; ``tpot_s`` is the per-token average)
    e2e_s      send -> ``data: [DONE]`` (or the end of the body for a non-2xx answer)
    output_tokens / prompt_tokens from the final ``usage`` chunk (``stream_options.include_usage``);
               without one, output_tokens falls back to the number of content chunks
    cost_usd   ``usage.cost_usd`` when the server reports it
    cached_tokens  ``usage.prompt_tokens_details.cached_tokens`` (prefix cache) when reported
    status     HTTP status (0 when no response: connect error, timeout, cancelled)
    outcome    ``ok`` (2xx and a complete stream), ``rejected`` (429 / 503), ``error`` (anything
               else, including a 2xx whose stream broke off or carried an error object)
    retry_after_s  the ``Retry-After`` header (seconds or HTTP date) of a rejection
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp

REJECT_STATUSES = (429, 503)


@dataclass
class RequestRecord:
    id: int
    phase: str
    scheduled_s: float | None  # planned send time (open loop), relative to run start
    start_s: float  # actual send time, relative to run start
    prompt_len: int
    max_tokens: int
    end_s: float | None = None
    status: int = 0
    outcome: str = "error"
    error: str | None = None
    error_type: str | None = None  # http_<status>, timeout, connection, cancelled, incomplete_stream, ...
    server_error_type: str | None = None  # error.type (or .code) of an OpenAI error body
    retry_after_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunks: int = 0
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    usage_reported: bool = False
    cost_usd: float | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def first_token_s(self) -> float | None:
        return None if self.ttft_s is None else self.start_s + self.ttft_s

    @property
    def tpot_s(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1): mean time per output token after the first."""
        if self.ttft_s is None or self.e2e_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        """JSON-ready; times rounded to microseconds to keep report.json small."""
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        for k in ("scheduled_s", "start_s", "end_s", "ttft_s", "e2e_s", "tpot_s", "retry_after_s"):
            if d[k] is not None:
                d[k] = round(d[k], 6)
        d["itl_s"] = [round(g, 6) for g in self.itl_s]
        return d


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date."""
    if value is None:
        return None
    v = value.strip()
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, dt.timestamp() - now)


def classify(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    if status in REJECT_STATUSES:
        return "rejected"
    return "error"


def _content_of(chunk: dict, endpoint: str) -> tuple[str | None, str | None]:
    """(content, finish_reason) of the first choice of a chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return None, None
    c = choices[0] or {}
    if endpoint == "chat":
        content = (c.get("delta") or {}).get("content")
    else:
        content = c.get("text")
    return content, c.get("finish_reason")


def _error_from_body(text: str) -> tuple[str, str | None]:
    try:
        err = json.loads(text).get("error") or {}
        msg = err.get("message") or text
        return str(msg)[:300], err.get("type") or err.get("code")
    except (ValueError, AttributeError):
        return text[:300], None


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    body: dict,
    record: RequestRecord,
    *,
    endpoint: str,
    t0: float,
    headers: dict | None = None,
    timeout_s: float = 120.0,
) -> RequestRecord:
    """POST ``body`` and fill ``record`` in place from the streamed answer. Never raises,
    except ``asyncio.CancelledError`` (after recording the cancellation)."""
    t_send = time.perf_counter()
    record.start_s = t_send - t0
    last = None
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
            record.status = resp.status
            if resp.status < 200 or resp.status >= 300:
                text = await resp.text()
                record.outcome = classify(resp.status)
                record.retry_after_s = parse_retry_after(resp.headers.get("Retry-After"))
                record.error, record.server_error_type = _error_from_body(text)
                if record.outcome == "error":
                    record.error_type = f"http_{resp.status}"
                record.e2e_s = time.perf_counter() - t_send
                return record
            done = False
            async for raw in resp.content:
                now = time.perf_counter()
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, event:/id: fields
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    record.outcome = "error"
                    record.error = f"malformed SSE data line: {payload[:120]!r}"
                    record.error_type = "malformed_stream"
                    record.e2e_s = time.perf_counter() - t_send
                    return record
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk and not chunk.get("choices"):
                    record.error, record.server_error_type = _error_from_body(json.dumps(chunk))
                    record.error_type = "error_in_stream"
                    record.outcome = "error"
                    record.e2e_s = time.perf_counter() - t_send
                    return record
                content, finish = _content_of(chunk, endpoint)
                if finish:
                    record.finish_reason = finish
                if content:
                    record.chunks += 1
                    if last is None:
                        record.ttft_s = now - t_send
                    else:
                        record.itl_s.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    record.usage_reported = True
                    record.output_tokens = usage.get("completion_tokens")
                    record.prompt_tokens = usage.get("prompt_tokens")
                    if usage.get("cost_usd") is not None:
                        record.cost_usd = float(usage["cost_usd"])
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        record.cached_tokens = int(details["cached_tokens"])
            record.e2e_s = time.perf_counter() - t_send
            if not record.usage_reported:
                record.output_tokens = record.chunks
            if done:
                record.outcome = "ok"
            else:
                record.outcome = "error"
                record.error = "stream ended without data: [DONE]"
                record.error_type = "incomplete_stream"
            return record
    except asyncio.CancelledError:
        record.outcome = "error"
        record.error = "cancelled: still in flight at the run's hard deadline"
        record.error_type = "cancelled"
        raise
    except asyncio.TimeoutError:
        record.outcome = "error"
        record.error = f"client timeout after {timeout_s:g}s"
        record.error_type = "timeout"
        return record
    except (aiohttp.ClientError, OSError, ValueError) as e:
        record.outcome = "error"
        record.error = f"{type(e).__name__}: {e}"[:300]
        record.error_type = "connection"
        return record
    finally:
        record.end_s = time.perf_counter() - t0
        if record.e2e_s is None:
            record.e2e_s = time.perf_counter() - t_send
