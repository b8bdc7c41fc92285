"""How often a replica sends a streaming request's tokens: one message per step at low load,
more tokens per message as the number of concurrent streams grows.

Every streamed message crosses two Ray hops (LLMReplica → Router → proxy) and costs CPU in
three processes whatever it holds; on a small CPU machine that CPU comes out of the engine.
Sent once per engine step, 64 streams at ~25 steps/s are 1,600 messages a second per hop, and
the served engine ran several times slower than offline. The replica therefore keeps its total
message rate near ``messages_per_s``: with S active streams each waits ``S / messages_per_s``
between messages, never less than ``min_interval_s`` (one message per step at low load) nor
more than ``max_interval_s`` (what a reader of a chat UI still sees as a steady stream). The
first token of a request is always sent at once, so TTFT never waits for pacing.
"""

from __future__ import annotations


class StreamPacer:
    def __init__(self, min_interval_s: float, max_interval_s: float, messages_per_s: float) -> None:
        if max_interval_s < min_interval_s:
            raise ValueError("max_interval_s must be >= min_interval_s")
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.messages_per_s = messages_per_s
        self.active = 0

    def opened(self) -> None:
        self.active += 1

    def closed(self) -> None:
        self.active -= 1

    def interval_s(self) -> float:
        """The gap to keep between two messages of one stream now."""
        if self.messages_per_s <= 0:
            return self.min_interval_s
        return min(self.max_interval_s, max(self.min_interval_s, self.active / self.messages_per_s))
