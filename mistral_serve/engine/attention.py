"""Attention over a paged KV cache for a ragged batch, in portable PyTorch (SDPA).

A step's tokens are one flat ragged batch: linear layers, RoPE and the KV-cache write run on
all T tokens at once with no padding. Attention itself needs each query to see only its own
sequence's keys, so the step is split into groups, each one SDPA call per layer: all *decode*
sequences together (one query each; they come first in the flat batch), then each *prefill*
chunk on its own (its queries are contiguous rows, so nothing is padded). Keys are gathered
from the cache whole blocks at a time through the block tables (one ``index_select`` of
contiguous block rows, many times faster than gathering slot by slot), padded to the group's
longest block range; an additive mask carries causality, the sliding window and the padding.
Gather indices and masks are built once per step (``AttentionMetadata``) and reused by every
layer.

GQA without copying K/V: the queries of the ``G = heads / kv_heads`` heads that share a KV
head are folded into the query-length axis, so a KV head is read once per group of queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Queries attended together in one SDPA call: S decode sequences (Lq = 1) or one prefill
    chunk (S = 1); either way the contiguous rows [token_start, token_end) of the flat batch.

    kv_blocks:  [S * (Lk / block_size)] cache blocks holding the keys, sequence by sequence
                (padding → block 0: always finite, since it is zeroed before first use, and masked).
    mask:       additive float mask, [S, 1, 1, Lk] (decode) or [1, 1, G * Lq, Lk] (prefill).
    """

    token_start: int
    token_end: int
    num_seqs: int
    q_len: int
    k_len: int
    kv_blocks: torch.Tensor
    mask: torch.Tensor


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, shared by all layers."""

    block_size: int
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    cos: torch.Tensor  # [T, 1, head_dim] RoPE tables at each token's position
    sin: torch.Tensor
    groups: list[AttentionGroup]


def build_group(
    token_start: int,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    block_table: torch.Tensor,
    block_offset: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    groups_per_kv: int,
    dtype: torch.dtype,
) -> AttentionGroup:
    """Build gather indices and the mask for sequences that share one SDPA call.

    q_start:      [S] absolute position of each sequence's first query this step
    q_len:        [S] number of queries (tokens scheduled) per sequence
    block_table:  [S, B] physical block ids of the sequence's live blocks
    block_offset: [S] logical index of ``block_table[:, 0]`` (blocks that slid out of the
                  window were freed and dropped from the table)
    """
    device = q_start.device
    s = q_start.shape[0]
    lq = int(q_len.max())
    ctx_end = q_start + q_len
    if sliding_window is None:
        k_start = torch.zeros_like(q_start)
    else:
        k_start = (q_start - sliding_window + 1).clamp_min(0)
    first_block = k_start // block_size
    num_blocks = (ctx_end - 1) // block_size - first_block + 1
    nb = int(num_blocks.max())
    lk = nb * block_size

    block_ar = torch.arange(nb, device=device)[None, :]
    column = (first_block[:, None] + block_ar - block_offset[:, None]).clamp(0, block_table.shape[1] - 1)
    kv_blocks = torch.where(block_ar < num_blocks[:, None], torch.gather(block_table, 1, column), 0).flatten()
    key_pos = first_block[:, None] * block_size + torch.arange(lk, device=device)[None, :]  # [S, Lk]
    key_valid = key_pos < ctx_end[:, None]

    if s > 1 and lq > 1:
        raise ValueError("a group is either decode sequences (one query each) or a single prefill chunk")
    q_pos = q_start[:, None] + torch.arange(lq, device=device)[None, :]  # [S, Lq]
    allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])
    if sliding_window is not None:
        allowed &= key_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    token_end = token_start + int(q_len.sum())
    # Fold the G query heads that share a KV head into the query axis: [S, 1, G * Lq, Lk]
    # (for decode, Lq = 1 and the [S, 1, 1, Lk] mask broadcasts over the folded heads).
    if lq == 1:
        folded = allowed[:, None]
    else:
        folded = allowed[:, None, None].expand(s, 1, groups_per_kv, lq, lk).reshape(s, 1, groups_per_kv * lq, lk)
    return AttentionGroup(token_start, token_end, s, lq, lk, kv_blocks, _additive(folded, dtype))


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of flat queries q [T, H, D] over the paged cache ([slots, KVH, D]) → [T, H, D]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    row = meta.block_size * num_kv_heads * head_dim
    block_rows = k_cache.view(-1, row), v_cache.view(-1, row)
    g = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for grp in meta.groups:  # the decode batch, then one per prefill chunk
        s, lq, lk = grp.num_seqs, grp.q_len, grp.k_len
        rows = q[grp.token_start : grp.token_end]
        # [S, Lq, KVH, G, D] -> [S, KVH, G*Lq, D]: fold the query heads sharing a KV head.
        qg = rows.view(s, lq, num_kv_heads, g, head_dim).permute(0, 2, 3, 1, 4).reshape(s, num_kv_heads, g * lq, head_dim)
        k = block_rows[0].index_select(0, grp.kv_blocks).view(s, lk, num_kv_heads, head_dim).transpose(1, 2)
        v = block_rows[1].index_select(0, grp.kv_blocks).view(s, lk, num_kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=grp.mask, scale=scale)
        o = o.view(s, num_kv_heads, g, lq, head_dim).permute(0, 3, 1, 2, 4).reshape(s * lq, num_heads, head_dim)
        out[grp.token_start : grp.token_end] = o
    return out
