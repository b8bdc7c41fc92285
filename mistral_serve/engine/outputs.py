"""Request outputs in vLLM's shape (``RequestOutput.outputs[0].token_ids`` / ``.text`` / ``.finish_reason``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Per-request timings in seconds and the compute time the engine attributed to it."""

    queue_time: float | None = None
    ttft: float | None = None
    e2e: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    compute_seconds: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """From the engine each output is a *delta*: the tokens and text new since the previous
    output of the same request. ``LLM.generate`` accumulates them into the final result."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (vLLM's name)
    # SamplingParams.prompt_logprobs: per prompt token ({token: logprob} with the top-k; None for
    # the first), on the output that carries the first generated token.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def merge(self, delta: RequestOutput) -> None:
        """Append a later delta of the same request (choices matched by ``index``, n > 1)."""
        if len(self.outputs) == 1 and len(delta.outputs) == 1 and self.outputs[0].index == delta.outputs[0].index:
            _append(self.outputs[0], delta.outputs[0])
        else:
            by_index = {c.index: c for c in self.outputs}
            for theirs in delta.outputs:
                if theirs.index in by_index:
                    _append(by_index[theirs.index], theirs)
                else:
                    by_index[theirs.index] = theirs
            self.outputs = sorted(by_index.values(), key=lambda c: c.index)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.finished = delta.finished
        self.metrics = delta.metrics or self.metrics
        self.num_cached_tokens = delta.num_cached_tokens


def _append(mine: CompletionOutput, theirs: CompletionOutput) -> None:
    """Fold a later delta of one choice into ``mine``."""
    mine.text += theirs.text
    mine.token_ids.extend(theirs.token_ids)
    if theirs.logprobs is not None:
        mine.logprobs = (mine.logprobs or []) + theirs.logprobs
    mine.finish_reason, mine.stop_reason = theirs.finish_reason, theirs.stop_reason
