"""What one benchmark run records, and the statistics reported over runs."""

from __future__ import annotations

import platform
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil


@dataclass
class RunResult:
    """One timed pass over the workload (all requests arrive at t=0)."""

    wall_s: float
    output_tokens: int
    prompt_tokens: int
    ttft_s: list[float] = field(default_factory=list)  # one per request (empty if not measurable)
    itl_s: list[float] = field(default_factory=list)  # every inter-token gap of every request
    generated_tokens: int | None = None  # tokens computed, if more than credited (padding to a batch max)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(name: str, runs: list[RunResult], peak_rss: int, notes: str = "") -> dict:
    """Median throughput over runs; latency percentiles from the median run."""
    by_speed = sorted(runs, key=lambda r: r.output_tokens / r.wall_s)
    median_run = by_speed[len(by_speed) // 2]
    return {
        "engine": name,
        "runs": len(runs),
        "output_tok_per_s": statistics.median(r.output_tokens / r.wall_s for r in runs),
        "total_tok_per_s": statistics.median((r.output_tokens + r.prompt_tokens) / r.wall_s for r in runs),
        "wall_s": [round(r.wall_s, 3) for r in runs],
        "output_tokens": median_run.output_tokens,
        "generated_tokens": median_run.generated_tokens,
        "ttft_p50_s": percentile(median_run.ttft_s, 50),
        "ttft_p99_s": percentile(median_run.ttft_s, 99),
        "itl_p50_s": percentile(median_run.itl_s, 50),
        "itl_p99_s": percentile(median_run.itl_s, 99),
        "peak_rss_mib": round(peak_rss / 2**20),
        "notes": notes,
    }


class PeakRSS:
    """Samples the RSS of this process and its children every 50 ms while active
    (``with PeakRSS() as p: ... p.peak``); children count for engines that fork workers."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _rss(self) -> int:
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def cpu_model() -> str:
    """The CPU's marketing name, recorded in every benchmark JSON: this project's machines of one
    kind come with different CPUs, so a figure is only compared with one from the same run
    (platform.processor() is often just the architecture on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
