"""Load generator for OpenAI-compatible LLM servers (``mistral-serve load``).

Works against any server that speaks ``POST /v1/completions`` / ``POST /v1/chat/completions``
with ``stream: true`` SSE, so the same run can be pointed at mistral-serve and at a peer
(vLLM, ...) for side-by-side numbers.  Entry point: :func:`load_tests.cli.main`.

Modules:
    argtypes   argparse converters shared by the CLI and the scenarios' own options
    workload   request specs: workload file, fixed, uniform, long-tail lengths; ids or text
    arrivals   open-loop arrival times (Poisson / constant, rate schedules)
    client     one streamed request -> :class:`RequestRecord` (TTFT, ITL, e2e, usage, status)
    runner     open-loop and closed-loop phases, bounded in time and request count
    sampler    Prometheus text endpoint and process-RSS sampling during a run
    stats      percentiles, summaries, goodput, timelines, slopes, saturation detection
    report     report.json, report.md and PNG plots
    scenarios  steady, sweep, overload, ramp, soak: one Scenario object each, in SCENARIOS
"""

__version__ = "0.1.0"
