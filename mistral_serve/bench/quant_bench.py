"""Weight quantization on CPU: output tok/s, batch-1 decode and peak RSS per scheme.

``python -m mistral_serve.bench.quant_bench --json docs/bench/quantization-cpu.json`` runs,
for the embedded tiny model (where the float32 vocabulary projection, never quantized, is
~75% of the weights) and a larger random-weight model where the decoder layers dominate
(hidden 1024, 8 layers, intermediate 3584), each scheme in a fresh subprocess (so peak RSS
is that scheme's own, loading included): a batch of 16 greedy requests (32-token prompts, 64
new tokens), and batch-1 decode (one request, 64 new tokens), each timed three times (the
fastest is reported: the machine is shared and contention only ever adds time). Peak RSS
(VmHWM) includes the memory-mapped checkpoint file safetensors reads from (clean file pages
the kernel can drop); ``rss_after_load_mib`` is what stays resident once the file is closed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = ("none", "int8", "int4", "fp8")
LARGER_SHAPE = {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8, "num_attention_heads": 8,
                "head_dim": 128}


def write_larger_model(out: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of the larger shape, same vocabulary and tokenizer as the tiny one."""
    from safetensors.torch import save_file

    from mistral_serve.model.tiny import random_weights, tiny_config, write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(tiny_config(), **LARGER_SHAPE)
    save_file(random_weights(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_tokenizer(out, mistral_common_files=True)
    return out


def _measure(model: str, scheme: str, threads: int) -> dict:
    """One scheme, in this (fresh) process."""
    import torch

    from mistral_serve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, quantization=scheme, num_threads=threads, kv_cache_memory_bytes=256 * 2**20)
    load_s = time.perf_counter() - t0
    rss_after_load = _status_kib("VmRSS")
    m = llm.engine.runner.model
    layer_bytes = sum(t.numel() * t.element_size() for t in [*m.layers.parameters(), *m.layers.buffers()])
    unique = {id(t): t for t in [*m.parameters(), *m.buffers()]}.values()  # a tied lm_head counts once
    total_bytes = sum(t.numel() * t.element_size() for t in unique)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 32000, (32,), generator=g).tolist() for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    batch_s = single_s = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        batch_s = min(batch_s, time.perf_counter() - t)
        t = time.perf_counter()
        llm.generate(prompts[:1], params)
        single_s = min(single_s, time.perf_counter() - t)
    return {
        "scheme": scheme, "effective": llm.engine.quantization,
        "decoder_layer_weight_mib": round(layer_bytes / 2**20, 1), "all_weight_mib": round(total_bytes / 2**20, 1),
        "load_s": round(load_s, 2),
        "batch16_output_tok_per_s": round(sum(len(o.outputs[0].token_ids) for o in outs) / batch_s, 1),
        "batch1_ms_per_token": round(single_s / 64 * 1e3, 2),
        "rss_after_load_mib": round(rss_after_load / 1024, 1),
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
    }


def _status_kib(field: str) -> int:
    """A /proc/self/status figure (VmHWM: this process's high-water RSS; not ru_maxrss, which
    keeps the parent's peak across fork + exec, so every child would report the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the report here")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)  # MODEL SCHEME, run in a child process
    a = p.parse_args(argv)
    if a._one:
        print(json.dumps(_measure(a._one[0], a._one[1], a.threads)))
        return 0
    from mistral_serve.model.tiny import ensure_tiny_model
    from mistral_serve.bench.measure import cpu_model

    report: dict = {"machine": {"cpu": cpu_model(), "threads": a.threads}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny (hidden 256, 4 layers)": str(ensure_tiny_model()),
                  "larger (hidden 1024, 8 layers)": str(write_larger_model(Path(tmp) / "larger"))}
        for label, model in models.items():
            rows = []
            for scheme in a.schemes.split(","):
                out = subprocess.run([sys.executable, "-m", "mistral_serve.bench.quant_bench", "--threads",
                                      str(a.threads), "--_one", model, scheme],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(label, rows[-1], flush=True)
            report["models"][label] = rows
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
