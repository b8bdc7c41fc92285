"""Preprocessing: a request body → a typed ``PreparedRequest`` (tokenized, validated, its
sampling parameters built), and the bodies of ``/tokenize`` and ``/detokenize``.

No Ray and no admission here: the Router runs this after its cheap refusals (draining, auth,
a full queue) and before it admits, so a flood is refused before its bodies are parsed, and
what is admitted is known to be valid. Every refusal is an ``AdmissionError`` in OpenAI's
error shape. Token-id and context-length rules are engine/validation.py's, shared with the
engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from mistral_serve.engine import validation
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.structured_output import StructuredOutputSpec
from mistral_serve.serving.admission import AdmissionError, check_context
from mistral_serve.serving.config import AdmissionConfig
from mistral_serve.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from mistral_serve.serving.response_format import check_constraint, constraint_from_request
from mistral_serve.serving.tool_calls import ToolContext, encode_messages, prepare_tools
from mistral_serve.tokenizer.tokenizer import MistralCommonTokenizer


@dataclass(slots=True)
class PreparedRequest:
    """A valid completion or chat request, ready for admission and a replica."""

    chat: bool
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    reserve_tokens: int  # prompt + n * max_tokens: what the tenant's token budget reserves
    echo: str | None = None  # completions with echo: the prompt text, before each choice's text
    tools: ToolContext | None = None  # chat with tools: each choice's text goes through its parser
    # best_of > n: (choices to return, the client asked for logprobs); the sequences are ranked
    # by cumulative logprob, so the engine reports logprobs even when the client did not ask.
    best_of: tuple[int, bool] | None = None
    context_warning: str | None = None  # soft context limit exceeded under the "warn" policy


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refused past ``limit`` bytes (declared or streamed) and unless it is
    strict UTF-8 without lone surrogates (the tokenizers cannot encode those)."""
    declared = request.headers.get("content-length")
    too_large = AdmissionError(413, f"The request body is larger than {limit} bytes.", reason="body_too_large",
                               code="request_too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        # Strict UTF-8 (json.loads of bytes would let encoded surrogates through), then no lone
        # surrogate from a \ud800 escape either.
        body = json.loads((b"".join(chunks) or b"null").decode("utf-8"))
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return body
    except (ValueError, RecursionError):  # UnicodeError is a ValueError; RecursionError: nesting
        raise AdmissionError(400, "We could not parse the JSON body of your request: it must be valid UTF-8 "
                             "JSON, nested at most a few hundred levels.", reason="invalid_request") from None


class Preprocessor:
    def __init__(self, model_name: str, tokenizer, vocab_size: int, max_model_len: int,
                 admission: AdmissionConfig) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.adm = admission

    def prepare(self, body: Any, chat: bool) -> PreparedRequest:
        req = parse(ChatCompletionRequest if chat else CompletionRequest, body)
        req.check()
        self._check_model(req.model)
        echo: str | None = None
        tools = prepare_tools(req.tools, req.tool_choice, req.parallel_tool_calls, self.tokenizer) if chat else None
        if chat:
            ids = self._encode_chat(req, tools)
            max_tokens, logprobs = req.effective_max_tokens, req.engine_logprobs
        else:
            prompt = req.single_prompt()
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
            max_tokens, logprobs = req.max_tokens, req.logprobs
            if req.echo:
                echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(
                    ids, skip_special_tokens=req.skip_special_tokens)
        if max_tokens is not None and max_tokens < 1:
            raise AdmissionError(400, f"max_tokens must be >= 1, got {max_tokens}.", reason="invalid_request",
                                 param="max_tokens")
        max_tokens, warning = check_context(len(ids), max_tokens, self.max_model_len, self.adm.soft_max_context_tokens,
                                            self.adm.soft_context_policy, "messages" if chat else "prompt")
        ranked = None if chat else req.ranked
        # echo + logprobs: the prompt tokens' logprobs too, computed in the prefill
        params = req.sampling_params(max_tokens, 0 if ranked and logprobs is None else logprobs,
                                     logprobs if echo is not None else None)
        if validation.bad_token_ids(params.stop_token_ids, self.vocab_size):
            raise AdmissionError(400, validation.stop_ids_message(self.vocab_size), reason="invalid_request",
                                 param="stop_token_ids")
        params.structured_output = _constraint(req, tools)
        if tools is not None and tools.mistral:
            params.skip_special_tokens = False  # the answer's [TOOL_CALLS] token must reach the parser
        return PreparedRequest(
            chat=chat, prompt_token_ids=ids, sampling=params, stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            reserve_tokens=len(ids) + params.n * max_tokens, echo=echo, tools=tools,
            best_of=(ranked, logprobs is not None) if ranked else None, context_warning=warning)

    def tokenize(self, body: Any) -> dict:
        req = parse(TokenizeRequest, body)
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise AdmissionError(400, "Give exactly one of 'prompt' or 'messages'.", reason="invalid_request",
                                 param="prompt")
        if req.messages is not None:
            ids = self._encode_chat(parse(ChatCompletionRequest, {"model": self.model_name, "messages": req.messages}))
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt, add_bos=req.add_special_tokens)
        else:
            ids = self._check_ids(list(req.prompt))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, body: Any) -> dict:
        """vLLM's shape: ``{"tokens": [ids]}`` (optional ``model``) → ``{"prompt": text}``; special
        tokens are kept, so the ids of ``/tokenize`` come back as the exact text they encode."""
        req = parse(DetokenizeRequest, body)
        self._check_model(req.model)
        if validation.bad_token_ids(req.tokens, self.vocab_size):
            raise AdmissionError(400, f"Token ids must be integers in [0, {self.vocab_size}).",
                                 reason="invalid_request", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def _check_model(self, model: str | None) -> None:
        """``None``: the field is optional there (tokenize, detokenize)."""
        if model is not None and model != self.model_name:
            raise AdmissionError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                                 reason="unknown_model", code="model_not_found", param="model")

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise AdmissionError(400, validation.EMPTY_PROMPT, reason="invalid_request", param="prompt")
        if validation.bad_token_ids(ids, self.vocab_size):
            raise AdmissionError(400, validation.prompt_ids_message(self.vocab_size), reason="invalid_request",
                                 param="prompt")
        return ids

    def _encode_chat(self, req: ChatCompletionRequest, tools: ToolContext | None = None) -> list[int]:
        messages = encode_messages(req.normalized_messages(), isinstance(self.tokenizer, MistralCommonTokenizer))
        try:
            return list(self.tokenizer.encode_chat(messages, tools.tools if tools is not None else None))
        except AdmissionError:
            raise
        except Exception as exc:  # noqa: BLE001 - mistral-common / chat template validation
            raise AdmissionError(400, f"Invalid messages: {exc}", reason="invalid_request",
                                 param="messages") from None


def _constraint(req: CompletionRequest | ChatCompletionRequest, tools: ToolContext | None) -> StructuredOutputSpec | None:
    """The request's decoding constraint: its response_format / vLLM extras, or the grammar of a
    call that tool_choice forces (not both)."""
    spec = constraint_from_request(req)
    if tools is not None and tools.forced is not None:
        if spec is not None:
            raise AdmissionError(400, "response_format cannot be combined with a tool_choice that forces a call.",
                                 reason="invalid_request", param="response_format")
        check_constraint(tools.forced, "tools")
        spec = tools.forced
    return spec
