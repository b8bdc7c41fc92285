"""Phases of load: open loop (arrivals at scheduled times, independent of the server) and closed
loop (a fixed number of users, each sending its next request when the previous one finished).

Every phase is bounded: it stops issuing at its issue deadline or when the run's request budget
is spent, then waits for in-flight requests until its drain deadline, then cancels what is still
running (recorded as errors of kind ``cancelled``), so ``sent = ok + rejected + errors`` holds
for every phase and the whole run.  Requests that an open-loop phase could not send because
``max_in_flight`` requests were already open are counted as ``client_dropped`` (never sent).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .arrivals import RateSchedule, arrival_times
from .client import RequestRecord, send_request
from .workload import Workload, build_body


def api_root(base_url: str) -> str:
    """``http://h:8000`` or ``http://h:8000/v1`` -> ``http://h:8000/v1``."""
    b = base_url.rstrip("/")
    return b if b.endswith("/v1") else b + "/v1"


def endpoint_url(base_url: str, endpoint: str) -> str:
    return api_root(base_url) + ("/chat/completions" if endpoint == "chat" else "/completions")


async def discover_model(session: aiohttp.ClientSession, base_url: str, headers: dict | None) -> str:
    """First model id from ``GET /v1/models``."""
    async with session.get(api_root(base_url) + "/models", headers=headers,
                           timeout=aiohttp.ClientTimeout(total=10)) as r:
        r.raise_for_status()
        data = await r.json()
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}: GET /v1/models listed no model; pass --model")
    return models[0]["id"]


@dataclass
class PhaseResult:
    name: str
    mode: str  # "rate" | "concurrency"
    offered: float | None  # mean offered req/s (rate) or concurrency
    start_s: float
    issue_end_s: float
    end_s: float
    records: list[RequestRecord]
    client_dropped: int = 0
    schedule: list[list[float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Runner:
    """Shared state of one run: HTTP session, request factory, budget, records, progress."""

    session: aiohttp.ClientSession
    url: str
    endpoint: str
    model: str
    workload: Workload
    headers: dict | None = None
    max_requests: int = 10_000
    request_timeout_s: float = 120.0
    max_in_flight: int = 1024
    honor_retry_after: bool = True
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict | None = None
    t0: float = field(default_factory=time.perf_counter)
    records: list[RequestRecord] = field(default_factory=list)
    in_flight: int = 0

    @property
    def budget_left(self) -> int:
        return self.max_requests - len(self.records)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def _one(self, phase: str, scheduled_s: float | None) -> RequestRecord:
        spec = self.workload.next()
        rec = RequestRecord(id=len(self.records), phase=phase, scheduled_s=scheduled_s,
                            start_s=self.now(), prompt_len=spec.prompt_len, max_tokens=spec.max_tokens)
        self.records.append(rec)
        body = build_body(spec, endpoint=self.endpoint, model=self.model, temperature=self.temperature,
                          ignore_eos=self.ignore_eos, extra=self.extra_body)
        self.in_flight += 1
        try:
            return await send_request(self.session, self.url, body, rec, endpoint=self.endpoint,
                                      t0=self.t0, headers=self.headers, timeout_s=self.request_timeout_s)
        finally:
            self.in_flight -= 1

    async def _drain(self, tasks: set[asyncio.Task], drain_deadline_s: float) -> None:
        pending = {t for t in list(tasks) if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.0, drain_deadline_s - self.now()))
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def open_loop(self, name: str, schedule: RateSchedule, *, drain_deadline_s: float,
                        arrival: str = "poisson", seed: int = 0) -> PhaseResult:
        """Send at the arrival times of ``schedule`` (phase-relative) for ``schedule.end`` s."""
        start = self.now()
        issue_end = start + schedule.end
        first = len(self.records)
        tasks: set[asyncio.Task] = set()
        dropped = 0
        for at in arrival_times(schedule, kind=arrival, seed=seed):
            if self.budget_left <= 0:
                break
            target = start + at
            delay = target - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.now() >= issue_end:
                break
            if self.in_flight >= self.max_in_flight:
                dropped += 1
                continue
            task = asyncio.create_task(self._one(name, target))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(0)  # let the request start before the next arrival
        if self.budget_left > 0 and self.now() < issue_end:
            await asyncio.sleep(issue_end - self.now())
        issue_end_actual = min(self.now(), issue_end) if self.budget_left > 0 else self.now()
        await self._drain(tasks, drain_deadline_s)
        n = schedule.expected_count()
        return PhaseResult(name=name, mode="rate", offered=n / schedule.end if schedule.end else None,
                           start_s=start, issue_end_s=issue_end_actual, end_s=self.now(),
                           records=self.records[first:], client_dropped=dropped,
                           schedule=[[start + t, r] for t, r in schedule.points])

    async def closed_loop(self, name: str, concurrency: int, duration_s: float, *,
                          drain_deadline_s: float) -> PhaseResult:
        """``concurrency`` users, each sending back to back for ``duration_s`` s."""
        start = self.now()
        issue_end = start + duration_s
        first = len(self.records)

        async def user() -> None:
            while self.now() < issue_end and self.budget_left > 0:
                rec = await self._one(name, None)
                wait = 0.0
                if rec.outcome == "rejected" and self.honor_retry_after:
                    wait = rec.retry_after_s if rec.retry_after_s is not None else 0.1
                elif rec.outcome == "error" and rec.status == 0:
                    wait = 0.05  # no answer at all: do not spin on a dead server
                wait = min(wait, issue_end - self.now())
                if wait > 0:
                    await asyncio.sleep(wait)

        tasks = {asyncio.create_task(user()) for _ in range(concurrency)}
        await asyncio.wait(tasks, timeout=max(0.0, issue_end - self.now()))
        await self._drain(tasks, drain_deadline_s)
        return PhaseResult(name=name, mode="concurrency", offered=float(concurrency), start_s=start,
                           issue_end_s=min(issue_end, self.now()), end_s=self.now(),
                           records=self.records[first:])
