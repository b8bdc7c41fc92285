"""The paged attention (decode buckets, causal prefill, masked prefill) against a dense reference
computed per sequence straight from unpaged K/V: random ragged batches, GQA 4:1, window on/off."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from mistral_serve.model import attention
from mistral_serve.model.attention import (
    CAUSAL,
    DECODE,
    MASKED,
    build_attention_metadata,
    decode_buckets,
    masked_buckets,
    paged_attention,
)

H, KVH, D, BS = 8, 2, 16, 16


def reference(q, k, v, q_start, window, scale):
    """q [Lq, H, D] at positions q_start.., k/v [ctx_end, KVH, D]: full causal attention with the window."""
    g = H // KVH
    out = torch.empty_like(q)
    for j in range(q.shape[0]):
        p = q_start + j
        lo = 0 if window is None else max(0, p - window + 1)
        kk = k[lo : p + 1].repeat_interleave(g, 1)  # [L, H, D]
        vv = v[lo : p + 1].repeat_interleave(g, 1)
        att = torch.einsum("hd,lhd->hl", q[j].double(), kk.double()) * scale
        out[j] = torch.einsum("hl,lhd->hd", att.softmax(-1), vv.double()).to(q.dtype)
    return out


def run_case(seqs, window, seed, min_split_blocks=None, per_chunk=False):
    """seqs: [(q_start, q_len)]. Builds a paged cache holding each sequence's live context in
    shuffled physical blocks (garbage everywhere else), runs the step, compares per sequence
    (per_chunk: also with the sequence laid out and attended alone, unbatched)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    scale = D**-0.5
    dense_k, dense_v, tables, offsets = [], [], [], []
    next_free = list(range(1, 4000))
    rng.shuffle(next_free)
    for s, n in seqs:
        end = s + n
        dense_k.append(torch.randn(end, KVH, D))
        dense_v.append(torch.randn(end, KVH, D))
        first_live = (0 if window is None else max(0, s - window + 1)) // BS
        offset = rng.randint(0, first_live)  # blocks may slide out later than they could
        nblocks = -(-end // BS) - offset
        tables.append([next_free.pop() for _ in range(nblocks)])
        offsets.append(offset)
    num_slots = 4000 * BS
    # Finite garbage in every slot (the engine zeroes blocks on first use; masking must hold anyway).
    k_cache = torch.randn(num_slots, KVH, D) * 3
    v_cache = torch.randn(num_slots, KVH, D) * 3
    for (s, n), k, v, table, off in zip(seqs, dense_k, dense_v, tables, offsets):
        for pos in range(off * BS, s):  # earlier context, already in the cache
            slot = table[pos // BS - off] * BS + pos % BS
            k_cache[slot], v_cache[slot] = k[pos], v[pos]
    kwargs = {} if min_split_blocks is None else {"min_split_blocks": min_split_blocks}
    layout = build_attention_metadata([s for s, _ in seqs], [n for _, n in seqs], offsets, tables, BS, window, **kwargs)
    # The step's queries and new K/V, laid out in the layout's order, written through slot_mapping.
    qs = [torch.randn(n, H, D) for _, n in seqs]
    q = torch.cat([qs[i] for i in layout.order])
    k_new = torch.cat([dense_k[i][seqs[i][0]:] for i in layout.order])
    v_new = torch.cat([dense_v[i][seqs[i][0]:] for i in layout.order])
    expect_pos = torch.cat([torch.arange(seqs[i][0], sum(seqs[i])) for i in layout.order])
    assert torch.equal(layout.positions, expect_pos)
    k_cache.index_copy_(0, layout.meta.slot_mapping, k_new)
    v_cache.index_copy_(0, layout.meta.slot_mapping, v_new)
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, layout.meta, scale)
    row = 0
    for i in layout.order:
        s, n = seqs[i]
        ref = reference(qs[i], dense_k[i], dense_v[i], s, window, scale)
        torch.testing.assert_close(out[row : row + n], ref, atol=2e-5, rtol=2e-5, msg=f"sequence {i} {seqs[i]}")
        if per_chunk:
            alone = build_attention_metadata([s], [n], [offsets[i]], [tables[i]], BS, window).meta
            rows = slice(row, row + n)
            one = paged_attention(qs[i], k_new[rows], v_new[rows], k_cache, v_cache, alone, scale)
            torch.testing.assert_close(out[rows], one, atol=1e-5, rtol=1e-5, msg=f"alone {i} {seqs[i]}")
        row += n
    return layout


@pytest.mark.parametrize("window", [None, 32, 100])
def test_mixed_decode_with_one_very_long_sequence(window):
    rng = random.Random(1)
    seqs = [(rng.randint(0, 400), 1) for _ in range(40)] + [(0, 1), (15, 1), (16, 1), (6000, 1)]
    rng.shuffle(seqs)
    layout = run_case(seqs, window, seed=2)
    kinds = {g.kind for g in layout.meta.groups}
    assert kinds == {DECODE}
    if window is None:  # the 6000-token sequence gets a bucket of its own
        first = layout.meta.groups[0]
        assert first.num_seqs == 1 and first.k_len == 6016 and len(layout.meta.groups) >= 2
    # Decode rows come longest first (by blocks read).
    kv_len = [seqs[i][0] + 1 - (0 if window is None else max(0, seqs[i][0] - window + 1)) // BS * BS for i in layout.order]
    nblocks = [-(-x // BS) for x in kv_len]
    assert nblocks == sorted(nblocks, reverse=True)


@pytest.mark.parametrize("window", [None, 32])
def test_many_small_buckets(window):
    rng = random.Random(3)
    seqs = [(rng.randint(0, 3000), 1) for _ in range(30)]
    layout = run_case(seqs, window, seed=4, min_split_blocks=0)
    if window is None:
        assert len(layout.meta.groups) > 3
        for g in layout.meta.groups:  # padding under 2x per bucket
            shortest = min(-(-(seqs[layout.order[r]][0] + 1) // BS) for r in range(g.token_start, g.token_end))
            assert g.k_len // BS < 2 * shortest


@pytest.mark.parametrize("window", [None, 32, 100])
def test_prefill_chunks_at_zero_and_mid_sequence(window):
    seqs = [(0, 7), (0, 40), (0, 128), (50, 20), (3000, 64), (33, 1), (17, 31), (0, 1)]
    layout = run_case(seqs, window, seed=5)
    kinds = [g.kind for g in layout.meta.groups if g.kind != DECODE for _ in range(g.num_seqs)]
    # (0, 7) is always plain causal on its own rows; (0, 40)/(0, 128) only when they fit the window.
    expect = {None: [CAUSAL, CAUSAL, CAUSAL, MASKED, MASKED, MASKED],
              32: [CAUSAL, MASKED, MASKED, MASKED, MASKED, MASKED],
              100: [CAUSAL, CAUSAL, MASKED, MASKED, MASKED, MASKED]}[window]
    assert kinds == expect
    for g in layout.meta.groups:
        if g.kind == MASKED:
            assert g.mask.dtype == torch.bool and g.mask.shape == (g.num_seqs, 1, g.q_len, g.k_len)
        if g.kind == CAUSAL:
            assert g.mask is None and g.kv_blocks is None


@pytest.mark.parametrize("seed", range(6))
def test_random_ragged_batches(seed):
    rng = random.Random(100 + seed)
    seqs = []
    for _ in range(rng.randint(1, 24)):
        if rng.random() < 0.6:
            seqs.append((rng.randint(0, 2000), 1))
        else:
            seqs.append((rng.choice([0, 0, rng.randint(1, 500)]), rng.randint(1, 200)))
    if rng.random() < 0.5:
        seqs.append((8000, 1))
    window = rng.choice([None, 32, 64, 1000])
    run_case(seqs, window, seed=seed)


def test_decode_buckets_rule():
    assert decode_buckets([], 0) == []
    assert decode_buckets([10, 9, 5, 4, 2, 1], 0) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert decode_buckets([512, 16, 16, 8], 64) == [(0, 1), (1, 4)]
    assert decode_buckets([64, 1, 1], 64) == [(0, 3)]
    assert decode_buckets([4, 2, 1]) == [(0, 3)] and decode_buckets([26, 13, 7]) == [(0, 1), (1, 3)]



@pytest.mark.parametrize("max_chunks", [2, 16])
@pytest.mark.parametrize("seed", range(4))
def test_masked_chunks_batched_equal_per_chunk(seed, max_chunks, monkeypatch):
    """Many mid-sequence chunks (a shared prefix plus their own tokens, as after a prefix-cache
    hit) of differing Lq/Lk, window on and off: batched into few SDPA calls with padded
    queries, equal to the dense reference and to each chunk laid out and attended alone."""
    rng = random.Random(200 + seed)
    window = [None, 48, 200, None][seed]
    seqs = [(rng.choice([1024, 1040, rng.randint(1, 1500)]), rng.choice([16, 32, rng.randint(2, 90)]))
            for _ in range(rng.randint(8, 40))]
    seqs += [(rng.randint(0, 500), 1) for _ in range(4)] + [(0, 33)]
    monkeypatch.setattr(attention, "masked_buckets", functools.partial(masked_buckets, max_chunks=max_chunks))
    layout = run_case(seqs, window, seed=seed, per_chunk=True)
    masked = [g for g in layout.meta.groups if g.kind == MASKED]
    assert len(masked) < sum(g.num_seqs for g in masked)  # chunks share calls
    assert any(g.q_index is not None for g in masked)  # padding is exercised
    for g in masked:
        assert g.mask.shape == (g.num_seqs, 1, g.q_len, g.k_len)


def test_masked_buckets_rule():
    assert masked_buckets([], []) == []
    assert masked_buckets([16] * 5, [66] * 5) == [(0, 2), (2, 4), (4, 5)]  # MAX_MASKED_BUCKET
    assert masked_buckets([16] * 5, [66] * 5, max_chunks=5) == [(0, 5)]
    # Padded work (members x longest chunk x most blocks) stays at most twice the real work.
    assert masked_buckets([2000, 16, 16, 16], [66] * 4, 8) == [(0, 2), (2, 4)]
    assert masked_buckets([16] * 5, [100, 30, 30, 30, 30], 8) == [(0, 3), (3, 5)]
