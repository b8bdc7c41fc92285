"""Engine-wide counters and gauges, and the snapshot of them the serving layer reads."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One reading of the engine (``AsyncLLM.stats()``): immutable and picklable, so another
    thread or process can keep it, and typed, so every consumer (routing and autoscaling stats,
    Prometheus gauges, ``LLMReplica.stats``) reads the same name for the same figure."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_usage: float  # kv_blocks_used / kv_blocks_total (0..1)
    kv_blocks_cached_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    prompt_tokens: int
    generation_tokens: int
    busy_seconds: float
    batch_capacity: int  # the engine's max_num_seqs
    last_step_time: float | None
    step_time_p50: float | None  # over the last 256 steps; None before the first
    step_time_p90: float | None
    alive: bool  # the engine loop runs (it has not raised)
    seconds_since_progress: float  # since the loop last finished a step or found nothing to do


@dataclass
class EngineCounters:
    """The live figures, updated by the engine thread as it steps; read through ``snapshot``."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_blocks_cached_free: int = 0  # unreferenced prefix-cache blocks (reclaimable: not in kv_blocks_used)
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache at admission
    prefix_cache_hits: int = 0  # of those, tokens found cached
    num_preemptions: int = 0
    num_steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    busy_seconds: float = 0.0
    batch_capacity: int = 0
    last_step_time: float | None = None  # time.monotonic() at the end of the latest step
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def snapshot(self, alive: bool, seconds_since_progress: float) -> EngineStats:
        """A copy for other threads; ``alive`` and ``seconds_since_progress`` come from the
        thread that runs the engine loop, which only its owner (``AsyncLLM``) knows."""
        times = sorted(self.step_times)
        return EngineStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_blocks_used=self.kv_blocks_used,
            kv_blocks_total=self.kv_blocks_total,
            kv_usage=self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0,
            kv_blocks_cached_free=self.kv_blocks_cached_free,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            busy_seconds=self.busy_seconds,
            batch_capacity=self.batch_capacity,
            last_step_time=self.last_step_time,
            step_time_p50=_quantile(times, 0.5),
            step_time_p90=_quantile(times, 0.9),
            alive=alive,
            seconds_since_progress=seconds_since_progress,
        )


def _quantile(ascending: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted values (nearest rank, no interpolation); None when empty."""
    return ascending[int(len(ascending) * q)] if ascending else None
