"""The synchronous engine: add requests, call ``step()``, get deltas. One thread drives it
(the offline ``LLM`` directly, the async engine from its loop thread)."""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

from mistral_serve.capacity import (
    CPU_DEFAULT_KV_BYTES,
    activation_reserve_bytes,
    cuda_kv_budget,
    kv_blocks_for_budget,
)
from mistral_serve.engine import validation
from mistral_serve.engine.args import EngineArgs
from mistral_serve.engine.block_manager import BlockManager
from mistral_serve.engine.model_runner import ModelRunner
from mistral_serve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from mistral_serve.engine.prompt_logprobs import append_prompt_logprobs
from mistral_serve.engine.sampler import sample
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.scheduler import Scheduler
from mistral_serve.engine.sequence import Sequence
from mistral_serve.engine.stats import EngineCounters
from mistral_serve.engine.structured_output import GrammarCompiler
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.loader import resolve_model_dir
from mistral_serve.tokenizer import load_tokenizer
from mistral_serve.tokenizer.detokenizer import IncrementalDetokenizer


class RequestError(ValueError):
    """A request the engine cannot serve (too long, bad ids); the message is client-facing.
    ``kind``: ``"context_length"`` when prompt + max_tokens exceed the model's context, else
    ``"invalid_request"`` (the replica maps it onto its error message without reading the text)."""

    def __init__(self, message: str, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keeps ``kind`` across pickling
        return type(self), (str(self), self.kind)


def validate_request(ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise RequestError (client-facing message) for a request no engine of this model can
    serve. Needs only facts fixed at start, so the async engine checks before queueing."""
    if not ids:
        raise RequestError(validation.EMPTY_PROMPT)
    if validation.bad_token_ids(ids, vocab_size):
        raise RequestError(validation.prompt_ids_message(vocab_size))
    if validation.bad_token_ids(params.stop_token_ids, vocab_size):
        raise RequestError(validation.stop_ids_message(vocab_size))
    if validation.exceeds_context(len(ids), params.max_tokens, max_model_len):
        raise RequestError(validation.context_length_message(max_model_len, len(ids), params.max_tokens or 0),
                           kind="context_length")


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_dir = resolve_model_dir(args.model)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.tokenizer.piece_table()  # the streaming detokenizer's table (~80 ms), built before any request
        device = args.torch_device()
        if device.type == "cpu":
            torch.set_num_threads(args.cpu_threads())
        self.dtype = args.torch_dtype(self.config.torch_dtype, device)
        self.max_model_len = min(args.max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.runner = ModelRunner(self.model_dir, self.config, self.dtype, device, self.max_model_len, args.block_size,
                                  args.quantization, args.attention_backend, args.enforce_eager, args.max_num_seqs)
        self.quantization = self.runner.quantization
        num_blocks = self._num_kv_blocks(device)
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, args.block_size, self.config.sliding_window,
                                          args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                                   args.enable_chunked_prefill)
        self.eos_token_ids = tuple(dict.fromkeys(self.config.eos_token_ids + self.tokenizer.eos_token_ids))
        # Compiled grammars for structured outputs; the async engine warms it off this thread.
        self.grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        # n > 1: the client's request id -> its n sequences (each also in ``requests`` under a
        # child id ``{request_id}#{i}``), until all n finished.
        self._groups: dict[str, list[Sequence]] = {}
        self._arrivals = itertools.count()
        self.stats = EngineCounters(kv_blocks_total=num_blocks, batch_capacity=args.max_num_seqs)

    def _num_kv_blocks(self, device: torch.device) -> int:
        dtype_bytes = torch.tensor([], dtype=self.dtype).element_size()
        if self.args.kv_cache_memory_bytes is not None:
            budget = self.args.kv_cache_memory_bytes
        elif device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            reserve = activation_reserve_bytes(self.config, self.args.max_num_batched_tokens,
                                               self.args.max_num_seqs, dtype_bytes)
            budget = cuda_kv_budget(total, free, self.args.gpu_memory_utilization, reserve)
        else:
            budget = CPU_DEFAULT_KV_BYTES
        # One block of the budget is the model runner's scratch block (padded decode rows write
        # there, model_runner.allocate_kv_cache), never handed out by the block manager.
        blocks = kv_blocks_for_budget(self.config, budget, self.args.block_size, dtype_bytes) - 1
        if blocks < 1:
            raise ValueError(f"KV budget of {budget} bytes holds no block of {self.args.block_size} tokens")
        return blocks

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> Sequence:
        """Queue a request; returns its sequence (of choice 0 when ``params.n > 1``).

        ``params.n > 1``: n sequences under this one request id, added together so that they
        are scheduled in the same step, where the prefix cache lets them share the prompt's
        full KV blocks (one prefill). Each step reports one ``RequestOutput`` per request, with
        a ``CompletionOutput`` (``index`` = choice) for each of its sequences that produced
        tokens; it is ``finished`` once all n are, and aborting the request aborts all n.
        """
        n = params.n
        child_ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        if request_id in self._groups or any(c in self.requests for c in child_ids):
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate_request(ids, params)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        seqs = []
        for i, child_id in enumerate(child_ids):
            # Choice i: its own seed (reproducible per choice), and prompt logprobs on choice 0
            # only, so the others may still share the prompt's cached blocks.
            p = params if n == 1 else dataclasses.replace(
                params, n=1, seed=child_seed(params.seed, i), prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            detok = IncrementalDetokenizer(self.tokenizer, ids, p.stop, p.include_stop_str_in_output,
                                           p.skip_special_tokens)
            seq = Sequence(child_id, ids, p, self.eos_token_ids, detok, priority, next(self._arrivals), cache_salt)
            seq.parent_id, seq.index = request_id, i
            if p.structured_output is not None:
                try:  # a cache hit (microseconds) when the async engine compiled it beforehand
                    seq.grammar = self.grammars.new_state(p.structured_output)
                except ValueError as exc:
                    raise RequestError(str(exc)) from None
            seqs.append(seq)
        if n > 1:
            self._groups[request_id] = seqs
        for seq in seqs:
            self.requests[seq.request_id] = seq
            self.scheduler.add(seq)
        return seqs[0]

    def validate_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError (client-facing message) if the request can never be served: the
        rules of ``validate_request`` below, and a KV pool large enough for it."""
        validate_request(ids, params, self.config.vocab_size, self.max_model_len)
        need = self.block_manager.max_blocks_per_seq(len(ids) + (params.max_tokens or 0))
        if need > self.block_manager.num_blocks:
            raise RequestError(f"the request needs {need} KV blocks but the pool holds {self.block_manager.num_blocks}")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request (all n sequences of it) and free its KV blocks now; returns its final
        (aborted) output."""
        group = self._groups.pop(request_id, None)
        if group is None:
            seq = self.requests.get(request_id)
            if seq is None or seq.parent_id != request_id:
                return None
            group = [seq]
        now = time.monotonic()
        live = [s for s in group if s.finish_reason is None]
        if not live:
            return None
        for seq in live:
            self.requests.pop(seq.request_id, None)
            self.scheduler.remove(seq)
            seq.finish_reason = "abort"
            seq.timings.finished = now
        self._refresh_gauges()
        outputs = [self._make_output(seq, [], [], group=group) for seq in live]
        return _merge_by_request(outputs)[0]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over all scheduled sequences, sample, and report deltas."""
        t0 = time.monotonic()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            self._refresh_gauges()
            return []
        self.runner.zero_new_blocks(self.block_manager.num_touched)
        inputs = self.runner.prepare(plan.scheduled)
        logits = self.runner.execute(inputs)
        sampling_seqs = inputs.sample_seqs
        if inputs.prompt_spans:  # prompt logprob rows follow the sampling rows
            append_prompt_logprobs(logits[len(sampling_seqs):], inputs.prompt_spans)
            logits = logits[: len(sampling_seqs)]
        result = sample(logits, sampling_seqs)
        has_groups = bool(self._groups)
        now = time.monotonic()

        for seq, n in plan.scheduled:
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = t0
            if seq.num_computed_tokens < seq.prompt_len:
                self.stats.prompt_tokens += min(n, seq.prompt_len - seq.num_computed_tokens)
            seq.num_computed_tokens += n
        outputs = []
        for seq, token, lp in zip(sampling_seqs, result.token_ids, result.logprobs):
            outputs.append(self._append_token(seq, token, lp, now))
        if has_groups:  # one output per request: the n sequences of an n > 1 request merged
            outputs = _merge_by_request(outputs)
        for seq, _ in plan.scheduled:
            if not seq.is_finished:
                self.block_manager.release_out_of_window(seq, seq.num_computed_tokens)

        elapsed = time.monotonic() - t0
        total = plan.num_tokens
        for seq, n in plan.scheduled:  # share the step's wall time by tokens processed
            seq.timings.compute_seconds += elapsed * n / total
        self.stats.num_steps += 1
        self.stats.busy_seconds += elapsed
        self.stats.step_times.append(elapsed)
        self.stats.last_step_time = time.monotonic()
        self._refresh_gauges()
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprobs: dict[int, float] | None, now: float) -> RequestOutput:
        seq.token_ids.append(token)
        self.stats.generation_tokens += 1
        t = seq.timings
        if t.first_token is None:
            t.first_token = now
        else:
            t.inter_token.append(now - t.last_token)
        t.last_token = now
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        stop_string = seq.detokenizer.add_token(token) if seq.detokenizer else None
        params = seq.params
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
        elif token in seq.stop_ids and seq.num_output_tokens > params.min_tokens - 1:
            seq.finish_reason = "stop"
            seq.stop_reason = None if token in seq.eos_token_ids else token
        elif seq.grammar is not None and seq.grammar.done:  # the constrained output is complete
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            t.finished = now
            self.requests.pop(seq.request_id, None)
            self.scheduler.remove(seq)
        # The prompt's logprobs are complete once its first token is sampled: sent with it.
        prompt_lps = seq.prompt_logprobs if seq.prompt_logprobs is not None and seq.num_output_tokens == 1 else None
        group = self._groups.get(seq.parent_id)
        out = self._make_output(seq, [token], [logprobs] if logprobs is not None else None, group, prompt_lps)
        if group is not None and out.finished:
            del self._groups[seq.parent_id]
        return out

    def _make_output(self, seq: Sequence, new_ids: list[int], new_logprobs: list | None,
                     group: list[Sequence] | None = None,
                     prompt_logprobs: list[dict[int, float] | None] | None = None) -> RequestOutput:
        """The delta of one sequence, under its request's id; ``group``: all n sequences of an
        n > 1 request (finished once all are, with their metrics summed)."""
        seq_finished = seq.finish_reason is not None
        finished = seq_finished if group is None else all(s.finish_reason is not None for s in group)
        text = seq.detokenizer.take_delta(seq_finished) if seq.detokenizer else ""
        metrics = _request_metrics(group or [seq]) if finished else None
        completion = CompletionOutput(seq.index, text, new_ids, seq.finish_reason, seq.stop_reason, new_logprobs)
        return RequestOutput(seq.parent_id, seq.prompt_token_ids, [completion], finished, metrics, seq.num_cached_tokens,
                             prompt_logprobs=prompt_logprobs)

    def _refresh_gauges(self) -> None:
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_blocks_used = self.block_manager.num_used_blocks
        s.num_preemptions = self.scheduler.num_preemptions
        s.kv_blocks_cached_free = self.block_manager.num_cached_free_blocks
        s.prefix_cache_queries = self.scheduler.prefix_cache_queries
        s.prefix_cache_hits = self.scheduler.prefix_cache_hits


def child_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of an n > 1 request: the request's own seed for choice 0 (so
    it equals the n = 1 answer), others spread by a 64-bit odd constant (the golden ratio's), so
    that choice i of seed s never replays choice 0 of a nearby seed."""
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % 2**63


def _request_metrics(seqs: list[Sequence]) -> RequestMetrics:
    """A finished request's metrics; for n > 1, over its n sequences: the first start and first
    token, the last finish, tokens, compute and preemptions summed (the prompt counted once)."""
    ts = [s.timings for s in seqs]

    def first(values):
        known = [v for v in values if v is not None]
        return min(known) if known else None

    e2e = [t.e2e for t in ts if t.e2e is not None]
    return RequestMetrics(
        queue_time=first(t.queue_time for t in ts), ttft=first(t.ttft for t in ts), e2e=max(e2e) if e2e else None,
        inter_token_latencies=[x for t in ts for x in t.inter_token],
        compute_seconds=sum(t.compute_seconds for t in ts), num_prompt_tokens=seqs[0].prompt_len,
        num_generation_tokens=sum(s.num_output_tokens for s in seqs),
        num_preemptions=sum(s.num_preemptions for s in seqs),
    )


def _merge_by_request(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per request id, in first-seen order (the n sequences of a request merged)."""
    merged: dict[str, RequestOutput] = {}
    for out in outputs:
        prev = merged.get(out.request_id)
        if prev is None:
            merged[out.request_id] = out
        else:
            prev.merge(out)
    return list(merged.values())
