"""Fixed-size KV blocks: a pool shared by reference count, each sequence's block table, and
the prefix cache.

A sequence's KV for positions [0, n) lives in blocks of ``block_size`` slots. With a sliding
window W, a query at position p reads keys (p - W, p] only, so once a sequence's next query is
at position p, every block wholly before p - W + 1 is dead for it and is released. Between
steps a windowed sequence therefore holds at most ceil(W / block_size) + 1 blocks, however
long it grows (a prefill chunk of C tokens needs C more slots while it is computed).

Prefix caching (``enable_prefix_caching``, vLLM's name and default). Every *full* block a
sequence computes is registered under its chained content hash (``block_hash.py``). A new
request adopts the longest run of cached blocks that covers its prompt from the start
(``find_cached_prefix``), always leaving at least its last prompt token to compute so that it
samples; with a window W it needs only the blocks covering the last W tokens before its new
part. Rules that keep sharing safe:

* only full blocks are ever registered or shared, and a sequence writes only at positions
  >= its ``num_computed_tokens``, which are past every block it adopted: no write into a
  shared block;
* a block's reference count is the number of block tables holding it; at zero a block whose
  content is complete goes to an LRU list (still findable, counted as free) and is evicted
  only when the pool has no never-cached block left;
* blocks are registered when they are allocated for the step that fills them, so requests
  admitted in the same step share them (every layer writes the step's new KV before it
  attends). A sequence preempted before that step ran releases them *unregistered*
  (``_release``'s ``complete``), so nothing ever finds a block whose KV was never written.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from mistral_serve.engine.block_hash import extend_block_hashes, routing_key
from mistral_serve.engine.sequence import Sequence

# Replicas advertise every ROUTING_STRIDE-th block of their cached prefixes (64 tokens at
# block size 16), the newest ROUTING_KEYS_LIMIT of them: enough for the request router to
# find the replica that holds a conversation, at a few tens of KB per stats report.
ROUTING_STRIDE = 4
ROUTING_KEYS_LIMIT = 4096


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """Cached blocks a waiting sequence can adopt: its KV then starts at ``num_tokens``.
    ``blocks`` hold logical blocks [first_block, num_tokens / block_size); ``num_unreferenced``
    of them sit in the LRU list, so adopting them takes them out of the free count."""

    num_tokens: int
    first_block: int
    blocks: tuple[int, ...]
    num_unreferenced: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, sliding_window: int | None,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool must hold at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        # Blocks holding nothing findable. A stack: the most recently freed block is reused
        # first, which keeps the touched part of the pool (and so the process RSS on CPU) as
        # small as the peak number of blocks in use plus the cache.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Unreferenced blocks still in the prefix cache, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        # Routing keys of cached blocks at logical indices ROUTING_STRIDE - 1, 2 * ROUTING_STRIDE - 1, ...,
        # in registration order (``routing_keys``).
        self._routing_keys: dict[int, int] = {}  # block -> key
        # Blocks [0, num_touched) have been handed out at least once; with the stack above they
        # always form a prefix, which lets the KV cache be initialised lazily, block by block.
        self.num_touched = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-cached ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        """Unreferenced blocks kept for prefix reuse (reclaimable, so counted as free)."""
        return len(self._evictable)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def max_blocks_per_seq(self, num_tokens: int) -> int:
        """Blocks a sequence of ``num_tokens`` needs at its peak (one token per step)."""
        if self.sliding_window is None:
            return cdiv(num_tokens, self.block_size)
        return min(cdiv(num_tokens, self.block_size), cdiv(self.sliding_window, self.block_size) + 1)

    def _first_live_block(self, next_query_pos: int) -> int:
        if self.sliding_window is None:
            return 0
        return max(0, next_query_pos - self.sliding_window + 1) // self.block_size

    # ---- prefix cache -------------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> PrefixHit | None:
        """The longest cached prefix a sequence with no KV yet can adopt, or None.

        Without a window that is the longest run of cached blocks from block 0. With a window
        W a prefix of k blocks is usable when the blocks its next query can see,
        [first_live(k * block_size), k), are all cached: earlier ones may be long evicted.
        """
        if not self.enable_prefix_caching or seq.num_computed_tokens or seq.block_table or not seq.cacheable:
            return None
        bs = self.block_size
        full = (seq.num_tokens - 1) // bs  # the last prompt token is always computed
        if full == 0:
            return None
        hashes = extend_block_hashes(seq.block_hashes, seq.token_ids, bs, full, seq.cache_salt)
        found = [self._block_of.get(h) for h in hashes[:full]]
        best, last_miss = 0, -1
        for k in range(1, full + 1):
            if found[k - 1] is None:
                last_miss = k - 1
                if self.sliding_window is None:
                    break
            if last_miss < self._first_live_block(k * bs):
                best = k
        if best == 0:
            return None
        first = self._first_live_block(best * bs)
        blocks = tuple(found[first:best])
        return PrefixHit(best * bs, first, blocks, sum(1 for b in blocks if self._refs[b] == 0))

    def routing_keys(self) -> list[int]:
        """Routing keys (``block_hash.routing_key``) of the cached blocks at logical indices
        ``ROUTING_STRIDE - 1, 2 * ROUTING_STRIDE - 1, ...``, newest last, at most
        ``ROUTING_KEYS_LIMIT``: what a replica advertises so that the request router can find
        the replica holding a prefix. Called from the replica's event loop while the engine
        thread steps: ``list()`` of a dict of ints runs in C under the GIL, so it sees a
        consistent snapshot."""
        keys = list(self._routing_keys.values())
        return keys[-ROUTING_KEYS_LIMIT:]

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (vLLM's ``reset_prefix_cache``): benchmarks
        start each pass cold. Blocks held by running sequences stay registered."""
        while self._evictable:
            block, _ = self._evictable.popitem()
            self._forget(block)
            self._free.append(block)

    def _register(self, seq: Sequence, end: int) -> None:
        """Make the blocks ``seq`` fills up to position ``end`` findable."""
        full = end // self.block_size
        if not self.enable_prefix_caching or not seq.cacheable or full <= seq.num_hashed_blocks:
            return
        hashes = extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, full, seq.cache_salt)
        for i in range(seq.num_hashed_blocks, full):
            block, h = seq.block_table[i - seq.block_offset], hashes[i]
            if h not in self._block_of:  # else another block already holds this content
                self._block_of[h] = block
                self._hash_of[block] = h
                if i % ROUTING_STRIDE == ROUTING_STRIDE - 1:
                    self._routing_keys[block] = routing_key(h)
        seq.num_hashed_blocks = full

    # ---- allocation -----------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> int:
        """New blocks ``seq`` needs to compute ``num_new_tokens`` more tokens (after adopting
        ``hit``, if given)."""
        if hit is None:
            computed, have = seq.num_computed_tokens, seq.block_offset + len(seq.block_table)
        else:
            computed, have = hit.num_tokens, hit.first_block + len(hit.blocks)
        end = computed + num_new_tokens
        return max(0, cdiv(end, self.block_size) - max(have, self._first_live_block(computed)))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        unreferenced = hit.num_unreferenced if hit is not None else 0
        return self.blocks_needed(seq, num_new_tokens, hit) + unreferenced <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> None:
        """Give ``seq`` the blocks to hold KV up to ``num_computed + num_new_tokens``; with a
        ``hit`` the sequence first adopts those cached blocks and its KV starts after them."""
        if hit is not None:
            for block in hit.blocks:
                if self._refs[block] == 0:
                    del self._evictable[block]
                self._refs[block] += 1
            seq.block_table = list(hit.blocks)
            seq.block_offset = hit.first_block
            seq.num_computed_tokens = hit.num_tokens
            seq.num_hashed_blocks = hit.num_tokens // self.block_size
        self.release_out_of_window(seq, seq.num_computed_tokens)
        if not seq.block_table:
            seq.block_offset = self._first_live_block(seq.num_computed_tokens)
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"allocate() without can_allocate(): {seq.request_id} needs {need}")
        for _ in range(need):
            block = self._take_free_block()
            self._refs[block] = 1
            seq.block_table.append(block)
        self._register(seq, seq.num_computed_tokens + num_new_tokens)

    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.pop()
            self.num_touched = max(self.num_touched, block + 1)
            return block
        block, _ = self._evictable.popitem(last=False)  # evict the least recently released
        self._forget(block)
        return block

    # ---- release ----------------------------------------------------------------------------------

    def release_out_of_window(self, seq: Sequence, next_query_pos: int) -> None:
        """Release blocks no future query of ``seq`` can attend to."""
        first_live = self._first_live_block(next_query_pos)
        while seq.block_table and seq.block_offset < first_live:
            self._release(seq.block_table.pop(0), complete=True)
            seq.block_offset += 1

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks (finish, abort or preemption). Last block first, so
        the LRU list evicts a prefix's tail before its head (a head alone is still useful)."""
        computed_blocks = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_table) - 1, -1, -1):
            self._release(seq.block_table[i], complete=seq.block_offset + i < computed_blocks)
        seq.block_table = []
        seq.block_offset = 0
        seq.num_hashed_blocks = 0  # a recompute registers what it does not adopt again

    def _release(self, block: int, complete: bool) -> None:
        """Drop one reference. ``complete``: the block's KV has been computed (False for a block
        allocated in this schedule for a sequence preempted before the step ran)."""
        refs = self._refs[block] - 1
        if refs < 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self._refs[block] = refs
        if refs:
            return
        if complete and block in self._hash_of:
            self._evictable[block] = None
        else:
            self._forget(block)
            self._free.append(block)

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
            self._routing_keys.pop(block, None)
