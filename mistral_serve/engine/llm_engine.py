"""The synchronous engine: add requests, call ``step()``, get deltas. One thread drives it
(the offline ``LLM`` directly, the async engine from its loop thread)."""

from __future__ import annotations

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
from mistral_serve.engine.sampler import sample
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.scheduler import Scheduler
from mistral_serve.engine.sequence import Sequence
from mistral_serve.engine.stats import EngineStats
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


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_dir = resolve_model_dir(args.model)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        device = args.torch_device()
        if device.type == "cpu":
            torch.set_num_threads(args.cpu_threads())
        self.dtype = args.torch_dtype(self.config.torch_dtype, device)
        self.max_model_len = min(args.max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.runner = ModelRunner(self.model_dir, self.config, self.dtype, device, self.max_model_len, args.block_size)
        num_blocks = self._num_kv_blocks(device)
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, args.block_size, self.config.sliding_window)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                                   args.enable_chunked_prefill)
        self.eos_token_ids = tuple(dict.fromkeys(self.config.eos_token_ids + self.tokenizer.eos_token_ids))
        self.requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.stats = EngineStats(kv_blocks_total=num_blocks, max_num_seqs=args.max_num_seqs)

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
        blocks = kv_blocks_for_budget(self.config, budget, self.args.block_size, dtype_bytes)
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
    ) -> Sequence:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate_request(ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.include_stop_str_in_output,
                                       params.skip_special_tokens)
        seq = Sequence(request_id, ids, params, self.eos_token_ids, detok, priority, next(self._arrivals))
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def validate_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError (client-facing message) if the request can never be served.

        Reads only immutable engine facts, so the async engine calls it from the event loop.
        """
        if not ids:
            raise RequestError(validation.EMPTY_PROMPT)
        vocab = self.config.vocab_size
        if validation.bad_token_ids(ids, vocab):
            raise RequestError(validation.prompt_ids_message(vocab))
        if validation.bad_token_ids(params.stop_token_ids, vocab):
            raise RequestError(validation.stop_ids_message(vocab))
        total = len(ids) + (params.max_tokens or 0)
        if validation.exceeds_context(len(ids), params.max_tokens, self.max_model_len):
            raise RequestError(validation.context_length_message(self.max_model_len, len(ids), params.max_tokens or 0),
                               kind="context_length")
        need = self.block_manager.max_blocks_per_seq(total)
        if need > self.block_manager.num_blocks:
            raise RequestError(f"the request needs {need} KV blocks but the pool holds {self.block_manager.num_blocks}")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its KV blocks now; returns its final (aborted) output."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        seq.finish_reason = "abort"
        seq.timings.finished = time.monotonic()
        self._refresh_gauges()
        return self._make_output(seq, [], [])

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
        result = sample(logits, sampling_seqs)
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
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
        elif token in seq.stop_ids and seq.num_output_tokens > params.min_tokens - 1:
            seq.finish_reason = "stop"
            seq.stop_reason = None if token in seq.eos_token_ids else token
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            t.finished = now
            self.requests.pop(seq.request_id, None)
            self.scheduler.remove(seq)
        return self._make_output(seq, [token], [logprobs] if logprobs is not None else None)

    def _make_output(self, seq: Sequence, new_ids: list[int], new_logprobs: list | None) -> RequestOutput:
        finished = seq.finish_reason is not None
        text = seq.detokenizer.take_delta(finished) if seq.detokenizer else ""
        metrics = None
        if finished:
            t = seq.timings
            metrics = RequestMetrics(
                queue_time=t.queue_time, ttft=t.ttft, e2e=t.e2e, inter_token_latencies=list(t.inter_token),
                compute_seconds=t.compute_seconds, num_prompt_tokens=seq.prompt_len,
                num_generation_tokens=seq.num_output_tokens, num_preemptions=seq.num_preemptions,
            )
        completion = CompletionOutput(0, text, new_ids, seq.finish_reason, seq.stop_reason, new_logprobs)
        prompt_ids = seq.token_ids[: seq.prompt_len]
        return RequestOutput(seq.request_id, prompt_ids, [completion], finished, metrics)

    def _refresh_gauges(self) -> None:
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_blocks_used = self.block_manager.num_used_blocks
        s.num_preemptions = self.scheduler.num_preemptions
