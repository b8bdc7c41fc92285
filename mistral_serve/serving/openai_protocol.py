"""OpenAI API request models, their mapping onto ``SamplingParams``, and response/chunk shapes.

Decisions where the API leaves room (docs/serving.md):
- ``prompt``: a string, a list of token ids, or a list holding exactly one of those. Batches of
  several prompts are rejected with 400 (send separate requests), as are ``suffix``,
  ``logit_bias`` and ``echo`` on chat.
- ``n`` in [1, 16] (``SamplingParams.MAX_N``): n sequences of one prompt in the engine.
  ``best_of`` in [n, 16] (completions, not streamed): best_of sequences, the n with the highest
  cumulative logprob returned.
  ``echo`` (completions) returns the prompt before the completion; with ``logprobs`` also the
  prompt tokens' logprobs (the first one null), computed in the prefill.
- vLLM's extra sampling fields are accepted: ``top_k``, ``min_p``, ``repetition_penalty``,
  ``ignore_eos``, ``min_tokens``, ``stop_token_ids``, ``include_stop_str_in_output``,
  ``skip_special_tokens``. Unknown fields are ignored, as OpenAI does.
- Structured outputs (``response_format``, vLLM's ``structured_outputs`` / ``guided_*``) are
  validated in serving/response_format.py, tools in serving/tool_calls.py.
- ``max_tokens`` defaults to 16 for completions (OpenAI's default) and to the rest of the
  context for chat; ``max_completion_tokens`` is an alias for chat.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.serving.admission import AdmissionError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured outputs (serving/response_format.py): OpenAI's response_format, vLLM's
    # structured_outputs and its older guided_* names. Validated there, with llguidance's reasons.
    response_format: Any | None = None
    structured_outputs: Any | None = None
    guided_json: Any | None = None
    guided_regex: Any | None = None
    guided_choice: Any | None = None
    guided_grammar: Any | None = None

    @property
    def num_sequences(self) -> int:
        """The engine sequences this request samples (``n``; completions' ``best_of`` may ask more)."""
        return 1 if self.n is None else self.n

    def _common_checks(self) -> None:
        if self.logit_bias:
            raise _bad("logit_bias is not supported.", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise _bad("stream_options is only allowed when stream is true.", "stream_options")

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        kwargs: dict[str, Any] = {
            "n": self.num_sequences,
            "prompt_logprobs": prompt_logprobs,
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k or 0,
            "min_p": self.min_p or 0.0,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            "stop_token_ids": list(self.stop_token_ids or []),
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
        }
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            first = message.split(" ", 1)[0]
            param = first if first in kwargs or first in ("stop",) else None
            if message.startswith("at most") or message.startswith("stop strings"):
                param = "stop"
            raise _bad(message[:1].upper() + message[1:] + ".", param) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        self._common_checks()
        n = 1 if self.n is None else self.n
        if self.best_of is not None and self.best_of != n:
            if not 1 <= n <= SamplingParams.MAX_N:  # before best_of replaces it as the engine's n
                raise _bad(f"n must be in [1, {SamplingParams.MAX_N}], got {n}.", "n")
            if not n <= self.best_of <= SamplingParams.MAX_N:
                raise _bad(f"best_of must be in [n, {SamplingParams.MAX_N}] (n is {n}), got {self.best_of}.",
                           "best_of")
            if self.stream:
                raise _bad("best_of > n cannot be streamed: the best n are known only at the end.", "best_of")
        if self.suffix:
            raise _bad("suffix is not supported.", "suffix")

    @property
    def num_sequences(self) -> int:
        n = 1 if self.n is None else self.n
        return max(n, self.best_of or n)

    @property
    def ranked(self) -> int | None:
        """best_of > n: how many of the sampled sequences are returned (the n best), else None."""
        n = 1 if self.n is None else self.n
        return n if self.num_sequences > n else None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            if not p:
                raise _bad("The prompt is empty.", "prompt")
            return p
        if not p:
            raise _bad("The prompt is empty.", "prompt")
        if all(isinstance(x, int) for x in p):
            return list(p)
        if len(p) != 1:
            raise _bad("Batches of prompts are not supported: send one prompt per request.", "prompt")
        return p[0]


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # Tool calling (serving/tool_calls.py validates them, with OpenAI-shaped 400s).
    tools: Any | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: Any | None = None
    echo: bool | None = None  # vLLM's chat extra; refused here (completions only)

    @field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise ValueError("each message needs a role of system, user, assistant or tool")
        return messages

    def check(self) -> None:
        self._common_checks()
        if self.top_logprobs is not None and not self.logprobs:
            raise _bad("top_logprobs requires logprobs to be true.", "top_logprobs")
        if self.echo:
            raise _bad("echo is only supported on /v1/completions.", "echo")

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def normalized_messages(self) -> list[dict[str, Any]]:
        """Content parts joined to text ("developer" is OpenAI's new name for system)."""
        out = []
        for m in self.messages:
            m = dict(m)
            if m["role"] == "developer":
                m["role"] = "system"
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise _bad("Only text content parts are supported.", "messages")
                    texts.append(str(part.get("text", "")))
                m["content"] = "".join(texts)
            out.append(m)
        return out


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize`` body."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: str | None = None
    tokens: list[int]


def _bad(message: str, param: str | None) -> AdmissionError:
    return AdmissionError(400, message, reason="invalid_request", param=param)


def parse(model_cls: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body into ``model_cls``, mapping pydantic errors to a 400 body."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None)
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "list[", "str", "int"))]
        param = loc[0] if loc else None
        what = ".".join(loc) if loc else "body"
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            msg = f"'{what}' is a required property"
        else:
            msg = f"Invalid value for '{what}': {msg}"
        raise _bad(msg, param) from None


# ---- responses ----------------------------------------------------------------------------------


def usage_dict(prompt_tokens: int, completion_tokens: int, cost_usd: float | None, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` counts the prompt tokens
    served from the prefix cache, as OpenAI reports them."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if cost_usd is not None:
        usage["cost_usd"] = round(cost_usd, 12)
    return usage


def completion_logprobs(entries: list) -> dict:
    """[(token, logprob, [(token, logprob), ...]), ...] → the completions API's shape."""
    tokens, lps, tops, offsets, offset = [], [], [], [], 0
    for token, lp, top in entries:
        tokens.append(token)
        lps.append(lp)
        tops.append({t: v for t, v in top} if top else None)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list) -> dict:
    def one(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [dict(one(t, lp), top_logprobs=[one(a, b) for a, b in (top or [])]) for t, lp, top in entries]}


def completion_response(rid: str, model: str, created: int, text: str, finish: str | None, logprobs: dict | None,
                        usage: dict) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "usage": usage,
    }


def chat_response(rid: str, model: str, created: int, text: str, finish: str | None, logprobs: dict | None,
                  usage: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish}],
        "usage": usage,
    }


def best_choices(entries: list[list], keep: int) -> list[int]:
    """best_of: the indexes of the ``keep`` choices with the highest cumulative logprob (of
    their (token, logprob, top) entries; the model's raw distribution), best first."""
    score = [sum(lp for _, lp, _ in choice if lp is not None) for choice in entries]
    return sorted(range(len(entries)), key=lambda i: -score[i])[:keep]


def with_choices(responses: list[dict]) -> dict:
    """n > 1: one response holding the single choice of each of ``responses``, as choices 0..n-1."""
    out = responses[0]
    if len(responses) > 1:
        out["choices"] = [dict(r["choices"][0], index=i) for i, r in enumerate(responses)]
    return out


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None,
                     logprobs: dict | None, index: int = 0) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None, logprobs: dict | None,
               index: int = 0) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, usage: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def models_response(model: str, max_model_len: int, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "mistral-serve", "max_model_len": max_model_len}]}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


FinishReason = Literal["stop", "length", "abort"]
