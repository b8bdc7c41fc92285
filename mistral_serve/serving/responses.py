"""Responses: a replica call's messages → the OpenAI response body, or its SSE events.

Both count every message into the request's ``Ticket`` (tokens, then the exact usage and the
bill from the ``Final``) and put the usage, with its cost, where OpenAI's clients look for it.
Releasing the ticket is the caller's: it owns the request's way out.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mistral_serve.serving.admission import AdmissionError
from mistral_serve.serving.openai_protocol import (
    best_choices,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    usage_chunk,
    usage_dict,
    with_choices,
)
from mistral_serve.serving.preprocess import PreparedRequest
from mistral_serve.serving.replica_client import ReplicaCall
from mistral_serve.serving.tickets import Ticket
from mistral_serve.serving.wire import Final


@dataclass(slots=True)
class ResponseShape:
    """What a response looks like besides its tokens."""

    request_id: str
    model: str
    created: int
    request: PreparedRequest

    @property
    def n(self) -> int:
        return self.request.sampling.n


def sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(ticket: Ticket) -> dict:
    return usage_dict(ticket.prompt_tokens, ticket.generated, ticket.cost_usd, ticket.cached_tokens)


async def collect(call: ReplicaCall, ticket: Ticket, shape: ResponseShape, deadline: float) -> dict:
    """The whole (non-streamed) response body. Raises ``AdmissionError`` if the call fails."""
    req, n = shape.request, shape.n
    # Per choice (n > 1: each message holds one, wire.py): texts, logprobs, finish reason.
    texts: list[list[str]] = [[] for _ in range(n)]
    lps: list[list] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    prompt_lps: list = []
    msg = call.first
    while True:
        ticket.absorb(msg)
        texts[msg.index].append(msg.text)
        lps[msg.index].extend(msg.logprobs or ())
        if msg.finish_reason is not None:
            finish[msg.index] = msg.finish_reason
        if msg.prompt_logprobs is not None:
            prompt_lps = msg.prompt_logprobs
        if isinstance(msg, Final):
            break
        msg = await call.next(deadline)
    ticket.finished = True
    usage = _usage(ticket)
    want_lp = req.sampling.logprobs is not None
    if req.best_of is not None:  # the n best of the sampled sequences, best first
        keep, want_lp = req.best_of
        order = best_choices(lps, keep)
        texts, lps, finish, n = [texts[i] for i in order], [lps[i] for i in order], [finish[i] for i in order], keep
    rid, model, created = shape.request_id, shape.model, shape.created
    if req.chat:
        out = with_choices([chat_response(rid, model, created, "".join(texts[i]), finish[i],
                                          chat_logprobs(lps[i]) if want_lp else None, usage) for i in range(n)])
        if req.tools is not None:
            for choice in out["choices"]:
                req.tools.apply_to_choice(choice)
        return out
    if req.echo is not None:  # the prompt, and its tokens' logprobs, before each choice's own
        texts = [[req.echo, *t] for t in texts]
        lps = [prompt_lps + entries for entries in lps]
    return with_choices([completion_response(rid, model, created, "".join(texts[i]), finish[i],
                                             completion_logprobs(lps[i]) if want_lp else None, usage)
                         for i in range(n)])


class SSEStream:
    """The SSE events of a streamed response, ``data: [DONE]`` last. A failure mid-stream (the
    status line is long gone) becomes an error event, and ``error`` holds it."""

    def __init__(self, call: ReplicaCall, ticket: Ticket, shape: ResponseShape, deadline: float) -> None:
        self.call, self.ticket, self.shape, self.deadline = call, ticket, shape, deadline
        self.error: AdmissionError | None = None

    async def events(self) -> AsyncIterator[str]:
        call, ticket, shape = self.call, self.ticket, self.shape
        req, n = shape.request, shape.n
        rid, model, created, chat = shape.request_id, shape.model, shape.created, req.chat
        # Tool calls (tool_calls.py): each choice's text goes through its own parser.
        parsers = [req.tools.stream() for _ in range(n)] if req.tools is not None and chat else None
        if chat:
            for i in range(n):
                yield sse_line(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None, None, index=i))
        msg = call.first
        if req.echo is not None:  # completions: each choice starts with the prompt (and its logprobs)
            plp = msg.prompt_logprobs
            for i in range(n):
                yield sse_line(completion_chunk(rid, model, created, req.echo, None,
                                                completion_logprobs(plp) if plp else None, index=i))
        while True:
            ticket.absorb(msg)
            final = isinstance(msg, Final)
            lp = msg.logprobs
            # a choice ends on the Final (n == 1) or on its last Delta (n > 1, wire.py)
            ended = msg.finish_reason is not None or (final and n == 1)
            if parsers is not None:
                parser = parsers[msg.index]
                deltas = parser.feed(msg.text) + (parser.finish() if ended else [])
                if lp and not deltas:
                    deltas = [{}]  # the logprobs still go out, with an empty delta
                for j, delta in enumerate(deltas):
                    yield sse_line(chat_chunk(rid, model, created, delta, None,
                                              chat_logprobs(lp) if lp and j == 0 else None, index=msg.index))
            elif msg.text or lp or (ended and not chat):
                if chat:
                    chunk = chat_chunk(rid, model, created, {"content": msg.text}, None,
                                       chat_logprobs(lp) if lp else None, index=msg.index)
                else:
                    chunk = completion_chunk(rid, model, created, msg.text, msg.finish_reason if ended else None,
                                             completion_logprobs(lp) if lp else None, index=msg.index)
                yield sse_line(chunk)
            if ended and chat:
                reason = parsers[msg.index].finish_reason(msg.finish_reason) if parsers else msg.finish_reason
                yield sse_line(chat_chunk(rid, model, created, {}, reason, None, index=msg.index))
            if final:
                ticket.finished = True
                if req.include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield sse_line(usage_chunk(rid, model, created, obj, _usage(ticket)))
                break
            try:
                msg = await call.next(self.deadline)
            except AdmissionError as exc:
                self.error = exc
                yield sse_line(exc.body())
                break
        yield "data: [DONE]\n\n"
