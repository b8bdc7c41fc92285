"""Prefix caching on vs off, interleaved pass by pass in one process (so machine load hits
both alike): what the cache costs a workload with no sharing, and what it saves one with.

    python -m mistral_serve.bench.prefix_cache_ab [--workload workload-64|shared-prefix|multi-turn|FILE]
        [--passes 7] [--json OUT]

Two engines on the embedded tiny model, one with ``enable_prefix_caching`` on (the default)
and one with it off; each timed pass resets the cache first, so sharing happens within a pass
only. Greedy, EOS ignored, all requests at t=0, as ``bench engine``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from mistral_serve import LLM, SamplingParams
from mistral_serve.bench.measure import cpu_model
from mistral_serve.bench.workload import load_workload
from mistral_serve.model.tiny import ensure_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default=None, help="shared-prefix, multi-turn or a file (default: workload-64)")
    p.add_argument("--passes", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    workload = load_workload(a.workload)
    model = str(ensure_tiny_model())
    engines = {"on": LLM(model), "off": LLM(model, enable_prefix_caching=False)}
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in workload.max_tokens]
    for llm in engines.values():  # warm-up
        llm.generate(workload.prompt_token_ids[:8], params[:8])
    walls: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(a.passes):
        for name, llm in engines.items():
            llm.reset_prefix_cache()
            t = time.perf_counter()
            llm.generate(workload.prompt_token_ids, params)
            walls[name].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in walls.items()}
    report = {
        "workload": workload.source, "cpu_model": cpu_model(), "torch_threads": a.threads, "passes": a.passes,
        "wall_s": walls, "median_wall_s": median,
        "output_tok_per_s": {k: workload.output_tokens / v for k, v in median.items()},
        "on_over_off_wall": median["on"] / median["off"],
    }
    print(json.dumps({k: report[k] for k in ("workload", "median_wall_s", "on_over_off_wall")}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
