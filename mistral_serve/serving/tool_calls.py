"""OpenAI tool calling: request validation, prompt encoding, forced-call grammars, and parsing
the model's calls back into OpenAI ``tool_calls`` (whole responses and streamed deltas).

Two model formats, chosen by the tokenizer:

* Mistral (mistral-common tokenizers): the prompt carries ``[AVAILABLE_TOOLS]`` and the history's
  ``[TOOL_CALLS]`` / ``[TOOL_RESULTS]`` exactly as mistral-common encodes them; the model answers
  ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``. mistral-common wants tool call ids
  of 9 letters or digits, so other ids in the history (``call_...``) are mapped to 9-character
  digests, the same one for a call and its result; ids we hand out are already of that form.
* JSON (HF tokenizers, e.g. Llama 3.1): the checkpoint's chat template renders ``tools`` and
  the history; the model answers one JSON object ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``.

``tool_choice``: ``none`` leaves the tools out of the prompt and parses nothing (vLLM's default);
``auto`` parses calls when the answer starts with the format's marker; ``required`` and a named
function constrain decoding (engine/structured_output.py) to the format's call syntax with the
functions' parameter schemas, so the call is always well formed (until ``max_tokens``).
``parallel_tool_calls: false`` allows one call in a forced Mistral answer; the JSON format
always makes one call, as the Llama 3.1 template documents.

Streaming: content streams as usual; once the answer starts with the call marker the text is
held and, when the request finishes, each parsed call is sent as one delta (index, id, type,
name and the complete arguments), the shape OpenAI clients assemble incrementally anyway. An
answer that looked like a call but does not parse is sent as content.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from mistral_serve.engine.structured_output import StructuredOutputSpec
from mistral_serve.serving.admission import AdmissionError
from mistral_serve.tokenizer.tokenizer import MistralCommonTokenizer, Tokenizer

MAX_TOOLS = 128
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ID_ALPHABET = string.ascii_letters + string.digits
MISTRAL_MARKER = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"


def _bad(message: str, param: str) -> AdmissionError:
    return AdmissionError(400, message, reason="invalid_request", param=param)


def new_call_id() -> str:
    """9 letters/digits: valid in a Mistral history (mistral-common checks) and for OpenAI."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def _mistral_id(call_id: str) -> str:
    if _MISTRAL_ID.match(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in digest[:9])


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, serialised

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out = {"index": index, **out}
        return out


@dataclass
class ToolContext:
    """A chat request's validated tools and how its answer is decoded and parsed."""

    tools: list[dict[str, Any]]  # OpenAI shape, validated
    choice: str | None  # "auto", "required", or None for a named function
    named: str | None
    parallel: bool
    mistral: bool
    eos_texts: tuple[str, ...]
    forced: StructuredOutputSpec | None = None  # the grammar of a call tool_choice forces

    @property
    def marker(self) -> str:
        return MISTRAL_MARKER if self.mistral else "{"

    # ---- parsing -------------------------------------------------------------------------

    def strip_eos(self, text: str) -> str:
        """The answer without the EOS token's text (decoded when special tokens are kept)."""
        for eos in self.eos_texts:
            if eos and text.endswith(eos):
                return text[: -len(eos)]
        return text

    def looks_like_call(self, text: str) -> bool | None:
        """True / False once the start of the answer decides it, None while it may still go
        either way (whitespace, or a prefix of the marker)."""
        s = text.lstrip()
        if not self.mistral and s.startswith(PYTHON_TAG):
            return True
        if not s or (self.marker.startswith(s) and s != self.marker) or (not self.mistral and PYTHON_TAG.startswith(s)):
            return None
        return s.startswith(self.marker)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer; no calls (and the text as content) when it
        does not hold a well-formed call."""
        text = self.strip_eos(text)
        if not self.looks_like_call(text):
            return text, []
        s = text.lstrip()
        try:
            if self.mistral:
                raw = json.loads(s[len(MISTRAL_MARKER):])
                items = raw if isinstance(raw, list) else [raw]
                calls = [self._call(item, "arguments") for item in items]
            else:
                if s.startswith(PYTHON_TAG):
                    s = s[len(PYTHON_TAG):]
                calls = [self._call(obj, "parameters") for obj in _json_values(s)]
        except (ValueError, TypeError, KeyError):
            return text, []
        if not calls:
            return text, []
        return None, calls

    @staticmethod
    def _call(item: Any, args_key: str) -> ToolCall:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("not a call")
        args = item.get(args_key, item.get("arguments", {}))
        if not isinstance(args, dict):
            raise ValueError("arguments are not an object")
        return ToolCall(new_call_id(), item["name"], json.dumps(args, ensure_ascii=False))

    def apply_to_choice(self, choice: dict[str, Any]) -> None:
        """Rewrite one non-streamed chat choice: parsed calls go to ``message.tool_calls``
        (content null) with ``finish_reason: "tool_calls"``."""
        message = choice["message"]
        content, calls = self.parse(message.get("content") or "")
        message["content"] = content
        if calls:
            message["tool_calls"] = [call.openai() for call in calls]
            choice["finish_reason"] = "tool_calls"

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


def _json_values(text: str) -> list[Any]:
    """The JSON values of ``text`` separated by whitespace or ``;`` (Llama 3.1's parallel-call
    convention); raises ValueError on anything else."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        value, i = decoder.raw_decode(text, i)
        values.append(value)


class ToolCallStream:
    """Turns one answer's text deltas into chat ``delta`` dicts (see the module docstring)."""

    def __init__(self, ctx: ToolContext) -> None:
        self.ctx = ctx
        self.held = ""
        self.tail = ""  # content held back: it may be (the start of) the EOS text
        self.decided: bool | None = None
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.decided is False:
            return self._content(text)
        self.held += text
        if self.decided is None:
            self.decided = self.ctx.looks_like_call(self.held)
            if self.decided is False:
                out, self.held = self.held, ""
                return self._content(out)
        return []

    def _content(self, text: str) -> list[dict[str, Any]]:
        """Content deltas, holding back a suffix that may be the EOS text (which ``parse``
        strips from the end of a whole answer): it is dropped or sent when the answer ends."""
        text, self.tail = self.tail + text, ""
        for eos in self.ctx.eos_texts:
            k = next((k for k in range(min(len(eos), len(text)), 0, -1) if text.endswith(eos[:k])), 0)
            if k:
                text, self.tail = text[:-k], text[-k:]
                break
        return [{"content": text}] if text else []

    def finish(self) -> list[dict[str, Any]]:
        """The deltas still owed once the request finished."""
        if self.decided is False:
            rest = self.ctx.strip_eos(self.tail)
            return [{"content": rest}] if rest else []
        content, self.calls = self.ctx.parse(self.held)
        if not self.calls:
            return [{"content": content}] if content else []
        return [{"tool_calls": [call.openai(i)]} for i, call in enumerate(self.calls)]

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.calls else engine_reason


# ---- requests --------------------------------------------------------------------------------


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's ``tools``: function tools with a name, optional description and a parameters
    object schema (default: an object with no declared properties)."""
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of function tools.", "tools")
    if len(tools) > MAX_TOOLS:
        raise _bad(f"At most {MAX_TOOLS} tools are allowed, got {len(tools)}.", "tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"tools[{i}]: only tools of type 'function' are supported.", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"tools[{i}].function must be an object.", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(f"tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}.", "tools")
        if name in seen:
            raise _bad(f"tools[{i}]: the function name {name!r} is used twice.", "tools")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise _bad(f"tools[{i}].function.description must be a string.", "tools")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema object.", "tools")
        clean = {"name": name, "parameters": params}
        if desc is not None:
            clean["description"] = desc
        out.append({"type": "function", "function": clean})
    return out


def _choice(tool_choice: Any, names: set[str]) -> tuple[str | None, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise _bad("tool_choice.function.name must be a string.", "tool_choice")
        if name not in names:
            raise _bad(f"tool_choice names the function {name!r}, which is not in 'tools'.", "tool_choice")
        return None, name
    raise _bad("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
               "{\"name\": ...}}.", "tool_choice")


def prepare_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any, tokenizer: Tokenizer) -> ToolContext | None:
    """The request's ToolContext, or None when it uses no tools (none given, or ``none``)."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad("parallel_tool_calls must be a boolean.", "parallel_tool_calls")
    if tools is None:
        if tool_choice not in (None, "none"):
            raise _bad("tool_choice is only allowed when tools are specified.", "tool_choice")
        return None
    tools = validate_tools(tools)
    choice, named = _choice(tool_choice, {t["function"]["name"] for t in tools})
    if choice == "none" or not tools:
        return None
    mistral = isinstance(tokenizer, MistralCommonTokenizer)
    eos_texts = tuple(tokenizer.decode([e], skip_special_tokens=False) for e in tokenizer.eos_token_ids)
    ctx = ToolContext(tools, choice, named, parallel_tool_calls is not False, mistral, eos_texts)
    if choice == "required" or named:
        ctx.forced = _forced_spec(ctx, tokenizer)
    return ctx


def _call_schema(fn: dict[str, Any], args_key: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: fn["parameters"]},
            "required": ["name", args_key], "additionalProperties": False}


def _forced_spec(ctx: ToolContext, tokenizer: Tokenizer) -> StructuredOutputSpec:
    fns = [t["function"] for t in ctx.tools if ctx.named is None or t["function"]["name"] == ctx.named]
    if ctx.mistral:
        marker = tokenizer.control_token_id(MISTRAL_MARKER)
        if marker is None:
            raise _bad("This model's tokenizer has no [TOOL_CALLS] token: tool_choice cannot force a call.",
                       "tool_choice")
        items = [_call_schema(fn, "arguments") for fn in fns]
        schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                                  "minItems": 1}
        if not ctx.parallel or ctx.named:
            schema["maxItems"] = 1
        schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        # The optional space: mistral-common encodes calls as "[TOOL_CALLS] [{...", so the model's
        # likeliest next token is "▁[" (space-prefixed); the grammar lets it keep that choice.
        return StructuredOutputSpec.grammar(f'start: <[{marker}]> " "? calls\ncalls: %json {json.dumps(schema)}\n')
    items = [_call_schema(fn, "parameters") for fn in fns]
    return StructuredOutputSpec.json_schema(items[0] if len(items) == 1 else {"anyOf": items})


def encode_messages(messages: list[dict[str, Any]], mistral: bool) -> list[dict[str, Any]]:
    """Messages with tool calls and results in the shape the tokenizer's encoder wants:
    mistral-common (9-character ids, no content beside tool_calls) or a chat template
    (arguments as objects, which templates serialise themselves)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls must be a list.", "messages")
            fixed = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
                    raise _bad(f"messages[{i}].tool_calls entries need an id and a function with a name.", "messages")
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        parsed = json.loads(args or "{}")
                    except ValueError:
                        raise _bad(f"messages[{i}].tool_calls: arguments must be a JSON object string.",
                                   "messages") from None
                else:
                    parsed = args
                if mistral:
                    fixed.append({"id": _mistral_id(call["id"]), "type": "function",
                                  "function": {"name": fn["name"], "arguments": json.dumps(parsed)}})
                else:
                    fixed.append({"id": call["id"], "type": "function",
                                  "function": {"name": fn["name"], "arguments": parsed}})
            m["tool_calls"] = fixed
            if mistral or not m.get("content"):
                m["content"] = None  # mistral-common: content or tool_calls, not both
        elif role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise _bad(f"messages[{i}]: a tool message needs a tool_call_id.", "messages")
            if mistral:
                m["tool_call_id"] = _mistral_id(m["tool_call_id"])
            if m.get("content") is None:
                m["content"] = ""
        out.append(m)
    return out
