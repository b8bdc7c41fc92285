"""``mistral-serve load SCENARIO --base-url URL [--duration S] [--rate R | --concurrency C] [--out DIR]``

Entry point :func:`main` (``mistral_serve.cli`` dispatches the ``load`` subcommand to it;
``python -m load_tests`` works too).  Writes ``DIR/report.json``, ``DIR/report.md`` and PNG plots.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp

from .argtypes import opt_float, pos_float, pos_int
from .report import write_json, write_markdown, write_plots
from .scenarios import SCENARIOS, default_out_dir, run_scenario
from .workload import DEFAULT_WORKLOAD, DISTRIBUTIONS, Workload


def _redact(argv: list[str]) -> list[str]:
    """argv for the report, with the API key replaced."""
    out, hide = [], False
    for x in argv:
        if hide:
            out.append("***")
            hide = False
        elif x == "--api-key":
            out.append(x)
            hide = True
        elif x.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(x)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mistral-serve load",
        description="Load generator for OpenAI-compatible servers (streaming completions / chat). "
                    "Every run stops by itself: it issues requests for at most --duration seconds, "
                    "waits at most --drain-timeout more, and sends at most --max-requests requests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("scenario", choices=SCENARIOS,
                   help="; ".join(f"{s.name}: {s.help}" for s in SCENARIOS.values()))
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--duration", type=pos_float, default=60.0, help="seconds of issuing requests (whole run)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=pos_float, help="open loop, req/s (sweep: highest rate; overload: the "
                                                      "saturation rate to multiply; ramp: peak rate)")
    load.add_argument("--concurrency", type=pos_int, help="closed loop, concurrent users (sweep: highest level)")
    p.add_argument("--out", type=Path, default=None, help="report directory (default load-report/SCENARIO-TIME)")

    g = p.add_argument_group("target")
    g.add_argument("--model", help="model id (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY if set)")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos=true (needed for servers that reject unknown fields)")

    g = p.add_argument_group("bounds")
    g.add_argument("--max-requests", type=pos_int, default=10_000, help="request budget of the whole run")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to wait for in-flight requests after issuing stops; then they are cancelled "
                        "and counted as errors")
    g.add_argument("--request-timeout", type=pos_float, default=120.0, help="per-request client timeout, s")
    g.add_argument("--max-in-flight", type=pos_int, default=1024,
                   help="open loop: arrivals beyond this many open requests are not sent (client_dropped)")
    g.add_argument("--no-retry-after", action="store_true",
                   help="closed loop: do not wait Retry-After seconds after a 429/503")

    g = p.add_argument_group("workload")
    g.add_argument("--dist", choices=DISTRIBUTIONS, default=None,
                   help="length distribution (default: workload if the workload file exists, else longtail)")
    g.add_argument("--workload", type=Path, default=None,
                   help=f"workload file for --dist workload (default {DEFAULT_WORKLOAD})")
    g.add_argument("--prompt-len", help="N or A:B (uniform range); median for longtail")
    g.add_argument("--output-len", help="max_tokens: N or A:B; median for longtail")
    g.add_argument("--max-prompt-len", type=pos_int, default=2048, help="longtail clip")
    g.add_argument("--max-output-len", type=pos_int, default=512, help="longtail clip")
    g.add_argument("--prompt-format", choices=("ids", "text"), default=None,
                   help="token-id list or text (default ids for completions; chat is always text)")
    g.add_argument("--arrival", choices=("poisson", "constant"), default="poisson", help="open-loop arrivals")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("SLO for goodput ('none' disables a bound)")
    g.add_argument("--slo-ttft", type=opt_float, default=1.0, help="TTFT bound, s")
    g.add_argument("--slo-itl", type=opt_float, default=0.1, help="bound on each request's p99 chunk gap, s")
    g.add_argument("--slo-e2e", type=opt_float, default=None, help="end-to-end bound, s")

    g = p.add_argument_group("server-side sampling")
    g.add_argument("--metrics-url", help="Prometheus text endpoint, e.g. http://127.0.0.1:8080/metrics")
    g.add_argument("--metrics-prefix", default="ray_mistral_serve_", help="'vllm:' for a vLLM peer")
    g.add_argument("--deployment", default="LLMReplica", help="deployment whose healthy replicas are counted")
    g.add_argument("--pid", type=int, help="sample the RSS of this process (and its children)")
    g.add_argument("--sample-interval", type=pos_float, default=None, help="s (default duration/60, 0.5..5)")

    g = p.add_argument_group("scenario options")
    for scenario in SCENARIOS.values():
        scenario.add_arguments(g)

    g = p.add_argument_group("output")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--fail-on-errors", action="store_true", help="exit 1 if any request errored")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    a = parser.parse_args(argv)
    a.argv = _redact(argv)
    if a.api_key is None:
        a.api_key = os.environ.get("OPENAI_API_KEY") or None
    if SCENARIOS[a.scenario].open_loop_only and a.concurrency:
        parser.error(f"{a.scenario} is open-loop: use --rate, not --concurrency")
    for other in SCENARIOS.values():
        for dest in other.exclusive:
            if getattr(a, dest) and other.name != a.scenario:
                parser.error(f"--{dest.replace('_', '-')} is for the {other.name} scenario")
    if a.endpoint == "chat":
        if a.prompt_format == "ids":
            parser.error("the chat endpoint takes text prompts: drop --prompt-format ids")
        a.prompt_format = "text"
    a.prompt_format = a.prompt_format or "ids"
    if a.dist is None:
        a.dist = "workload" if (a.workload or DEFAULT_WORKLOAD).exists() else "longtail"
    if a.dist == "workload" and not (a.workload or DEFAULT_WORKLOAD).exists():
        parser.error(f"workload file not found: {a.workload or DEFAULT_WORKLOAD} (pass --workload or --dist)")
    if a.drain_timeout < 0:
        parser.error("--drain-timeout must be >= 0")
    if a.out is None:
        a.out = default_out_dir(a.scenario)
    return a


def make_workload(a: argparse.Namespace) -> Workload:
    return Workload(a.dist, prompt_format=a.prompt_format, prompt_len=a.prompt_len, output_len=a.output_len,
                    max_prompt_len=a.max_prompt_len, max_output_len=a.max_output_len,
                    workload_path=a.workload, seed=a.seed)


def run(argv: list[str]) -> dict:
    """Parse, run, write the report files; return the report dict (its ``files`` key lists them)."""
    return execute(parse_args(argv))


def execute(a: argparse.Namespace) -> dict:
    workload = make_workload(a)
    report = asyncio.run(run_scenario(a, workload))
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [] if a.no_plots else write_plots(report, out)
    report["files"] = {"json": str(out / "report.json"), "markdown": str(out / "report.md"),
                       "plots": [str(out / n) for n in report["plots"]]}
    write_json(report, out)
    write_markdown(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)  # exits 2 on a usage error
    try:
        report = execute(a)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # e.g. while discovering the model
        print(f"mistral-serve load: cannot reach the server: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        print(f"mistral-serve load: error: {e}", file=sys.stderr)
        return 1
    s = report["summary"]
    keys = ("sent", "ok", "rejected", "errors", "req_per_s", "output_tok_per_s", "goodput_req_per_s",
            "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p99_s")
    print(json.dumps({k: s.get(k) for k in keys}))
    sc = report.get("scenario") or {}
    if sc.get("saturation"):
        print("saturation:", json.dumps({k: sc["saturation"].get(k) for k in ("found", "offered", "req_per_s",
                                                                                "output_tok_per_s", "reason")}))
    print(f"report: {report['files']['markdown']} {report['files']['json']}")
    if not s.get("accounting_balanced", True):
        return 1
    if a.fail_on_errors and s.get("errors"):
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
