"""Property tests of the scheduler and block manager, driving the real engine.

Random arrivals, aborts, prompt/output lengths, priorities and shared prompt prefixes (the
prefix cache is on, as by default) against a tiny KV pool: no block leaks or double frees,
every block's reference count equals the number of tables holding it, no sequence ever writes
into a block another sequence holds, every request ends exactly once, the whole pool is free
again at the end (cached blocks reclaimable), and a sliding-window sequence never holds more
than ceil(W / block_size) + 1 blocks between steps.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_serve import LLM, SamplingParams
from mistral_serve.engine.block_manager import BlockManager, cdiv
from mistral_serve.engine.sequence import Sequence
from mistral_serve.model.config import ModelConfig

BLOCK = 8


@pytest.fixture(scope="module")
def engine(tiny_window32_dir):
    block_bytes = ModelConfig.from_dir(tiny_window32_dir).kv_bytes_per_token(4) * BLOCK
    engine = LLM(str(tiny_window32_dir), block_size=BLOCK, kv_cache_memory_bytes=24 * block_bytes,
                 max_num_batched_tokens=48, max_num_seqs=6).engine
    assert_writes_only_own_blocks(engine)
    return engine


def check_invariants(engine) -> None:
    bm = engine.block_manager
    held = Counter(b for s in engine.scheduler.running + engine.scheduler.waiting for b in s.block_table)
    assert all(bm.ref_count(b) == n for b, n in held.items()), "a reference count differs from the tables"
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks) if b not in held), "a block leaked"
    assert len(held) + bm.num_free_blocks == bm.num_blocks, "blocks leaked or double-freed"
    assert set(bm._free).isdisjoint(held) and set(bm._evictable).isdisjoint(held)
    cap = cdiv(engine.config.sliding_window, bm.block_size) + 1
    for seq in engine.scheduler.running:
        assert len(seq.block_table) <= cap, f"{seq} holds {len(seq.block_table)} > {cap} blocks"
    for seq in engine.scheduler.waiting:
        assert seq.block_table == [] or seq.num_computed_tokens > 0


def assert_writes_only_own_blocks(engine) -> None:
    """Wrap the runner's ``prepare`` (it sees every step's schedule): every slot a step writes,
    positions [num_computed, num_computed + n) of each scheduled sequence, lies in a block that
    sequence alone holds, or in one it fills this very step under the hash of its own tokens,
    which requests admitted in the same step adopted (they read it after the layer wrote it)."""
    prepare = engine.runner.prepare

    def checked(scheduled):
        bm = engine.block_manager
        bs = bm.block_size
        for seq, n in scheduled:
            end = seq.num_computed_tokens + n
            for logical in range(seq.num_computed_tokens // bs, (end - 1) // bs + 1):
                block = seq.block_table[logical - seq.block_offset]
                if bm.ref_count(block) > 1:
                    assert (logical + 1) * bs <= end, f"{seq} writes into shared block {block} it does not fill"
                    assert bm._hash_of[block] == seq.block_hashes[logical], f"{seq} writes into another's block"
        return prepare(scheduled)

    engine.runner.prepare = checked


request = st.tuples(
    st.integers(0, 2),  # prompt family: prompts of one family share their prefix
    st.integers(1, 120),  # prompt length
    st.integers(1, 60),  # max_tokens
    st.integers(0, 2),  # priority
    st.integers(0, 8),  # arrival step
    st.one_of(st.none(), st.integers(0, 30)),  # abort at step (None: never)
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request, min_size=1, max_size=10))
def test_random_workloads_keep_invariants(engine, requests):
    for request_id in list(engine.requests):  # left by a failed example while hypothesis shrinks
        engine.abort_request(request_id)
    finished: dict[str, int] = {}
    step = 0
    while step < 400:
        for i, (family, plen, max_tokens, prio, arrive, _) in enumerate(requests):
            if arrive == step:
                engine.add_request(str(i), list(range(100 + 1000 * family, 100 + 1000 * family + plen)),
                                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), prio)
        for i, (*_, abort_at) in enumerate(requests):
            if abort_at == step and (out := engine.abort_request(str(i))) is not None:
                assert out.finished and out.outputs[0].finish_reason == "abort"
                finished[str(i)] = finished.get(str(i), 0) + 1
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = finished.get(out.request_id, 0) + 1
                assert out.outputs[0].finish_reason == "length"
        check_invariants(engine)
        step += 1
        if step > 8 and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), "a request never finished"
    assert finished == {str(i): 1 for i in range(len(requests))}, "every request ends exactly once"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_window_frees_blocks_as_the_sequence_grows():
    bm = BlockManager(num_blocks=64, block_size=4, sliding_window=10)
    seq = Sequence("a", list(range(50)), SamplingParams(max_tokens=5), (2,), None)
    bm.allocate(seq, 50)  # one 50-token prefill chunk needs all 13 blocks while it runs
    assert len(seq.block_table) == 13
    seq.num_computed_tokens = 50
    bm.release_out_of_window(seq, 50)  # the next query (position 50) sees keys 41..50
    assert seq.block_offset == 41 // 4
    assert len(seq.block_table) <= cdiv(10, 4) + 1
    for pos in range(50, 90):
        bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
        bm.release_out_of_window(seq, pos + 1)
        assert len(seq.block_table) <= cdiv(10, 4) + 1
    bm.free(seq)
    assert bm.num_free_blocks == 64


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=4, block_size=4, sliding_window=None)
    a = Sequence("a", [1, 2, 3], SamplingParams(), (2,), None)
    bm.allocate(a, 3)
    block = a.block_table[0]
    bm.free(a)
    a.block_table = [block]
    with pytest.raises(RuntimeError):
        bm.free(a)


def test_priority_decides_admission_and_preemption(tiny_model_dir):
    """Lower priority value is admitted first and preempted last."""
    block_bytes = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(4) * BLOCK
    engine = LLM(str(tiny_model_dir), block_size=BLOCK, kv_cache_memory_bytes=6 * block_bytes,
                 max_num_seqs=1).engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("low", [5] * 10, params, priority=5)
    engine.add_request("high", [5] * 10, params, priority=0)
    first = engine.scheduler.schedule()
    assert [s.request_id for s, _ in first.scheduled] == ["high"]
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
