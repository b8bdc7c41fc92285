"""Attention over a paged KV cache for a ragged batch, in portable PyTorch (SDPA): the ``torch``
backend (``TorchBackend``; the interface is ``attention_backend.py``).

A step's tokens are one flat ragged batch: linear layers, RoPE and the KV-cache write run on
all T tokens at once with no padding. Attention needs each query to see only its own
sequence's keys, so the step is split into groups, one SDPA call each per layer:

* **decode buckets** (one query per sequence; they come first in the flat batch). Decode
  sequences are ordered by KV length, longest first, and cut into buckets whose longest
  member has at most twice the blocks of its shortest (``decode_buckets``). Each bucket
  gathers its sequences' live blocks, padded only to the bucket's longest, so one 32K-token
  sequence no longer pads 63 short ones to 32K (the padded gather was ~20x the real KV in
  that case, for every layer of every step). A boolean mask [S, 1, 1, Lk] marks padding and
  the sliding window. Measured on CPU (``mistral_serve.bench.attention_bench``,
  docs/bench/attention-cpu.json), bucketing beats both alternatives: one call padded to the
  longest (the old layout) is ~35x slower on 1 x 8K + 63 x 256, and gathering only each
  sequence's own blocks with one SDPA call per sequence (no padding at all) pays 64 calls per
  layer, ~2x slower than two buckets on both that case and the shared workload's 64 x 100-400
  tokens. Even there, where the 2x rule saves only ~20% of the padded rows, two buckets run
  ~2.5x faster than one: each bucket's gathered K/V copy is small enough to still be in cache
  when SDPA reads it. Buckets of at most ``MIN_SPLIT_BLOCKS`` blocks are not split further.
* **causal prefill**: a chunk that starts at position 0 (the whole prompt in one chunk, the
  common case) and fits in the sliding window attends to exactly its own keys, causally: SDPA
  with ``is_causal=True`` on the chunk's own freshly projected K/V rows, no cache gather and
  no mask (K/V expanded to the query heads: on CPU faster than ``enable_gqa`` here).
* **masked prefill**: a chunk with earlier context (chunked prefill, recompute, a prefix-cache
  hit) or longer than the window gathers the blocks of its key range from the cache and uses
  a boolean mask (causal with an offset, and the window band; keys are masked by absolute
  position, so a block's rows before the window need no slicing), built once per step; K/V
  heads are shared through ``enable_gqa`` so the mask is not replicated per head. Consecutive
  masked chunks are batched up to ``MAX_MASKED_BUCKET`` (2) per SDPA call as [S, H, Lq_max, D]
  queries against [S, KVH, Lk_max, D] keys with a mask [S, 1, Lq_max, Lk_max]; a bucket's
  padded work stays under twice its real work (``masked_buckets``), and a shorter chunk's
  padded queries repeat its last one (no empty mask row), their outputs dropped. After a
  shared-prefix hit (64 chunks of 16 queries at 1,040 tokens) this ran the step's attention
  ~20-28% faster than one call per chunk (numbers at ``MAX_MASKED_BUCKET``).

Everything is computed once per step on the host from Python ints and small CPU tensors
(``build_attention_metadata``), moved to the device once, and reused by every layer: no
device-to-host reads in the forward pass.

GQA in decode without copying K/V: the ``G = heads / kv_heads`` query heads sharing a KV head
are folded into the query-length axis ([S, KVH, G, D]), so a KV head is read once per bucket.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mistral_serve.model.attention_backend import AttentionBackend, KVCache, StepLayout, StepMetadata
from mistral_serve.model.step_layout import StepGeometry, lay_out_step

DECODE, CAUSAL, MASKED = "decode", "causal", "masked"
# Decode buckets are not split while their longest member has at most this many blocks: tiny
# buckets would only add SDPA calls (splitting at 16 blocks measured no better than at 0).
MIN_SPLIT_BLOCKS = 4
# Masked prefill chunks per SDPA call, at most. 4 layers of 63 chunks of 16 queries at 1,040
# tokens of context (a prefix-cache hit), 2 CPU threads: one call per chunk 62-68 ms, 2 chunks
# per call 47-51, 4: 47-50, 8: ~100, 16: ~70, all 63 in one call ~100 ms; 8 such chunks: 8.5 /
# 6.2 / 11 ms for 1 / 2 / 4 per call. Larger calls lose to the cache (each holds S copies of the
# gathered prefix) and to the kernel's work split; 2 was best or within noise of best in every case.
MAX_MASKED_BUCKET = 2


@dataclass
class AttentionGroup:
    """Queries attended together in one SDPA call: the contiguous rows [token_start, token_end)
    of the flat batch.

    kind:       DECODE (S sequences, one query each), CAUSAL (one prefill chunk) or MASKED
                (S prefill chunks, each padded to ``q_len`` queries).
    kv_blocks:  cache blocks to gather, sequence by sequence, ``k_len / block_size`` each
                (DECODE, MASKED); None for CAUSAL (its keys are its own rows).
    mask:       boolean, True = attend: [S, 1, 1, Lk] (DECODE) or [S, 1, Lq, Lk] (MASKED); None
                when nothing is masked.
    q_index:    MASKED with chunks of differing lengths: [S * Lq] row within the group of each
                padded query (padding repeats a chunk's last query); None when none is padded.
    out_index:  with ``q_index``: [token_end - token_start] padded row holding each real query.
    """

    kind: str
    token_start: int
    token_end: int
    num_seqs: int
    q_len: int
    k_len: int
    kv_blocks: torch.Tensor | None
    mask: torch.Tensor | None
    q_index: torch.Tensor | None = None
    out_index: torch.Tensor | None = None


@dataclass
class AttentionMetadata(StepMetadata):
    """Everything attention needs for one step, shared by all layers."""

    block_size: int
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    cos: torch.Tensor | None  # [T, 1, head_dim] RoPE tables at each token's position
    sin: torch.Tensor | None
    groups: list[AttentionGroup]

    def write_kv(self, kv_cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        kv_cache[0].index_copy_(0, self.slot_mapping, k)
        kv_cache[1].index_copy_(0, self.slot_mapping, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
               scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, kv_cache[0], kv_cache[1], self, scale)


class TorchBackend(AttentionBackend):
    """The portable path: a cache of slots [num_blocks * block_size, KVH, D] per K and V, SDPA
    groups built on the host (``metadata_from_geometry``). No CUDA graphs: its groups, masks
    and gathers change shape with every step."""

    name = "torch"

    def kv_cache_shape(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks * self.block_size, num_kv_heads, head_dim)

    def build_metadata(self, geom: StepGeometry, graph_size: int | None = None) -> StepLayout:
        if graph_size is not None:
            raise ValueError("the torch attention backend has no CUDA-graph metadata")
        return metadata_from_geometry(geom, self.device)


def decode_buckets(num_blocks: list[int], min_split_blocks: int = MIN_SPLIT_BLOCKS) -> list[tuple[int, int]]:
    """Cut decode sequences, sorted by block count descending, into [lo, hi) buckets: a new
    bucket starts when a sequence has at most half the blocks of its bucket's longest (so
    padding stays under 2x), unless that longest is at most ``min_split_blocks``."""
    spans: list[tuple[int, int]] = []
    lo = 0
    for i in range(1, len(num_blocks) + 1):
        if i == len(num_blocks) or (num_blocks[lo] > min_split_blocks and 2 * num_blocks[i] <= num_blocks[lo]):
            spans.append((lo, i))
            lo = i
    return spans


def masked_buckets(q_lens: list[int], num_blocks: list[int], max_chunks: int = MAX_MASKED_BUCKET) -> list[tuple[int, int]]:
    """Cut consecutive masked prefill chunks into [lo, hi) buckets of at most ``max_chunks``: a
    chunk joins the current bucket while the bucket's padded work (members x longest chunk x
    most blocks) stays at most twice its real work (sum of queries x blocks)."""
    spans: list[tuple[int, int]] = []
    lo, real, lq_max, nb_max = 0, 0, 0, 0
    for i, (lq, nb) in enumerate(zip(q_lens, num_blocks)):
        padded = (i - lo + 1) * max(lq_max, lq) * max(nb_max, nb)
        if i - lo == max_chunks or (i > lo and padded > 2 * (real + lq * nb)):
            spans.append((lo, i))
            lo, real, lq_max, nb_max = i, 0, 0, 0
        real, lq_max, nb_max = real + lq * nb, max(lq_max, lq), max(nb_max, nb)
    if q_lens:
        spans.append((lo, len(q_lens)))
    return spans


def build_attention_metadata(
    q_start: list[int],
    q_len: list[int],
    block_offset: list[int],
    block_tables: list[list[int]],
    block_size: int,
    sliding_window: int | None,
    device: torch.device | str = "cpu",
    min_split_blocks: int = MIN_SPLIT_BLOCKS,
) -> StepLayout:
    """Lay a step out and build its attention metadata.

    Per sequence (any order): ``q_start`` absolute position of its first query this step,
    ``q_len`` queries scheduled, ``block_tables`` its live physical blocks, of which the first
    holds logical block ``block_offset`` (blocks that slid out of the window were freed).

    Layout (``step_layout.lay_out_step``): decode sequences (one query) first, longest KV first,
    then prefill chunks in input order (consecutive masked chunks share buckets).
    """
    geom = lay_out_step(q_start, q_len, block_offset, block_tables, block_size, sliding_window)
    return metadata_from_geometry(geom, device, min_split_blocks)


def metadata_from_geometry(geom: StepGeometry, device: torch.device | str = "cpu",
                           min_split_blocks: int = MIN_SPLIT_BLOCKS) -> StepLayout:
    """The SDPA groups of a laid-out step. Everything is computed on the host (all inputs are
    Python ints) and moved to ``device`` once."""
    n, w, block_size = len(geom.order), geom.sliding_window, geom.block_size
    q_start, first_block, ctx_end, nblocks = geom.q_start, geom.first_block, geom.ctx_end, geom.nblocks
    order, lens, tok_off, shift, flat_table = geom.order, geom.lens, geom.tok_off, geom.shift, geom.flat_table
    decode = [i for i in order if geom.q_len[i] == 1]

    def gather_index(rows: list[int], nb: int) -> torch.Tensor:
        """[len(rows) * nb] physical blocks first_block .. first_block + nb - 1 of each row's
        sequence (past its last block: its last block again, masked)."""
        base = torch.tensor([shift[r] + first_block[order[r]] for r in rows], dtype=torch.long)
        last = torch.tensor([nblocks[order[r]] - 1 for r in rows], dtype=torch.long)
        col = torch.minimum(torch.arange(nb)[None, :], last[:, None]) + base[:, None]
        return flat_table[col].flatten()

    groups: list[AttentionGroup] = []
    nd = len(decode)
    for lo, hi in decode_buckets([nblocks[i] for i in decode], min_split_blocks):
        rows = list(range(lo, hi))
        nb = nblocks[order[lo]]
        lk = nb * block_size
        fb = torch.tensor([first_block[order[r]] for r in rows], dtype=torch.long)
        end = torch.tensor([ctx_end[order[r]] for r in rows], dtype=torch.long)
        key_pos = fb[:, None] * block_size + torch.arange(lk)[None, :]
        allowed = key_pos < end[:, None]
        if w is not None:
            allowed &= key_pos >= end[:, None] - w
        mask = None if bool(allowed.all()) else allowed[:, None, None, :].to(device)
        groups.append(AttentionGroup(DECODE, lo, hi, hi - lo, 1, lk, gather_index(rows, nb).to(device), mask))
    def is_causal(r: int) -> bool:
        return q_start[order[r]] == 0 and (w is None or lens[r] <= w)

    masked: list[list[int]] = []  # buckets of rows
    for causal, run in itertools.groupby(range(nd, n), key=is_causal):
        run = list(run)
        if causal:
            groups.extend(AttentionGroup(CAUSAL, tok_off[r], tok_off[r + 1], 1, lens[r], lens[r], None, None)
                          for r in run)
        else:
            masked.extend(run[lo:hi] for lo, hi in masked_buckets([lens[r] for r in run], [nblocks[order[r]] for r in run]))
    for rows in masked:
        nb, lq_max = max(nblocks[order[r]] for r in rows), max(lens[r] for r in rows)
        lk = nb * block_size
        lq = torch.tensor([lens[r] for r in rows], dtype=torch.long)
        # Padded query j of a chunk repeats its last query (j >= Lq), so no mask row is empty.
        j = torch.minimum(torch.arange(lq_max)[None, :], lq[:, None] - 1)  # [S, Lq_max]
        q_pos = torch.tensor([q_start[order[r]] for r in rows], dtype=torch.long)[:, None] + j
        fb = torch.tensor([first_block[order[r]] for r in rows], dtype=torch.long)
        key_pos = (fb[:, None] * block_size + torch.arange(lk)[None, :])[:, None, :]  # [S, 1, Lk]
        # Causal (which also hides the padding past each chunk's end) and the window band.
        allowed = key_pos <= q_pos[:, :, None]
        if w is not None:
            allowed &= key_pos > q_pos[:, :, None] - w
        q_index = out_index = None
        if bool((lq != lq_max).any()):
            q_index = (j + (torch.tensor(tok_off[rows[0]:rows[-1] + 1]) - tok_off[rows[0]])[:, None]).flatten().to(device)
            out_index = torch.arange(len(rows) * lq_max).view(len(rows), lq_max)[
                torch.arange(lq_max)[None, :] < lq[:, None]].to(device)
        groups.append(AttentionGroup(MASKED, tok_off[rows[0]], tok_off[rows[-1] + 1], len(rows), lq_max, lk,
                                     gather_index(rows, nb).to(device), allowed[:, None].to(device),
                                     q_index, out_index))
    meta = AttentionMetadata(block_size, geom.slot_mapping.to(device), None, None, groups)
    return StepLayout(order, geom.positions.to(device), meta)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of flat queries q [T, H, D] → [T, H, D]. ``k``/``v`` [T, KVH, D] are this
    step's new keys/values (already written to the paged cache, [slots, KVH, D])."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    bs = meta.block_size
    row = bs * num_kv_heads * head_dim
    block_rows = k_cache.view(-1, row), v_cache.view(-1, row)
    g = num_heads // num_kv_heads
    out = torch.empty_like(q)

    def gather(cache_rows: torch.Tensor, grp: AttentionGroup) -> torch.Tensor:
        """The group's K or V blocks as [S, KVH, Lk, D]."""
        rows = cache_rows.index_select(0, grp.kv_blocks)
        return rows.view(grp.num_seqs, grp.k_len, num_kv_heads, head_dim).transpose(1, 2)

    for grp in meta.groups:
        t0, t1, s = grp.token_start, grp.token_end, grp.num_seqs
        if grp.kind == DECODE:
            qg = q[t0:t1].view(s, num_kv_heads, g, head_dim)
            o = F.scaled_dot_product_attention(qg, gather(block_rows[0], grp), gather(block_rows[1], grp),
                                               attn_mask=grp.mask, scale=scale)
            out[t0:t1] = o.reshape(s, num_heads, head_dim)
        elif grp.kind == CAUSAL:
            qc = q[t0:t1].transpose(0, 1)[None]  # [1, H, Lq, D]
            kc = k[t0:t1].transpose(0, 1).repeat_interleave(g, 0)[None]
            vc = v[t0:t1].transpose(0, 1).repeat_interleave(g, 0)[None]
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)
            out[t0:t1] = o[0].transpose(0, 1)
        else:
            qm = q[t0:t1] if grp.q_index is None else q[t0:t1].index_select(0, grp.q_index)
            qm = qm.view(s, grp.q_len, num_heads, head_dim).transpose(1, 2)  # [S, H, Lq, D]
            o = F.scaled_dot_product_attention(qm, gather(block_rows[0], grp), gather(block_rows[1], grp),
                                               attn_mask=grp.mask, scale=scale, enable_gqa=True)
            o = o.transpose(1, 2).reshape(s * grp.q_len, num_heads, head_dim)
            out[t0:t1] = o if grp.out_index is None else o.index_select(0, grp.out_index)
    return out
