"""Statistics over request records: percentiles, summaries, goodput, timelines, slopes and
sweep saturation detection.  Pure functions over lists of :class:`RequestRecord` (or dicts with
the same fields) so they are unit-testable without a server."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .client import RequestRecord

PCTS = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """A request is "good" when it succeeded and meets every bound that is set."""

    ttft_s: float | None = 1.0
    itl_p99_s: float | None = 0.1  # the request's own p99 chunk gap
    e2e_s: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if r.outcome != "ok":
            return False
        if self.ttft_s is not None and (r.ttft_s is None or r.ttft_s > self.ttft_s):
            return False
        if self.itl_p99_s is not None and r.itl_s:
            if float(np.percentile(r.itl_s, 99)) > self.itl_p99_s:
                return False
        if self.e2e_s is not None and (r.e2e_s is None or r.e2e_s > self.e2e_s):
            return False
        return True

    def as_dict(self) -> dict:
        return {"ttft_s": self.ttft_s, "itl_p99_s": self.itl_p99_s, "e2e_s": self.e2e_s}


def percentiles(values: Iterable[float], pcts: Sequence[int] = PCTS) -> dict[int, float | None]:
    """Linear-interpolated percentiles (monotone in p); None for no data."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {p: None for p in pcts}
    vals = np.percentile(arr, list(pcts))
    return {p: float(v) for p, v in zip(pcts, vals)}


def _rnd(v: float | None, nd: int = 6) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), nd)


def summarize(
    records: Sequence[RequestRecord],
    slo: SLO | None = None,
    window: tuple[float, float] | None = None,
    client_dropped: int = 0,
) -> dict:
    """Aggregate a set of records.

    Throughputs divide by ``window`` (start, end) in run-relative seconds; by default the span
    from the first send to the last finish.  Latency percentiles use successful requests only;
    ITL pools every chunk gap of every successful request.
    """
    slo = slo or SLO()
    sent = len(records)
    by = Counter(r.outcome for r in records)
    ok_recs = [r for r in records if r.outcome == "ok"]
    rejected = [r for r in records if r.outcome == "rejected"]
    if window is None:
        if records:
            t_a = min(r.start_s for r in records)
            t_b = max((r.end_s if r.end_s is not None else r.start_s) for r in records)
        else:
            t_a = t_b = 0.0
    else:
        t_a, t_b = window
    elapsed = max(t_b - t_a, 1e-9)

    ttft = percentiles(r.ttft_s for r in ok_recs)
    itl = percentiles(g for r in ok_recs for g in r.itl_s)
    e2e = percentiles(r.e2e_s for r in ok_recs)
    tpot = percentiles(r.tpot_s for r in ok_recs)
    ra = percentiles(r.retry_after_s for r in rejected)
    lag = [r.start_s - r.scheduled_s for r in records if r.scheduled_s is not None]

    out_tok = sum(int(r.output_tokens or 0) for r in ok_recs)
    prompt_tok = sum(int(r.prompt_tokens or 0) for r in ok_recs)
    good = sum(1 for r in ok_recs if slo.met(r))
    costs = [r.cost_usd for r in ok_recs if r.cost_usd is not None]
    cost_total = float(sum(costs)) if costs else None
    costed_out = sum(int(r.output_tokens or 0) for r in ok_recs if r.cost_usd is not None)
    costed_all = costed_out + sum(int(r.prompt_tokens or 0) for r in ok_recs if r.cost_usd is not None)

    s = {
        "sent": sent,
        "ok": by.get("ok", 0),
        "rejected": by.get("rejected", 0),
        "errors": by.get("error", 0),
        "rejected_429": sum(1 for r in rejected if r.status == 429),
        "rejected_503": sum(1 for r in rejected if r.status == 503),
        "client_dropped": client_dropped,
        "accounting_balanced": sent == by.get("ok", 0) + by.get("rejected", 0) + by.get("error", 0),
        "error_rate": _rnd(by.get("error", 0) / sent if sent else 0.0),
        "rejection_rate": _rnd(by.get("rejected", 0) / sent if sent else 0.0),
        "window_s": _rnd(elapsed, 3),
        "sent_per_s": _rnd(sent / elapsed, 4),
        "req_per_s": _rnd(len(ok_recs) / elapsed, 4),
        "output_tokens": out_tok,
        "prompt_tokens": prompt_tok,
        "output_tok_per_s": _rnd(out_tok / elapsed, 3),
        "usage_reported_frac": _rnd(sum(r.usage_reported for r in ok_recs) / len(ok_recs)) if ok_recs else None,
        "slo": slo.as_dict(),
        "good": good,
        "goodput_req_per_s": _rnd(good / elapsed, 4),
        "goodput_frac": _rnd(good / sent if sent else 0.0, 4),
        "cost_usd_total": _rnd(cost_total, 9),
        "cost_per_1m_output_tokens_usd": _rnd(cost_total / costed_out * 1e6, 6) if cost_total is not None and costed_out else None,
        "cost_per_1m_tokens_usd": _rnd(cost_total / costed_all * 1e6, 6) if cost_total is not None and costed_all else None,
        "send_lag_p99_s": _rnd(percentiles(lag)[99]),
        "send_lag_max_s": _rnd(max(lag)) if lag else None,
        "status_counts": {str(k): v for k, v in sorted(Counter(r.status for r in records).items())},
        "error_kinds": dict(Counter(r.error_type or "other" for r in records if r.outcome == "error")),
        "error_examples": list(dict.fromkeys(
            f"{r.status} {r.error}" for r in records if r.outcome == "error"))[:5],
    }
    for name, d in (("ttft", ttft), ("itl", itl), ("e2e", e2e), ("tpot", tpot), ("retry_after", ra)):
        for p in PCTS:
            s[f"{name}_p{p}_s"] = _rnd(d[p])
    return s


def in_flight_at(records: Sequence[RequestRecord], times: Sequence[float]) -> list[int]:
    starts = np.sort(np.array([r.start_s for r in records], dtype=float))
    ends = np.sort(np.array([r.end_s if r.end_s is not None else np.inf for r in records], dtype=float))
    t = np.asarray(times, dtype=float)
    return (np.searchsorted(starts, t, side="right") - np.searchsorted(ends, t, side="right")).tolist()


def timeline(records: Sequence[RequestRecord], bin_s: float | None = None,
             t_end: float | None = None) -> list[dict]:
    """Per-time-bin series: completions by outcome, output tok/s (each request's tokens spread
    evenly over its generation interval), mean requests in flight over the bin, and latency
    percentiles of the requests *sent* in the bin."""
    if not records:
        return []
    t_end = t_end if t_end is not None else max((r.end_s or r.start_s) for r in records)
    t_end = max(t_end, 1e-3)
    if bin_s is None:
        bin_s = max(0.5, t_end / 40)
    nb = max(1, int(math.ceil(t_end / bin_s)))
    edges = np.arange(nb + 1) * bin_s
    tok = np.zeros(nb)
    busy = np.zeros(nb)  # request-seconds in flight per bin
    for r in records:
        e = r.end_s if r.end_s is not None else t_end
        busy += np.clip(np.minimum(edges[1:], e) - np.maximum(edges[:-1], r.start_s), 0, None)
        if r.outcome != "ok" or not r.output_tokens or r.end_s is None:
            continue
        a = r.first_token_s if r.first_token_s is not None else r.start_s
        b = max(r.end_s, a + 1e-6)
        ov = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None)
        tok += r.output_tokens * ov / (b - a)
    mids = (edges[:-1] + edges[1:]) / 2
    rows = []
    for i in range(nb):
        lo, hi = edges[i], edges[i + 1]
        done = [r for r in records if r.end_s is not None and lo <= r.end_s < hi]
        sent = [r for r in records if lo <= r.start_s < hi]
        ok_sent = [r for r in sent if r.outcome == "ok"]
        tt = percentiles(r.ttft_s for r in ok_sent)
        ee = percentiles(r.e2e_s for r in ok_sent)
        it = percentiles(g for r in ok_sent for g in r.itl_s)
        rows.append({
            "t_s": round(float(mids[i]), 3),
            "sent_per_s": round(len(sent) / bin_s, 4),
            "ok_per_s": round(sum(r.outcome == "ok" for r in done) / bin_s, 4),
            "rejected_per_s": round(sum(r.outcome == "rejected" for r in done) / bin_s, 4),
            "errors_per_s": round(sum(r.outcome == "error" for r in done) / bin_s, 4),
            "output_tok_per_s": round(float(tok[i]) / bin_s, 3),
            "in_flight": round(float(busy[i]) / bin_s, 3),
            "ttft_p50_s": _rnd(tt[50]), "ttft_p90_s": _rnd(tt[90]), "ttft_p99_s": _rnd(tt[99]),
            "e2e_p50_s": _rnd(ee[50]), "e2e_p99_s": _rnd(ee[99]),
            "itl_p50_s": _rnd(it[50]), "itl_p99_s": _rnd(it[99]),
        })
    return rows


def slope(ts: Sequence[float], ys: Sequence[float | None], skip_frac: float = 0.1) -> dict | None:
    """Least-squares slope of y over t (per second and per hour), skipping the first
    ``skip_frac`` of the samples as warm-up.  None with fewer than 3 usable points."""
    pts = [(float(t), float(y)) for t, y in zip(ts, ys) if y is not None and not math.isnan(float(y))]
    if len(pts) >= 10 and skip_frac > 0:
        pts = pts[int(len(pts) * skip_frac):]
    if len(pts) < 3:
        return None
    t = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    if np.ptp(t) == 0:
        return None
    k, b = np.polyfit(t, y, 1)
    pred = k * t + b
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"per_s": float(k), "per_h": float(k * 3600), "intercept": float(b),
            "r2": (1 - ss_res / ss_tot) if ss_tot > 0 else None, "n": len(pts),
            "first": float(y[0]), "last": float(y[-1]), "min": float(y.min()), "max": float(y.max())}


def find_saturation(steps: Sequence[dict], growth_min: float = 0.1, goodput_collapse: float = 0.5,
                    shed_max: float = 0.05) -> dict:
    """Saturation point of a sweep.

    ``steps``: ordered low -> high load, each a phase summary (``output_tok_per_s``,
    ``req_per_s``, ``goodput_req_per_s``, ``rejection_rate``, ``error_rate``) plus ``offered``
    (req/s or concurrency).  Step i is past saturation when, relative to step i-1, achieved
    output tok/s grew by less than ``growth_min`` (relative), or goodput fell below
    ``goodput_collapse`` x the best goodput so far, or the server shed more than ``shed_max`` of
    the requests (rejections + errors).  The saturation point is the last step before the
    first one past saturation; ``capacity_req_per_s`` is the best achieved request rate.
    """
    res: dict = {"found": False, "index": None, "offered": None, "reason": None,
                 "saturated_at_index": None, "output_tok_per_s": None, "req_per_s": None,
                 "capacity_req_per_s": None, "capacity_output_tok_per_s": None}
    if not steps:
        return res
    res["capacity_req_per_s"] = max((s.get("req_per_s") or 0.0) for s in steps)
    res["capacity_output_tok_per_s"] = max((s.get("output_tok_per_s") or 0.0) for s in steps)
    best_good = 0.0
    for i, s in enumerate(steps):
        tok = s.get("output_tok_per_s") or 0.0
        good = s.get("goodput_req_per_s") or 0.0
        shed = (s.get("rejection_rate") or 0.0) + (s.get("error_rate") or 0.0)
        reason = None
        if shed > shed_max:
            reason = f"{shed * 100:.0f}% of requests rejected or failed (> {shed_max * 100:.0f}%)"
        elif i > 0:
            prev_tok = steps[i - 1].get("output_tok_per_s") or 0.0
            if tok < prev_tok * (1 + growth_min):
                growth = (tok / prev_tok - 1) * 100 if prev_tok else 0.0
                reason = f"output tok/s grew {growth:.0f}% (< {growth_min * 100:.0f}%)"
            elif best_good > 0 and good < goodput_collapse * best_good:
                reason = (f"goodput fell to {good:.3g} req/s "
                          f"(< {goodput_collapse:g} x best {best_good:.3g})")
        if reason is not None:
            res.update(found=True, reason=reason, saturated_at_index=i)
            if i == 0:
                res["reason"] = "already past saturation at the lowest load: " + reason
            else:
                j = i - 1
                res.update(index=j, offered=steps[j].get("offered"),
                           output_tok_per_s=steps[j].get("output_tok_per_s"),
                           req_per_s=steps[j].get("req_per_s"))
            return res
        best_good = max(best_good, good)
    return res
