"""Cost accounting: every second of a replica's accelerator is billed either to the requests
that were computing in it or to idle time.

- A request's cost = the compute-seconds the engine attributed to it (each step's wall time
  shared among the sequences in it by tokens processed) × the replica's price per second.
  Summed over requests, that is the engine's busy time × price.
- Idle seconds = wall time the replica was up minus engine busy time; idle cost likewise.
  So request cost + idle cost = replica-hours × price, exactly, and no GPU-second is lost.
- Compute spent on requests that were aborted (client disconnects) is not billed to a tenant;
  it shows as busy seconds without a matching request cost.

Rolling $/1M output tokens and break-even utilization against a hosted API's reference
price are derived in PromQL from these counters (k8s/monitoring rules); ``break_even`` below
is the same formula, used in docs and tests.
"""

from __future__ import annotations

import time


def usd_per_second(gpu_price_usd_per_hour: float) -> float:
    return gpu_price_usd_per_hour / 3600.0


def request_cost_usd(compute_seconds: float, gpu_price_usd_per_hour: float) -> float:
    return max(0.0, compute_seconds) * usd_per_second(gpu_price_usd_per_hour)


def usd_per_million_tokens(cost_usd: float, tokens: int) -> float | None:
    return None if tokens <= 0 else cost_usd / tokens * 1e6


def break_even_utilization(gpu_price_usd_per_hour: float, reference_usd_per_1m: float,
                           full_load_output_tokens_per_s: float) -> float | None:
    """Fraction of full-load throughput at which self-hosting costs what the hosted API would:
    (GPU $/h) / (reference $/1M × output tokens per hour at full load / 1M)."""
    per_hour_at_reference = reference_usd_per_1m * full_load_output_tokens_per_s * 3600 / 1e6
    return None if per_hour_at_reference <= 0 else gpu_price_usd_per_hour / per_hour_at_reference


class BusyIdleMeter:
    """Turns the engine's cumulative busy seconds into busy/idle counter increments.

    Idle time is wall time minus busy time, cumulatively. It is only released while the
    engine has no work: during a long step busy time lags (a step is counted when it ends),
    and a counter cannot be decremented, so wall - busy is carried until the engine is empty
    again. Over a replica's life busy + idle = wall time exactly."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._start: float | None = None
        self._busy_emitted = 0.0
        self._idle_emitted = 0.0
        self._busy_base = 0.0

    def sample(self, busy_seconds_total: float, has_work: bool) -> tuple[float, float]:
        """(busy increment, idle increment) since the previous sample."""
        now = self._clock()
        if self._start is None:
            self._start, self._busy_base = now, busy_seconds_total
            return 0.0, 0.0
        busy_total = max(0.0, busy_seconds_total - self._busy_base)
        busy = max(0.0, busy_total - self._busy_emitted)
        self._busy_emitted += busy
        idle = 0.0
        if not has_work:
            idle = max(0.0, (now - self._start) - self._busy_emitted - self._idle_emitted)
            self._idle_emitted += idle
        return busy, idle
