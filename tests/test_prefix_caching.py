"""Prefix caching: greedy ids stay identical to HF transformers while prompts reuse cached KV.

Covers requests sharing a long prefix arriving together and one after another, multi-turn
chats whose every prompt extends the last, prefixes longer than the sliding window, and the
same with preemption and with chunked prefill forced; plus the block manager's own rules
(uncomputed blocks are never found, LRU eviction, cached blocks count as free).
"""

from __future__ import annotations

import pytest

from hf_reference import hf_greedy, random_prompts
from mistral_serve import LLM, SamplingParams
from mistral_serve.engine.block_manager import BlockManager
from mistral_serve.engine.sequence import Sequence
from mistral_serve.model.config import ModelConfig

BLOCK = 16


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def shared_prompts(n: int, prefix_len: int, seed: int) -> list[list[int]]:
    prefix = random_prompts(1, prefix_len, prefix_len, seed=seed)[0]
    return [prefix + own for own in random_prompts(n, 3, 40, seed=seed + 1)]


def assert_pool_reclaimable(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests()


def run_together(llm: LLM, prompts: list[list[int]], max_tokens: int):
    return llm.generate(prompts, greedy(max_tokens))


@pytest.mark.parametrize("fixture", ["tiny_nowindow_dir", "tiny_model_dir"])
def test_shared_prefix_arriving_together_matches_hf(request, fixture):
    model_dir = request.getfixturevalue(fixture)
    prompts = shared_prompts(6, 100, seed=10)
    llm = LLM(str(model_dir), block_size=BLOCK)
    outs = run_together(llm, prompts, 12)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.outputs[0].token_ids == hf_greedy(model_dir, p, 12), f"request {i}"
    # Admitted in one step: the first computes the prefix, the others adopt its full blocks.
    assert [o.num_cached_tokens for o in outs] == [0] + [96] * 5
    sched = llm.engine.scheduler
    assert sched.prefix_cache_hits == 5 * 96 and sched.prefix_cache_queries == sum(map(len, prompts))
    assert_pool_reclaimable(llm)
    assert llm.engine.block_manager.num_cached_free_blocks > 0


def test_shared_prefix_one_after_another_matches_hf(tiny_nowindow_dir):
    prompts = shared_prompts(4, 150, seed=20)
    llm = LLM(str(tiny_nowindow_dir), block_size=BLOCK)
    cached = []
    for i, p in enumerate(prompts):
        out = llm.generate([p], greedy(10))[0]
        assert out.outputs[0].token_ids == hf_greedy(tiny_nowindow_dir, p, 10), f"request {i}"
        cached.append(out.num_cached_tokens)
    assert cached == [0, 144, 144, 144]


def test_identical_prompt_always_computes_its_last_token(tiny_nowindow_dir):
    """A prompt that is entirely cached still computes its last token so it can sample; with a
    length that is a multiple of the block size, its last block is recomputed."""
    prompt = random_prompts(1, 64, 64, seed=30)[0]
    llm = LLM(str(tiny_nowindow_dir), block_size=BLOCK)
    first = llm.generate([prompt], greedy(6))[0]
    again = llm.generate([prompt], greedy(6))[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == hf_greedy(tiny_nowindow_dir, prompt, 6)
    assert again.num_cached_tokens == 48


@pytest.mark.parametrize("fixture", ["tiny_nowindow_dir", "tiny_window32_dir"])
def test_multi_turn_chat_matches_hf(request, fixture):
    """Each turn's prompt is the previous prompt + the reply + a new user message; each turn
    reuses the previous turns' blocks (with a window of 32: only those its window needs)."""
    model_dir = request.getfixturevalue(fixture)
    llm = LLM(str(model_dir), block_size=8)
    prompt = random_prompts(1, 40, 40, seed=40)[0]
    user_turns = random_prompts(4, 5, 20, seed=41)
    cached = []
    for turn in user_turns:
        prompt = prompt + turn
        out = llm.generate([prompt], greedy(8))[0]
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, 8)
        cached.append(out.num_cached_tokens)
        prompt = prompt + out.outputs[0].token_ids
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])
    assert cached == sorted(cached), "each turn reuses at least what the previous one did"
    assert_pool_reclaimable(llm)


def test_prefix_longer_than_window_adopts_only_the_window(tiny_window32_dir):
    """Window 32, shared prefix of 120 tokens: a later request needs only the blocks covering
    the last 32 tokens before its own part, even after the early blocks were evicted."""
    prompts = shared_prompts(3, 120, seed=50)
    llm = LLM(str(tiny_window32_dir), block_size=8)
    bm = llm.engine.block_manager
    first = llm.generate([prompts[0]], greedy(8))[0]
    assert first.outputs[0].token_ids == hf_greedy(tiny_window32_dir, prompts[0], 8)
    seq = Sequence("probe", prompts[1], greedy(8), (), None)
    hit = bm.find_cached_prefix(seq)
    assert hit is not None and hit.num_tokens == 120
    assert len(hit.blocks) <= 32 // 8 + 1 and hit.first_block == (120 - 32 + 1) // 8
    for p in prompts[1:]:
        out = llm.generate([p], greedy(8))[0]
        assert out.outputs[0].token_ids == hf_greedy(tiny_window32_dir, p, 8)
        assert out.num_cached_tokens == 120


def test_forced_preemption_and_chunked_prefill_match_hf(tiny_model_dir):
    """A KV pool too small for the batch (preemption by recompute, which then finds its own
    blocks again) and a 32-token step budget (every prompt chunked)."""
    prompts = shared_prompts(6, 80, seed=60)
    block_bytes = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(4) * BLOCK
    llm = LLM(str(tiny_model_dir), block_size=BLOCK, kv_cache_memory_bytes=20 * block_bytes,
              max_num_batched_tokens=32, max_num_seqs=6)
    outs = run_together(llm, prompts, 40)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool should have forced preemption"
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.outputs[0].token_ids == hf_greedy(tiny_model_dir, p, 40), f"request {i}"
    assert llm.engine.scheduler.prefix_cache_hits > 0
    assert_pool_reclaimable(llm)


def test_disabled_cache_reuses_nothing(tiny_nowindow_dir):
    prompts = shared_prompts(3, 64, seed=70)
    on = LLM(str(tiny_nowindow_dir), block_size=BLOCK)
    off = LLM(str(tiny_nowindow_dir), block_size=BLOCK, enable_prefix_caching=False)
    outs_on, outs_off = run_together(on, prompts, 6), run_together(off, prompts, 6)
    assert [o.outputs[0].token_ids for o in outs_on] == [o.outputs[0].token_ids for o in outs_off]
    assert all(o.num_cached_tokens == 0 for o in outs_off)
    assert off.engine.scheduler.prefix_cache_queries == 0
    assert off.engine.block_manager.num_cached_free_blocks == 0


def test_blocks_of_a_step_that_never_ran_are_not_found():
    """Blocks are registered when allocated for the step that fills them; a sequence preempted
    before that step ran releases them unregistered."""
    bm = BlockManager(num_blocks=8, block_size=4, sliding_window=None)
    a = Sequence("a", list(range(10, 23)), greedy(4), (), None)
    bm.allocate(a, 13)  # registers blocks 0..2 (full after this step)
    b = Sequence("b", list(range(10, 23)), greedy(4), (), None)
    assert bm.find_cached_prefix(b).num_tokens == 12  # same step: findable
    bm.free(a)  # preempted before the step ran: num_computed_tokens is still 0
    assert bm.find_cached_prefix(b) is None
    assert bm.num_cached_free_blocks == 0 and bm.num_free_blocks == 8


def test_lru_eviction_and_reclaimable_accounting():
    bm = BlockManager(num_blocks=4, block_size=4, sliding_window=None)
    a = Sequence("a", list(range(10, 19)), greedy(1), (), None)
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.free(a)
    assert bm.num_cached_free_blocks == 2 and bm.num_free_blocks == 4 and bm.num_used_blocks == 0
    # A new unrelated sequence takes the never-cached blocks first, then evicts the LRU tail.
    c = Sequence("c", list(range(50, 63)), greedy(1), (), None)
    bm.allocate(c, 13)
    assert len(c.block_table) == 4 and bm.num_cached_free_blocks == 0
    again = Sequence("a2", list(range(10, 19)), greedy(1), (), None)
    assert bm.find_cached_prefix(again) is None
    bm.free(c)
    assert bm.num_free_blocks == 4


def test_salt_separates_chains():
    bm = BlockManager(num_blocks=8, block_size=4, sliding_window=None)
    a = Sequence("a", list(range(10, 19)), greedy(1), (), None, cache_salt="tenant-a")
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    same = Sequence("s", list(range(10, 19)), greedy(1), (), None, cache_salt="tenant-a")
    other = Sequence("o", list(range(10, 19)), greedy(1), (), None, cache_salt="tenant-b")
    assert bm.find_cached_prefix(same).num_tokens == 8
    assert bm.find_cached_prefix(other) is None
