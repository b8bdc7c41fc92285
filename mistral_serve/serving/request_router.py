"""``LeastQueueDepthRouter``: Ray Serve custom request router for LLMReplica callers, with
prefix-cache affinity.

Ray's default (power of two choices) compares the number of ongoing requests of two random
replicas. For an LLM engine that number hides what matters: how full the running batch is
relative to *its* capacity (replicas may differ in ``max_num_seqs``) and how close the KV
pool is to preempting. Each LLMReplica reports ``record_routing_stats()`` (num_waiting,
num_running, kv_usage, batch_capacity, ongoing, and a summary of its prefix cache); Serve's
controller collects them every ``request_routing_stats_period_s`` and pushes them to every
caller. We rank *all* candidate replicas by

    depth = ongoing / batch_capacity + kv_usage

where ``ongoing`` is the caller's fresh queue-length cache (updated on every send and probe),
falling back to the reported value.

Cache affinity: a replica advertises the routing keys of every ``prefix_stride``-th block of
the prefixes its engine holds cached (``BlockManager.routing_keys``: the same chained block
hashes the engine matches prompts with). The router hashes the request's prompt the same way
and takes, per replica, the longest advertised prefix of it. The replica with the longest
match goes first unless its depth exceeds the shallowest replica's by more than
``AFFINITY_DEPTH_SLACK`` (half a batch): a hot conversation then spills over to other replicas
instead of queueing on one. Without a match the order is by depth alone. Ray's own
``PrefixCacheAffinityRouter`` guesses from a prefix tree of the request *text* the router has
sent where; ours reads what each engine really holds, in tokens, so evictions, restarts and
other callers' traffic are reflected within one stats period.

A request the Router retries after a replica failed it lists that replica in its
``GenerateRequest.avoid_replicas`` (wire.py), which then ranks last. The first replica in the
order that still has a free slot (``max_ongoing_requests``) gets the request; the base class
probes and backs off as usual.
"""

from __future__ import annotations

import math
import random

from ray.serve.request_router import FIFOMixin, LocalityMixin, PendingRequest, RequestRouter, RunningReplica

from mistral_serve.engine.block_hash import extend_block_hashes, routing_key
from mistral_serve.serving.wire import GenerateRequest

# How much deeper (in batch fractions plus KV usage, see ``queue_depth``) the replica holding a
# request's prefix may be than the shallowest replica and still get it.
AFFINITY_DEPTH_SLACK = 0.5


def queue_depth(stats: dict | None, ongoing: int | None, max_ongoing: int) -> float:
    stats = stats or {}
    if stats.get("failed"):
        return math.inf  # engine dead or wedged: only when nothing else is left
    batch_capacity = stats.get("batch_capacity") or max_ongoing or 1
    if ongoing is None:
        ongoing = stats.get("ongoing", stats.get("num_running", 0) + stats.get("num_waiting", 0))
    return ongoing / max(1, batch_capacity) + float(stats.get("kv_usage", 0.0))


class PrefixMatcher:
    """Longest advertised prefix of one prompt per replica. The prompt's routing keys are
    computed once per (block size, stride), each replica's advertised keys become a set once
    per stats report (the list object changes only when the controller pushes new stats)."""

    def __init__(self, prompt_token_ids: list[int]) -> None:
        self.prompt = prompt_token_ids
        self._keys: dict[tuple[int, int], list[int]] = {}

    def matched_tokens(self, stats: dict | None, advertised: set[int]) -> int:
        if not stats or not advertised:
            return 0
        block_size, stride = stats["prefix_block_size"], stats["prefix_stride"]
        keys = self._keys.get((block_size, stride))
        if keys is None:
            full = len(self.prompt) // block_size
            hashes = extend_block_hashes([], self.prompt, block_size, full)
            keys = self._keys[(block_size, stride)] = [routing_key(hashes[i]) for i in range(stride - 1, full, stride)]
        for j in range(len(keys) - 1, -1, -1):
            if keys[j] in advertised:
                return (j + 1) * stride * block_size
        return 0


def affinity_order(depths: list[float], matches: list[int], slack: float = AFFINITY_DEPTH_SLACK) -> list[int]:
    """Indices of replicas in routing order: by depth, except that the shallowest replica among
    those with the longest prefix match goes first if it is within ``slack`` of the shallowest
    of all."""
    order = sorted(range(len(depths)), key=lambda i: depths[i])
    best = max(matches, default=0)
    if best == 0 or not order:
        return order
    holder = min((i for i in order if matches[i] == best), key=lambda i: depths[i])
    if depths[holder] <= depths[order[0]] + slack:
        order.remove(holder)
        order.insert(0, holder)
    return order


class LeastQueueDepthRouter(FIFOMixin, LocalityMixin, RequestRouter):
    def initialize_state(self, prefix_cache_routing: bool = True, **kwargs) -> None:
        self._prefix_cache_routing = prefix_cache_routing
        self._advertised: dict[str, tuple[int, set[int]]] = {}  # replica -> (id of its key list, keys)

    def _advertised_keys(self, replica: RunningReplica) -> set[int]:
        stats = replica.routing_stats or {}
        keys = stats.get("prefix_keys") or []
        rid = replica.replica_id.unique_id
        cached = self._advertised.get(rid)
        if cached is None or cached[0] != id(keys):
            cached = self._advertised[rid] = (id(keys), set(keys))
        return cached[1]

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
        depths = [queue_depth(r.routing_stats, cache.get(r.replica_id), r.max_ongoing_requests) for r in replicas]
        req = generate_request(pending_request)
        if req is not None and not req.avoid_replicas and self._prefix_cache_routing:
            matcher = PrefixMatcher(req.prompt_token_ids)
            matches = [matcher.matched_tokens(r.routing_stats, self._advertised_keys(r)) for r in replicas]
            order = affinity_order(depths, matches)
        else:
            avoid = set(req.avoid_replicas) if req is not None else set()
            order = sorted(range(len(replicas)),
                           key=lambda i: (replicas[i].replica_id.unique_id in avoid, depths[i]))
        return [[replicas[i]] for i in order]


def generate_request(pending_request: PendingRequest | None) -> GenerateRequest | None:
    """The ``GenerateRequest`` of a ``LLMReplica.generate`` call; None for other calls (stats,
    test hooks)."""
    args = pending_request.args if pending_request is not None else ()
    req = args[0] if args else None
    return req if isinstance(req, GenerateRequest) else None
