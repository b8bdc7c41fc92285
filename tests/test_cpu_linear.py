"""oneDNN weight packing falls back to plain linear layers on CPUs that cannot pack a dtype.

Machines of this project's kind come with AVX-512 (Intel) or AVX2 only (AMD); on the latter,
packing bf16/fp16 weights raises. ``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN behave as on an
AVX2-only CPU, so the fallback is exercised whatever CPU runs the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, torch
    from mistral_serve import LLM, SamplingParams
    from mistral_serve.model.cpu_linear import PackedLinear, can_pack
    dtype = sys.argv[2]
    llm = LLM(sys.argv[1], dtype=dtype, kv_cache_memory_bytes=16 << 20, num_threads=1)
    model = llm.engine.runner.model
    packed = any(isinstance(m, PackedLinear) for m in model.modules())
    out = llm.generate([[1, 1782, 6333, 1117]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    ids = out[0].outputs[0].token_ids
    assert len(ids) == 8, ids
    print("PACKED" if packed else "PLAIN", can_pack(torch.device("cpu"), getattr(torch, dtype)))
""")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_runs_when_onednn_cannot_pack(tiny_model_dir, dtype) -> None:
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), dtype], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["PLAIN", "False"], proc.stdout


def test_float32_is_packed_on_avx2(tiny_model_dir) -> None:
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), "float32"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["PACKED", "True"], proc.stdout


def test_packed_model_steps_on_bucketed_rows_without_changing_real_rows(tiny_model_dir) -> None:
    """A packed model runs each step on a multiple of PACKED_ROW_BUCKET rows (oneDNN builds a
    primitive per row count); the zero padding rows never change the real rows' logits."""
    from mistral_serve import LLM, SamplingParams
    from mistral_serve.model.cpu_linear import PACKED_ROW_BUCKET

    llm = LLM(str(tiny_model_dir), kv_cache_memory_bytes=16 << 20)
    model = llm.engine.runner.model
    assert model.row_bucket == PACKED_ROW_BUCKET
    rows_seen: list[int] = []
    hook = model.layers[0].self_attn.qkv_proj.register_forward_pre_hook(lambda _m, args: rows_seen.append(args[0].shape[0]))
    prompts = [[1, *range(1000 * i, 1000 * i + n)] for i, n in enumerate((5, 37, 70), 1)]  # 115 tokens, no shared prefix
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    bucketed = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    hook.remove()
    assert rows_seen and all(r % PACKED_ROW_BUCKET == 0 for r in rows_seen), rows_seen
    assert rows_seen[0] == 128, rows_seen  # 115 tokens padded to the next multiple of 32
    model.row_bucket = 1
    llm.reset_prefix_cache()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == bucketed
