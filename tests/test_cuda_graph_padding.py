"""The padding that CUDA-graph decode uses, run eagerly on CPU with the torch backend.

A decode step padded to a larger "captured" size must give the real rows the logits of the
unpadded step, and the pad rows may write only the scratch block. ``ModelRunner.prepare_step``
with ``pad_to`` is the very code ``prepare`` runs before a graph replay (there with
``graph=True``, which only changes which attention metadata the backend returns).
"""

from __future__ import annotations

import pytest
import torch

from hf_reference import random_prompts
from mistral_serve import LLM, SamplingParams
from mistral_serve.engine.cuda_graphs import DecodeGraphs, capture_sizes, pad_decode_batch
from mistral_serve.model.step_layout import lay_out_step


def decoding_step(model_dir, prompts, steps: int, block_size: int = 8):
    """An engine whose sequences are all decoding, and its next (decode-only) schedule."""
    llm = LLM(str(model_dir), block_size=block_size)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(steps):
        engine.step()
    scheduled = engine.scheduler.schedule().scheduled
    engine.runner.zero_new_blocks(engine.block_manager.num_touched)  # as step() does before prepare
    assert all(n == 1 for _, n in scheduled) and len(scheduled) == len(prompts)
    return llm, scheduled


def snapshot(runner) -> list[torch.Tensor]:
    return [t.clone() for kv in runner.kv_caches for t in kv]


def restore(runner, saved: list[torch.Tensor]) -> None:
    for t, s in zip((t for kv in runner.kv_caches for t in kv), saved):
        t.copy_(s)


@pytest.mark.parametrize("fixture,pad_to", [("tiny_model_dir", 8), ("tiny_window32_dir", 8),
                                            ("tiny_window32_dir", 32)])
def test_padded_decode_step_equals_unpadded(fixture, pad_to, request):
    model_dir = request.getfixturevalue(fixture)
    # Prompts past the window (32): with block size 8, leading blocks were freed (block_offset > 0).
    llm, scheduled = decoding_step(model_dir, random_prompts(5, 20, 90, seed=21), steps=6)
    runner = llm.engine.runner
    if fixture == "tiny_window32_dir":
        assert any(seq.block_offset > 0 for seq, _ in scheduled)
    before = snapshot(runner)

    plain = runner.prepare_step(scheduled)
    assert plain.num_pad_rows == 0 and not plain.graph
    want = runner.execute(plain)
    after_plain = snapshot(runner)

    restore(runner, before)
    padded = runner.prepare_step(scheduled, pad_to=pad_to)
    assert padded.num_pad_rows == pad_to - len(scheduled) and padded.input_ids.numel() == pad_to
    assert [s.request_id for s in padded.sample_seqs] == [s.request_id for s in plain.sample_seqs]
    got = runner.execute(padded)
    after_padded = snapshot(runner)

    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # The scratch block (the pool's last, owned by no sequence) is the only KV the pad rows touched.
    bs, scratch = runner.block_size, runner.scratch_block
    assert scratch == llm.engine.block_manager.num_blocks
    outside = slice(0, scratch * bs)
    for b, p, a in zip(before, after_padded, after_plain):
        assert torch.equal(p[outside], a[outside])
        assert torch.equal(a[scratch * bs:], b[scratch * bs:])  # the unpadded step never touches it
        assert not torch.equal(p[scratch * bs], b[scratch * bs])  # slot 0: written by the pad rows
        assert torch.equal(p[scratch * bs + 1:], b[scratch * bs + 1:])


def test_pad_rows_come_last_and_read_only_the_scratch_block():
    # The third sequence at 300 keeps logical blocks 16-18 live (window 32: keys from 269).
    q_start, q_len, offsets, tables = [40, 7, 300], [1, 1, 1], [0, 0, 16], [[3, 4, 5], [9], [11, 12, 13]]
    pad_decode_batch(q_start, q_len, offsets, tables, 8, scratch_block=99)
    assert tables[3:] == [[99]] * 5 and q_start[3:] == [0] * 5
    geom = lay_out_step(q_start, q_len, offsets, tables, 16, 32)
    assert sorted(geom.order[:3]) == [0, 1, 2] and geom.order[3:] == [3, 4, 5, 6, 7]
    assert geom.slot_mapping[3:].tolist() == [99 * 16] * 5
    assert all(geom.blocks_of_row(r).tolist() == [99] for r in range(3, 8))
    with pytest.raises(ValueError):
        pad_decode_batch(q_start, q_len, offsets, tables, 4, scratch_block=99)


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(10) == [1, 2, 4, 8, 10]
    assert capture_sizes(128) == [1, 2, 4, 8] + list(range(16, 129, 8))


def test_graph_size_for_decode_only_steps(tiny_model_dir):
    """Which steps a graph serves: decode-only, at the smallest captured size that fits."""
    llm, scheduled = decoding_step(tiny_model_dir, random_prompts(5, 10, 30, seed=22), steps=3)
    graphs = DecodeGraphs(llm.engine.runner, [1, 2, 4, 8])  # nothing captured: only the rule
    assert graphs.size_for(scheduled) == 8
    assert graphs.size_for(scheduled[:3]) == 4 and graphs.size_for(scheduled[:1]) == 1
    assert DecodeGraphs(llm.engine.runner, [1, 2, 4]).size_for(scheduled) is None  # too many: eager
    seq, _ = scheduled[0]
    assert graphs.size_for([(seq, 2)]) is None  # a chunk of two tokens is no decode step
    assert graphs.size_for([]) is None
