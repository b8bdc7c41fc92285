"""What makes a request servable at all, as one rule with one wording: prompt and stop token
ids inside the vocabulary, prompt + completion inside the model's context. Free of Ray and of
the engine's state, so the Router (before admission, answering 400) and the engine
(``LLMEngine.validate_request``, for every other caller) apply the same check and say the same."""

from __future__ import annotations

from collections.abc import Iterable

EMPTY_PROMPT = "The prompt is empty."


def bad_token_ids(ids: Iterable, vocab_size: int) -> bool:
    """True if any id is not a plain int (bool excluded) in [0, vocab_size)."""
    return any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in ids)


def prompt_ids_message(vocab_size: int) -> str:
    return f"Prompt token ids must be integers in [0, {vocab_size})."


def stop_ids_message(vocab_size: int) -> str:
    return f"stop_token_ids must be integers in [0, {vocab_size})."


def exceeds_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> bool:
    """Whether prompt + max_tokens overflow the context; ``max_tokens=None`` (up to the context)
    needs room for at least one generated token."""
    if max_tokens is None:
        return prompt_tokens >= max_model_len
    return prompt_tokens + max_tokens > max_model_len


def context_length_message(max_model_len: int, prompt_tokens: int, max_tokens: int) -> str:
    """OpenAI's wording."""
    total = prompt_tokens + max_tokens
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{total} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or completion."
    )
