#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): one go, no network, under 8 minutes, on one H100/H200.
#
#   bash bench/gpu/check.sh                 # on the GPU machine, from anywhere
#   bash bench/gpu/check.sh --fetch-wheels  # on a networked machine: fill bench/gpu/wheels/ first
#
# Stages, each time-boxed with `timeout` (a failed or timed-out stage does not stop the next):
#   install  carried wheels (bench/gpu/wheels/*.whl, if any) and the repo, all --no-deps
#   hf       greedy equality with HF transformers, engine on CUDA in float32 (tests/test_engine_vs_hf.py
#            + tests/test_gpu_bench.py), default attention backend (auto: torch for these float32,
#            head_dim-32 models, FlashInfer having neither; the summary says what auto chose)
#   hf-torch the same with MISTRAL_SERVE_ATTENTION_BACKEND=torch
#   flashinfer  tests/test_attention_backends.py + test_cuda_graph_padding.py on CUDA: FlashInfer's
#            kernels against the torch backend (bf16, head_dim 64, window and freed blocks), and
#            CUDA-graph decode against eager decode; skipped (and said so) without flashinfer
#   smoke    Mistral 7B v0.3 full shape, bf16, random weights: 16 tokens for 2 prompts, finite logits
#   bench    mistral-serve bench gpu: decode ms/step vs the HBM floor, prefill, workload-64, 8 x 16K
#   quant-int4, quant-fp8  the same decode figure (batch 1 and 64, 1K context) with int4 / fp8
#            projections (docs/quantization.md); the floor counts the quantized weight bytes
# Results (logs, JSON, summary.txt) go to $OUT, or ./gpu-results/ when $OUT is unset.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 1
WHEELS="$REPO/bench/gpu/wheels"
PY="${PYTHON:-python}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # Pure-Python/manylinux wheels the engine and tests need beyond torch/numpy, for the GPU
    # machine's Python (PYV, default: this one's). Torch, triton, numpy and nvidia-* are dropped:
    # the GPU machine has its own CUDA torch and pip must never replace it.
    PYV="${PYV:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}"
    mkdir -p "$WHEELS"
    "$PY" -m pip download --only-binary=:all: --python-version "$PYV" \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS" \
        "transformers==5.24.0" "safetensors==0.8.0" "mistral-common[sentencepiece]==1.13.1" \
        "pydantic==2.13.4" "huggingface-hub==2.4.0" "tqdm==4.70.1" "psutil==7.2.2" "pytest==9.0.3" \
        ${EXTRA_WHEELS:-} || exit 1
    # FlashInfer (pyproject's `gpu` extra, same pin) without its dependencies: they include torch
    # and several GB of nvidia-* / CUTLASS-DSL wheels the attention path never imports. What it
    # does need: tvm-ffi (its op bindings), nvidia-ml-py (imported at start), ninja (runs the JIT build).
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYV" \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS" \
        "flashinfer-python==0.7.4" "apache-tvm-ffi==0.1.15.post2" "nvidia-ml-py==13.615.71" "ninja==1.13.2" \
        || exit 1
    rm -f "$WHEELS"/torch-*.whl "$WHEELS"/triton-*.whl "$WHEELS"/numpy-*.whl "$WHEELS"/nvidia_*.whl
    du -sh "$WHEELS"
    exit 0
fi

OUT_DIR="${OUT:-$REPO/gpu-results}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
START=$SECONDS
TOTAL_S="${CHECK_TOTAL_S:-460}"   # all stages together; each stage also has its own cap
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # works even if the editable install fails
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MISTRAL_SERVE_CACHE="$OUT_DIR/.cache"          # the tiny model is built here, not in ~

# stage NAME CAP_SECONDS COMMAND...: run with the smaller of CAP and the time left, log to $OUT/NAME.log.
stage() {
    local name="$1" cap="$2"; shift 2
    local left=$(( TOTAL_S - (SECONDS - START) ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        echo "$name: SKIPPED (no time left)" | tee -a "$SUMMARY"
        return 0
    fi
    echo "=== $name (limit ${limit}s) ===" >&2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT_DIR/$name.log") 2>&1
    local rc=$?
    local verdict=PASS
    if (( rc == 124 || rc == 137 )); then verdict="TIMEOUT after ${limit}s"; elif (( rc != 0 )); then verdict="FAIL rc=$rc"; fi
    echo "$name: $verdict ($(( SECONDS - t0 ))s, log $name.log)" | tee -a "$SUMMARY"
    return 0
}

# ---- environment ---------------------------------------------------------------------------
{
    date -u
    timeout 20 nvidia-smi -L 2>&1 || echo "no nvidia-smi"
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 || true
    timeout 90 "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ["torch", "triton", "transformers", "safetensors", "mistral_common", "sentencepiece", "pydantic",
             "huggingface_hub", "tqdm", "numpy", "psutil", "pytest", "flashinfer"]:
    try:
        m = importlib.import_module(name)
        print(f"{name:16} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name:16} MISSING ({type(e).__name__})")
import torch
print("cuda available", torch.cuda.is_available(), "torch.version.cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# ---- (a) install ---------------------------------------------------------------------------
install() {
    shopt -s nullglob
    local wheels=()
    for w in "$WHEELS"/*.whl; do
        case "$(basename "$w")" in torch-*|triton-*|numpy-*|nvidia_*) echo "not installing $w (the machine's own)";;
            *) wheels+=("$w");; esac
    done
    if (( ${#wheels[@]} )); then
        "$PY" -m pip install --no-deps --no-index "${wheels[@]}" || return 1
    else
        echo "no carried wheels in $WHEELS: skipping (flashinfer-python etc. stay absent)"
    fi
    # --no-deps: torch is the machine's CUDA build and pip must not pull the pinned CPU one;
    # --no-build-isolation: no network to fetch setuptools into an isolated build env.
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
        || echo "editable install failed: running from PYTHONPATH=$REPO instead"
    "$PY" -c "import mistral_serve, torch; print('mistral_serve from', mistral_serve.__file__); assert torch.cuda.is_available(), 'no CUDA'"
}
export -f install
export WHEELS PY
stage install 60 bash -c install

# ---- (b) greedy equality with HF on CUDA, float32 (tiny model) ------------------------------
# test_prefill_logits_close_to_hf compares CUDA logits with CPU ones through assert_close (device
# mismatch, not an engine fault): tests/test_gpu_bench.py::test_prefill_logits_close_to_hf_on_device
# is the same check with the engine's logits moved to the CPU.
HF_TESTS=(tests/test_engine_vs_hf.py tests/test_gpu_bench.py::test_prefill_logits_close_to_hf_on_device
          --deselect tests/test_engine_vs_hf.py::test_prefill_logits_close_to_hf)
stage hf 100 env MISTRAL_SERVE_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -rs "${HF_TESTS[@]}"
# The engine's choice for the HF tests' models (float32, and the bf16 case; head_dim 32) and for
# Mistral 7B (bf16, head_dim 128) under the stage's environment: the engine logs the same
# "attention backend: NAME (why)" line at start-up.
backends() {
    env "$@" timeout 60 "$PY" - <<'PYEOF' 2>&1 | tail -3
import torch
from mistral_serve.model.attention_select import resolve_attention_backend
for dtype, hd in (("float32", 32), ("bfloat16", 32), ("bfloat16", 128)):
    try:
        name, why = resolve_attention_backend("auto", torch.device("cuda"), getattr(torch, dtype), hd)
        print(f"  {dtype}, head_dim {hd}: {name} ({why})")
    except Exception as e:
        print(f"  {dtype}, head_dim {hd}: ERROR {type(e).__name__}: {e}")
PYEOF
}
{ echo "hf: attention backend per case:"; backends; } | tee -a "$SUMMARY"
stage hf-torch 80 env MISTRAL_SERVE_TEST_DEVICE=cuda MISTRAL_SERVE_ATTENTION_BACKEND=torch \
    "$PY" -m pytest -q -p no:cacheprovider -rs "${HF_TESTS[@]}"
{ echo "hf-torch: attention backend per case:"; backends MISTRAL_SERVE_ATTENTION_BACKEND=torch; } | tee -a "$SUMMARY"

# ---- (b2) FlashInfer kernels and CUDA-graph decode ------------------------------------------
# The first FlashInfer call JIT-compiles its kernels (docs/gpu.md), cached under
# ~/.cache/flashinfer: this stage pays for the test shapes, smoke/bench once more for head_dim 128.
stage flashinfer 150 env MISTRAL_SERVE_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_attention_backends.py tests/test_cuda_graph_padding.py
grep -h "^SKIPPED" "$OUT_DIR/flashinfer.log" | sed 's/^/flashinfer: /' | head -3 | tee -a "$SUMMARY"

# ---- (c) full-shape bf16 smoke ------------------------------------------------------------
stage smoke 60 "$PY" -m mistral_serve.bench.gpu --device cuda --shape full --dtype bfloat16 --smoke \
    --json "$OUT_DIR/smoke.json"
# Which attention backend ran and whether decode replayed CUDA graphs: a bench JSON's engine section.
ran_with() {
    "$PY" -c 'import json, sys; e = json.load(open(sys.argv[1]))["engine"]; print("attention %s, CUDA graphs %s" % (e["attention_backend"], "on" if e["cuda_graphs"] else "off"))' "$1" 2>/dev/null || echo "no engine section in $1"
}
echo "smoke: $(ran_with "$OUT_DIR/smoke.json")" | tee -a "$SUMMARY"

# ---- (d) the benchmark --------------------------------------------------------------------
# The JSON is rewritten after every section, so a timeout keeps the sections already measured.
stage bench 230 "$PY" -m mistral_serve.bench.gpu --device cuda --shape full --dtype bfloat16 \
    --json "$OUT_DIR/bench-gpu.json"
echo "bench: $(ran_with "$OUT_DIR/bench-gpu.json")" | tee -a "$SUMMARY"

# ---- (e) quantized decode ------------------------------------------------------------------
for q in int4 fp8; do
    stage "quant-$q" 75 "$PY" -m mistral_serve.bench.gpu --device cuda --shape full --dtype bfloat16 \
        --quantization "$q" --batches 1,64 --contexts 1024 --skip prefill --skip workload --skip long \
        --json "$OUT_DIR/bench-gpu-$q.json"
done

echo "total: $(( SECONDS - START ))s; results in $OUT_DIR" | tee -a "$SUMMARY"
echo "===== summary ====="
cat "$SUMMARY"
