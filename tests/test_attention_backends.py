"""Attention backends: which one an engine picks and why, and FlashInfer's index math.

On CPU: ``attention_flashinfer.page_table`` (block tables + block_offset + window → FlashInfer's
indptr / indices / last_page_len / write positions) is checked against the torch backend's own
view of the same steps, key by key (its SDPA gathers and masks), against the block tables
directly, and numerically through a CPU model of FlashInfer's kernels reading the very same KV
bytes. On CUDA with flashinfer installed (bench/gpu/check.sh): the real kernels against the
torch backend, and CUDA-graph decode against eager decode.
"""

from __future__ import annotations

import importlib.util
import logging
import random

import pytest
import torch

from hf_reference import random_prompts
from mistral_serve import LLM, SamplingParams
from mistral_serve.model import attention_select
from mistral_serve.model.attention import CAUSAL, DECODE, metadata_from_geometry, paged_attention
from mistral_serve.model.attention_flashinfer import page_table, window_left
from mistral_serve.model.attention_select import ENV_VAR, resolve_attention_backend
from mistral_serve.model.step_layout import lay_out_step

H, KVH, D, BS = 8, 2, 16, 16
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
needs_flashinfer = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_FLASHINFER),
                                      reason="needs CUDA and the flashinfer package (bench/gpu/check.sh)")


def random_step(seed: int, window: int | None):
    """A ragged step (decode tokens, prompts, mid-sequence chunks, one long sequence) with
    shuffled physical blocks and block_offset anywhere the block manager may leave it."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(rng.randint(1, 20)):
        if rng.random() < 0.6:
            seqs.append((rng.randint(0, 1500), 1))
        else:
            seqs.append((rng.choice([0, 0, rng.randint(1, 500)]), rng.randint(1, 150)))
    seqs.append((3000, 1))
    free = list(range(5000))
    rng.shuffle(free)
    offsets, tables = [], []
    for s, n in seqs:
        first_live = (0 if window is None else max(0, s - window + 1)) // BS
        off = rng.randint(0, first_live)  # blocks may slide out later than they could
        offsets.append(off)
        tables.append([free.pop() for _ in range(-(-(s + n) // BS) - off)])
    return [s for s, _ in seqs], [n for _, n in seqs], offsets, tables


def slot_of(pos: int, table: list[int], offset: int) -> int:
    return table[pos // BS - offset] * BS + pos % BS


def torch_visible(layout) -> dict[int, set[int]]:
    """Flat token → cache slots its query attends to, read off the torch backend's SDPA groups."""
    meta, seen = layout.meta, {}
    for g in meta.groups:
        if g.kind == CAUSAL:
            slots = meta.slot_mapping[g.token_start:g.token_end].tolist()
            for j in range(g.q_len):
                seen[g.token_start + j] = set(slots[: j + 1])
            continue
        nb = g.k_len // BS
        blocks = g.kv_blocks.view(g.num_seqs, nb)
        col = torch.arange(g.k_len)
        for s in range(g.num_seqs):
            key_slots = (blocks[s][col // BS] * BS + col % BS).tolist()
            q_rows = range(g.q_len) if g.kind != DECODE else [0]
            for j in q_rows:
                allowed = (torch.ones(g.k_len, dtype=torch.bool) if g.mask is None else g.mask[s, 0, j]).tolist()
                row = s * g.q_len + j
                if g.q_index is not None:
                    row = int(g.q_index[row])
                seen[g.token_start + row] = {slot for slot, a in zip(key_slots, allowed) if a}
    return seen


def flashinfer_visible(pt, window: int | None) -> dict[int, set[int]]:
    """Flat token → slots, by FlashInfer's mask rule (include/flashinfer/attention/variants.cuh
    and the causal bottom-right alignment): query i of a request with qo_len queries and kv_len
    keys sees key k iff k <= kv_len - qo_len + i and k + qo_len + window_left >= kv_len + i."""
    wl, seen = window_left(window), {}
    for b in range(len(pt.kv_last_page_len)):
        q0, q1 = int(pt.qo_indptr[b]), int(pt.qo_indptr[b + 1])
        p0, p1 = int(pt.kv_indptr[b]), int(pt.kv_indptr[b + 1])
        pages = pt.kv_indices[p0:p1].tolist()
        kv_len = (p1 - p0 - 1) * BS + int(pt.kv_last_page_len[b])
        qo_len = q1 - q0
        wl_b = kv_len if wl < 0 else wl
        for i in range(qo_len):
            seen[q0 + i] = {pages[k // BS] * BS + k % BS for k in range(kv_len)
                            if k <= kv_len - qo_len + i and k + qo_len + wl_b >= kv_len + i}
    return seen


@pytest.mark.parametrize("window", [None, 32, 100])
@pytest.mark.parametrize("seed", range(5))
def test_page_table_sees_what_the_torch_backend_sees(seed, window):
    q_start, q_len, offsets, tables = random_step(seed, window)
    geom = lay_out_step(q_start, q_len, offsets, tables, BS, window)
    pt = page_table(geom)
    fi = flashinfer_visible(pt, window)
    assert fi == torch_visible(metadata_from_geometry(geom))
    # And both equal the model's definition, read straight from the block tables: keys (p - W, p].
    for r, i in enumerate(geom.order):
        for j in range(q_len[i]):
            p = q_start[i] + j
            lo = 0 if window is None else max(0, p - window + 1)
            assert fi[geom.tok_off[r] + j] == {slot_of(k, tables[i], offsets[i]) for k in range(lo, p + 1)}
    # The cache write lands where the torch backend writes (slot_mapping), inside live blocks only.
    pages = [pt.kv_indices[int(pt.kv_indptr[b]):int(pt.kv_indptr[b + 1])] for b in range(len(geom.order))]
    write = torch.stack([pages[b][pos // BS] * BS + pos % BS
                         for b, pos in zip(pt.batch_indices.tolist(), pt.kv_positions.tolist())])
    assert torch.equal(write, geom.slot_mapping)
    assert set(pt.kv_indices.tolist()) <= {b for t in tables for b in t}
    assert ((pt.kv_last_page_len >= 1) & (pt.kv_last_page_len <= BS)).all()
    assert pt.kv_indices.dtype == pt.kv_indptr.dtype == torch.int32


def test_freed_blocks_never_appear():
    """Window 32, block 16: a sequence at 1,000 tokens whose first 60 blocks were freed
    (block_offset 60) reads only blocks 61.. and numbers its keys from there."""
    table = list(range(100, 103))  # logical blocks 60, 61, 62
    geom = lay_out_step([1000], [1], [60], [table], BS, 32)
    pt = page_table(geom)
    # Query at 1000 sees 969..1000: logical blocks 60 (969..975) to 62; keys numbered from 960.
    assert pt.kv_indices.tolist() == [100, 101, 102]
    assert int(pt.kv_last_page_len[0]) == 1001 - 992 and int(pt.kv_positions[0]) == 1000 - 960
    # At 1,010 (logical block 63, now live as 103) the window starts at 979: block 60 is out of it.
    geom = lay_out_step([1010], [1], [60], [table + [103]], BS, 32)
    assert page_table(geom).kv_indices.tolist() == [101, 102, 103]


def flashinfer_model(q, kv_cache, pt, window, scale):
    """FlashInfer's paged prefill as a CPU loop, reading a (K, V) NHD cache [blocks, BS, KVH, D]."""
    k_cache, v_cache = kv_cache
    out = torch.empty_like(q)
    wl, g = window_left(window), H // KVH
    for b in range(len(pt.kv_last_page_len)):
        q0, q1 = int(pt.qo_indptr[b]), int(pt.qo_indptr[b + 1])
        pages = pt.kv_indices[int(pt.kv_indptr[b]):int(pt.kv_indptr[b + 1])].long()
        kv_len = (len(pages) - 1) * BS + int(pt.kv_last_page_len[b])
        k = k_cache[pages].reshape(-1, KVH, D)[:kv_len].repeat_interleave(g, 1).double()
        v = v_cache[pages].reshape(-1, KVH, D)[:kv_len].repeat_interleave(g, 1).double()
        qo_len, kpos = q1 - q0, torch.arange(kv_len)
        for i in range(qo_len):
            top = kv_len - qo_len + i
            ok = (kpos <= top) & (kpos >= top - (kv_len if wl < 0 else wl))
            att = torch.einsum("hd,lhd->hl", q[q0 + i].double(), k[ok]) * scale
            out[q0 + i] = torch.einsum("hl,lhd->hd", att.softmax(-1), v[ok]).to(q.dtype)
    return out


def flashinfer_append(k, v, kv_cache, pt):
    """``append_paged_kv_cache``'s contract, on CPU."""
    for t, (b, pos) in enumerate(zip(pt.batch_indices.tolist(), pt.kv_positions.tolist())):
        page = int(pt.kv_indices[int(pt.kv_indptr[b]) + pos // BS])
        kv_cache[0][page, pos % BS], kv_cache[1][page, pos % BS] = k[t], v[t]


@pytest.mark.parametrize("window", [None, 32])
@pytest.mark.parametrize("seed", range(3))
def test_flashinfer_semantics_on_the_same_bytes_equal_the_torch_backend(seed, window):
    """The FlashInfer layout is a view of the torch backend's: write with each backend's rule
    into its own copy, attend with each, compare outputs and the caches themselves."""
    torch.manual_seed(seed)
    q_start, q_len, offsets, tables = random_step(seed + 10, window)
    geom = lay_out_step(q_start, q_len, offsets, tables, BS, window)
    num_blocks = 5000
    slots = torch.randn(2, num_blocks * BS, KVH, D)
    torch_cache = (slots[0].clone(), slots[1].clone())
    fi_cache = (slots[0].clone().view(num_blocks, BS, KVH, D), slots[1].clone().view(num_blocks, BS, KVH, D))
    t = geom.num_tokens
    q, k, v = torch.randn(t, H, D), torch.randn(t, KVH, D), torch.randn(t, KVH, D)
    layout = metadata_from_geometry(geom)
    layout.meta.write_kv(torch_cache, k, v)
    pt = page_table(geom)
    flashinfer_append(k, v, fi_cache, pt)
    assert torch.equal(fi_cache[0].view(-1, KVH, D), torch_cache[0])
    assert torch.equal(fi_cache[1].view(-1, KVH, D), torch_cache[1])
    scale = D**-0.5
    ref = paged_attention(q, k, v, torch_cache[0], torch_cache[1], layout.meta, scale)
    torch.testing.assert_close(flashinfer_model(q, fi_cache, pt, window, scale), ref, atol=2e-5, rtol=2e-5)


# ---- choosing the backend ------------------------------------------------------------------------


def test_auto_is_torch_on_cpu_and_says_why(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    name, why = resolve_attention_backend("auto", torch.device("cpu"), torch.float32, 128)
    assert name == "torch" and "device is cpu" in why


def test_auto_on_cuda_in_float32_is_torch(monkeypatch):
    """FlashInfer has no float32 kernels: auto falls back with the reason, explicit fails."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    name, why = resolve_attention_backend("auto", torch.device("cuda"), torch.float32, 128)
    assert name == "torch" and "float32" in why
    with pytest.raises(ValueError, match="'flashinfer' requested.*float32"):
        resolve_attention_backend("flashinfer", torch.device("cuda"), torch.float32, 128)


def test_auto_on_cuda_without_the_package_is_torch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(attention_select.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError(f"No module named {name!r}")))
    name, why = resolve_attention_backend("auto", torch.device("cuda"), torch.bfloat16, 128)
    assert name == "torch" and "flashinfer is not importable" in why


def test_auto_needs_a_flashinfer_head_dim(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    name, why = resolve_attention_backend("auto", torch.device("cuda"), torch.bfloat16, 32)
    assert name == "torch" and "head_dim 32" in why


def test_environment_variable_replaces_auto_only(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_attention_backend("auto", torch.device("cuda"), torch.bfloat16, 128) == (
        "torch", f"requested ({ENV_VAR}=torch)")
    monkeypatch.setenv(ENV_VAR, "flashinfer")
    with pytest.raises(ValueError, match=f"requested \\({ENV_VAR}=flashinfer\\) but device is cpu"):
        resolve_attention_backend("auto", torch.device("cpu"), torch.float32, 128)
    assert resolve_attention_backend("torch", torch.device("cpu"), torch.float32, 128)[0] == "torch"
    monkeypatch.setenv(ENV_VAR, "flash")
    with pytest.raises(ValueError, match="expected one of auto, torch, flashinfer"):
        resolve_attention_backend("auto", torch.device("cpu"), torch.float32, 128)


def test_engine_logs_backend_and_graphs_and_refuses_flashinfer_on_cpu(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.delenv(ENV_VAR, raising=False)
    if torch.cuda.is_available():
        pytest.skip("checks the CPU engine's start-up lines")
    with caplog.at_level(logging.INFO, logger="mistral_serve.engine.model_runner"):
        llm = LLM(str(tiny_model_dir))
    lines = [r.getMessage() for r in caplog.records]
    assert "attention backend: torch (auto: device is cpu (FlashInfer runs on CUDA only))" in lines
    assert "CUDA graphs for decode: off (device is cpu)" in lines
    assert llm.engine.runner.attention.name == "torch" and not llm.engine.runner.cuda_graphs
    with pytest.raises(ValueError, match="'flashinfer' requested"):
        LLM(str(tiny_model_dir), attention_backend="flashinfer")


# ---- on a GPU with flashinfer (bench/gpu/check.sh) -------------------------------------------


@needs_flashinfer
@pytest.mark.parametrize("window", [None, 32])
@pytest.mark.parametrize("seed", range(3))
def test_flashinfer_kernels_equal_the_torch_backend(seed, window):
    """Real kernels, bf16, on one ragged step with freed leading blocks, against the torch backend."""
    from mistral_serve.model.attention import TorchBackend
    from mistral_serve.model.attention_flashinfer import FlashInferBackend

    dev, dtype, d = torch.device("cuda"), torch.bfloat16, 64  # a FlashInfer head size
    torch.manual_seed(seed)
    q_start, q_len, offsets, tables = random_step(seed + 20, window)
    geom = lay_out_step(q_start, q_len, offsets, tables, BS, window)
    num_blocks = 5000
    slots = torch.randn(2, num_blocks * BS, KVH, d, device=dev, dtype=dtype)
    tb = TorchBackend(BS, window, dev)
    fb = FlashInferBackend(BS, window, dev, num_heads=H, num_kv_heads=KVH, head_dim=d, dtype=dtype,
                           max_num_seqs=64, max_model_len=4096)
    torch_cache = (slots[0].clone(), slots[1].clone())
    fi_cache = tuple(s.clone().view(fb.kv_cache_shape(num_blocks, KVH, d)) for s in slots)
    t = geom.num_tokens
    q = torch.randn(t, H, d, device=dev, dtype=dtype)
    k, v = torch.randn(t, KVH, d, device=dev, dtype=dtype), torch.randn(t, KVH, d, device=dev, dtype=dtype)
    tm, fm = tb.build_metadata(geom).meta, fb.build_metadata(geom).meta
    tm.write_kv(torch_cache, k, v)
    fm.write_kv(fi_cache, k, v)
    assert torch.equal(fi_cache[0].view(-1, KVH, d), torch_cache[0])
    scale = d**-0.5
    torch.testing.assert_close(fm.attend(q, k, v, fi_cache, scale), tm.attend(q, k, v, torch_cache, scale),
                               atol=2e-2, rtol=2e-2)


def _run_until_decoding(llm: LLM, prompts: list[list[int]]):
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(8):  # prefill, then a few decode steps (captured graphs replay)
        engine.step()
    scheduled = engine.scheduler.schedule().scheduled
    engine.runner.zero_new_blocks(engine.block_manager.num_touched)  # as step() does before prepare
    return scheduled


@pytest.fixture(scope="module", params=[None, 32], ids=["nowindow", "window32"])
def tiny_hd64_dir(request, tmp_path_factory):
    """A tiny model with head_dim 64 (4 heads, 1 KV head: GQA 4:1), a FlashInfer head size (the
    shared tiny models' head_dim is 32)."""
    import json

    from safetensors.torch import save_file

    from mistral_serve.model.tiny import build_tiny_model, random_weights

    out = build_tiny_model(tmp_path_factory.mktemp("hd64"), sliding_window=request.param, seed=5)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(head_dim=64, num_attention_heads=4, num_key_value_heads=1)
    save_file(random_weights(cfg, 5), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


@needs_flashinfer
def test_graph_decode_equals_eager_decode(tiny_hd64_dir):
    """The captured graph of a padded decode step gives the eager (unpadded) step's logits."""
    model_dir = tiny_hd64_dir
    llm = LLM(str(model_dir), dtype="bfloat16", attention_backend="flashinfer", max_num_seqs=16, block_size=8)
    runner = llm.engine.runner
    assert runner.cuda_graphs and runner.attention.name == "flashinfer"
    scheduled = _run_until_decoding(llm, random_prompts(5, 20, 90, seed=11))
    graph_inputs = runner.prepare(scheduled)
    assert graph_inputs.graph and graph_inputs.num_pad_rows == 8 - 5
    graph_logits = runner.execute(graph_inputs).clone()
    eager_logits = runner.execute(runner.prepare_step(scheduled))  # rewrites the same K/V: idempotent
    torch.testing.assert_close(graph_logits, eager_logits, atol=3e-2, rtol=3e-2)
    for rid in list(llm.engine.requests):
        llm.engine.abort_request(rid)


@needs_flashinfer
def test_flashinfer_engine_close_to_torch_engine(tiny_hd64_dir):
    """Whole engines in bf16, one per backend: the logits of every prompt token of one ragged
    prefill step (prompts up to 90 tokens, window 32 or none) are close."""
    prompts = random_prompts(4, 20, 90, seed=12)
    logits = {}
    for backend in ("torch", "flashinfer"):
        llm = LLM(str(tiny_hd64_dir), dtype="bfloat16", attention_backend=backend, block_size=8)
        engine = llm.engine
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        scheduled = engine.scheduler.schedule().scheduled
        engine.runner.zero_new_blocks(engine.block_manager.num_touched)
        inputs = engine.runner.prepare(scheduled)
        inputs.logits_index = torch.arange(sum(len(p) for p in prompts), device=inputs.input_ids.device)
        logits[backend] = engine.runner.execute(inputs).cpu()
        for i in range(len(prompts)):
            engine.abort_request(str(i))
    torch.testing.assert_close(logits["flashinfer"], logits["torch"], atol=5e-2, rtol=5e-2)
