"""Cache-aware routing across replicas (serving/request_router.py): the router hashes a prompt
the way the engine does and prefers the replica whose prefix cache holds the longest part of
it, within a load bound. The advertised keys come from a real BlockManager."""

from __future__ import annotations

import time

import httpx
import pytest

from mistral_serve.engine.block_manager import ROUTING_STRIDE, BlockManager
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.sequence import Sequence
from mistral_serve.serving.request_router import AFFINITY_DEPTH_SLACK, PrefixMatcher, affinity_order

BS = 4
BLOCK_SIZE = 16  # the engine's default, which the live app keeps


def replica_holding(prompt: list[int]) -> dict:
    """Routing stats of a replica whose engine computed ``prompt``."""
    bm = BlockManager(num_blocks=64, block_size=BS, sliding_window=None)
    seq = Sequence("s", prompt, SamplingParams(), (), None)
    bm.allocate(seq, len(prompt))
    seq.num_computed_tokens = len(prompt)
    bm.free(seq)
    return {"prefix_block_size": BS, "prefix_stride": ROUTING_STRIDE, "prefix_keys": bm.routing_keys()}


def test_matcher_finds_the_longest_advertised_prefix():
    conversation = list(range(100, 160))  # 60 tokens: 15 blocks, keys at blocks 3, 7, 11
    holder = replica_holding(conversation)
    other = replica_holding(list(range(500, 560)))
    next_turn = conversation + list(range(900, 920))
    m = PrefixMatcher(next_turn)
    assert m.matched_tokens(holder, set(holder["prefix_keys"])) == 12 * BS  # the deepest advertised block
    assert m.matched_tokens(other, set(other["prefix_keys"])) == 0
    assert PrefixMatcher(list(range(100, 110))).matched_tokens(holder, set(holder["prefix_keys"])) == 0
    assert m.matched_tokens(None, set()) == 0


def test_affinity_order_prefers_the_holder_within_the_load_bound():
    # Replica 1 holds the prefix and is a little busier: it still goes first.
    assert affinity_order([0.1, 0.3, 0.2], [0, 48, 16]) == [1, 0, 2]
    # The holder is more than the slack deeper than the shallowest: load wins.
    assert affinity_order([0.1, 0.2 + AFFINITY_DEPTH_SLACK, 0.2], [0, 48, 0]) == [0, 2, 1]
    # No match anywhere: by depth.
    assert affinity_order([0.4, 0.1, 0.2], [0, 0, 0]) == [1, 2, 0]
    # Two holders of the same length: the shallower of them.
    assert affinity_order([0.5, 0.3, 0.0], [48, 48, 0])[0] == 1


def test_hot_conversation_spills_over_when_its_replica_fills():
    """Simulate a hot prefix: every request goes to the holder until it is the slack deeper
    than the other replica, then they alternate, so neither replica takes all the load."""
    ongoing, capacity = [0, 0], 8
    matches = [64, 0]
    for _ in range(16):
        first = affinity_order([n / capacity for n in ongoing], matches)[0]
        ongoing[first] += 1
    assert ongoing[0] > ongoing[1] > 0
    assert ongoing[0] - ongoing[1] <= AFFINITY_DEPTH_SLACK * capacity + 1


@pytest.mark.ray
@pytest.mark.slow
def test_multi_turn_conversations_hit_the_cache_across_two_replicas(live_server):
    """Four conversations, four turns each, interleaved, over the live app's two replicas.
    On one replica every turn would find at least the previous turn's prompt cached (its full
    blocks); across two, cache-aware routing must reach at least 90% of that.

    No system message: Mistral's v3 chat format puts the system prompt into the *last* user
    turn, so it moves every turn and only the history before it is shared (docs/serving.md)."""
    from openai import OpenAI

    client = OpenAI(base_url=live_server.base_url + "/v1", api_key=live_server.api_keys["alpha"], max_retries=0,
                    timeout=120)
    histories = [[] for _ in range(4)]
    last_prompt = [0] * 4
    cached = ideal = 0
    for turn in range(4):
        for c, history in enumerate(histories):
            opening = f"conversation {c}: " + "please answer briefly. " * 15 if turn == 0 else ""
            history.append({"role": "user", "content": opening + f"question {turn}: " + "tell me more " * 5})
            r = client.chat.completions.create(model=live_server.model, messages=history, max_tokens=8,
                                               temperature=0)
            history.append({"role": "assistant", "content": r.choices[0].message.content})
            if turn:
                cached += r.usage.prompt_tokens_details.cached_tokens
                ideal += last_prompt[c] // BLOCK_SIZE * BLOCK_SIZE
            last_prompt[c] = r.usage.prompt_tokens
        time.sleep(2.0)  # > routing_stats_period_s: the replicas' new blocks are advertised
    assert cached >= 0.9 * ideal, (cached, ideal)
    metrics = httpx.get(live_server.metrics_url, timeout=10).text
    assert "ray_mistral_serve_prefix_cache_hits_total" in metrics
