"""Streaming detokenization and stop strings.

Sentencepiece marks word starts with "▁" and byte-fallback splits multi-byte characters over
several tokens, so decoding each new token alone would drop spaces and emit broken UTF-8.
Two ways to get each new token's text, the same text either way:

- ``_PieceStream`` (sentencepiece vocabularies, special tokens skipped: what completions and
  chat send): each id's text from the tokenizer's ``PieceTable``; the bytes of byte-fallback
  pieces are gathered until they make a character, as sentencepiece decodes them. 5 µs per
  token, where decoding a window costs two ``decode`` calls: 28 µs (2-vCPU AMD EPYC; 4% of
  a burst-like offline run).
- ``_DecodeWindow`` (other tokenizers, or special tokens kept as their names): decode a short
  window that starts a few tokens back and emit only the new suffix, once it no longer ends in
  U+FFFD (an incomplete character).

Both start from the prompt's last ``_CONTEXT_TOKENS`` ids, so the first output token keeps its
leading space after prompt text and loses it where nothing but special tokens precede it (as
sentencepiece's decode of prompt + output would). When the request has stop strings, the last
``len(longest stop) - 1`` characters are held back until they can no longer be the start of a
stop string, so a stop string never leaks into a stream.
"""

from __future__ import annotations

from mistral_serve.tokenizer.tokenizer import PieceTable, Tokenizer

# Tokens of prompt context used to decode the first output token with its leading space.
_CONTEXT_TOKENS = 5


class _PieceStream:
    def __init__(self, table: PieceTable, context: list[int]) -> None:
        self.surface, self.word_start, self.byte_ids = table.surface, table.word_start, table.byte_ids
        # No text before the output yet: its first piece loses the space of its "▁".
        self.at_start = not any(self.surface[t] for t in context)
        self.run = bytearray()  # bytes of byte pieces not yet a whole character
        self.held = ""  # text ending in U+FFFD (invalid bytes), held as the window holds it

    def push(self, token_id: int) -> str:
        if token_id in self.byte_ids:
            self.run += self.surface[token_id]
            text = _take_chars(self.run, final=False)
        else:
            text = _take_chars(self.run, final=True) if self.run else ""  # any other piece ends a run
            self.at_start = self.at_start and not text
            piece = self.surface[token_id]  # empty for a special token
            if self.at_start and token_id in self.word_start:
                piece = piece[1:]
            text += piece.decode()
        if text:
            self.at_start = False
        text = self.held + text
        if text.endswith("\ufffd"):
            self.held = text
            return ""
        self.held = ""
        return text


def _take_chars(run: bytearray, final: bool) -> str:
    """Remove from ``run`` and return the characters its bytes complete, as sentencepiece
    decodes a run of byte pieces: a byte that starts no valid character becomes one U+FFFD;
    an incomplete character at the end stays in ``run`` unless the run is ``final``."""
    out = []
    while run:
        lead = run[0]
        n = 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else (
            4 if 0xF0 <= lead < 0xF5 else 0)
        if n and len(run) < n and not final:
            try:  # wait only if the bytes so far can still start a valid character
                bytes(run).decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data":
                    break
            n = 0
        if n and len(run) >= n:
            try:
                out.append(bytes(run[:n]).decode("utf-8"))
                del run[:n]
                continue
            except UnicodeDecodeError:
                pass
        out.append("\ufffd")
        del run[:1]
    return "".join(out)


class _DecodeWindow:
    def __init__(self, tokenizer: Tokenizer, context: list[int], skip_special: bool) -> None:
        self.decode = tokenizer.decode
        self.skip_special = skip_special
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = self.decode(self.ids[self.prefix_offset :], self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
    ) -> None:
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        table = tokenizer.piece_table() if skip_special_tokens else None
        self.source = _PieceStream(table, context) if table is not None else _DecodeWindow(
            tokenizer, context, skip_special_tokens)
        self.text = ""
        self.emitted = 0
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token; return the stop string it completed, if any."""
        delta = self.source.push(token_id)
        if not delta:
            return None
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        if not self.stop:
            return None
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
