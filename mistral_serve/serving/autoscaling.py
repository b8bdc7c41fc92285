"""Queue-depth autoscaling of the LLMReplica deployment (Ray Serve 2.60 custom policy).

Ray Serve's default policy scales on ongoing requests per replica against one fixed
``target_ongoing_requests``. For an LLM engine the unit of capacity is the running batch
(``max_num_seqs`` sequences, fewer when the KV cache is full), and how long a request stays
depends on its output length. :class:`QueueDepthPolicy` therefore scales on what the engines
report through ``LLMReplica.record_autoscaling_stats`` (replica.py):

    load(replica) = (num_waiting + num_running) / effective_capacity        (1.0 = batch full)
    effective_capacity = batch_capacity (max_num_seqs), or num_running while the
                         KV cache is above ``kv_full_threshold`` (then the KV pool,
                         not the batch slots, bounds the batch)
    demand = sum over replicas of load + queued_at_handles / batch_capacity
    scale up    to ceil(demand / target_utilization)       when that is above the target
    scale down  to ceil(demand / downscale_utilization)    when that is below the target
                (hysteresis: downscale_utilization < target_utilization, so a replica
                 removed does not push the others straight back over the target),
                but never while replicas of the target are still starting, for up to
                ``hold_while_starting_s``: the demand measured meanwhile is what the running
                replicas admitted, which the Routers' admission caps under overload, so it
                reads low exactly when the new replicas are needed (measured: a scale-up
                from 1 to 3 was cut back to 2 after 25 s, its replica killed while starting)

Each value is the replica's mean over ``look_back_period_s`` (Ray aggregates the samples
the replicas record every ``0.2 * look_back_period_s`` and push every
``metrics_interval_s``). ``queued_at_handles`` is Serve's own count of requests the
Routers have sent but no replica has accepted yet (all replicas at
``max_ongoing_requests``): demand the engines cannot see.

Ray wraps the policy (``ray/serve/autoscaling_policy.py``: ``_apply_autoscaling_config``)
with the ``upscale_delay_s`` / ``downscale_delay_s`` / ``downscale_to_zero_delay_s`` timers,
the up/down scaling factors and the min/max bounds, and with its cold-start path: at zero
running replicas a request queued at a handle scales to one replica at once, without the
upscale delay. The policy itself never returns more than ``capacity_adjusted_max_replicas``
is worth: Ray clamps it.

``QueueDepthAutoscaling`` is the typed ``replicas.autoscaling`` block of the app args
(config.py); :meth:`QueueDepthAutoscaling.ray_config` turns it into the deployment's
``autoscaling_config``. Importing this module does not import Ray.

The controller cloudpickles the policy class by value (``AutoscalingPolicy.serialize_policy``
registers this module for pickling by value): keep :class:`QueueDepthPolicy` free of
references to anything in this module but plain helpers and the standard library.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

POLICY_IMPORT_PATH = "mistral_serve.serving.autoscaling:QueueDepthPolicy"


class QueueDepthPolicy:
    """Class-based Ray Serve autoscaling policy (instantiated once by the controller with
    ``policy_kwargs``; called with an ``AutoscalingContext`` every control-loop tick)."""

    def __init__(
        self,
        batch_capacity: int,
        target_utilization: float = 1.0,
        downscale_utilization: float | None = None,
        kv_full_threshold: float = 0.95,
        count_handle_queue: bool = True,
        hold_while_starting_s: float = 300.0,
    ) -> None:
        if batch_capacity < 1:
            raise ValueError(f"batch_capacity must be >= 1, got {batch_capacity}")
        if target_utilization <= 0:
            raise ValueError(f"target_utilization must be > 0, got {target_utilization}")
        down = 0.7 * target_utilization if downscale_utilization is None else downscale_utilization
        if not 0 < down <= target_utilization:
            raise ValueError(f"downscale_utilization must be in (0, target_utilization], got {down}")
        self.batch_capacity = int(batch_capacity)
        self.target = float(target_utilization)
        self.down = float(down)
        self.kv_full = float(kv_full_threshold)
        self.count_handle_queue = bool(count_handle_queue)
        self.hold_while_starting_s = float(hold_while_starting_s)

    # The decision, separated from Ray's context object so that it is unit-testable.
    def decide(self, target: int, per_replica: dict[str, dict[Any, float]], queued_at_handles: float,
               ongoing_at_handles: float, hold_target: bool = False) -> tuple[int, dict[str, float]]:
        """(replicas wanted before Ray's delays/bounds, what it was computed from). ``target``
        is the controller's current target number of replicas; ``hold_target``: some of them
        are still starting, so the decision does not go below it."""
        depth = per_replica.get("queue_depth_per_capacity") or {}
        reported = list(depth)
        if not reported:
            # No replica has reported yet (just started, or zero replicas): fall back to
            # Serve's ongoing-request count at the handles, in units of one batch.
            demand = ongoing_at_handles / self.batch_capacity
            source = 0.0
        else:
            demand = 0.0
            for rid in reported:
                cap = per_replica.get("batch_capacity", {}).get(rid) or self.batch_capacity
                running = per_replica.get("num_running", {}).get(rid, 0.0)
                waiting = per_replica.get("num_waiting", {}).get(rid, 0.0)
                kv = per_replica.get("kv_usage", {}).get(rid, 0.0)
                if kv >= self.kv_full and waiting > 0 and 0 < running < cap:
                    cap = running  # KV-bound: the batch cannot grow past what fits
                demand += (running + waiting) / max(cap, 1e-9)
            if self.count_handle_queue:
                demand += max(0.0, queued_at_handles) / self.batch_capacity
            source = float(len(reported))
        up = math.ceil(demand / self.target - 1e-9)
        if up > target:
            decision = up
        else:
            # Hysteresis: drop replicas only down to what keeps the rest under downscale_utilization.
            decision = min(target, math.ceil(demand / self.down - 1e-9))
            if hold_target:
                decision = target
        info = {"demand_batches": round(demand, 4), "reporting_replicas": source, "decision": float(decision)}
        return decision, info

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        # Compared with the controller's current target (Ray's delay timers compare with it too),
        # not the running count, which lags it while new replicas start.
        target = int(ctx.target_num_replicas)
        per_replica = ctx.aggregated_metrics or {}
        # Only the replicas Serve counts as running (a stopping replica's last report is stale).
        running_ids = set(ctx.running_replicas or [])
        if running_ids:
            per_replica = {name: {rid: v for rid, v in values.items() if rid in running_ids}
                           for name, values in per_replica.items()}
        try:
            queued = float(ctx.total_queued_requests or 0.0)
        except Exception:  # noqa: BLE001 - handle metrics missing: engines' view only
            queued = 0.0
        try:
            ongoing = float(ctx.total_num_requests or 0.0)
        except Exception:  # noqa: BLE001
            ongoing = 0.0
        # Replicas of the target not running yet: hold the target while they start (see the
        # module docstring), but not forever: one that can never be placed must not pin it.
        if len(running_ids) < target:
            now = time.monotonic()
            hold = now - state.setdefault("starting_since", now) < self.hold_while_starting_s
        else:
            state.pop("starting_since", None)
            hold = False
        decision, info = self.decide(target, per_replica, queued, ongoing, hold)
        state["queue_depth"] = info
        return decision, state


class QueueDepthAutoscaling(BaseModel):
    """``replicas.autoscaling`` in the app args: LLMReplica autoscaling on engine queue depth."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, description=(
        "replicas kept warm. 0 (scale to zero) is not offered yet: the Router answers 503 "
        "while no LLMReplica is running, so no request would ever reach Serve's cold-start "
        "path (docs/serving.md, Autoscaling)"))
    max_replicas: int = Field(4, ge=1, description="at most this many (one GPU each in production)")
    initial_replicas: int | None = Field(None, ge=1, description="replicas at deploy time (default: min_replicas)")
    target_utilization: float = Field(
        1.0, gt=0, le=4,
        description="scale up when (waiting + running) / max_num_seqs, summed over replicas, "
                    "exceeds this many full batches per replica")
    downscale_utilization: float | None = Field(
        None, gt=0, description="scale down only while the rest stay under this (default 0.7 x target)")
    kv_full_threshold: float = Field(0.95, gt=0, le=1, description="KV usage above which the batch is KV-bound")
    count_handle_queue: bool = Field(True, description="add requests queued at Serve handles to the demand")
    hold_while_starting_s: float = Field(
        300.0, ge=0, description="never scale down while replicas of the target are still starting, for up to "
        "this long (a replica that cannot be placed must not pin the target)")
    upscale_delay_s: float = Field(30.0, ge=0, description="demand must stay above target this long")
    downscale_delay_s: float = Field(600.0, ge=0, description="demand must stay below this long")
    look_back_period_s: float = Field(30.0, gt=0, description="window the replicas' stats are averaged over")
    metrics_interval_s: float = Field(
        10.0, gt=0, description="how often replicas and handles push stats to the controller (Ray's knob)")
    upscaling_factor: float | None = Field(None, gt=0, description="Ray's gain on upscale steps (default 1)")
    downscaling_factor: float | None = Field(None, gt=0, description="Ray's gain on downscale steps (default 1)")

    @model_validator(mode="after")
    def _check(self) -> QueueDepthAutoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must be within [min_replicas, max_replicas]")
        if self.downscale_utilization is not None and self.downscale_utilization > self.target_utilization:
            raise ValueError("downscale_utilization must not exceed target_utilization")
        if self.look_back_period_s <= self.metrics_interval_s:
            # Ray averages over the window; a window shorter than one push sees one sample or none.
            raise ValueError("look_back_period_s must be greater than metrics_interval_s")
        return self

    def policy_kwargs(self, batch_capacity: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "batch_capacity": int(batch_capacity),
            "target_utilization": self.target_utilization,
            "kv_full_threshold": self.kv_full_threshold,
            "count_handle_queue": self.count_handle_queue,
            "hold_while_starting_s": self.hold_while_starting_s,
        }
        if self.downscale_utilization is not None:
            kwargs["downscale_utilization"] = self.downscale_utilization
        return kwargs

    def ray_config(self, batch_capacity: int) -> dict[str, Any]:
        """The LLMReplica deployment's ``autoscaling_config`` (a dict Serve validates)."""
        cfg: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
            # Used by Ray only for its "target ongoing requests" gauge; our policy ignores it.
            "target_ongoing_requests": max(1.0, self.target_utilization * batch_capacity),
            "policy": {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": self.policy_kwargs(batch_capacity)},
        }
        for key in ("initial_replicas", "upscaling_factor", "downscaling_factor"):
            value = getattr(self, key)
            if value is not None:
                cfg[key] = value
        return cfg
