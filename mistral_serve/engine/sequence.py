"""A request as the engine tracks it: tokens, KV progress, block table, timings, cost."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.structured_output import GrammarState
from mistral_serve.tokenizer.detokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestTimings:
    """Wall-clock marks (time.monotonic) and the compute-seconds attributed to the request."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    inter_token: list[float] = field(default_factory=list)
    compute_seconds: float = 0.0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


class Sequence:
    """One request. ``token_ids`` holds prompt + output; KV exists for the first
    ``num_computed_tokens`` of them. After a preemption (recompute) ``num_computed_tokens``
    drops to zero and the whole ``token_ids`` is prefilled again; nothing is re-sampled."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        detokenizer: IncrementalDetokenizer | None,
        priority: int = 0,
        arrival_order: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        # The prompt once, shared by every output of the request (never copied per token).
        self.prompt_token_ids: list[int] = self.token_ids[: self.prompt_len]
        self.params = params
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.stop_ids = frozenset(params.stop_token_ids) | frozenset(self.eos_token_ids)
        self.detokenizer = detokenizer
        self.priority = priority
        self.arrival_order = arrival_order
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        # Live physical blocks; block_table[0] holds logical block ``block_offset`` (earlier
        # blocks slid out of the attention window and went back to the pool).
        self.block_table: list[int] = []
        self.block_offset = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.timings = RequestTimings()
        self.logprobs: list[dict[int, float]] = []
        # n > 1 (llm_engine.py): the client's request id, shared by its n sequences, and this
        # sequence's choice index; for n == 1, request_id and 0.
        self.parent_id = request_id
        self.index = 0
        # prompt_logprobs: one entry per prompt token with an entry so far (the first has none);
        # model_runner.prepare asks for the rows of the positions still missing.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self._penalty_state: PenaltyState | None = None
        # Constrained decoding: this sequence's position in its grammar (engine/structured_output.py).
        self.grammar: GrammarState | None = None
        # Prefix caching (block_manager.py): the chained hashes of this sequence's full blocks
        # computed so far, how many of its blocks are registered, the salt that separates
        # chains (e.g. per tenant), and the prompt tokens served from the cache at admission.
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []
        self.num_hashed_blocks = 0
        self.num_cached_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def cacheable(self) -> bool:
        """Whether the prefix cache may serve and register this sequence's blocks: not when its
        prompt logprobs need every prompt position computed."""
        return not self.params.needs_all_prompt_positions

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def penalty_state(self, vocab_size: int) -> PenaltyState:
        """The token statistics the sampler's penalties read, brought up to date with
        ``token_ids`` (created on first use, only for requests that use penalties)."""
        st = self._penalty_state
        if st is None or st.vocab_size != vocab_size or st.num_counted > len(self.token_ids):
            st = self._penalty_state = PenaltyState(self.params, vocab_size)
        st.update(self.token_ids, self.prompt_len)
        return st

    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then first come first served."""
        return (self.priority, self.arrival_order)

    def __repr__(self) -> str:
        return f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, {self.status.value})"


class PenaltyState:
    """Dense per-request token statistics for penalties, kept incrementally.

    ``seen[v]``: token ``v`` occurs in prompt + output (repetition penalty);
    ``output_counts[v]``: occurrences of ``v`` in the output (presence/frequency penalties).
    Each appended token costs one NumPy scalar update (~0.1 us) the next time the sampler
    asks (``update`` folds in ``token_ids[num_counted:]``, normally one token), so nothing
    is ever rebuilt from the whole context. NumPy arrays on the host: the sampler stacks the
    penalised rows once per step (one device copy where the logits are not on the CPU).
    Only the arrays a request's parameters need are allocated.
    """

    __slots__ = ("vocab_size", "num_counted", "seen", "output_counts")

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.num_counted = 0
        self.seen = np.zeros(vocab_size, dtype=bool) if params.repetition_penalty != 1.0 else None
        wants_counts = params.presence_penalty != 0 or params.frequency_penalty != 0
        self.output_counts = np.zeros(vocab_size, dtype=np.float32) if wants_counts else None

    def update(self, token_ids: list[int], prompt_len: int) -> None:
        start = self.num_counted
        if start == len(token_ids):
            return
        new = token_ids[start:]
        if len(new) > 8:  # first use: one vectorised pass over the context so far
            ids = np.asarray(new, dtype=np.int64)
            if self.seen is not None:
                self.seen[ids] = True
            if self.output_counts is not None:
                out = ids[max(prompt_len - start, 0):]
                self.output_counts += np.bincount(out, minlength=self.vocab_size).astype(np.float32)
        else:
            seen, counts = self.seen, self.output_counts
            for pos, t in enumerate(new, start):
                if seen is not None:
                    seen[t] = True
                if counts is not None and pos >= prompt_len:
                    counts[t] += 1.0
        self.num_counted = len(token_ids)
