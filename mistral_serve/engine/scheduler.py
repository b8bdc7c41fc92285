"""Iteration-level scheduling: which sequences run this step, and with how many tokens.

Every step has a token budget (``max_num_batched_tokens``) shared by decode tokens (one per
running sequence) and prefill chunks, and a cap on running sequences (``max_num_seqs``).
Running sequences go first, in admission order, so decodes are never starved by new
prompts; waiting requests are admitted in (priority, arrival) order with their prompt cut
to what is left of the budget (chunked prefill). When the KV pool cannot hold the next
token of a running sequence, the least important running sequence is preempted: its blocks
are freed and it goes back to the waiting queue to be recomputed later (prompt + output so
far), so nothing crashes and nothing is dropped.

With prefix caching a waiting request first adopts its longest cached prefix
(``BlockManager.find_cached_prefix``), so its prompt costs the budget only for the tokens it
really computes, and it is admitted only if the pool can hold what it adopts and what it adds.
A preempted request finds its own blocks again the same way if they were not evicted.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mistral_serve.engine.block_manager import BlockManager
from mistral_serve.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []  # kept sorted by Sequence.sort_key
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0
        # vLLM's prefix-cache counters, in tokens: looked up at admission, and found cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its KV."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        # id(seq) -> tokens for running sequences planned so far; they are always a prefix of
        # self.running (victims leave both), so len(planned) indexes the next one to plan.
        planned: dict[int, int] = {}
        while len(planned) < len(self.running) and budget > 0:
            seq = self.running[len(planned)]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate(seq, n):
                victim = max(self.running, key=Sequence.sort_key)
                budget += planned.pop(id(victim), 0)  # a victim already planned gives its tokens back
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # seq itself was the least important and went back to waiting
            bm.allocate(seq, n)
            planned[id(seq)] = n
            budget -= n
        out.scheduled = [(s, planned[id(s)]) for s in self.running if id(s) in planned]
        if out.preempted:
            return out  # the pool is full: admitting more would only thrash
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = bm.find_cached_prefix(seq)
            remaining = seq.num_tokens - (hit.num_tokens if hit else seq.num_computed_tokens)
            n = min(remaining, budget)
            if n < remaining and not self.enable_chunked_prefill:
                break
            if not bm.can_allocate(seq, n, hit):
                break
            self.waiting.pop(0)
            bm.allocate(seq, n, hit)
            if bm.enable_prefix_caching and seq.cacheable:
                cached = hit.num_tokens if hit else 0
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += cached
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
