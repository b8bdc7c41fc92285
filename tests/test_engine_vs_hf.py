"""Greedy output of the engine must be token-for-token identical to HF transformers."""

from __future__ import annotations

import pytest
import torch

from hf_reference import hf_greedy, hf_logits, random_prompts
from mistral_serve import LLM, SamplingParams
from mistral_serve.model.config import ModelConfig


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def assert_matches_hf(llm: LLM, model_dir, prompts: list[list[int]], max_tokens: int) -> None:
    """Run all prompts together (continuous batching) and compare each with HF alone."""
    outs = llm.generate(prompts, greedy(max_tokens))
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.outputs[0].token_ids == hf_greedy(model_dir, p, max_tokens), f"request {i}"
    assert_pool_free(llm)


def assert_pool_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests()


def test_single_request_matches_hf(tiny_model_dir):
    prompt = random_prompts(1, 20, 20, seed=0)[0]
    llm = LLM(str(tiny_model_dir))
    out = llm.generate([prompt], greedy(40))[0]
    assert out.outputs[0].token_ids == hf_greedy(tiny_model_dir, prompt, 40)
    assert out.outputs[0].finish_reason == "length"
    assert_pool_free(llm)


def test_prefill_logits_close_to_hf(tiny_model_dir):
    """Logits of a whole prompt prefilled in one ragged step, against HF's full forward."""
    prompts = random_prompts(3, 30, 200, seed=1)
    llm = LLM(str(tiny_model_dir))
    engine = llm.engine
    seqs = [engine.add_request(str(i), p, greedy(1)) for i, p in enumerate(prompts)]
    plan = engine.scheduler.schedule()
    assert [n for _, n in plan.scheduled] == [len(p) for p in prompts]
    inputs = engine.runner.prepare(plan.scheduled)
    # Ask for the logits of every token, not only the last one per sequence.
    inputs.logits_index = torch.arange(sum(len(p) for p in prompts))
    logits = engine.runner.execute(inputs)
    start = 0
    for p in prompts:
        ref = hf_logits(tiny_model_dir, p)
        torch.testing.assert_close(logits[start:start + len(p)], ref, atol=1e-4, rtol=1e-4)
        start += len(p)
    for s in seqs:
        engine.abort_request(s.request_id)
    assert_pool_free(llm)


def test_many_requests_arriving_at_different_steps(tiny_model_dir):
    """16 requests of different lengths join a running batch over several steps."""
    prompts = random_prompts(16, 3, 120, seed=2)
    lengths = [10 + 7 * (i % 6) for i in range(16)]
    llm = LLM(str(tiny_model_dir), max_num_batched_tokens=256)
    engine = llm.engine
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # two new requests every third step
            for _ in range(2):
                if pending:
                    i, p = pending.pop(0)
                    engine.add_request(str(i), p, greedy(lengths[i]))
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
        step += 1
    for i, p in enumerate(prompts):
        assert outputs[str(i)] == hf_greedy(tiny_model_dir, p, lengths[i]), f"request {i}"
    assert_pool_free(llm)


@pytest.mark.slow
def test_longer_than_sliding_window(tiny_window32_dir):
    """Window 32: prompts and generations well past it; blocks slide out of the window."""
    prompts = random_prompts(6, 20, 90, seed=3)
    assert_matches_hf(LLM(str(tiny_window32_dir), block_size=8), tiny_window32_dir, prompts, 70)


def test_window_changes_the_output(tiny_window32_dir, tmp_path):
    """Guard against a test that cannot fail: without the window, outputs differ."""
    import json
    import shutil

    no_window = tmp_path / "nowindow"
    shutil.copytree(tiny_window32_dir, no_window)
    cfg = json.loads((no_window / "config.json").read_text())
    cfg["sliding_window"] = None
    (no_window / "config.json").write_text(json.dumps(cfg))
    prompt = random_prompts(1, 80, 80, seed=4)[0]
    with_window = LLM(str(tiny_window32_dir)).generate([prompt], greedy(30))[0].outputs[0].token_ids
    without = LLM(str(no_window)).generate([prompt], greedy(30))[0].outputs[0].token_ids
    assert with_window != without


def test_chunked_prefill_forced(tiny_window32_dir):
    prompts = random_prompts(5, 60, 150, seed=5)
    llm = LLM(str(tiny_window32_dir), max_num_batched_tokens=24, block_size=8)
    assert_matches_hf(llm, tiny_window32_dir, prompts, 25)
    assert llm.engine.stats.num_steps > sum(len(p) for p in prompts) // 24


def test_preemption_forced(tiny_model_dir):
    """A KV pool of 12 blocks for 8 requests: preemption by recompute, same output."""
    prompts = random_prompts(8, 10, 40, seed=6)
    block_bytes = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(4) * 8
    llm = LLM(str(tiny_model_dir), block_size=8, kv_cache_memory_bytes=12 * block_bytes)
    assert_matches_hf(llm, tiny_model_dir, prompts, 40)
    assert llm.engine.stats.num_preemptions > 0


@pytest.mark.parametrize("fixture", ["tiny_llama31_dir", "tiny_llama2_dir"])
def test_llama_family(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    prompts = random_prompts(4, 5, 60, seed=7)
    assert_matches_hf(LLM(str(model_dir), max_num_batched_tokens=64), model_dir, prompts, 30)


def test_llama2_has_no_gqa_and_llama31_scales_rope(tiny_llama2_dir, tiny_llama31_dir):
    l2 = ModelConfig.from_dir(tiny_llama2_dir)
    l31 = ModelConfig.from_dir(tiny_llama31_dir)
    assert l2.num_key_value_heads == l2.num_attention_heads
    assert l31.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_runs_close_to_float32(tiny_model_dir, dtype):
    """bf16/fp16 load and decode; the first greedy token is among float32's top 3 (8-bit
    mantissas do not give identical ids, so this is a sanity bound, not an equality)."""
    prompt = random_prompts(1, 40, 40, seed=8)[0]
    ref = hf_logits(tiny_model_dir, prompt)[-1]
    llm = LLM(str(tiny_model_dir), dtype=dtype)
    assert llm.engine.runner.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    out = llm.generate([prompt], greedy(3))[0]
    assert len(out.outputs[0].token_ids) == 3
    assert out.outputs[0].token_ids[0] in ref.topk(3).indices.tolist()
    assert_pool_free(llm)


def test_garbage_in_unused_cache_memory_never_leaks(tiny_model_dir):
    """The pool is allocated uninitialised; fill every not-yet-used block with NaN (the worst
    garbage) and check outputs still match HF, across preemptions and block reuse."""
    prompts = random_prompts(6, 5, 50, seed=9)
    block_bytes = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(4) * 8
    llm = LLM(str(tiny_model_dir), block_size=8, kv_cache_memory_bytes=14 * block_bytes)
    for k, v in llm.engine.runner.kv_caches:
        k[8:].fill_(float("nan"))
        v[8:].fill_(float("nan"))
    assert_matches_hf(llm, tiny_model_dir, prompts, 30)
