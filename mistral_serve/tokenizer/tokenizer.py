"""One tokenizer interface over mistral-common and Hugging Face tokenizers.

Mistral checkpoints ship ``tokenizer.model.v*`` or ``tekken.json``; for them we use
mistral-common, the reference implementation: its chat encoding keeps text a user typed
(a literal ``[INST]`` or ``</s>``) as plain text, where the HF fast tokenizer would turn it
into a control token. Other checkpoints (Llama) use ``transformers.AutoTokenizer`` and the
checkpoint's chat template.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PieceTable:
    """What a sentencepiece vocabulary's ids decode to, one id at a time: a streaming
    detokenizer (detokenizer.py) can then turn each new id into text with a table lookup
    instead of decoding a window of ids twice per token.

    ``surface``: each id's bytes (``▁`` is a space, a ``<0xNN>`` piece is that byte, a special
    token nothing: what decoding shows with special tokens skipped); ``word_start``: ids
    whose piece starts with ``▁``, whose space sentencepiece drops when the piece is the first
    text of a decode (its dummy prefix)."""

    surface: list[bytes]
    word_start: frozenset[int]
    byte_ids: frozenset[int]  # ``<0xNN>`` pieces (byte fallback)


class Tokenizer(ABC):
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Plain text → ids. Special-token text in ``text`` stays plain text."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """OpenAI-style messages (and tool definitions, OpenAI's ``tools``) → prompt ids,
        ending where the assistant's answer starts."""

    @abstractmethod
    def grammar_tokenizer(self, vocab_size: int, eos_token_ids: list[int]):
        """This vocabulary as an ``llguidance.LLTokenizer`` of ``vocab_size`` ids, for
        constrained decoding (engine/structured_output.py). Here because only the tokenizer
        knows how its pieces map to bytes. Expensive (~0.1-1 s): the caller caches it."""

    def piece_table(self) -> PieceTable | None:
        """The per-id table of a sentencepiece vocabulary (built once), or None where ids do
        not decode independently of their neighbours this way."""
        return None


class MistralCommonTokenizer(Tokenizer):
    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self._mistral = MistralTokenizer.from_file(str(path))
        self._tok = self._mistral.instruct_tokenizer.tokenizer
        self.bos_token_id = self._tok.bos_id
        self.eos_token_ids = (self._tok.eos_id,)
        self.vocab_size = self._tok.n_words
        self._piece_table: PieceTable | None = None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._tok.encode(text, bos=add_bos, eos=False)

    def piece_table(self) -> PieceTable | None:
        from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

        if not isinstance(self._tok, SentencePieceTokenizer):
            return None  # tekken: byte-level BPE, decoded by window
        if self._piece_table is None:
            surface, word_start, byte_ids = [], set(), set()
            for i, (kind, text) in enumerate(sentencepiece_pieces(self._tok._model)):
                if kind == "control" or self._tok.is_special(i):
                    surface.append(b"")
                elif kind == "unknown":
                    surface.append(" \u2047 ".encode())  # sentencepiece's unk surface
                else:
                    if kind == "byte":
                        byte_ids.add(i)
                    elif text.startswith(b" "):  # pieces hold no literal spaces: this was "▁"
                        word_start.add(i)
                    surface.append(text)
            self._piece_table = PieceTable(surface, frozenset(word_start), frozenset(byte_ids))
        return self._piece_table

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        if skip_special_tokens:
            return self._tok.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
        # mistral-common's KEEP policy returns raw pieces ("▁Hi<0x0A>"), not text: decode each
        # run between special tokens as text and keep the special tokens' names ("[TOOL_CALLS]"),
        # which is what the tool-call parser (serving/tool_calls.py) and /detokenize need.
        parts, run = [], []
        for t in ids:
            if self._tok.is_special(t):
                if run:
                    parts.append(self._tok.decode(run, special_token_policy=SpecialTokenPolicy.IGNORE))
                    run = []
                parts.append(self._tok.id_to_piece(t))
            else:
                run.append(t)
        if run:
            parts.append(self._tok.decode(run, special_token_policy=SpecialTokenPolicy.IGNORE))
        return "".join(parts)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools  # [AVAILABLE_TOOLS] ... [/AVAILABLE_TOOLS], mistral-common's own layout
        request = ChatCompletionRequest.model_validate(body)
        return self._mistral.encode_chat_completion(request).tokens

    def control_token_id(self, name: str) -> int | None:
        """The id of a control token such as ``[TOOL_CALLS]``, or None if this vocabulary lacks it."""
        try:
            return self._tok.get_special_token(name)
        except Exception:  # noqa: BLE001 - mistral-common raises different errors per version
            return None

    def grammar_tokenizer(self, vocab_size: int, eos_token_ids: list[int]):
        import llguidance
        from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

        if not isinstance(self._tok, SentencePieceTokenizer):
            raise ValueError("structured outputs support sentencepiece (v1-v3) Mistral tokenizers, not tekken")
        wrapper = llguidance.TokenizerWrapper(_SentencePieceBytes(self._tok._model, eos_token_ids))
        return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size,
                                      eos_token=eos_token_ids)


class HFTokenizer(Tokenizer):
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.bos_token_id = self._tok.bos_token_id
        eos = self._tok.eos_token_id
        self.eos_token_ids = (eos,) if eos is not None else ()
        self.vocab_size = len(self._tok)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # split_special_tokens: user text that looks like a control token stays plain text.
        ids = self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        if not self._tok.chat_template:
            raise ValueError("this model has no chat template; use the completions API")
        out = self._tok.apply_chat_template(messages, tools=tools or None, tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def grammar_tokenizer(self, vocab_size: int, eos_token_ids: list[int]):
        from llguidance.hf import from_tokenizer

        return from_tokenizer(self._tok, n_vocab=vocab_size, eos_token=eos_token_ids)


class _SentencePieceBytes:
    """A sentencepiece model in the shape ``llguidance.TokenizerWrapper`` reads: each id's bytes
    (``▁`` is a space, ``<0xNN>`` pieces are that byte, control tokens are special) and an
    encoder of bytes that adds no dummy-prefix space (llguidance tokenizes forced text with it)."""

    def __init__(self, sp, eos_token_ids: list[int]) -> None:
        self._sp = sp
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = sp.bos_id()
        pieces = sentencepiece_pieces(sp)
        self.tokens: list[bytes] = [text for _, text in pieces]
        self.special_token_ids: list[int] = [i for i, (kind, _) in enumerate(pieces) if kind in ("control", "unknown")]
        # sentencepiece puts a space before the text; after a newline (a byte token nothing
        # merges with) the rest is tokenized as at the start of a line, so strip those ids.
        self._prefix = sp.encode("\n")

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._sp.encode("\n" + text)
        n = len(self._prefix)
        return ids[n:] if ids[:n] == self._prefix else ids


def sentencepiece_pieces(sp) -> list[tuple[str, bytes]]:
    """Each id of a sentencepiece model as (kind, bytes): kind is "control", "unknown", "byte"
    or "piece"; the bytes are a control or unknown token's name, a ``<0xNN>`` piece's byte, or a
    piece's text with ``▁`` as a space."""
    out = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i):
            out.append(("control", piece.encode()))
        elif sp.is_unknown(i):
            out.append(("unknown", piece.encode()))
        elif sp.is_byte(i):
            out.append(("byte", bytes([int(piece[3:5], 16)])))
        else:
            out.append(("piece", piece.replace("\u2581", " ").encode()))
    return out


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """mistral-common when the checkpoint ships its files, else the HF tokenizer."""
    model_dir = Path(model_dir)
    for pattern in ("tekken.json", "tokenizer.model.v*"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return MistralCommonTokenizer(found[-1])
    return HFTokenizer(model_dir)
