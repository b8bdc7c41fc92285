"""Fixed-size KV blocks: a free pool and each sequence's block table.

A sequence's KV for positions [0, n) lives in blocks of ``block_size`` slots. With a sliding
window W, a query at position p reads keys (p - W, p] only, so once a sequence's next query is
at position p, every block wholly before p - W + 1 is dead and goes back to the pool. Between
steps a windowed sequence therefore holds at most ceil(W / block_size) + 1 blocks, however
long it grows (a prefill chunk of C tokens needs C more slots while it is computed).
"""

from __future__ import annotations

from mistral_serve.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, sliding_window: int | None) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool must hold at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        # A stack: the most recently freed block is reused first, which keeps the touched part of
        # the pool (and so the process RSS on CPU) as small as the peak number of blocks in use.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Blocks [0, num_touched) have been handed out at least once; with the stack above they
        # always form a prefix, which lets the KV cache be initialised lazily, block by block.
        self.num_touched = 0
        self._owner: dict[int, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def max_blocks_per_seq(self, num_tokens: int) -> int:
        """Blocks a sequence of ``num_tokens`` needs at its peak (one token per step)."""
        if self.sliding_window is None:
            return cdiv(num_tokens, self.block_size)
        return min(cdiv(num_tokens, self.block_size), cdiv(self.sliding_window, self.block_size) + 1)

    def _first_live_block(self, next_query_pos: int) -> int:
        if self.sliding_window is None:
            return 0
        return max(0, next_query_pos - self.sliding_window + 1) // self.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks ``seq`` needs to compute ``num_new_tokens`` more tokens."""
        end = seq.num_computed_tokens + num_new_tokens
        have = seq.block_offset + len(seq.block_table)
        return max(0, cdiv(end, self.block_size) - max(have, self._first_live_block(seq.num_computed_tokens)))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` the blocks to hold KV up to ``num_computed + num_new_tokens``."""
        self.release_out_of_window(seq, seq.num_computed_tokens)
        if not seq.block_table:
            seq.block_offset = self._first_live_block(seq.num_computed_tokens)
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"allocate() without can_allocate(): {seq.request_id} needs {need}")
        for _ in range(need):
            block = self._free.pop()
            self.num_touched = max(self.num_touched, block + 1)
            self._owner[block] = seq.request_id
            seq.block_table.append(block)

    def release_out_of_window(self, seq: Sequence, next_query_pos: int) -> None:
        """Return blocks no future query of ``seq`` can attend to."""
        first_live = self._first_live_block(next_query_pos)
        while seq.block_table and seq.block_offset < first_live:
            self._release(seq.block_table.pop(0), seq)
            seq.block_offset += 1

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks (finish, abort or preemption)."""
        for block in seq.block_table:
            self._release(block, seq)
        seq.block_table = []
        seq.block_offset = 0

    def _release(self, block: int, seq: Sequence) -> None:
        owner = self._owner.pop(block, None)
        if owner != seq.request_id:
            raise RuntimeError(f"block {block} freed by {seq.request_id} but owned by {owner}")
        self._free.append(block)
