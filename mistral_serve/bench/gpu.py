"""``mistral-serve bench gpu``: decode and prefill speed of the engine at Mistral 7B v0.3's full
shape, with random weights built directly in device memory, against the HBM-bandwidth floor.

No checkpoint is read or written: timing does not depend on weight values, so the model is built
from the config by ``loader.build_random_model`` (N(0, 0.02) weights in bf16, on the GPU), and the
engine is pointed at a stub checkpoint directory holding only config.json, generation_config.json
and the tiny model's Mistral v3 tokenizer files, so the engine and tokenizer code paths are the
real ones. The one seam is ``random_weights()``, which has ``ModelRunner`` call
``build_random_model`` instead of ``load_model`` while the engine is built.

What it measures (all greedy, EOS ignored, one engine for everything):

* **decode ms/step** at batch B and context L: B prompts of L random tokens are prefilled, then,
  once every sequence is decoding, ``engine.step()`` is timed alone (no prefill token in any timed
  step: checked). Batches are timed largest first on the same sequences, aborting the extra ones
  in between, so one prefill serves every batch size of a context.
* each decode figure's **HBM floor**: the bytes one decode step must read (every weight except the
  embedding table, which a lookup reads B rows of, plus the K/V of every context token of every
  sequence) over the GPU's bandwidth (``capacity.GPUS``), and measured / floor;
* **prefill tok/s**: 8 prompts of 2,048 tokens, one output token each;
* **workload-64**: the shared offline workload (``bench engine``'s), through ``LLM.generate``.

The report's ``engine`` section names the attention backend that ran and whether decode steps
replayed CUDA graphs (``--attention-backend``, ``--enforce-eager``). The JSON report is rewritten
after every section, so a run cut short by a timeout keeps what it
measured. On CPU (``--device cpu --shape tiny``) the same code runs on the tiny shape, which is how
CI exercises it (tests/test_gpu_bench.py); CPU figures say nothing about the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mistral_serve.capacity import GPU, GPUS, PRESETS
from mistral_serve.model.config import ModelConfig

FULL_PRESET = "mistral-7b-v0.3"
SECTIONS = ("decode", "prefill", "workload", "long")


# ---- shapes, stub checkpoints, the random-weight seam ---------------------------------------


def full_shape_dict(preset: str = FULL_PRESET, dtype: str = "bfloat16") -> dict:
    """config.json contents of the published checkpoint's shape (``capacity.PRESETS``)."""
    return dict(PRESETS[preset], architectures=["MistralForCausalLM"], torch_dtype=dtype)


def tiny_shape_dict() -> dict:
    """The tiny model's shape without a sliding window (as v0.3 has none), float32."""
    from mistral_serve.model.tiny import tiny_config

    return tiny_config(sliding_window=None)


def shape_dict(shape: str, dtype: str) -> dict:
    if shape == "full":
        return full_shape_dict(dtype=dtype)
    if shape == "tiny":
        return dict(tiny_shape_dict(), torch_dtype=dtype)
    raise ValueError(f"unknown shape {shape!r} (full or tiny)")


def write_stub_checkpoint(out: str | Path, config: dict) -> Path:
    """A checkpoint directory without weights: config.json, generation_config.json and the
    tiny model's tokenizer files (``tiny.write_tokenizer``). Only loadable under ``random_weights``."""
    from mistral_serve.model.tiny import write_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}) + "\n")
    write_tokenizer(out, mistral_common_files=config.get("model_type") == "mistral")
    return out


@contextmanager
def random_weights(seed: int = 0) -> Iterator[list[Path]]:
    """While active, engines build their model with ``build_random_model`` (on the engine's
    device and dtype) instead of reading the checkpoint's weights. Yields the list of model
    directories it stood in for, so callers can check the seam was really used."""
    from mistral_serve.engine import model_runner
    from mistral_serve.model.loader import build_random_model

    if not hasattr(model_runner, "load_model"):
        raise RuntimeError("mistral_serve.engine.model_runner no longer calls load_model: update bench/gpu.py's seam")
    calls: list[Path] = []

    def load(model_dir, config, dtype, device, max_positions, quantization="none"):
        calls.append(Path(model_dir))
        return build_random_model(config, dtype, device, max_positions, seed=seed, quantization=quantization)

    original = model_runner.load_model
    model_runner.load_model = load
    try:
        yield calls
    finally:
        model_runner.load_model = original


# ---- the HBM floor ---------------------------------------------------------------------------


def detect_gpu(name: str, memory_bytes: int | None = None) -> GPU | None:
    """The ``capacity.GPUS`` entry for a ``torch.cuda.get_device_name()``, or None if unknown."""
    n = name.upper().replace("-", " ")
    if "H200" in n:
        return GPUS["H200-141GB"]
    if "H100" in n:
        if "PCIE" in n:
            return GPUS["H100-PCIe-80GB"]
        if "NVL" in n:
            return GPUS["H100-NVL-94GB"]
        return GPUS["H100-80GB"]  # SXM (HBM3)
    if "A100" in n:
        small = ("40GB" in n.replace(" ", "")) or (memory_bytes is not None and memory_bytes < 60 * 10**9)
        return GPUS["A100-40GB" if small else "A100-80GB"]
    for key, tag in (("L40S-48GB", "L40S"), ("A10G-24GB", "A10G"), ("L4-24GB", "L4")):
        if tag in n.split():
            return GPUS[key]
    return None


def weight_bytes_per_decode_step(config: ModelConfig, dtype_bytes: int, quantization: str = "none") -> int:
    """Weight bytes one decode step reads: all weights (projections as ``quantization`` stores
    them) but the embedding table (a lookup reads only the batch's rows), unless the table
    doubles as the LM head."""
    from mistral_serve.model.quantization.footprint import embedding_bytes, weight_bytes

    total = weight_bytes(config, quantization, dtype_bytes)
    if not config.tie_word_embeddings:
        total -= embedding_bytes(config, quantization, dtype_bytes)
    return total


def decode_floor_ms(config: ModelConfig, dtype_bytes: int, kv_tokens: float, bandwidth_bytes_per_s: float,
                    quantization: str = "none") -> float:
    """The memory-bandwidth floor of one decode step that attends to ``kv_tokens`` cached
    tokens in all (summed over the batch): weights once plus every K/V byte, over bandwidth."""
    read = (weight_bytes_per_decode_step(config, dtype_bytes, quantization)
            + kv_tokens * config.kv_bytes_per_token(dtype_bytes))
    return read / bandwidth_bytes_per_s * 1e3


# ---- measurements ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 32000, (n, length), generator=g).tolist()


def _greedy(max_tokens: int):
    from mistral_serve import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def time_decode(llm, batch_sizes: list[int], context_len: int, steps: int, warmup_steps: int,
                seed: int = 0, time_limit_s: float = 600.0) -> list[dict]:
    """Decode ms/step at each batch size, all at ~``context_len`` tokens of context.

    The largest batch is prefilled; once every sequence is decoding, each batch size is timed
    for ``steps`` steps (after ``warmup_steps`` untimed ones), largest first, aborting sequences
    down to the next size. One row per batch size; a batch whose KV does not fit the pool is
    reported as skipped."""
    engine = llm.engine
    device = engine.runner.device
    if engine.has_unfinished_requests():
        raise RuntimeError("time_decode needs an idle engine")
    block_size = engine.args.block_size
    chunk = engine.args.max_num_batched_tokens
    sizes = sorted(set(batch_sizes), reverse=True)
    n_max = sizes[0]
    # Early finishers decode while later ones prefill: budget the output length for that.
    prefill_steps = -(-n_max * context_len // max(1, chunk - n_max)) + n_max
    max_tokens = prefill_steps + len(sizes) * (steps + warmup_steps) + 16
    max_tokens = min(max_tokens, engine.max_model_len - context_len)
    blocks_per_seq = -(-(context_len + max_tokens) // block_size)
    fit = min(engine.block_manager.num_blocks // blocks_per_seq, engine.args.max_num_seqs)
    rows = [{"batch": b, "context": context_len, "skipped": f"KV pool of {engine.block_manager.num_blocks} blocks "
             f"fits {fit} sequences of {context_len + max_tokens} tokens"} for b in sizes if b > fit]
    sizes = [b for b in sizes if b <= fit]
    if not sizes:
        return sorted(rows, key=lambda r: r["batch"])
    n_max = sizes[0]

    ids = [f"decode-{context_len}-{i}" for i in range(n_max)]
    for rid, prompt in zip(ids, _random_prompts(n_max, context_len, seed)):
        engine.add_request(rid, prompt, _greedy(max_tokens))
    seqs = [engine.requests[rid] for rid in ids]
    _sync(device)
    t0 = time.perf_counter()
    n_prefill_steps = 0
    while any(s.num_computed_tokens < s.prompt_len for s in seqs):
        engine.step()
        n_prefill_steps += 1
        if time.perf_counter() - t0 > time_limit_s:
            raise TimeoutError(f"prefill of {n_max} x {context_len} tokens took over {time_limit_s} s")
    _sync(device)
    prefill_s = time.perf_counter() - t0
    if any(s.is_finished for s in seqs):
        raise RuntimeError("a sequence finished during prefill: raise max_tokens")

    config, dtype_bytes = engine.config, engine.runner.dtype.itemsize
    window = config.sliding_window
    live = list(seqs)
    for b in sizes:
        while len(live) > b:
            engine.abort_request(live.pop().request_id)
        for _ in range(warmup_steps):
            engine.step()
        prompt_tokens0, preempt0 = engine.stats.prompt_tokens, engine.scheduler.num_preemptions
        times, kv_tokens, contexts = [], [], []
        for _ in range(steps):
            kv_tokens.append(sum(min(s.num_tokens, window) if window else s.num_tokens for s in live))
            contexts.append(statistics.fmean(s.num_tokens for s in live))
            _sync(device)
            t = time.perf_counter()
            out = engine.step()
            _sync(device)
            times.append(time.perf_counter() - t)
            if len(out) != b or any(o.finished for o in out):
                raise RuntimeError(f"batch {b}: step produced {len(out)} outputs (finished early?), expected {b}")
        if engine.stats.prompt_tokens != prompt_tokens0 or engine.scheduler.num_preemptions != preempt0:
            raise RuntimeError(f"batch {b}: a timed step prefilled or preempted; the timing is not pure decode")
        row = {
            "batch": b,
            "context": context_len,
            "mean_context_tokens": round(statistics.fmean(contexts), 1),
            "steps": steps,
            "ms_per_step_median": statistics.median(times) * 1e3,
            "ms_per_step_mean": statistics.fmean(times) * 1e3,
            "ms_per_step_min": min(times) * 1e3,
            "ms_per_step_max": max(times) * 1e3,
            "output_tok_per_s": b / statistics.median(times),
            "kv_tokens_per_step": statistics.fmean(kv_tokens),
            "weight_bytes_per_step": weight_bytes_per_decode_step(config, dtype_bytes, llm.engine.quantization),
            "kv_bytes_per_step": statistics.fmean(kv_tokens) * config.kv_bytes_per_token(dtype_bytes),
        }
        if b == n_max:
            row["prefill_of_this_context"] = {"sequences": n_max, "seconds": prefill_s, "steps": n_prefill_steps,
                                              "tok_per_s": n_max * context_len / prefill_s}
        rows.append(row)
    for s in live:
        engine.abort_request(s.request_id)
    return sorted(rows, key=lambda r: r["batch"])


def add_floors(rows: list[dict], config: ModelConfig, dtype_bytes: int, gpu: GPU | None,
               quantization: str = "none") -> None:
    """Fill in each timed row's HBM floor and measured / floor (None without a known GPU)."""
    for r in rows:
        if "skipped" in r:
            continue
        if gpu is None:
            r["floor_ms"] = r["ratio_to_floor"] = None
            continue
        r["floor_ms"] = decode_floor_ms(config, dtype_bytes, r["kv_tokens_per_step"], gpu.bandwidth_bytes_per_s,
                                        quantization)
        r["ratio_to_floor"] = r["ms_per_step_median"] / r["floor_ms"]


def time_prefill(llm, n: int, length: int, runs: int = 2, seed: int = 1) -> dict:
    """Prompt tokens per second for ``n`` prompts of ``length`` tokens, one output token each."""
    device = llm.engine.runner.device
    prompts = _random_prompts(n, length, seed)
    walls = []
    for _ in range(runs):
        _sync(device)
        t = time.perf_counter()
        llm.generate(prompts, _greedy(1))
        _sync(device)
        walls.append(time.perf_counter() - t)
    best = min(walls)
    return {"prompts": n, "prompt_len": length, "runs": runs, "wall_s": walls,
            "tok_per_s_best": n * length / best, "tok_per_s_median": n * length / statistics.median(walls)}


def smoke(llm, prompts: int = 2, max_tokens: int = 16, seed: int = 2) -> dict:
    """Generate ``max_tokens`` greedy tokens for ``prompts`` prompts of different lengths,
    checking every step's logits are finite and not constant. ``ok`` is the verdict."""
    runner = llm.engine.runner
    execute = runner.execute
    finite, spread = [], []

    def checked(inputs):
        logits = execute(inputs)
        finite.append(torch.isfinite(logits).all())
        spread.append(logits.float().std(dim=-1).min())
        return logits

    ps = [p[: 24 + 40 * i] for i, p in enumerate(_random_prompts(prompts, 24 + 40 * prompts, seed))]
    runner.execute = checked
    try:
        t = time.perf_counter()
        outs = llm.generate(ps, _greedy(max_tokens))
        wall = time.perf_counter() - t
    finally:
        del runner.execute  # back to the class's method
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    all_finite = bool(torch.stack(finite).all()) if finite else False
    min_std = float(torch.stack(spread).min()) if spread else 0.0
    return {"prompts": [len(p) for p in ps], "max_tokens": max_tokens, "output_lengths": lengths,
            "steps": len(finite), "logits_finite": all_finite, "min_logit_std": min_std, "wall_s": wall,
            "first_tokens": [o.outputs[0].token_ids[:4] for o in outs],
            "ok": all_finite and min_std > 0 and lengths == [max_tokens] * len(ps)}


def run_workload(llm, workload, runs: int) -> dict:
    """``bench engine``'s runner and summary on the already-built engine."""
    from mistral_serve.bench.measure import summarize
    from mistral_serve.bench.runners import DECODINGS, OursRunner

    class _OnThisEngine(OursRunner):
        def __init__(self, llm) -> None:  # noqa: D107 - reuse the engine, do not build another
            self.llm = llm
            self.decoding = DECODINGS["greedy"]

    runner = _OnThisEngine(llm)
    runner.run(workload, warmup=True)
    results = [runner.run(workload) for _ in range(runs)]
    summary = summarize(OursRunner.name, results, 0, OursRunner.notes)
    summary.pop("peak_rss_mib")
    summary["workload"] = {"source": workload.source, "requests": len(workload),
                           "prompt_tokens": workload.prompt_tokens, "output_tokens": workload.output_tokens}
    return summary


# ---- the command -----------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mistral-serve bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--shape", choices=["full", "tiny"], default="full",
                   help="full: Mistral 7B v0.3 (7.25B parameters); tiny: the embedded test shape (for CPU/CI)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batches", type=_ints, default=[1, 8, 32, 64])
    p.add_argument("--contexts", type=_ints, default=[1024, 8192])
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--long-context", type=int, default=16384)
    p.add_argument("--long-batch", type=int, default=8)
    p.add_argument("--prefill", default="8x2048", help="NxLEN prompts for the prefill figure")
    p.add_argument("--workload", help="workload JSON (default: ../shared/bench/workload-64.json or its recipe)")
    p.add_argument("--workload-requests", type=int, help="only the first N requests of the workload")
    p.add_argument("--workload-runs", type=int, default=2)
    p.add_argument("--skip", action="append", choices=SECTIONS, default=[], help="repeatable")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="engine chunk size (an 8K prompt prefills in one causal chunk)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--quantization", choices=["none", "int8", "int4", "fp8"], default="none",
                   help="quantize the random projections (docs/quantization.md); the floor counts their bytes")
    p.add_argument("--kv-cache-memory-bytes", type=int, help="KV pool size (default: engine's)")
    p.add_argument("--attention-backend", choices=["auto", "torch", "flashinfer"], default="auto",
                   help="engine's attention backend (auto: flashinfer on CUDA in bf16/fp16 when installed)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--bandwidth-tbs", type=float, help="HBM bandwidth in TB/s (default: from the GPU's name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="only build the engine and generate 16 tokens for 2 prompts, checking finite logits")
    p.add_argument("--json", help="write the report here (rewritten after every section)")
    return p


def _machine(device: torch.device) -> dict:
    from mistral_serve.bench.measure import cpu_model

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "device": str(device), "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
    return info


def run(a: argparse.Namespace) -> dict:
    from mistral_serve import LLM
    from mistral_serve.bench.workload import load_workload

    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    machine = _machine(device)
    gpu = detect_gpu(machine["gpu"], machine.get("gpu_memory_bytes")) if machine["gpu"] else None
    if a.bandwidth_tbs:
        gpu = GPU(f"{machine['gpu'] or device.type} (--bandwidth-tbs)", machine.get("gpu_memory_bytes", 0),
                  a.bandwidth_tbs * 1e12)
    cfg_dict = shape_dict(a.shape, dtype)
    config = ModelConfig.from_dict(cfg_dict)
    dtype_bytes = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    report: dict = {
        "kind": "mistral-serve bench gpu",
        "note": "random weights (timing does not depend on their values); greedy, EOS ignored",
        "machine": machine,
        "model": {"shape": a.shape, "preset": FULL_PRESET if a.shape == "full" else "tiny",
                  "parameters": config.num_parameters(), "dtype": dtype,
                  "quantization": a.quantization,
                  "weight_bytes_per_decode_step": weight_bytes_per_decode_step(config, dtype_bytes, a.quantization),
                  "kv_bytes_per_token": config.kv_bytes_per_token(dtype_bytes)},
        "hbm": ({"gpu": gpu.name, "bandwidth_bytes_per_s": gpu.bandwidth_bytes_per_s,
                 "floor": "(weights but the embedding table + K/V of every context token) / bandwidth"}
                if gpu else None),
        "errors": {},
    }

    def save() -> None:
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(report, indent=2) + "\n")

    engine_args = {"dtype": dtype, "device": device.type, "max_num_batched_tokens": a.max_num_batched_tokens,
                   "gpu_memory_utilization": a.gpu_memory_utilization, "quantization": a.quantization,
                   "attention_backend": a.attention_backend, "enforce_eager": a.enforce_eager}
    if a.kv_cache_memory_bytes:
        engine_args["kv_cache_memory_bytes"] = a.kv_cache_memory_bytes
    report["engine_args"] = engine_args
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        stub = write_stub_checkpoint(Path(tmp) / "model", cfg_dict)
        t = time.perf_counter()
        with random_weights(a.seed) as calls:
            llm = LLM(str(stub), **engine_args)
        if not calls:
            raise RuntimeError("the engine did not build its model through the random-weight seam")
        _sync(device)
        engine = llm.engine
        report["engine"] = {"build_s": time.perf_counter() - t, "kv_blocks": engine.block_manager.num_blocks,
                            "block_size": engine.args.block_size, "max_model_len": engine.max_model_len,
                            "kv_pool_tokens": engine.block_manager.num_blocks * engine.args.block_size,
                            # what ran: the attention backend and whether decode steps replay CUDA graphs
                            "attention_backend": engine.runner.attention.name,
                            "cuda_graphs": engine.runner.cuda_graphs}
        if device.type == "cuda":
            report["engine"]["cuda_memory_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
        if a.smoke:
            report["smoke"] = smoke(llm)
            if not report["smoke"]["ok"]:
                report["errors"]["smoke"] = "non-finite or constant logits, or short outputs"
            save()
            return report
        llm.generate(_random_prompts(2, 32, a.seed), _greedy(8))  # warm-up: kernels, allocator
        save()

        def section(name: str, fn) -> None:
            if name in a.skip:
                return
            t = time.perf_counter()
            try:
                report[name] = fn()
            except Exception as e:  # keep the other sections' figures
                report["errors"][name] = f"{type(e).__name__}: {e}"
                for rid in list(engine.requests):
                    engine.abort_request(rid)
            print(f"[bench gpu] {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            save()

        def decode(contexts: list[int], batches: list[int]) -> list[dict]:
            rows = []
            for ctx in contexts:
                ctx_rows = time_decode(llm, batches, ctx, a.steps, a.warmup_steps, a.seed)
                add_floors(ctx_rows, config, dtype_bytes, gpu, a.quantization)
                rows.extend(ctx_rows)
            return rows

        n, length = _ints(a.prefill.replace("x", ","))
        workload = load_workload(a.workload)
        if a.workload_requests:
            workload = workload.head(a.workload_requests)
        short = [c for c in a.contexts if c <= 2048]
        section("decode", lambda: decode(short, a.batches) if short else [])
        section("prefill", lambda: time_prefill(llm, n, length))
        section("workload", lambda: run_workload(llm, workload, a.workload_runs))
        longer = [c for c in a.contexts if c > 2048]
        if longer and "decode" not in a.skip:
            t = time.perf_counter()
            try:
                report["decode"] = report.get("decode", []) + decode(longer, a.batches)
            except Exception as e:
                report["errors"]["decode_long_contexts"] = f"{type(e).__name__}: {e}"
                for rid in list(engine.requests):
                    engine.abort_request(rid)
            print(f"[bench gpu] decode {longer}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            save()
        section("long", lambda: decode([a.long_context], [a.long_batch]))
        if device.type == "cuda":
            report["engine"]["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        save()
    return report


def format_report(report: dict) -> str:
    m = report["machine"]
    if "smoke" in report:
        e = report["engine"]
        return (f"smoke ({report['model']['shape']} shape, {report['model']['dtype']}, {m['device']}, attention "
                f"{e['attention_backend']}, CUDA graphs {'on' if e['cuda_graphs'] else 'off'}): {report['smoke']}")
    lines = [f"{report['model']['shape']} shape, {report['model']['dtype']}, {m['device']} "
             f"({m['gpu'] or m['cpu']}), torch {m['torch']}"
             + (f", floor at {report['hbm']['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s" if report["hbm"] else "")
             + f", attention {report['engine']['attention_backend']}, CUDA graphs "
             + ("on" if report["engine"]["cuda_graphs"] else "off")]
    head = f"{'batch':>6}{'context':>9}{'ms/step':>10}{'floor ms':>10}{'x floor':>9}{'tok/s':>10}"
    lines += [head, "-" * len(head)]
    for r in report.get("decode", []) + report.get("long", []):
        if "skipped" in r:
            lines.append(f"{r['batch']:>6}{r['context']:>9}  skipped: {r['skipped']}")
            continue
        floor = "-" if r["floor_ms"] is None else f"{r['floor_ms']:.2f}"
        ratio = "-" if r["ratio_to_floor"] is None else f"{r['ratio_to_floor']:.2f}"
        lines.append(f"{r['batch']:>6}{r['context']:>9}{r['ms_per_step_median']:>10.2f}{floor:>10}{ratio:>9}"
                     f"{r['output_tok_per_s']:>10,.0f}")
    if "prefill" in report:
        p = report["prefill"]
        lines.append(f"prefill {p['prompts']} x {p['prompt_len']}: {p['tok_per_s_best']:,.0f} tok/s")
    if "workload" in report:
        w = report["workload"]
        lines.append(f"workload {w['workload']['source']}: {w['output_tok_per_s']:,.0f} output tok/s")
    for name, err in report["errors"].items():
        lines.append(f"ERROR in {name}: {err}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    report = run(a)
    print(format_report(report))
    if a.json:
        print(f"wrote {a.json}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
