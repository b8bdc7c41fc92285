"""Where a step's tokens and keys are: the layout every attention backend starts from.

A step is a ragged batch of sequences, each with ``q_len`` new tokens starting at absolute
position ``q_start`` and a block table of *live* blocks (the first holds logical block
``block_offset``: blocks that slid out of the window were freed). ``lay_out_step`` fixes the
flat-batch order (decode sequences first, longest KV first, then prefill chunks in input order),
each token's position and cache slot, and for each sequence the blocks its queries can see,
[first_block, first_block + nblocks) in logical numbering. Both backends read this one object,
so their views of "which keys does query t see" cannot drift apart; each turns it into its own
per-step metadata (``attention.build_attention_metadata``, ``attention_flashinfer.page_table``).

Computed on the host from Python ints with CPU tensor ops; nothing here touches a device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


def key_start(q_start: int, sliding_window: int | None) -> int:
    """First key position the first query of a chunk starting at ``q_start`` may see."""
    return 0 if sliding_window is None else max(0, q_start - sliding_window + 1)


@dataclass
class StepGeometry:
    """``lay_out_step``'s result. Per-sequence lists are indexed by *input* index; ``order``
    maps layout row r to input index ``order[r]``."""

    block_size: int
    sliding_window: int | None
    order: list[int]
    q_start: list[int]
    q_len: list[int]
    ctx_end: list[int]  # q_start + q_len: KV length once this step's tokens are written
    first_block: list[int]  # first logical block any of the sequence's queries this step can see
    nblocks: list[int]  # blocks [first_block, first_block + nblocks) cover every key it can see
    lens: list[int]  # q_len in layout order
    tok_off: list[int]  # [rows + 1] first flat token of each row
    shift: list[int]  # per row: column of logical block 0 in ``flat_table`` (may be negative)
    flat_table: torch.Tensor  # every row's live blocks, rows in layout order (long)
    seq_of_token: torch.Tensor  # [T] layout row of each token
    positions: torch.Tensor  # [T] absolute position of each token (long, CPU)
    slot_mapping: torch.Tensor  # [T] cache slot each token's K/V is written to (long, CPU)

    @property
    def num_tokens(self) -> int:
        return self.tok_off[-1]

    def blocks_of_row(self, r: int) -> torch.Tensor:
        """Physical blocks [first_block, first_block + nblocks) of row r's sequence."""
        i = self.order[r]
        lo = self.shift[r] + self.first_block[i]
        return self.flat_table[lo : lo + self.nblocks[i]]


def lay_out_step(
    q_start: list[int],
    q_len: list[int],
    block_offset: list[int],
    block_tables: list[list[int]],
    block_size: int,
    sliding_window: int | None,
) -> StepGeometry:
    """Order the step decode-first (longest KV first), then prefill chunks in input order, and
    compute each token's position and slot and each sequence's visible block range."""
    n = len(q_start)
    w = sliding_window
    first_block = [key_start(s, w) // block_size for s in q_start]
    ctx_end = [s + l for s, l in zip(q_start, q_len)]
    nblocks = [(e - 1) // block_size - fb + 1 for e, fb in zip(ctx_end, first_block)]
    decode = sorted((i for i in range(n) if q_len[i] == 1), key=lambda i: -nblocks[i])
    order = decode + [i for i in range(n) if q_len[i] != 1]

    lens = [q_len[i] for i in order]
    tok_off = list(itertools.accumulate(lens, initial=0))
    # One flat block table for the step (sequences in layout order) and each one's start in it.
    tables = [block_tables[i] for i in order]
    table_start = list(itertools.accumulate((len(t) for t in tables), initial=0))
    flat_table = torch.tensor(list(itertools.chain.from_iterable(tables)), dtype=torch.long)

    starts_t = torch.tensor([q_start[i] for i in order], dtype=torch.long)
    lens_t = torch.tensor(lens, dtype=torch.long)
    seq_of_token = torch.repeat_interleave(torch.arange(n), lens_t)
    tok_off_t = torch.tensor(tok_off[:-1], dtype=torch.long)
    positions = starts_t[seq_of_token] + torch.arange(tok_off[-1]) - tok_off_t[seq_of_token]
    # Column of each token's block in its sequence's table, shifted to the flat table.
    shift = [table_start[r] - block_offset[i] for r, i in enumerate(order)]
    slot_mapping = (flat_table[torch.tensor(shift, dtype=torch.long)[seq_of_token] + positions // block_size]
                    * block_size + positions % block_size)
    return StepGeometry(block_size, w, order, list(q_start), list(q_len), ctx_end, first_block, nblocks, lens,
                        tok_off, shift, flat_table, seq_of_token, positions, slot_mapping)
