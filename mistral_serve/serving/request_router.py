"""``LeastQueueDepthRouter``: Ray Serve custom request router for LLMReplica callers.

Ray's default (power of two choices) compares the number of ongoing requests of two random
replicas. For an LLM engine that number hides what matters: how full the running batch is
relative to *its* capacity (replicas may differ in ``max_num_seqs``) and how close the KV
pool is to preempting. Each LLMReplica reports ``record_routing_stats()`` (num_waiting,
num_running, kv_usage, capacity, ongoing); Serve's controller collects them every
``request_routing_stats_period_s`` and pushes them to every caller. We rank *all* candidate
replicas by

    depth = ongoing / capacity + kv_usage

where ``ongoing`` is the caller's fresh queue-length cache (updated on every send and probe),
falling back to the reported value, and send to the best one that still has a free slot
(``max_ongoing_requests``); the base class probes and backs off as usual. A request the Router
retries after a replica failed it lists that replica in its ``GenerateRequest.avoid_replicas``
(wire.py), which then ranks last.
"""

from __future__ import annotations

import math
import random

from ray.serve.request_router import FIFOMixin, LocalityMixin, PendingRequest, RequestRouter, RunningReplica

from mistral_serve.serving.wire import GenerateRequest


def queue_depth(stats: dict | None, ongoing: int | None, max_ongoing: int) -> float:
    stats = stats or {}
    if stats.get("failed"):
        return math.inf  # engine dead or wedged: only when nothing else is left
    capacity = stats.get("capacity") or max_ongoing or 1
    if ongoing is None:
        ongoing = stats.get("ongoing", stats.get("num_running", 0) + stats.get("num_waiting", 0))
    return ongoing / max(1, capacity) + float(stats.get("kv_usage", 0.0))


class LeastQueueDepthRouter(FIFOMixin, LocalityMixin, RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ids = self.apply_locality_routing(pending_request)  # also decides when to back off
        replicas = [r for r in candidate_replicas if r.replica_id in ids]
        if not replicas:
            return []
        random.shuffle(replicas)  # ties go to a random replica
        cache = self.replica_queue_len_cache
        avoid = avoided_replicas(pending_request)
        replicas.sort(key=lambda r: (r.replica_id.unique_id in avoid,
                                     queue_depth(r.routing_stats, cache.get(r.replica_id), r.max_ongoing_requests)))
        return [[r] for r in replicas]


def avoided_replicas(pending_request: PendingRequest | None) -> set[str]:
    """Replica ids a retried request must not go back to (its ``GenerateRequest.avoid_replicas``
    lists the ones that failed it), unless nothing else is left. Other calls (stats, test hooks)
    avoid nothing."""
    args = pending_request.args if pending_request is not None else ()
    req = args[0] if args else None
    return set(req.avoid_replicas) if isinstance(req, GenerateRequest) else set()
