"""Streaming detokenization and stop strings.

Sentencepiece marks word starts with "▁" and byte-fallback splits multi-byte characters over
several tokens, so decoding each new token alone would drop spaces and emit broken UTF-8.
We decode a short window that starts a few tokens back and emit only the new suffix, and
only once it no longer ends in U+FFFD (an incomplete character). When the request has stop
strings, the last ``len(longest stop) - 1`` characters are held back until they can no longer
be the start of a stop string, so a stop string never leaks into a stream.
"""

from __future__ import annotations

from mistral_serve.tokenizer.tokenizer import Tokenizer

# Tokens of prompt context used to decode the first output token with its leading space.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.skip_special = skip_special_tokens

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token; return the stop string it completed, if any."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = decode(self.ids[self.prefix_offset :], self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        hits = [(at, stop) for stop in self.stop if (at := self.text.find(stop, search_from)) != -1]
        if not hits:
            return None
        at, stop = min(hits)
        self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
        return stop

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, keep back what may start a stop string."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
