"""One tokenizer interface over mistral-common and Hugging Face tokenizers.

Mistral checkpoints ship ``tokenizer.model.v*`` or ``tekken.json``; for them we use
mistral-common, the reference implementation: its chat encoding keeps text a user typed
(a literal ``[INST]`` or ``</s>``) as plain text, where the HF fast tokenizer would turn it
into a control token. Other checkpoints (Llama) use ``transformers.AutoTokenizer`` and the
checkpoint's chat template.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


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
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """OpenAI-style messages → prompt ids, ending where the assistant's answer starts."""


class MistralCommonTokenizer(Tokenizer):
    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self._mistral = MistralTokenizer.from_file(str(path))
        self._tok = self._mistral.instruct_tokenizer.tokenizer
        self.bos_token_id = self._tok.bos_id
        self.eos_token_ids = (self._tok.eos_id,)
        self.vocab_size = self._tok.n_words

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._tok.encode(text, bos=add_bos, eos=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        policy = SpecialTokenPolicy.IGNORE if skip_special_tokens else SpecialTokenPolicy.KEEP
        return self._tok.decode(ids, special_token_policy=policy)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        request = ChatCompletionRequest.model_validate({"messages": messages})
        return self._mistral.encode_chat_completion(request).tokens


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

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self._tok.chat_template:
            raise ValueError("this model has no chat template; use the completions API")
        out = self._tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """mistral-common when the checkpoint ships its files, else the HF tokenizer."""
    model_dir = Path(model_dir)
    for pattern in ("tekken.json", "tokenizer.model.v*"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return MistralCommonTokenizer(found[-1])
    return HFTokenizer(model_dir)
