"""Attention over a paged KV cache for a ragged batch, in portable PyTorch (SDPA).

A step's tokens are one flat ragged batch: linear layers, RoPE and the KV-cache write run on
all T tokens at once with no padding. Attention itself needs each query to see only its own
sequence's keys, so the step's sequences are split into two groups, each one SDPA call per
layer: *decode* (one query per sequence) and *prefill* (chunks of several queries). Within a
group keys are gathered from the cache through block tables and padded to the group's
longest key range; a boolean mask carries causality, the sliding window and the padding.
The masks and gather indices are built once per step (``AttentionMetadata``) and reused by
every layer.

GQA without copying K/V: the queries of the ``G = heads / kv_heads`` heads that share a KV
head are folded into the query-length axis, so a KV head is read once per group of queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences whose queries are attended together in one SDPA call.

    q_index:   [S, Lq] rows of the flat token batch that are this group's queries
               (padding entries point at row 0 and are discarded).
    q_valid:   [S, Lq] which of those entries are real queries.
    kv_slots:  [S, Lk] cache slots of the keys each sequence may attend to (padded with 0).
    mask:      [S, 1, Lq, Lk] True where a query may attend to a key.
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor | None
    kv_slots: torch.Tensor
    mask: torch.Tensor
    out_index: torch.Tensor


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    groups: list[AttentionGroup]


def build_group(
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    token_offset: torch.Tensor,
    block_table: torch.Tensor,
    block_offset: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    groups_per_kv: int,
) -> AttentionGroup:
    """Build gather indices and the mask for sequences that share one SDPA call.

    q_start:      [S] absolute position of each sequence's first query this step
    q_len:        [S] number of queries (tokens scheduled) per sequence
    token_offset: [S] row of each sequence's first query in the flat token batch
    block_table:  [S, B] physical block ids of the sequence's live blocks
    block_offset: [S] logical index of ``block_table[:, 0]`` (blocks that slid out of the
                  window were freed and dropped from the table)
    groups_per_kv: query heads per KV head; the mask is laid out for the folded query axis
    """
    device = q_start.device
    lq = int(q_len.max())
    ctx_end = q_start + q_len
    if sliding_window is None:
        k_start = torch.zeros_like(q_start)
    else:
        k_start = (q_start - sliding_window + 1).clamp_min(0)
    lk = int((ctx_end - k_start).max())

    key_pos = k_start[:, None] + torch.arange(lk, device=device)[None, :]  # [S, Lk]
    key_valid = key_pos < ctx_end[:, None]
    logical_block = (key_pos // block_size - block_offset[:, None]).clamp(0, block_table.shape[1] - 1)
    physical = torch.gather(block_table, 1, logical_block)
    kv_slots = torch.where(key_valid, physical * block_size + key_pos % block_size, 0)

    q_ar = torch.arange(lq, device=device)[None, :]
    q_valid = q_ar < q_len[:, None]  # [S, Lq]
    q_pos = q_start[:, None] + q_ar
    mask = key_valid[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])
    if sliding_window is not None:
        mask &= key_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    q_index = torch.where(q_valid, token_offset[:, None] + q_ar, 0)
    if lq == 1:  # decode: one [S, 1, 1, Lk] mask broadcasts over the folded heads
        return AttentionGroup(q_index, None, kv_slots, mask[:, None], q_index[:, 0])
    # Padding queries attend to key 0 so SDPA never sees an all-masked row (which gives NaN).
    mask |= (~q_valid)[:, :, None] & (torch.arange(lk, device=device) == 0)[None, None, :]
    s = q_start.shape[0]
    folded = mask[:, None, None].expand(s, 1, groups_per_kv, lq, lk).reshape(s, 1, groups_per_kv * lq, lk)
    return AttentionGroup(q_index, q_valid, kv_slots, folded, q_index[q_valid])


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of flat queries q [T, H, D] over the paged cache ([slots, KVH, D]) → [T, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    groups_per_kv = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for group in meta.groups:  # at most two: decode and prefill
        s, lq = group.q_index.shape
        # [S, Lq, KVH, G, D] -> [S, KVH, G*Lq, D]: fold the query heads sharing a KV head.
        qg = q[group.q_index].view(s, lq, num_kv_heads, groups_per_kv, head_dim)
        qg = qg.permute(0, 2, 3, 1, 4).reshape(s, num_kv_heads, groups_per_kv * lq, head_dim)
        k = k_cache[group.kv_slots].transpose(1, 2)  # [S, KVH, Lk, D]
        v = v_cache[group.kv_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.mask, scale=scale)
        o = o.view(s, num_kv_heads, groups_per_kv, lq, head_dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(s, lq, num_heads, head_dim)
        out[group.out_index] = o[group.q_valid] if group.q_valid is not None else o[:, 0]
    return out
