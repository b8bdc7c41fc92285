"""Sampler micro-benchmark: median ms per ``sample()`` step at batch 64, vocab 32768.

    python -m mistral_serve.bench.sampler_bench --json OUT [--baseline OLD_SAMPLER.py]

Each case builds 64 sequences and, every step, samples from fixed logits (N(0, 3^2), seed 0;
``_flat`` cases N(0, 0.32^2), the spread the embedded random-weight model's logits have, whose
top-p 0.95 nucleus is ~29K of the 32K tokens) and appends the chosen tokens as the engine
does, so per-sequence state is exercised as in serving. ``--baseline`` loads another sampler module from a file (e.g. an earlier version via
``git show e2514ec:mistral_serve/engine/sampler.py > /tmp/old_sampler.py``, the last
per-row-loop sampler) and times it interleaved with the current one, step by step, so
machine load hits both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mistral_serve.bench.measure import cpu_model
from mistral_serve.engine import sampler as current_sampler
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.sequence import Sequence

BATCH = 64
VOCAB = 32768
PENALTY_CONTEXT = 16384
PENALTY_OUTPUT = 256  # of the 16K context, this many are generated tokens

LOGIT_STD = 3.0
FLAT_LOGIT_STD = 0.32

# SamplingParams keyword arguments, and the logits' spread where it is not LOGIT_STD
CASES: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "temperature_0.8": dict(temperature=0.8),
    "temperature_0.8_top_p_0.95": dict(temperature=0.8, top_p=0.95),
    "temperature_0.8_top_p_0.95_flat": dict(temperature=0.8, top_p=0.95, logit_std=FLAT_LOGIT_STD),
    "temperature_0.8_top_p_0.95_rep_1.1_freq_0.5_ctx16k": dict(temperature=0.8, top_p=0.95,
                                                               repetition_penalty=1.1, frequency_penalty=0.5),
    "temperature_0.8_seeded": dict(temperature=0.8, seed=0),
    "temperature_0.8_top_k_50": dict(temperature=0.8, top_k=50),
    "greedy_logprobs_5": dict(temperature=0.0, logprobs=5),
}


def load_sampler(path: str):
    spec = importlib.util.spec_from_file_location("baseline_sampler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_seqs(case: dict, rng: np.random.Generator) -> list[Sequence]:
    long_ctx = "repetition_penalty" in case or "frequency_penalty" in case or "presence_penalty" in case
    seqs = []
    for i in range(BATCH):
        kw = dict(case, max_tokens=100_000, ignore_eos=True)
        kw.pop("logit_std", None)
        if "seed" in kw:
            kw["seed"] = i
        params = SamplingParams(**kw)
        n = PENALTY_CONTEXT if long_ctx else 64
        out = PENALTY_OUTPUT if long_ctx else 8
        ids = rng.integers(0, VOCAB, n).tolist()
        seq = Sequence(f"r{i}", ids[: n - out], params, (2,), None)
        seq.token_ids.extend(ids[n - out:])
        seqs.append(seq)
    return seqs


def bench(impls: dict, steps: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    unit_logits = torch.randn(BATCH, VOCAB, generator=torch.Generator().manual_seed(0))
    results = {}
    for name, case in CASES.items():
        logits = unit_logits * case.get("logit_std", LOGIT_STD)
        seqs = {label: make_seqs(case, np.random.default_rng(1)) for label in impls}
        times: dict[str, list[float]] = {label: [] for label in impls}
        for step in range(warmup + steps):
            for label, module in impls.items():
                x = logits.clone()
                t0 = time.perf_counter()
                res = module.sample(x, seqs[label])
                dt = time.perf_counter() - t0
                for s, tok in zip(seqs[label], res.token_ids):
                    s.token_ids.append(tok)
                if step >= warmup:
                    times[label].append(dt * 1e3)
        results[name] = {label: round(statistics.median(ts), 3) for label, ts in times.items()}
        print(f"{name:52s} " + "  ".join(f"{label} {v:9.2f} ms" for label, v in results[name].items()), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mistral_serve.bench.sampler_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--baseline", help="a sampler module file to time interleaved with the current one")
    p.add_argument("--steps", type=int, default=15, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--note", help="free text stored in the report (e.g. what the baseline is)")
    a = p.parse_args(argv)
    impls = {"current": current_sampler}
    if a.baseline:
        impls = {"baseline": load_sampler(a.baseline), **impls}
    results = bench(impls, a.steps, a.warmup, a.threads)
    report = {
        "benchmark": "mistral_serve.bench.sampler_bench",
        "batch": BATCH,
        "vocab": VOCAB,
        "logits": f"N(0, {LOGIT_STD}^2) float32, fixed (seed 0); logit_std where a case gives one",
        "penalty_context_tokens": PENALTY_CONTEXT,
        "steps": a.steps,
        "unit": "median ms per sample() call",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "numpy": np.__version__,
                    "loadavg_1m_at_end": os.getloadavg()[0]},
        "baseline": a.baseline,
        "note": a.note,
        "cases": CASES,
        "results_ms": results,
    }
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
