"""Writes a run's results: ``report.json`` (meta, summary, phases, scenario results, timeline,
server samples, one record per request), ``report.md`` and PNG plots.

Which scenario sections and plots a report gets follows from the findings in its ``scenario``
key (a sweep's ``saturation`` and ``curve``, an overload's ``accounting``, a ramp's ``schedule``
and ``replicas``, a soak's ``slopes``), not from the scenario's name: only the scenario that
found something says so, and this module needs no table of scenarios."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .stats import PCTS

# --------------------------------------------------------------------------------------------
# JSON


def write_json(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# --------------------------------------------------------------------------------------------
# Markdown


def _f(v: Any, unit: str = "", nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v}{unit}"
    if isinstance(v, float):
        if unit == " ms":
            return f"{v * 1000:.{max(nd - 2, 0) if v * 1000 >= 100 else 1}f} ms"
        if abs(v) >= 100:
            return f"{v:,.0f}{unit}"
        return f"{v:.{nd}g}{unit}"
    return f"{v}{unit}"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{v * 100:.1f}%"


def _ms(v: Any) -> str:
    return _f(v, " ms")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(s: dict) -> str:
    slo = s.get("slo") or {}
    slo_txt = ", ".join(f"{k} ≤ {v:g}" for k, v in slo.items() if v is not None) or "none"
    rows = [
        ["requests sent / ok / rejected (429+503) / errors",
         f"{s['sent']} / {s['ok']} / {s['rejected']} ({s.get('rejected_429', 0)}+{s.get('rejected_503', 0)}) / {s['errors']}"],
        ["accounted for (sent = ok + rejected + errors)", _f(s.get("accounting_balanced"))],
        ["error rate / rejection rate", f"{_pct(s.get('error_rate'))} / {_pct(s.get('rejection_rate'))}"],
        ["window", _f(s.get("window_s"), " s")],
        ["throughput", f"{_f(s.get('req_per_s'))} req/s, {_f(s.get('output_tok_per_s'))} output tok/s"],
        [f"goodput (SLO: {slo_txt})", f"{_f(s.get('goodput_req_per_s'))} req/s ({_pct(s.get('goodput_frac'))} of sent)"],
    ]
    if s.get("cost_usd_total") is not None:
        rows.append(["cost reported by server", f"${s['cost_usd_total']:.6g} total, "
                     f"${_f(s.get('cost_per_1m_output_tokens_usd'))} per 1M output tokens, "
                     f"${_f(s.get('cost_per_1m_tokens_usd'))} per 1M tokens (prompt+output)"])
    if s.get("client_dropped"):
        rows.append(["client-dropped (max in-flight reached, never sent)", s["client_dropped"]])
    if s.get("send_lag_p99_s") is not None:
        rows.append(["open-loop send lag p99 / max", f"{_ms(s.get('send_lag_p99_s'))} / {_ms(s.get('send_lag_max_s'))}"])
    out = _table(["", ""], rows)
    lat = [[name] + [_ms(s.get(f"{key}_p{p}_s")) for p in PCTS] for name, key in (
        ("TTFT", "ttft"), ("ITL (per chunk)", "itl"), ("TPOT (per token)", "tpot"), ("end-to-end", "e2e"),
        )]
    lat.append(["Retry-After of rejections"] + [_f(s.get(f"retry_after_p{p}_s"), " s") for p in PCTS])
    out += "\n\n" + _table(["latency", *(f"p{p}" for p in PCTS)], lat)
    return out


def phases_markdown(phases: Sequence[dict]) -> str:
    rows = []
    for p in phases:
        s = p["summary"]
        off = p.get("offered")
        off_txt = "–" if off is None else (f"{off:.3g} req/s" if p["mode"] == "rate" else f"{int(off)} users")
        rows.append([p["name"], off_txt, s["sent"], s["ok"], s["rejected"], s["errors"],
                     _f(s.get("req_per_s")), _f(s.get("output_tok_per_s")), _f(s.get("goodput_req_per_s")),
                     _ms(s.get("ttft_p50_s")), _ms(s.get("ttft_p99_s")), _ms(s.get("itl_p99_s")),
                     _ms(s.get("e2e_p99_s"))])
    return _table(["phase", "offered", "sent", "ok", "rej", "err", "req/s", "out tok/s", "goodput req/s",
                   "TTFT p50", "TTFT p99", "ITL p99", "e2e p99"], rows)


def write_markdown(report: dict, out_dir: Path) -> Path:
    m = report["meta"]
    lines = [f"# Load test: `{m['scenario']}`", ""]
    lines += [_table(["", ""], [
        ["target", f"`{m['url']}`"], ["model", f"`{m['model']}`"], ["endpoint", m["endpoint"]],
        ["load", m.get("load_desc", "")], ["workload", f"`{json.dumps(m.get('workload', {}))}`"],
        ["started (UTC)", m.get("started_at", "")], ["wall time", _f(m.get("wall_s"), " s")],
        ["bounds", f"duration {m.get('duration_s')} s (+ drain ≤ {m.get('drain_timeout_s')} s), "
                   f"max {m.get('max_requests')} requests"],
    ]), ""]
    lines += ["## Summary", "", summary_markdown(report["summary"]), ""]
    sc = report.get("scenario") or {}
    if sc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in sc["notes"]] + [""]
    if sc.get("saturation"):
        sat = sc["saturation"]
        lines += ["## Saturation", ""]
        if sat.get("index") is not None:
            lines.append(f"Saturation point: step {sat['index']} (offered {_f(sat.get('offered'))}"
                         f"{' req/s' if sc.get('mode') == 'rate' else ' users'}), "
                         f"{_f(sat.get('req_per_s'))} req/s, {_f(sat.get('output_tok_per_s'))} output tok/s. "
                         f"Next step: {sat.get('reason')}.")
        elif sat.get("found"):
            lines.append(f"{sat.get('reason')}. Start the sweep lower.")
        else:
            lines.append("Not reached: throughput still grew at the highest load of the sweep; raise the rates.")
        lines += ["", f"Best achieved: {_f(sat.get('capacity_req_per_s'))} req/s, "
                      f"{_f(sat.get('capacity_output_tok_per_s'))} output tok/s.", ""]
    if "accounting" in sc:
        acc = sc["accounting"]
        lines += ["## No request lost", "",
                  f"Overload phase at {_f(sc.get('overload_rate'))} req/s "
                  f"({_f(sc.get('factor'))} × saturation {_f(sc.get('saturation_rate'))} req/s, "
                  f"{sc.get('saturation_source')}): sent {acc.get('sent')} = ok {acc.get('ok')} + "
                  f"rejected {acc.get('rejected')} + errors {acc.get('errors')} → "
                  f"**{'balanced' if acc.get('balanced') else 'NOT balanced'}**.", ""]
        if sc.get("server_counters"):
            lines += ["Server-side router counters (delta over the run, as scraped; Ray exports with a delay): "
                      f"`{json.dumps(sc['server_counters'])}`", ""]
    if sc.get("slopes"):
        rows = []
        for k, v in sc["slopes"].items():
            if not v:
                continue
            div, unit = (1e6, " MB") if k.endswith("_bytes") else (1.0, " s" if k.endswith("_s") else "")
            rows.append([k, _f(v["first"] / div, unit), _f(v["last"] / div, unit), _f(v["per_h"] / div, unit),
                         _f(v.get("r2")), v.get("n")])
        lines += ["## Drift over the soak", "", _table(["series", "first", "last", "slope per hour", "r²", "samples"], rows), ""]
    if sc.get("replicas"):
        r = sc["replicas"]
        lines += ["## Autoscaling", "", f"Replicas (healthy `LLMReplica`): min {_f(r.get('min'))}, "
                  f"max {_f(r.get('max'))}, at end {_f(r.get('last'))}; peak queue depth (waiting+running) "
                  f"{_f(r.get('queue_depth_max'))}.", ""]
    if report.get("phases") and len(report["phases"]) > 1 or "curve" in sc:
        lines += ["## Phases", "", phases_markdown(report["phases"]), ""]
    s = report["summary"]
    if s.get("errors") or s.get("rejected"):
        lines += ["## Errors and rejections", "", f"Status counts: `{json.dumps(s.get('status_counts'))}`; "
                  f"error kinds: `{json.dumps(s.get('error_kinds'))}`", ""]
        lines += [f"- `{e}`" for e in s.get("error_examples", [])] + [""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    lines += ["Files: `report.json` (this summary, per-phase summaries, the timeline, server samples and one "
              "record per request), `report.md`, the PNG plots.", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _col(rows: Sequence[dict], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]


def plot_latency_vs_time(tl: Sequence[dict], path: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = _col(tl, "t_s")
    for k, st in (("ttft_p50_s", "-"), ("ttft_p90_s", "--"), ("ttft_p99_s", ":")):
        a1.plot(t, [v * 1000 for v in _col(tl, k)], st, marker=".", label=k.replace("_s", "").replace("_", " "))
    a1.plot(t, [v * 1000 for v in _col(tl, "e2e_p99_s")], "-", color="grey", alpha=.6, label="e2e p99")
    a1.set_ylabel("ms"); a1.set_title("latency of requests sent in each interval"); a1.legend(fontsize=8)
    for k, st in (("itl_p50_s", "-"), ("itl_p99_s", ":")):
        a2.plot(t, [v * 1000 for v in _col(tl, k)], st, marker=".", label=k.replace("_s", "").replace("_", " "))
    a2.set_ylabel("ITL per chunk, ms"); a2.set_xlabel("time since start, s"); a2.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=.3)
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def plot_throughput_vs_time(tl: Sequence[dict], path: Path, schedule: Sequence[Sequence[float]] | None = None) -> None:
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    t = _col(tl, "t_s")
    a1.plot(t, _col(tl, "output_tok_per_s"), marker=".", label="output tok/s")
    a1.set_ylabel("output tok/s"); a1.legend(fontsize=8)
    for k in ("sent_per_s", "ok_per_s", "rejected_per_s", "errors_per_s"):
        a2.plot(t, _col(tl, k), marker=".", label=k.replace("_per_s", "/s"))
    if schedule:
        a2.plot([p[0] for p in schedule], [p[1] for p in schedule], "k--", alpha=.6, label="offered rate")
    a2.set_ylabel("req/s"); a2.legend(fontsize=8)
    a3.step(t, _col(tl, "in_flight"), where="mid", label="requests in flight (client, mean per interval)")
    a3.set_ylabel("in flight"); a3.set_xlabel("time since start, s"); a3.legend(fontsize=8)
    for a in (a1, a2, a3):
        a.grid(alpha=.3)
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def plot_latency_throughput(phases: Sequence[dict], path: Path, saturation: dict | None = None) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    x = [p["summary"].get("output_tok_per_s") or 0.0 for p in phases]
    for k, st in (("ttft_p50_s", "o-"), ("ttft_p99_s", "o--"), ("itl_p99_s", "s:"), ("e2e_p50_s", "^-")):
        a1.plot(x, [(p["summary"].get(k) or float("nan")) * 1000 for p in phases], st,
                label=k.replace("_s", "").replace("_", " "))
    for p, xi in zip(phases, x):
        off = p.get("offered")
        if off is not None:
            a1.annotate(f"{off:.3g}", (xi, (p["summary"].get("ttft_p99_s") or 0) * 1000), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    if saturation and saturation.get("index") is not None:
        a1.axvline(x[saturation["index"]], color="red", alpha=.5, ls="--", label="saturation")
    a1.set_xlabel("achieved output tok/s"); a1.set_ylabel("latency, ms (log)"); a1.set_yscale("log")
    a1.set_title("latency vs throughput (labels: offered load)"); a1.legend(fontsize=8); a1.grid(alpha=.3)
    off = [p.get("offered") or i for i, p in enumerate(phases)]
    a2.plot(off, [p["summary"].get("req_per_s") or 0 for p in phases], "o-", label="achieved req/s")
    a2.plot(off, [p["summary"].get("goodput_req_per_s") or 0 for p in phases], "s--", label="goodput req/s")
    if phases and phases[0]["mode"] == "rate":
        a2.plot(off, off, "k:", alpha=.5, label="offered")
        a2.set_xlabel("offered req/s")
    else:
        a2.set_xlabel("concurrency")
    a2.set_ylabel("req/s"); a2.legend(fontsize=8); a2.grid(alpha=.3); a2.set_title("throughput and goodput")
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def plot_replicas_queue(samples: Sequence[dict], path: Path, schedule: Sequence[Sequence[float]] | None = None) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = _col(samples, "t_s")
    a1.step(t, _col(samples, "replicas"), where="post", color="C3", label="healthy LLMReplica replicas")
    a1.set_ylabel("replicas"); a1.legend(loc="upper left", fontsize=8)
    if schedule:
        ax = a1.twinx()
        ax.plot([p[0] for p in schedule], [p[1] for p in schedule], "k--", alpha=.5, label="offered req/s")
        ax.set_ylabel("offered req/s"); ax.legend(loc="upper right", fontsize=8)
    a2.plot(t, _col(samples, "waiting"), label="waiting"); a2.plot(t, _col(samples, "running"), label="running")
    a2.plot(t, _col(samples, "queue_depth"), "k:", label="waiting + running")
    a2.set_ylabel("requests"); a2.set_xlabel("time since start, s"); a2.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=.3)
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def plot_memory_kv(samples: Sequence[dict], path: Path, slopes: dict) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = _col(samples, "t_s")
    for i, key in enumerate(("rss_bytes", "rss_tree_bytes", "server_rss_bytes", "ray_rss_bytes")):
        ys = _col(samples, key)
        base = next((y for y in ys if not math.isnan(y)), None)
        if base is None:
            continue
        a1.plot(t, [(y - base) / 1e6 for y in ys], marker=".", color=f"C{i}",
                label=f"{key.replace('_bytes', '')} (first {base / 1e6:,.0f} MB)")
        sl = slopes.get(key)
        if sl:
            a1.plot(t, [(sl["intercept"] + sl["per_s"] * x - base) / 1e6 for x in t], "--", color=f"C{i}",
                    alpha=.6, label=f"fit {sl['per_h'] / 1e6:+.3g} MB/h")
    a1.set_ylabel("MB since first sample"); a1.legend(fontsize=8); a1.set_title("resident memory drift")
    ys = _col(samples, "kv_usage")
    a2.plot(t, ys, marker=".", label="KV cache usage (mean over replicas)")
    sl = slopes.get("kv_usage")
    if sl:
        a2.plot(t, [sl["intercept"] + sl["per_s"] * x for x in t], "--", alpha=.6, label=f"fit {sl['per_h']:+.3g}/h")
    a2.set_ylabel("KV usage 0..1"); a2.set_xlabel("time since start, s"); a2.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=.3)
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def write_plots(report: dict, out_dir: Path) -> list[str]:
    """Draw every plot the data allows; returns file names (relative to ``out_dir``)."""
    try:
        _plt()
    except ImportError:
        report.setdefault("scenario", {}).setdefault("notes", []).append(
            "matplotlib is not installed: no plots were drawn")
        return []
    names: list[str] = []
    tl = report.get("timeline") or []
    sc = report.get("scenario") or {}
    sched = sc.get("schedule")
    if tl:
        plot_latency_vs_time(tl, out_dir / "latency_vs_time.png"); names.append("latency_vs_time.png")
        plot_throughput_vs_time(tl, out_dir / "throughput_vs_time.png", sched)
        names.append("throughput_vs_time.png")
    if sc.get("curve"):  # one point per phase
        plot_latency_throughput(report["phases"], out_dir / "latency_throughput.png", sc.get("saturation"))
        names.append("latency_throughput.png")
    samples = report.get("samples") or []
    if samples and any(s.get("replicas") is not None or s.get("queue_depth") is not None for s in samples):
        plot_replicas_queue(samples, out_dir / "replicas_queue.png", sched)
        names.append("replicas_queue.png")
    if samples and any(s.get(k) is not None for s in samples
                       for k in ("rss_bytes", "server_rss_bytes", "ray_rss_bytes", "kv_usage")):
        plot_memory_kv(samples, out_dir / "memory_kv.png", sc.get("slopes") or {})
        names.append("memory_kv.png")
    return names
