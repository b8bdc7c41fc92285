"""Open-loop arrival processes.

A :class:`RateSchedule` is a piecewise-linear offered rate r(t) (req/s) over ``[0, end]``; a
constant rate is a one-piece schedule.  :func:`arrival_times` draws a non-homogeneous Poisson
process from it by thinning (Lewis & Shedler), or evenly spaced arrivals
(``kind="constant"``, the deterministic counterpart: arrival k at the time where the integrated
rate reaches k).  Times are relative to the phase start, seeded, and independent of how the
server responds (that is what makes the load open-loop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class RateSchedule:
    points: tuple[tuple[float, float], ...]  # (t_s, rate_req_per_s), t strictly increasing

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("empty rate schedule")
        ts = [t for t, _ in self.points]
        if ts[0] != 0.0 or any(b <= a for a, b in zip(ts, ts[1:])):
            raise ValueError("schedule times must start at 0 and increase strictly")
        if any(r < 0 for _, r in self.points):
            raise ValueError("rates must be >= 0")

    @classmethod
    def constant(cls, rate: float, duration: float) -> "RateSchedule":
        return cls(((0.0, float(rate)), (float(duration), float(rate))))

    @classmethod
    def triangle(cls, low: float, peak: float, duration: float, hold_frac: float = 0.0) -> "RateSchedule":
        """low -> peak -> low; ``hold_frac`` of the time is spent at the peak."""
        hold = duration * hold_frac
        up = (duration - hold) / 2
        pts = [(0.0, low), (up, peak)]
        if hold > 0:
            pts.append((up + hold, peak))
        pts.append((duration, low))
        return cls(tuple(pts))

    @classmethod
    def parse(cls, text: str) -> "RateSchedule":
        """``"0:1,30:10,60:1"`` -> points (t seconds : rate req/s)."""
        pts = []
        for part in text.split(","):
            t, r = part.strip().split(":")
            pts.append((float(t), float(r)))
        return cls(tuple(pts))

    @property
    def end(self) -> float:
        return self.points[-1][0]

    @property
    def peak(self) -> float:
        return max(r for _, r in self.points)

    def rate(self, t: float) -> float:
        pts = self.points
        if t <= 0:
            return pts[0][1]
        for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
            if t <= t1:
                return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
        return pts[-1][1]

    def expected_count(self, until: float | None = None) -> float:
        """Integral of r(t) over [0, until] (trapezoids are exact for piecewise-linear)."""
        until = self.end if until is None else until
        total = 0.0
        for (t0, r0), (t1, r1) in zip(self.points, self.points[1:]):
            if t0 >= until:
                break
            b = min(t1, until)
            rb = r0 + (r1 - r0) * (b - t0) / (t1 - t0)
            total += (r0 + rb) / 2 * (b - t0)
        return total

    def scaled(self, factor: float) -> "RateSchedule":
        return RateSchedule(tuple((t, r * factor) for t, r in self.points))

    def as_list(self) -> list[list[float]]:
        return [[t, r] for t, r in self.points]


def arrival_times(
    schedule: RateSchedule, *, kind: str = "poisson", seed: int = 0, until: float | None = None
) -> Iterator[float]:
    """Yield arrival times in [0, until) (default: the schedule's end), increasing."""
    end = schedule.end if until is None else min(until, schedule.end)
    if kind == "poisson":
        rng = np.random.default_rng(seed)
        rmax = schedule.peak
        if rmax <= 0:
            return
        t = 0.0
        while True:
            t += float(rng.exponential(1.0 / rmax))
            if t >= end:
                return
            if rng.random() * rmax <= schedule.rate(t):
                yield t
    elif kind == "constant":
        # k-th arrival where the cumulative expected count crosses k - 0.5 (first one at ~half
        # an interval, so a constant rate r gives exactly floor(r*T + 0.5) arrivals).
        step = 0.01 if schedule.peak <= 0 else min(0.01, 0.1 / schedule.peak)
        acc, t, k = 0.0, 0.0, 0
        while t < end:
            r0 = schedule.rate(t)
            t1 = min(end, t + step)
            r1 = schedule.rate(t1)
            inc = (r0 + r1) / 2 * (t1 - t)
            while acc + inc >= k + 0.5 and inc > 0:
                frac = (k + 0.5 - acc) / inc
                yield t + frac * (t1 - t)
                k += 1
            acc += inc
            t = t1
    else:
        raise ValueError(f"unknown arrival kind {kind!r}")


def interarrival_cv(times: Sequence[float]) -> float:
    """Coefficient of variation of the gaps (1 for Poisson, 0 for constant)."""
    g = np.diff(np.asarray(times, dtype=float))
    if len(g) < 2 or g.mean() == 0:
        return float("nan")
    return float(g.std() / g.mean())
