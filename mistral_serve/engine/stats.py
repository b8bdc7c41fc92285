"""Engine-wide counters and gauges, read by the serving layer's metrics exporter."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class EngineStats:
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
    max_num_seqs: int = 0
    last_step_time: float | None = None  # time.monotonic() at the end of the latest step
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def snapshot(self) -> dict:
        """A plain, picklable copy for other threads and processes."""
        times = sorted(self.step_times)
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_blocks_used": self.kv_blocks_used,
            "kv_blocks_total": self.kv_blocks_total,
            "kv_usage": self.kv_usage,
            "kv_blocks_cached_free": self.kv_blocks_cached_free,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "num_preemptions": self.num_preemptions,
            "num_steps": self.num_steps,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "busy_seconds": self.busy_seconds,
            "max_num_seqs": self.max_num_seqs,
            "last_step_time": self.last_step_time,
            "step_time_p50": times[len(times) // 2] if times else None,
        }
