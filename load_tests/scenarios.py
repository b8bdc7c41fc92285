"""Named scenarios.  Each is a :class:`Scenario` object in the :data:`SCENARIOS` table:

    steady    one phase at --rate (open loop) or --concurrency (closed loop)
    sweep     loads from low to saturation; latency-throughput curve and the saturation point
    overload  factor x (given or measured) saturation rate; proves sent = ok + rejected + errors
    ramp      offered rate rises then falls; with --metrics-url, replica count and queue depth
    soak      a long steady phase; memory (--pid RSS, server process metrics) and KV usage
              sampled over time, with least-squares slopes

A scenario says what it adds to the CLI (its options, whether it is open-loop only, which
options no other scenario takes), which phases it runs and what it concludes from them; the
driver :func:`run_scenario` does what every run shares (HTTP session, server sampling, progress,
the report dict).  The CLI reads the table for its choices, help and checks, so a new scenario
is one class and one table entry, and nothing dispatches on the scenario's name.

Time bound of every scenario: it issues requests for at most --duration seconds and waits at
most --drain-timeout more for in-flight requests; the request budget is --max-requests.
"""
from __future__ import annotations

import abc
import argparse
import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from tqdm import tqdm

from . import __version__
from .argtypes import pos_float, pos_int
from .arrivals import RateSchedule
from .runner import PhaseResult, Runner, discover_model, endpoint_url
from .sampler import Sampler, scrape_once
from .stats import SLO, find_saturation, slope, summarize, timeline
from .workload import Workload


def phase_window(p: PhaseResult) -> tuple[float, float]:
    """Throughput window of a phase: its start to when its last request finished (or was cut)."""
    last = max((r.end_s for r in p.records if r.end_s is not None), default=p.issue_end_s)
    return p.start_s, max(p.issue_end_s, last)


def phase_dict(p: PhaseResult, slo: SLO) -> dict:
    s = summarize(p.records, slo, window=phase_window(p), client_dropped=p.client_dropped)
    return {"name": p.name, "mode": p.mode, "offered": p.offered, "start_s": round(p.start_s, 3),
            "issue_end_s": round(p.issue_end_s, 3), "end_s": round(p.end_s, 3), "summary": s, **p.extra}


class Progress:
    """tqdm bar over the planned duration, with live counts."""

    def __init__(self, runner: Runner, total_s: float, enabled: bool, desc: str) -> None:
        self.runner = runner
        self.bar = tqdm(total=round(total_s, 1), unit="s", desc=desc, disable=not enabled,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s{postfix}", leave=True)
        self.phase = ""
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            self.update()
            await asyncio.sleep(0.5)

    def update(self) -> None:
        if self.bar.disable:
            return
        recs = self.runner.records
        ok = sum(r.outcome == "ok" and r.end_s is not None for r in recs)
        rej = sum(r.outcome == "rejected" for r in recs)
        err = sum(r.outcome == "error" and r.end_s is not None for r in recs)
        self.bar.n = min(self.bar.total, round(self.runner.now(), 1))
        self.bar.set_postfix_str(f"{self.phase} sent={len(recs)} ok={ok} rej={rej} err={err} "
                                 f"inflight={self.runner.in_flight}", refresh=True)

    def __enter__(self) -> "Progress":
        self._task = asyncio.create_task(self._tick())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._task:
            self._task.cancel()
        self.update()
        self.bar.close()


def _slo(a: argparse.Namespace) -> SLO:
    return SLO(ttft_s=a.slo_ttft, itl_p99_s=a.slo_itl, e2e_s=a.slo_e2e)


def _doubling(top: int) -> list[int]:
    out, c = [], 1
    while c < top:
        out.append(c)
        c *= 2
    out.append(top)
    return out


@dataclass
class RunContext:
    """One run as a scenario sees it: the runner and the deadline while it issues load; the phases
    it ran, the server samples and the wall time when it summarizes.  ``findings`` becomes the
    report's ``scenario`` key (its ``notes`` list included)."""

    a: argparse.Namespace
    runner: Runner
    progress: Progress
    slo: SLO
    hard_deadline_s: float
    phases: list[PhaseResult] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=lambda: {"notes": []})
    samples: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def notes(self) -> list[str]:
        return self.findings["notes"]

    @property
    def window(self) -> tuple[float, float]:
        """Throughput window of the whole run: first phase start to the last phase's end."""
        ends = [phase_window(p)[1] for p in self.phases]
        return (self.phases[0].start_s if self.phases else 0.0, max(ends or [self.wall_s]))

    @property
    def client_dropped(self) -> int:
        return sum(p.client_dropped for p in self.phases)


class Scenario(abc.ABC):
    """A named load pattern: its CLI options, its phases (:meth:`run`) and its conclusions
    (:meth:`summarize`)."""

    name: ClassVar[str]
    help: ClassVar[str]
    """A few words for the CLI's scenario help."""
    open_loop_only: ClassVar[bool] = False
    """``--concurrency`` is a usage error (the scenario is defined by offered rates)."""
    exclusive: ClassVar[tuple[str, ...]] = ()
    """Options (argparse dests, default ``None``) that only this scenario takes; the CLI rejects
    them with any other, since they would be silently ignored there."""

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add this scenario's options to the CLI's "scenario options" group."""

    @abc.abstractmethod
    async def run(self, ctx: RunContext) -> str:
        """Run the phases (appended to ``ctx.phases``); return the load description of the report."""

    def summarize(self, ctx: RunContext, phase_dicts: list[dict]) -> dict:
        """The report's ``summary``; scenario conclusions go into ``ctx.findings``.  By default the
        summary of every request of the run."""
        return summarize(ctx.runner.records, ctx.slo, window=ctx.window, client_dropped=ctx.client_dropped)


class Steady(Scenario):
    name = "steady"
    help = "one phase"

    async def run(self, ctx: RunContext) -> str:
        a, runner, progress = ctx.a, ctx.runner, ctx.progress
        if a.concurrency:
            progress.phase = f"c={a.concurrency}"
            ctx.phases.append(await runner.closed_loop("steady", a.concurrency, a.duration,
                                                       drain_deadline_s=ctx.hard_deadline_s))
            return f"closed loop, {a.concurrency} concurrent users for {a.duration:g} s"
        rate = a.rate if a.rate is not None else 1.0
        progress.phase = f"{rate:g} req/s"
        ctx.phases.append(await runner.open_loop("steady", RateSchedule.constant(rate, a.duration),
                                                 drain_deadline_s=ctx.hard_deadline_s, arrival=a.arrival,
                                                 seed=a.seed))
        return f"open loop, {a.arrival} arrivals at {rate:g} req/s for {a.duration:g} s"


class Sweep(Scenario):
    name = "sweep"
    help = "low load to saturation"
    exclusive = ("rates",)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--rates", help="sweep: explicit comma-separated rates, low to high")
        group.add_argument("--steps", type=pos_int, default=6, help="sweep: number of steps")
        group.add_argument("--start-rate", type=pos_float, default=0.5,
                           help="sweep without --rate: first rate, doubled per step")
        group.add_argument("--growth-min", type=float, default=0.1,
                           help="sweep: a step whose output tok/s grows less than this (relative) is past "
                                "saturation")

    async def run(self, ctx: RunContext) -> str:
        a, runner, progress, scen = ctx.a, ctx.runner, ctx.progress, ctx.findings
        if a.concurrency:
            mode, levels, adaptive = "concurrency", _doubling(a.concurrency), False
        elif a.rates:
            mode, levels, adaptive = "rate", [float(x) for x in a.rates.split(",")], False
        elif a.rate is not None:
            mode, adaptive = "rate", False
            levels = [a.rate / 2 ** (a.steps - 1 - i) for i in range(a.steps)]
        else:
            mode, adaptive = "rate", True
            levels = [a.start_rate * 2 ** i for i in range(a.steps)]
        n_steps = len(levels)
        step_s = a.duration / n_steps
        scen.update(mode=mode, levels=levels, step_duration_s=step_s, adaptive=adaptive)
        summaries: list[dict] = []
        sat: dict = {}
        for i, lvl in enumerate(levels):
            left = a.duration - runner.now()
            if left < min(1.0, step_s / 2) or runner.budget_left <= 0:
                ctx.notes.append(f"stopped before step {i}: time or request budget spent")
                break
            d = min(step_s, left)
            drain = min(runner.now() + d + a.drain_timeout, ctx.hard_deadline_s)
            name = f"step{i}"
            if mode == "concurrency":
                progress.phase = f"{name} c={int(lvl)}"
                p = await runner.closed_loop(name, int(lvl), d, drain_deadline_s=drain)
            else:
                progress.phase = f"{name} {lvl:.3g} req/s"
                p = await runner.open_loop(name, RateSchedule.constant(lvl, d), drain_deadline_s=drain,
                                           arrival=a.arrival, seed=a.seed + i)
            ctx.phases.append(p)
            s = summarize(p.records, ctx.slo, window=phase_window(p))
            summaries.append({**s, "offered": p.offered, "mode": mode})
            sat = find_saturation(summaries, growth_min=a.growth_min)
            if sat["found"]:
                break
        scen["saturation"] = sat or find_saturation(summaries)
        scen["curve"] = [{"offered": s["offered"], "req_per_s": s["req_per_s"],
                          "output_tok_per_s": s["output_tok_per_s"], "goodput_req_per_s": s["goodput_req_per_s"],
                          "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
                          "itl_p99_s": s["itl_p99_s"], "e2e_p99_s": s["e2e_p99_s"]}
                         for s in summaries]
        unit = "users" if mode == "concurrency" else "req/s"
        return (f"sweep over {mode} {', '.join(f'{x:.3g}' for x in levels)} {unit}, {step_s:.3g} s per step, "
                f"stops at saturation")


class Overload(Scenario):
    name = "overload"
    help = "factor x saturation rate"
    open_loop_only = True

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--factor", type=pos_float, default=10.0, help="overload: multiple of the saturation rate")
        group.add_argument("--saturation-rate", type=pos_float,
                           help="overload: the saturation rate (same as --rate)")
        group.add_argument("--probe-concurrency", type=pos_int, default=16,
                           help="overload: users of the saturation probe")
        group.add_argument("--probe-duration", type=pos_float,
                           help="overload: probe seconds (default min(10, duration/4))")

    async def run(self, ctx: RunContext) -> str:
        a, runner, progress = ctx.a, ctx.runner, ctx.progress
        if a.concurrency:
            raise ValueError("overload is open-loop: give --rate (the saturation rate) or let it measure one")
        sat = a.saturation_rate if a.saturation_rate is not None else a.rate
        source = "given"
        if sat is None:
            probe_s = a.probe_duration or min(10.0, a.duration / 4)
            progress.phase = f"probe c={a.probe_concurrency}"
            p = await runner.closed_loop("probe", a.probe_concurrency, probe_s,
                                         drain_deadline_s=min(runner.now() + probe_s + a.drain_timeout,
                                                              ctx.hard_deadline_s))
            ctx.phases.append(p)
            s = summarize(p.records, window=phase_window(p))
            sat = s["req_per_s"] or 0.0
            source = f"measured: closed loop at {a.probe_concurrency} users for {probe_s:g} s"
            if sat <= 0:
                sat = 1.0
                ctx.notes.append("the probe completed no request; assuming a saturation rate of 1 req/s")
        rate = a.factor * sat
        d = a.duration - runner.now()
        if d <= 0:
            raise ValueError("no time left for the overload phase: raise --duration")
        progress.phase = f"overload {rate:.3g} req/s"
        ctx.phases.append(await runner.open_loop("overload", RateSchedule.constant(rate, d),
                                                 drain_deadline_s=ctx.hard_deadline_s, arrival=a.arrival,
                                                 seed=a.seed))
        ctx.findings.update(saturation_rate=sat, saturation_source=source, factor=a.factor, overload_rate=rate,
                            overload_duration_s=d)
        return f"open loop at {a.factor:g} x {sat:.3g} req/s = {rate:.3g} req/s for {d:.3g} s ({source})"

    def summarize(self, ctx: RunContext, phase_dicts: list[dict]) -> dict:
        """The overload phase alone (the probe is not part of it), plus the accounting of that
        phase and of the whole run."""
        main = [p for p in ctx.phases if p.name == "overload"]
        summary = phase_dicts[-1]["summary"] if main else summarize(ctx.runner.records, ctx.slo, window=ctx.window)
        whole = super().summarize(ctx, phase_dicts)
        ctx.findings["accounting"] = {
            "sent": summary["sent"], "ok": summary["ok"], "rejected": summary["rejected"],
            "errors": summary["errors"], "balanced": summary["accounting_balanced"],
            "whole_run": {k: whole[k] for k in ("sent", "ok", "rejected", "errors", "accounting_balanced")}}
        return summary


class Ramp(Scenario):
    name = "ramp"
    help = "rate up then down (+ replica count)"
    open_loop_only = True
    exclusive = ("schedule",)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--schedule", help="ramp: 't:rate,...' points (s:req/s), linear in between")
        group.add_argument("--min-rate", type=pos_float, help="ramp: start/end rate (default peak/10)")
        group.add_argument("--hold-frac", type=float, default=0.0, help="ramp: fraction of the time held at the peak")

    async def run(self, ctx: RunContext) -> str:
        a = ctx.a
        if a.concurrency:
            raise ValueError("ramp is open-loop: give the peak --rate or a --schedule")
        if a.schedule:
            sched = RateSchedule.parse(a.schedule)
            if sched.end > a.duration:
                raise ValueError(f"--schedule ends at {sched.end:g} s, after --duration {a.duration:g} s")
        else:
            peak = a.rate if a.rate is not None else 4.0
            low = a.min_rate if a.min_rate is not None else peak / 10
            sched = RateSchedule.triangle(low, peak, a.duration, hold_frac=a.hold_frac)
        ctx.progress.phase = f"ramp peak {sched.peak:.3g} req/s"
        p = await ctx.runner.open_loop("ramp", sched, drain_deadline_s=ctx.hard_deadline_s, arrival=a.arrival,
                                       seed=a.seed)
        ctx.phases.append(p)
        ctx.findings["schedule"] = p.schedule  # run-relative (t_s, req/s) points
        return "open loop, rate schedule " + ", ".join(f"{r:.3g} req/s @ {t:g} s" for t, r in sched.points)

    def summarize(self, ctx: RunContext, phase_dicts: list[dict]) -> dict:
        """Adds the range of the healthy replica count and the deepest queue that the samples saw."""
        reps = [s["replicas"] for s in ctx.samples if s.get("replicas") is not None]
        qd = [s["queue_depth"] for s in ctx.samples if s.get("queue_depth") is not None]
        if reps or qd:
            ctx.findings["replicas"] = {"min": min(reps) if reps else None, "max": max(reps) if reps else None,
                                        "last": reps[-1] if reps else None,
                                        "queue_depth_max": max(qd) if qd else None}
        elif not ctx.a.metrics_url:
            ctx.notes.append("no --metrics-url: replica count and queue depth were not sampled")
        else:
            ctx.notes.append("the metrics endpoint had no replica / queue series (check --metrics-prefix, "
                             "--deployment)")
        return super().summarize(ctx, phase_dicts)


class Soak(Steady):
    """A steady run (same phase) whose point is the drift over time, not the summary."""

    name = "soak"
    help = "long steady run (+ memory/KV drift)"

    def summarize(self, ctx: RunContext, phase_dicts: list[dict]) -> dict:
        """Adds least-squares slopes of memory, KV usage, TTFT and e2e over the run."""
        # only samples taken while load was applied (not the idle tail after issuing stopped)
        steady = [s for s in ctx.samples if s["t_s"] <= (ctx.phases[0].issue_end_s if ctx.phases else ctx.wall_s)]
        ts = [s["t_s"] for s in steady]
        slopes = {k: slope(ts, [s.get(k) for s in steady])
                  for k in ("rss_bytes", "rss_tree_bytes", "server_rss_bytes", "ray_rss_bytes", "kv_usage")}
        ok = [r for r in ctx.runner.records if r.outcome == "ok"]
        slopes["ttft_s"] = slope([r.start_s for r in ok], [r.ttft_s for r in ok])
        slopes["e2e_s"] = slope([r.start_s for r in ok], [r.e2e_s for r in ok])
        ctx.findings["slopes"] = {k: v for k, v in slopes.items() if v is not None}
        if not ctx.a.pid and not ctx.a.metrics_url:
            ctx.notes.append("neither --pid nor --metrics-url: only latency drift was measured")
        return super().summarize(ctx, phase_dicts)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (Steady(), Sweep(), Overload(), Ramp(), Soak())}
"""Every scenario by name, in the order of the CLI's help."""


async def run_scenario(a: argparse.Namespace, workload: Workload) -> dict:
    """Run ``SCENARIOS[a.scenario]`` with server sampling and progress; return the report dict."""
    scenario = SCENARIOS[a.scenario]
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    slo = _slo(a)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        model = a.model or await discover_model(session, a.base_url, headers)
        runner = Runner(session=session, url=endpoint_url(a.base_url, a.endpoint), endpoint=a.endpoint,
                        model=model, workload=workload, headers=headers, max_requests=a.max_requests,
                        request_timeout_s=a.request_timeout, max_in_flight=a.max_in_flight,
                        honor_retry_after=not a.no_retry_after, temperature=a.temperature,
                        ignore_eos=not a.no_ignore_eos)
        t0 = runner.t0
        interval = a.sample_interval or max(0.5, min(5.0, a.duration / 60))
        sampler = Sampler(metrics_url=a.metrics_url, pid=a.pid, interval_s=interval,
                          prefix=a.metrics_prefix, deployment=a.deployment, t0=t0)
        before = await scrape_once(a.metrics_url, prefix=a.metrics_prefix, deployment=a.deployment) \
            if a.metrics_url else None
        ctx = RunContext(a=a, runner=runner, progress=Progress(runner, a.duration, not a.no_progress, a.scenario),
                         slo=slo, hard_deadline_s=a.duration + a.drain_timeout)
        sampler.start()
        try:
            with ctx.progress:
                desc = await scenario.run(ctx)
        finally:
            await sampler.stop()
        after = await scrape_once(a.metrics_url, prefix=a.metrics_prefix, deployment=a.deployment) \
            if a.metrics_url else None
    ctx.wall_s = wall = time.perf_counter() - t0
    ctx.samples = samples = sampler.samples

    records = runner.records
    scen = ctx.findings
    if before and after:
        scen["server_counters"] = {
            k: (after[k] - before[k]) for k in ("admitted_total", "rejected_total")
            if after.get(k) is not None and before.get(k) is not None}
    if sampler.errors:
        ctx.notes.append(f"{sampler.errors} of {len(samples)} metrics scrapes failed "
                         f"(first: {next((s['metrics_error'] for s in samples if 'metrics_error' in s), '')})")
    phase_dicts = [phase_dict(p, slo) for p in ctx.phases]
    summary = scenario.summarize(ctx, phase_dicts)
    report = {
        "meta": {
            "tool": "mistral-serve load", "version": __version__, "scenario": a.scenario,
            "base_url": a.base_url, "url": runner.url, "endpoint": a.endpoint, "model": model,
            "started_at": started, "wall_s": round(wall, 3), "duration_s": a.duration,
            "drain_timeout_s": a.drain_timeout, "max_requests": a.max_requests,
            "request_timeout_s": a.request_timeout, "load_desc": desc, "workload": workload.describe(),
            "arrival": a.arrival, "seed": a.seed, "slo": slo.as_dict(),
            "metrics_url": a.metrics_url, "pid": a.pid,
            "argv": getattr(a, "argv", None),
        },
        "summary": summary,
        "phases": phase_dicts,
        "scenario": scen,
        "timeline": timeline(records, t_end=max([wall] + [r.end_s or 0 for r in records])),
        "samples": samples,
        "requests": [r.to_dict() for r in records],
    }
    return report


def default_out_dir(scenario: str) -> Path:
    return Path("load-report") / f"{scenario}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
