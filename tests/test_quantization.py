"""Weight quantization (docs/quantization.md): int8 / int4 / fp8 on load, AWQ / GPTQ checkpoints.

Tolerances are derived, not tuned. Round-to-nearest onto a grid of step s leaves an error
uniform in [-s/2, s/2], RMS s/sqrt(12). For the tiny model's N(0, sigma) weights that makes
the relative RMS weight error e_w of each scheme:

- int8 per channel: s = max|w_row| / 127 ~ 3.6 sigma / 127       -> e_w ~ 0.008
- int4, groups of 128, asymmetric: s = range / 15 ~ 5.2 sigma / 15 -> e_w ~ 0.10
  (AWQ alike; GPTQ's symmetric grid spans [-max|w|, max|w|], the same ~5.2 sigma)
- fp8 E4M3 weights (3 mantissa bits, relative step 2^-3 .. 2^-4) -> e_w ~ 0.036
  (on CPU FP8 has no kernel and is dequantized at load: weights only, no activation FP8)

Every quantized model also holds its input embedding table in int8 per row (unless tied to
the lm_head), e_emb ~ 0.007 for the tiny model's rows of 256 (max|row| ~ 2.9 sigma), bounded
by int8's 0.008. A token's embedding row enters the residual stream once, then the token passes
16 quantized projections (4 layers x qkv, o, gate/up, down); independent errors add in
quadrature, so the logits' relative RMS error (centred) is bounded by
rho = sqrt(16 e_w^2 + e_emb^2) (int4: 0.4001, the embedding's share is negligible). For a small logit perturbation delta, KL(p || q) ~ Var_p(delta) / 2,
so with the float32 logits' spread sigma_l the mean KL is bounded by (rho sigma_l)^2 / 2. Top-1
can only flip where the float32 margin is within the noise, so top-1 must agree (>= 95%) at
positions whose margin exceeds 3 sqrt(2) rho sigma_l (3 sigma of the difference of two logit
errors). The random tiny model's margins are small (median ~0.05 logits): for int4 that
threshold (~0.5) leaves no position, so int4 is held to the relative-error and KL bounds and
the engine-level checks; docs/quantization.md reports its measured top-1 agreement.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_reference import random_prompts
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mistral_serve import LLM, SamplingParams
from mistral_serve.capacity import GPUS, PRESETS, plan
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.cpu_linear import PackedLinear, PackedSiluGateUp
from mistral_serve.model.loader import load_model
from mistral_serve.model.quantization import awq, gptq
from mistral_serve.model.quantization.config import QuantizationConfigError, resolve_quantization
from mistral_serve.model.quantization.embedding import Int8Embedding
from mistral_serve.model.quantization.footprint import embedding_bytes, weight_bytes
from mistral_serve.model.quantization.linear import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    QuantizedSiluGateUp,
    kernel_unavailable,
)
from mistral_serve.model.quantization.loading import QuantizedLayerLoader
from mistral_serve.model.quantization.schemes import (
    FP8_MAX,
    Fp8Weight,
    Int4Weight,
    Int8Weight,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)
from mistral_serve.model.tiny import random_weights, tiny_config

CPU = torch.device("cpu")
E_W = {"int8": 0.008, "int4": 0.10, "fp8": 0.036, "awq": 0.10, "gptq": 0.10, "gptq-act": 0.10}
PATH_PROJECTIONS = 16  # 4 layers x (qkv, o, gate/up, down)
E_EMBEDDING = E_W["int8"]  # the int8 per-row input embedding of every quantized (untied) model


def rho_bound(scheme: str) -> float:
    return math.sqrt(PATH_PROJECTIONS * E_W[scheme] ** 2 + E_EMBEDDING**2)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    return random_weights(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory) -> dict[str, Path]:
    """Real AWQ / GPTQ (with and without act-order) checkpoints of the tiny model (seed 0),
    written by the CLI a user would run."""
    from mistral_serve.cli import main

    root = tmp_path_factory.mktemp("prequantized")
    dirs = {"awq": root / "awq", "gptq": root / "gptq", "gptq-act": root / "gptq-act"}
    assert main(["tiny-model", str(dirs["awq"]), "--quantize", "awq"]) == 0
    assert main(["tiny-model", str(dirs["gptq"]), "--quantize", "gptq"]) == 0
    assert main(["tiny-model", str(dirs["gptq-act"]), "--quantize", "gptq", "--desc-act"]) == 0
    return dirs


def prefill_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """float32 logits at every prompt position, all prompts prefilled in one ragged step."""
    engine = llm.engine
    seqs = [engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=1)) for i, p in enumerate(prompts)]
    plan_ = engine.scheduler.schedule()
    assert [n for _, n in plan_.scheduled] == [len(p) for p in prompts]
    inputs = engine.runner.prepare(plan_.scheduled)
    inputs.logits_index = torch.arange(sum(len(p) for p in prompts))
    logits = engine.runner.execute(inputs)
    for s in seqs:
        engine.abort_request(s.request_id)
    return logits


@pytest.fixture(scope="module")
def logit_prompts() -> list[list[int]]:
    return random_prompts(4, 30, 120, seed=3)


@pytest.fixture(scope="module")
def float_logits(tiny_model_dir, logit_prompts) -> torch.Tensor:
    return prefill_logits(LLM(str(tiny_model_dir)), logit_prompts)


# ----------------------------------------------------------------------------- kernels
def test_int8_and_int4_kernels_run_on_this_cpu_and_fp8_says_why_not():
    assert kernel_unavailable(Int8Weight, CPU) is None
    assert kernel_unavailable(Int4Weight, CPU) is None
    assert "no FP8 matmul kernel on CPU" in kernel_unavailable(Fp8Weight, CPU)


def test_kernels_run_on_an_avx2_only_cpu():
    """The ATen kernels dispatch on the CPU's ISA; AVX2 (e.g. AMD EPYC hosts) must work too."""
    code = (
        "import torch\n"
        "from mistral_serve.model.quantization.linear import kernel_unavailable, Int8Linear, Int4Linear\n"
        "from mistral_serve.model.quantization.schemes import Int8Weight, Int4Weight, quantize_int8, quantize_int4\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX2', torch.backends.cpu.get_cpu_capability()\n"
        "cpu = torch.device('cpu')\n"
        "assert kernel_unavailable(Int8Weight, cpu) is None and kernel_unavailable(Int4Weight, cpu) is None\n"
        "w = torch.randn(256, 256) * 0.02; x = torch.randn(5, 256)\n"
        "for q, layer in ((quantize_int8(w), Int8Linear), (quantize_int4(w), Int4Linear)):\n"
        "    ref = x.bfloat16().float() @ q.dequantize().T\n"
        "    torch.testing.assert_close(layer(q, cpu)(x), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)\n"
        "from mistral_serve.model.quantization.embedding import Int8Embedding\n"
        "ids = torch.tensor([3, 0, 255, 3])\n"
        "emb = Int8Embedding.from_float(w, cpu, torch.bfloat16)\n"
        "assert torch.equal(emb(ids), quantize_int8(w).dequantize()[ids].bfloat16())\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("quantize,layer", [(quantize_int8, Int8Linear), (quantize_int4, Int4Linear)])
def test_kernel_layer_computes_its_dequantized_weight(quantize, layer):
    """Kernel output = bf16(x) @ dequantized weight, up to bf16 scale rounding and bf16 output."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 768, generator=g) * 0.02
    x = torch.randn(37, 768, generator=g)
    q = quantize(w)
    ref = x.bfloat16().float() @ q.dequantize().T
    out = layer(q, CPU)(x)
    assert out.dtype == torch.float32 and out.shape == (37, 384)
    # bf16 output: relative 2^-8; zero' = (8 - z) * scale rounded to bf16 adds the same order.
    torch.testing.assert_close(out, ref, atol=2 ** -7 * ref.abs().max().item(), rtol=0)


def test_kernel_rows_do_not_depend_on_the_batch():
    """Batch invariance starts here: a row's result is the same alone or among 200 rows."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1536, 256, generator=g) * 0.02
    x = torch.randn(200, 256, generator=g)
    for layer in (Int8Linear(quantize_int8(w), CPU), Int4Linear(quantize_int4(w), CPU)):
        full = layer(x)
        for m in (1, 3, 17, 64):
            assert torch.equal(layer(x[:m]), full[:m]), (type(layer).__name__, m)


def test_fp8_w8a8_layer_matches_its_emulation():
    """The FP8 (CUDA) layer's math, run on CPU where torch._scaled_mm has a reference
    implementation: per-token activation scales max|x_row|/448 and per-channel weight scales."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(9, 512, generator=g) * torch.logspace(-2, 1, 9)[:, None]  # rows of very different scale
    q = quantize_fp8(w)
    out = Fp8Linear(q, CPU)(x)
    xb = x.bfloat16().float()  # the layer takes bf16 activations
    xs = xb.abs().amax(1, keepdim=True) / FP8_MAX
    xq = (xb / xs).to(torch.float8_e4m3fn).float() * xs
    emulated = xq @ q.dequantize().T
    # Equal up to the bf16 output (relative RMS 2^-9 per element; 2^-8 leaves room for summation order).
    assert ((out - emulated).norm(dim=1) / emulated.norm(dim=1)).max() < 2 ** -8
    exact = x @ w.T
    rel = (out - exact).norm(dim=1) / exact.norm(dim=1)
    assert rel.max() < 2 * math.sqrt(2) * E_W["fp8"], rel  # weight and activation rounding, independent


# ----------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_rounding_error_is_what_the_grid_step_predicts(tiny_weights, scheme):
    """Round-to-nearest: RMS error = step / sqrt(12) within 10%, at most half a step. int4's
    rounded zero point shifts the grid by up to half a step, so a group's extreme values may
    clip by up to one step: allowed for < 1% of them."""
    for name, w in tiny_weights.items():
        if not name.endswith("proj.weight"):
            continue
        if scheme == "int8":
            q = quantize_int8(w)
            step = q.scale[:, None].expand_as(w)
        else:
            q = quantize_int4(w)
            step = q.scale.repeat_interleave(128, dim=1)
        err = q.dequantize() - w
        beyond_half = err.abs() > step / 2 * (1 + 1e-5) + 1e-9
        if scheme == "int8":
            assert not beyond_half.any(), name
        else:
            assert beyond_half.float().mean() < 0.01 and (err.abs() <= step * (1 + 1e-5)).all(), name
        predicted = (step.pow(2).mean() / 12).sqrt()
        assert abs(err.pow(2).mean().sqrt() / predicted - 1) < 0.1, name
        assert err.pow(2).mean().sqrt() / w.std() < 1.25 * E_W[scheme], name


def test_fp8_rounding_is_within_half_an_e4m3_step(tiny_weights):
    w = tiny_weights["model.layers.0.mlp.down_proj.weight"]
    q = quantize_fp8(w)
    err = (q.dequantize() - w).abs()
    # 3 mantissa bits: half a step is 2^-4 of the value for normals; subnormals: 2^-10 * scale.
    assert (err <= torch.maximum(w.abs() * 2 ** -4, q.scale[:, None] * 2 ** -10) * (1 + 1e-6)).all()
    assert (q.dequantize() - w).pow(2).mean().sqrt() / w.std() < 1.25 * E_W["fp8"]


def test_int8_embedding_error_against_the_float_table(tiny_weights):
    """The quantized input table vs the float one: every element within half a step (its row's
    scale), RMS error = step / sqrt(12) within 10% overall and within 25% in every row (256
    uniform errors: ~3% spread per row, the worst of 32768 rows ~4 of those), relative RMS
    error under E_EMBEDDING; the lookup returns exactly the dequantized rows, in the model
    dtype, for ids of any shape."""
    w = tiny_weights["model.embed_tokens.weight"]
    emb = Int8Embedding.from_float(w, CPU, torch.float32)
    assert emb.qweight.dtype == torch.int8 and emb.scales.dtype == torch.bfloat16
    rows = emb(torch.arange(w.shape[0]))
    assert torch.equal(rows, quantize_int8(w).dequantize())
    err = rows - w
    step = emb.scales.float()[:, None].expand_as(w)
    assert (err.abs() <= step / 2 * (1 + 1e-5)).all()
    assert abs(err.pow(2).mean().sqrt() / (step.pow(2).mean() / 12).sqrt() - 1) < 0.1
    assert err.pow(2).mean().sqrt() / w.std() < E_EMBEDDING
    row_rms = err.pow(2).mean(dim=1).sqrt()
    assert ((row_rms / (emb.scales.float() / math.sqrt(12)) - 1).abs() < 0.25).all()
    ids = torch.tensor([[5, w.shape[0] - 1, 0], [5, 7, 7]])
    assert torch.equal(emb(ids), rows[ids])
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(Int8Embedding.from_float(w, CPU, dtype)(ids), rows[ids].to(dtype))


# ----------------------------------------------------------------------------- model logits
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8", "awq", "gptq", "gptq-act"])
def test_logits_stay_close_to_float32(tiny_model_dir, quantized_dirs, logit_prompts, float_logits, scheme):
    """AWQ/GPTQ checkpoints hold the same seed-0 weights as the float tiny model, in 4 bits."""
    if scheme in quantized_dirs:
        llm = LLM(str(quantized_dirs[scheme]))
        assert llm.engine.quantization == scheme.split("-")[0]
    else:
        llm = LLM(str(tiny_model_dir), quantization=scheme)
        assert llm.engine.quantization == scheme
    logits = prefill_logits(llm, logit_prompts)
    ref = float_logits
    centred = ref - ref.mean(-1, keepdim=True)
    sigma_l = centred.pow(2).mean().sqrt().item()
    rho = ((logits - ref).norm(dim=-1) / centred.norm(dim=-1))
    assert rho.max() <= rho_bound(scheme), (rho.max(), rho_bound(scheme))
    logp = ref.log_softmax(-1)
    kl = (logp.exp() * (logp - logits.log_softmax(-1))).sum(-1)
    assert kl.mean() <= (rho_bound(scheme) * sigma_l) ** 2 / 2, (kl.mean(), rho_bound(scheme), sigma_l)
    if E_W[scheme] >= 0.1:
        return  # no position's margin clears 4-bit noise on this random model (module docstring)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 3 * math.sqrt(2) * rho_bound(scheme) * sigma_l
    assert clear.sum() >= 10, "too few positions to judge top-1 agreement"
    agree = (logits.argmax(-1) == ref.argmax(-1))[clear].float().mean()
    assert agree >= 0.95, agree


def test_quantized_projections_bypass_onednn_packing(tiny_model_dir):
    """oneDNN packing still takes lm_head (float), never a quantized layer; the default stays packed."""
    cfg = ModelConfig.from_dir(tiny_model_dir)
    plain = load_model(tiny_model_dir, cfg, torch.float32, CPU, 64)
    assert isinstance(plain.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(plain.layers[0].mlp.gate_up_proj, PackedSiluGateUp)
    assert plain.quantization == "none"
    model = load_model(tiny_model_dir, cfg, torch.float32, CPU, 64, quantization="int4")
    for layer in model.layers:
        assert isinstance(layer.self_attn.qkv_proj, Int4Linear)
        assert isinstance(layer.self_attn.o_proj, Int4Linear)
        assert isinstance(layer.mlp.gate_up_proj, QuantizedSiluGateUp)
        assert isinstance(layer.mlp.down_proj, Int4Linear)
    assert isinstance(model.lm_head, PackedLinear)
    assert isinstance(model.embed_tokens, Int8Embedding)
    # No float copy of any projection or of the input table survives: the only float matrix is lm_head.
    floats = {n for n, t in [*model.named_parameters(), *model.named_buffers()]
              if t.dtype == torch.float32 and t.dim() == 2}
    assert all(n.startswith(("lm_head", "rope")) for n in floats), floats


def test_no_kernel_on_the_device_dequantizes_at_load_with_a_warning(tiny_model_dir, monkeypatch, caplog):
    """FP8 has no CPU kernel; an int4 kernel that fails its probe (simulated) falls back the
    same way: float layers holding the dequantized weights, oneDNN-packed, and a warning."""
    from mistral_serve.model.quantization import linear

    linear._warn_dequantized.cache_clear()
    cfg = ModelConfig.from_dir(tiny_model_dir)
    with caplog.at_level("WARNING", logger="mistral_serve.model.quantization.linear"):
        model = load_model(tiny_model_dir, cfg, torch.float32, CPU, 64, quantization="fp8")
    assert any("fp8: no FP8 matmul kernel on CPU" in r.message and "dequantized" in r.message for r in caplog.records)
    assert isinstance(model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(model.layers[0].mlp.gate_up_proj, PackedSiluGateUp)
    assert model.quantization == "fp8"

    monkeypatch.setattr(linear, "kernel_unavailable", lambda kind, device: "simulated: no kernel")
    w = torch.randn(384, 256) * 0.02
    q = quantize_int4(w)
    layer = linear.build_linear(q, CPU, torch.float32, silu_gate_up=False, float_gate_up=torch.nn.Linear)
    assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, q.dequantize())


def test_bf16_checkpoint_quantizes_on_load_like_fp32(tiny_model_dir, logit_prompts, tmp_path):
    """Published checkpoints are bf16: quantizing them gives (nearly) the fp32 checkpoint's model."""
    shutil.copytree(tiny_model_dir, tmp_path / "bf16")
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in tensors.items()}, str(tmp_path / "bf16" / "model.safetensors"))
    a = prefill_logits(LLM(str(tiny_model_dir), quantization="int8"), logit_prompts)
    b = prefill_logits(LLM(str(tmp_path / "bf16"), quantization="int8"), logit_prompts)
    # bf16 rounding of the weights (relative 2^-9) is well inside int8's own error (0.008).
    rel = (a - b).norm(dim=-1) / (a - a.mean(-1, keepdim=True)).norm(dim=-1)
    assert rel.max() < rho_bound("int8")


def test_quantize_on_load_holds_one_layer_of_float_weights_at_most(tiny_model_dir):
    """The loader never holds more than one decoder layer's float projections (shards are
    name-sorted, a layer's tensors adjacent): peak pending bytes <= one layer's."""
    from mistral_serve.model.decoder import DecoderModel, SiluGateUp
    from mistral_serve.model.loader import load_weights

    cfg = ModelConfig.from_dir(tiny_model_dir)
    qc = resolve_quantization("int8", cfg.raw)
    with torch.device("meta"):
        model = DecoderModel(cfg, 64, torch.float32)
    loader = QuantizedLayerLoader(model, qc, CPU, torch.float32, SiluGateUp)
    model.to_empty(device=CPU)
    with torch.no_grad():
        load_weights(model, tiny_model_dir, loader)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    one_layer = 4 * (h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * h * i)
    assert 0 < loader.peak_pending_bytes <= one_layer
    assert isinstance(model.layers[3].mlp.down_proj, Int8Linear)


# ----------------------------------------------------------------------------- AWQ / GPTQ formats
def _autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing loop, verbatim in structure: intweight is
    [in, out]; eight output columns per int32, order_map [0, 2, 4, 6, 1, 3, 5, 7]."""
    iw = intweight.to(torch.int64)
    packed = torch.zeros(iw.shape[0], iw.shape[1] // 8, dtype=torch.int64)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(iw.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= iw[:, col * 8 + order_map[i]] << (i * 4)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _autogptq_pack_qweight(intweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack for 4 bits: intweight [in, out]; rows i..i+7 into one row."""
    iw = intweight.to(torch.int64)
    packed = torch.zeros(iw.shape[0] // 8, iw.shape[1], dtype=torch.int64)
    for row in range(packed.shape[0]):
        for j in range(8):
            packed[row] |= iw[row * 8 + j] << (4 * j)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _autogptq_pack_qzeros(zeros: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's qzeros: zeros [groups, out] minus 1 (format v1), columns i..i+7 into one."""
    z = zeros.to(torch.int64) - 1
    packed = torch.zeros(z.shape[0], z.shape[1] // 8, dtype=torch.int64)
    for col in range(packed.shape[1]):
        for j in range(8):
            packed[:, col] |= z[:, col * 8 + j] << (4 * j)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def test_awq_packing_is_autoawqs(tiny_weights):
    w = tiny_weights["model.layers.1.self_attn.q_proj.weight"]
    ref = quantize_int4(w, 128, symmetric=False, scale_dtype=torch.float16)
    t = awq.encode(w, 128)
    assert torch.equal(t["qweight"], _autoawq_pack(ref.q.T))
    assert torch.equal(t["qzeros"], _autoawq_pack(ref.zero.T))
    assert torch.equal(t["scales"], ref.scale.T.half())
    back = awq.decode(t, 128, "x")
    assert torch.equal(back.q, ref.q) and torch.equal(back.zero, ref.zero) and torch.equal(back.scale, ref.scale)


def test_gptq_packing_is_autogptqs(tiny_weights):
    w = tiny_weights["model.layers.1.mlp.down_proj.weight"]  # K = 768: six groups
    ref = quantize_int4(w, 128, symmetric=True, scale_dtype=torch.float16)
    t = gptq.encode(w, 128)
    assert torch.equal(t["qweight"], _autogptq_pack_qweight(ref.q.T))
    assert torch.equal(t["qzeros"], _autogptq_pack_qzeros(ref.zero.T))
    assert torch.equal(t["g_idx"], (torch.arange(768) // 128).int())
    back = gptq.decode(t, 128, 1, "x")
    assert back.perm is None and torch.equal(back.dequantize(), ref.dequantize())
    # gptq_v2 stores the zero itself: the config selects the offset.
    v2 = gptq.encode(w, 128, zero_offset=0)
    assert torch.equal(v2["qzeros"], _autogptq_pack_qzeros(ref.zero.T + 1))
    qc = resolve_quantization("none", {"quantization_config": {**gptq.quantization_config(128, False),
                                                               "checkpoint_format": "gptq_v2"}})
    assert torch.equal(gptq.decode(v2, 128, qc.zero_offset, "x").dequantize(), ref.dequantize())


def _expected_dequantized(w: torch.Tensor, fmt: str, perm: torch.Tensor | None) -> torch.Tensor:
    if fmt == "awq":
        return quantize_int4(w, 128, symmetric=False, scale_dtype=torch.float16).dequantize()
    order = torch.arange(w.shape[1]) if perm is None else perm
    q = quantize_int4(w[:, order], 128, symmetric=True, scale_dtype=torch.float16).dequantize()
    out = torch.empty_like(w)
    out[:, order] = q
    return out


@pytest.mark.parametrize("fmt", ["awq", "gptq", "gptq-act"])
def test_prequantized_checkpoint_loads_back_to_the_same_weights(quantized_dirs, tiny_weights, fmt):
    """The written repo → config detection → decode gives the known quantized weights bit for
    bit; the loaded kernel layer reproduces them up to its bfloat16 scales."""
    path = quantized_dirs[fmt]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == fmt.split("-")[0]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.qweight" in names
        assert not any(n.endswith("_proj.weight") for n in names)
        tensors = {n: f.get_tensor(n) for n in names if n.startswith("model.layers.2.self_attn.")}
    qc = resolve_quantization("none", cfg)
    parts = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        suffixes = awq.TENSORS if qc.method == "awq" else gptq.TENSORS
        t = {s: tensors[f"model.layers.2.self_attn.{proj}.{s}"] for s in suffixes}
        decoded = awq.decode(t, 128, proj) if qc.method == "awq" else gptq.decode(t, 128, qc.zero_offset, proj)
        perm = None
        if fmt == "gptq-act":
            assert decoded.perm is not None
            perm = torch.argsort(t["g_idx"].long(), stable=True)
            # the permutation is the act-order one the writer used: groups follow it
            assert torch.equal(t["g_idx"].long()[perm], torch.arange(256) // 128)
        w = tiny_weights[f"model.layers.2.self_attn.{proj}.weight"]
        expected = _expected_dequantized(w, fmt.split("-")[0], _writer_perm(fmt, w.shape[1], "attn_in"))
        assert torch.equal(decoded.dequantize(), expected), proj
        parts.append(expected)
    model = load_model(path, ModelConfig.from_dir(path), torch.float32, CPU, 64)
    layer = model.layers[2].self_attn.qkv_proj
    assert isinstance(layer, Int4Linear) and (layer.perm is not None) == (fmt == "gptq-act")
    kernel_weight = layer(torch.eye(256)).T  # one-hot inputs read the weight out column by column
    fused = torch.cat(parts)
    torch.testing.assert_close(kernel_weight, fused, atol=2 ** -7 * fused.abs().max().item(), rtol=0)


def _writer_perm(fmt: str, k: int, group: str) -> torch.Tensor | None:
    """The act-order permutation ``export.prequantize`` drew for layer 2's ``group`` input:
    seeded, one per (layer, input) in the order the checkpoint's tensors come."""
    if fmt != "gptq-act":
        return None
    from mistral_serve.model.quantization.export import _INPUT_GROUP, _PROJ

    gen = torch.Generator().manual_seed(0)
    drawn: dict[tuple[str, str], torch.Tensor] = {}
    for name, w in random_weights(tiny_config(), seed=0).items():
        m = _PROJ.match(name)
        if m is not None and m[4] in _INPUT_GROUP and (m[2], _INPUT_GROUP[m[4]]) not in drawn:
            drawn[(m[2], _INPUT_GROUP[m[4]])] = torch.randperm(w.shape[1], generator=gen)
    perm = drawn[("2", group)]
    assert perm.numel() == k
    return perm


# ----------------------------------------------------------------------------- engine
@pytest.mark.parametrize("which", ["int8", "int4", "awq", "gptq-act"])
def test_batched_greedy_equals_one_prompt_at_a_time(tiny_model_dir, quantized_dirs, which):
    """Quantization must not break batch invariance: the continuous-batching engine with four
    prompts of different lengths gives each the tokens it gets alone."""
    if which in ("int8", "int4"):
        llm = LLM(str(tiny_model_dir), quantization=which)
    else:
        llm = LLM(str(quantized_dirs[which]))
    prompts = random_prompts(4, 5, 60, seed=11)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_prequantized_checkpoint_is_detected_and_named(quantized_dirs):
    llm = LLM(str(quantized_dirs["gptq"]), quantization="gptq")
    assert llm.engine.quantization == "gptq"
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits=8 is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point=false"),
    ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size -1 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
    ({"quant_method": "gptq", "bits": 4}, "needs an integer group_size"),
    ({"bits": 4}, "has no quant_method"),
    ("awq", "must be an object"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["mlp.down_proj"]},
     "modules_to_not_convert"),
])
def test_unsupported_quantization_config_is_refused_clearly(qc, message):
    with pytest.raises(QuantizationConfigError, match=message.replace("(", r"\(")):
        resolve_quantization("none", {"quantization_config": qc})


def test_requests_that_contradict_the_checkpoint_are_refused():
    awq_cfg = {"quantization_config": awq.quantization_config(128)}
    with pytest.raises(QuantizationConfigError, match="already quantized with awq"):
        resolve_quantization("int4", awq_cfg)
    with pytest.raises(QuantizationConfigError, match="needs a checkpoint whose config.json has a gptq"):
        resolve_quantization("gptq", {})
    with pytest.raises(QuantizationConfigError, match="not one of"):
        resolve_quantization("int3", {})
    assert resolve_quantization("none", {}) is None
    assert resolve_quantization("awq", awq_cfg).method == "awq"


def _copy_with(src: Path, dst: Path, config_patch: dict | None = None,
               tensors: dict[str, torch.Tensor] | None = None) -> Path:
    shutil.copytree(src, dst)
    if config_patch is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_patch)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_malformed_checkpoints_fail_at_load_with_the_reason(tiny_model_dir, quantized_dirs, tmp_path):
    # A float checkpoint claiming to be AWQ.
    bad = _copy_with(tiny_model_dir, tmp_path / "claims-awq", {"quantization_config": awq.quantization_config(128)})
    with pytest.raises(ValueError, match="stores qweight, qzeros, scales for each linear layer, not 'weight'"):
        LLM(str(bad))
    # An unsupported method in a real directory: refused before any weight is read.
    bad = _copy_with(quantized_dirs["awq"], tmp_path / "gemv", {"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}})
    with pytest.raises(QuantizationConfigError, match="version 'gemv'"):
        LLM(str(bad))
    # A GPTQ checkpoint missing a tensor of one projection.
    tensors = load_file(str(quantized_dirs["gptq"] / "model.safetensors"))
    del tensors["model.layers.3.mlp.up_proj.g_idx"]
    bad = _copy_with(quantized_dirs["gptq"], tmp_path / "missing", tensors=tensors)
    with pytest.raises(ValueError, match=r"lacks gptq tensors for 1 projections.*model.layers.3.mlp.up_proj.g_idx"):
        LLM(str(bad))
    # Shapes that do not agree with the declared group size.
    tensors = load_file(str(quantized_dirs["awq"] / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.scales"] = tensors["model.layers.0.mlp.down_proj.scales"][:2]
    bad = _copy_with(quantized_dirs["awq"], tmp_path / "shapes", tensors=tensors)
    with pytest.raises(ValueError, match="AWQ shapes do not agree for group_size 128"):
        LLM(str(bad))
    # A quantized load of a checkpoint without its input embedding.
    tensors = load_file(str(quantized_dirs["awq"] / "model.safetensors"))
    del tensors["model.embed_tokens.weight"]
    bad = _copy_with(quantized_dirs["awq"], tmp_path / "no-embed", tensors=tensors)
    with pytest.raises(ValueError, match="checkpoint lacks model.embed_tokens.weight"):
        LLM(str(bad))
    # A g_idx that is not an act-order layout (group 0 gets every row).
    tensors = load_file(str(quantized_dirs["gptq-act"] / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.g_idx"] = torch.zeros(256, dtype=torch.int32)
    bad = _copy_with(quantized_dirs["gptq-act"], tmp_path / "gidx", tensors=tensors)
    with pytest.raises(ValueError, match="g_idx does not assign exactly 128 input rows"):
        LLM(str(bad))


# ----------------------------------------------------------------------------- capacity
def test_plan_int4_mistral_7b_weights_kv_and_decode_floor():
    cfg = ModelConfig.from_dict(PRESETS["mistral-7b-v0.3"])
    bf16 = plan(cfg, "m", GPUS["L4-24GB"], 2, 8192)
    int4 = plan(cfg, "m", GPUS["L4-24GB"], 2, 8192, quantization="int4")
    assert int4.quantization == "int4" and bf16.quantization == "none"
    # 4-bit projections + a bf16 scale and zero per 128 weights; the input embedding int8 + a
    # bf16 scale per row; lm_head and norms bf16.
    proj = 32 * (4096 * 6144 + 4096 * 4096 + 2 * 14336 * 4096 + 4096 * 14336)
    table = 32768 * 4096
    expected = proj // 2 + proj // 128 * 4 + table + 32768 * 2 + (cfg.num_parameters() - proj - table) * 2
    assert int4.weight_bytes == expected == weight_bytes(cfg, "int4", 2) == 4_111_015_936
    assert int4.weight_bytes <= 4.2e9  # the target, in decimal GB (plan prints 3.83 GiB)
    assert embedding_bytes(cfg, "int4", 2) == table + 32768 * 2 and embedding_bytes(cfg, "none", 2) == table * 2
    # A decode step reads every weight but the input table (a lookup reads the batch's rows only).
    from mistral_serve.bench import gpu

    assert gpu.weight_bytes_per_decode_step(cfg, 2, "int4") == int4.weight_bytes - embedding_bytes(cfg, "int4", 2)
    # A checkpoint's own group size counts: groups of 64 hold twice the scales and zeros.
    g64 = ModelConfig.from_dict({**PRESETS["mistral-7b-v0.3"], "quantization_config": awq.quantization_config(64)})
    assert weight_bytes(g64, "awq", 2) - int4.weight_bytes == proj // 128 * 4
    assert int4.kv_tokens > bf16.kv_tokens and int4.max_seqs > bf16.max_seqs
    assert int4.decode_floor_ms == pytest.approx(bf16.decode_floor_ms * int4.weight_bytes / bf16.weight_bytes)
    int8 = weight_bytes(cfg, "int8", 2)
    assert weight_bytes(cfg, "awq", 2) == int4.weight_bytes < int8 < weight_bytes(cfg, "none", 2)


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight the loaded model holds (a tied lm_head once), RoPE tables aside."""
    tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith("rope.")]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("which", ["none", "int8", "int4", "awq", "gptq", "gptq-act"])
def test_plan_counts_the_bytes_the_loaded_model_holds(tiny_model_dir, quantized_dirs, which):
    """``plan``'s weight bytes are the loaded model's, buffer for buffer: int4 kernel packing,
    bf16 scales and zeros, the int8 table, a checkpoint's group size and act-order permutations.
    (FP8 is left out: on CPU it has no kernel and loads dequantized, see linear.py.)"""
    path = quantized_dirs.get(which, tiny_model_dir)
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, torch.float32, CPU, 64, quantization=which if which in ("int8", "int4") else "none")
    assert model.quantization == which.split("-")[0]
    assert _held_bytes(model) == weight_bytes(cfg, model.quantization, 4)


def test_tied_embedding_stays_float_and_shared_with_the_head(tiny_model_dir, logit_prompts, tmp_path):
    """A table tied to the lm_head is the head, which stays in the model dtype: a quantized
    tied model keeps one float table, shared, and plan counts it once; its logits stay within
    int4's bound of the float tied model's."""
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    del tensors["lm_head.weight"]
    tied = _copy_with(tiny_model_dir, tmp_path / "tied", {"tie_word_embeddings": True}, tensors)
    cfg = ModelConfig.from_dir(tied)
    model = load_model(tied, cfg, torch.float32, CPU, 64, quantization="int4")
    assert type(model.embed_tokens) is torch.nn.Embedding and model.lm_head.weight is model.embed_tokens.weight
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert embedding_bytes(cfg, "int4", 4) == cfg.vocab_size * cfg.hidden_size * 4
    assert _held_bytes(model) == weight_bytes(cfg, "int4", 4)
    ref = prefill_logits(LLM(str(tied)), logit_prompts)
    logits = prefill_logits(LLM(str(tied), quantization="int4"), logit_prompts)
    rho = (logits - ref).norm(dim=-1) / (ref - ref.mean(-1, keepdim=True)).norm(dim=-1)
    assert rho.max() <= math.sqrt(PATH_PROJECTIONS) * E_W["int4"], rho.max()


def test_plan_cli_all_gpus_table(capsys):
    from mistral_serve.cli import main

    assert main(["plan", "--model", "mistral-7b-v0.3", "--quantization", "int4", "--all-gpus", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["gpu"] for r in rows} == set(GPUS)
    assert all(r["quantization"] == "int4" and r["kv_tokens"] > 0 for r in rows)
