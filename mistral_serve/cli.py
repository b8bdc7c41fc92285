"""The ``mistral-serve`` command. Each subcommand lives with the code it drives; this module
only routes, importing lazily so ``mistral-serve plan`` does not pay for Ray or transformers."""

from __future__ import annotations

import argparse
import json
import sys


def _tiny_model(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mistral-serve tiny-model",
                                description="Write a tiny random-weight HF checkpoint of Mistral 7B's architecture.")
    p.add_argument("dir")
    p.add_argument("--arch", choices=["mistral", "llama"], default="mistral")
    p.add_argument("--sliding-window", default="128", help="tokens, or 'none' (mistral only; default 128)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads of 8 query heads (2 = GQA 4:1, 8 = MHA)")
    p.add_argument("--rope-scaling", choices=["none", "llama3"], default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=["awq", "gptq"], default=None,
                   help="write the projections as a 4-bit AWQ / GPTQ checkpoint (group size 128)")
    p.add_argument("--desc-act", action="store_true", help="GPTQ with act-order (a seeded column permutation)")
    a = p.parse_args(argv)
    from mistral_serve.model.tiny import build_tiny_model

    if a.desc_act and a.quantize != "gptq":
        p.error("--desc-act needs --quantize gptq")
    window = None if a.sliding_window.lower() in ("none", "null", "0") or a.arch == "llama" else int(a.sliding_window)
    out = build_tiny_model(a.dir, a.arch, window, a.kv_heads, a.seed, None if a.rope_scaling == "none" else a.rope_scaling,
                           a.quantize, a.desc_act)
    print(f"wrote {out}")
    return 0


def _plan(argv: list[str]) -> int:
    from mistral_serve import capacity
    from mistral_serve.model.config import ModelConfig

    p = argparse.ArgumentParser(prog="mistral-serve plan", description="KV-cache and throughput capacity math.")
    p.add_argument("--model", required=True,
                   help=f"checkpoint dir, a preset ({', '.join(capacity.PRESETS)}) or a known hub name")
    p.add_argument("--gpu", default="H100-80GB", choices=list(capacity.GPUS))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--quantization", default=None, choices=["none", "int8", "int4", "fp8", "awq", "gptq"],
                   help="weight quantization (default: a checkpoint's own quantization_config, else none)")
    p.add_argument("--all-gpus", action="store_true", help="one row per GPU preset: weights, KV tokens, decode floor")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    preset = capacity.PRESET_ALIASES.get(a.model, a.model)
    if preset in capacity.PRESETS:
        config = ModelConfig.from_dict(capacity.PRESETS[preset])
    else:
        from mistral_serve.model.loader import resolve_model_dir

        config = ModelConfig.from_dir(resolve_model_dir(a.model))
    dtype_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[a.dtype]
    from mistral_serve.model.quantization.config import resolve_quantization

    qc = resolve_quantization(a.quantization or "none", config.raw)
    quantization = a.quantization or (qc.method if qc is not None else "none")
    if a.all_gpus:
        plans = [capacity.plan(config, a.model, gpu, dtype_bytes, a.max_model_len, a.gpu_memory_utilization,
                               a.block_size, quantization=quantization) for gpu in capacity.GPUS.values()]
        print(json.dumps([p.as_dict() for p in plans], indent=2) if a.json else capacity.format_gpu_table(plans))
        return 0
    result = capacity.plan(config, a.model, capacity.GPUS[a.gpu], dtype_bytes, a.max_model_len,
                           a.gpu_memory_utilization, a.block_size, quantization=quantization)
    if a.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(capacity.format_plan(result, config))
    return 0


def _bench(argv: list[str]) -> int:
    from mistral_serve.bench.cli import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from mistral_serve.serving.cli import main

    return main(argv)


def _load(argv: list[str]) -> int:
    from load_tests.cli import main

    return main(argv)


COMMANDS = {
    "tiny-model": (_tiny_model, "write the embedded tiny random-weight model"),
    "plan": (_plan, "capacity math: KV bytes, sequences that fit, decode floor"),
    "bench": (_bench, "benchmark the engine against baselines"),
    "serve": (_serve, "run the OpenAI-compatible server on a local Ray"),
    "load": (_load, "load-test an OpenAI-compatible server"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: mistral-serve COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<12} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
