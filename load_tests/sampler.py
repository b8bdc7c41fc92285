"""Samples server-side state while a run is going: a Prometheus text endpoint (``--metrics-url``)
and the resident memory of a process (``--pid``).

Series read from the metrics endpoint (names follow docs/metrics.md; ``prefix`` defaults to
``ray_mistral_serve_`` and can be set to ``vllm:`` for a vLLM peer):
    replicas        sum of ``ray_serve_deployment_replica_healthy`` over the replicas whose
                    ``deployment`` label contains ``deployment`` (default ``LLMReplica``)
    waiting/running sum of ``{prefix}num_requests_waiting`` / ``{prefix}num_requests_running``
    kv_usage        mean (and max) of ``{prefix}kv_cache_usage_perc`` over replicas, 0..1
    server_rss_bytes sum of ``process_resident_memory_bytes`` (prometheus_client process metrics)
    ray_rss_bytes   sum of Ray's ``ray_component_rss_mb`` x 1e6 (every Ray worker / component)
    admitted/rejected router counters ``{prefix}router_requests_{admitted,rejected}_total``
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

try:  # psutil comes with the project's dependencies (via accelerate); /proc is the fallback
    import psutil  # type: ignore
except ImportError:  # pragma: no cover
    psutil = None


def parse_metrics(text: str, *, prefix: str = "ray_mistral_serve_",
                  deployment: str = "LLMReplica") -> dict[str, Any]:
    """Extract the series above from one Prometheus text exposition."""
    sums: dict[str, float] = {}
    seen: set[str] = set()
    kv: list[float] = []
    replicas = 0.0
    replicas_seen = False
    want = {
        f"{prefix}num_requests_waiting": "waiting",
        f"{prefix}num_requests_running": "running",
        "process_resident_memory_bytes": "server_rss_bytes",
        f"{prefix}router_requests_admitted_total": "admitted_total",
        f"{prefix}router_requests_rejected_total": "rejected_total",
        f"{prefix}router_requests_in_flight": "router_in_flight",
    }
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name, value = s.name, float(s.value)
            if name == "ray_serve_deployment_replica_healthy":
                if deployment in s.labels.get("deployment", ""):
                    replicas += value
                    replicas_seen = True
            elif name == f"{prefix}kv_cache_usage_perc":
                kv.append(value)
            elif name == "ray_component_rss_mb":
                sums["ray_rss_bytes"] = sums.get("ray_rss_bytes", 0.0) + value * 1e6
                seen.add("ray_rss_bytes")
            elif name in want:
                key = want[name]
                sums[key] = sums.get(key, 0.0) + value
                seen.add(key)
    out: dict[str, Any] = {k: None for k in (*want.values(), "ray_rss_bytes")}
    out.update({k: sums[k] for k in seen})
    out["replicas"] = replicas if replicas_seen else None
    out["kv_usage"] = sum(kv) / len(kv) if kv else None
    out["kv_usage_max"] = max(kv) if kv else None
    if out["waiting"] is not None or out["running"] is not None:
        out["queue_depth"] = (out["waiting"] or 0.0) + (out["running"] or 0.0)
    else:
        out["queue_depth"] = None
    return out


def process_rss(pid: int) -> dict[str, int | None]:
    """RSS of ``pid`` and of ``pid`` plus all its descendants (bytes)."""
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            own = p.memory_info().rss
            tree = own
            for c in p.children(recursive=True):
                try:
                    tree += c.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            return {"rss_bytes": own, "rss_tree_bytes": tree}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return {"rss_bytes": None, "rss_tree_bytes": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return {"rss_bytes": int(line.split()[1]) * 1024, "rss_tree_bytes": None}
    except OSError:
        pass
    return {"rss_bytes": None, "rss_tree_bytes": None}


class Sampler:
    """Background sampling every ``interval_s`` until :meth:`stop`."""

    def __init__(self, *, metrics_url: str | None = None, pid: int | None = None,
                 interval_s: float = 2.0, prefix: str = "ray_mistral_serve_",
                 deployment: str = "LLMReplica", t0: float | None = None) -> None:
        self.metrics_url = metrics_url
        self.pid = pid
        self.interval_s = interval_s
        self.prefix = prefix
        self.deployment = deployment
        self.t0 = time.perf_counter() if t0 is None else t0
        self.samples: list[dict] = []
        self.errors = 0
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.metrics_url or self.pid)

    async def sample_once(self, session: aiohttp.ClientSession | None) -> dict:
        row: dict[str, Any] = {"t_s": round(time.perf_counter() - self.t0, 3)}
        if self.metrics_url and session is not None:
            try:
                to = aiohttp.ClientTimeout(total=max(1.0, self.interval_s))
                async with session.get(self.metrics_url, timeout=to) as r:
                    text = await r.text()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")
                row.update(parse_metrics(text, prefix=self.prefix, deployment=self.deployment))
            except Exception as e:  # noqa: BLE001 - a failed scrape is recorded, not fatal
                self.errors += 1
                row["metrics_error"] = f"{type(e).__name__}: {e}"[:200]
        if self.pid:
            row.update(process_rss(self.pid))
        self.samples.append(row)
        return row

    async def _loop(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                await self.sample_once(session)
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
                except asyncio.TimeoutError:
                    pass
            await self.sample_once(session)  # one last sample at the end

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(self._task, timeout=max(5.0, 2 * self.interval_s))
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._task = None


async def scrape_once(url: str, *, prefix: str = "ray_mistral_serve_",
                      deployment: str = "LLMReplica", timeout_s: float = 5.0) -> dict | None:
    """One scrape (for before/after counter deltas). None if it failed."""
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status != 200:
                    return None
                return parse_metrics(await r.text(), prefix=prefix, deployment=deployment)
    except Exception:  # noqa: BLE001
        return None
