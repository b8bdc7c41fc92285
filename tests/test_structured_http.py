"""Structured outputs and tool calling end to end: the official ``openai`` client and LangChain
against the live Ray Serve app (tests/ray_fixtures.py), tiny random-weight model.

The model's own preferences are noise, so every well-formed JSON answer or tool call here is
the grammar's doing; schemas bound their strings and numbers so that answers end in time.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest

from test_serving_http import _assert_error_body, _client, _post

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
                   "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def _chat_stream_text(client, **kwargs) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish


# ---- structured outputs -------------------------------------------------------------------------


def test_json_schema_chat_streamed_and_not_batched_with_free_requests(live_server):
    client = _client(live_server)
    model = live_server.model

    def constrained(i: int) -> tuple[str, str | None]:
        kwargs = dict(model=model, messages=USER, max_tokens=100, temperature=1.0, seed=i,
                      response_format=_json_schema_format(PERSON))
        if i % 2:
            return _chat_stream_text(client, **kwargs)
        r = client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason

    def free(i: int) -> str | None:
        r = client.completions.create(model=model, prompt=f"free {i}", max_tokens=30, temperature=1.0, seed=i)
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        frees = [pool.submit(free, i) for i in range(4)]
        results = list(pool.map(constrained, range(6)))
    assert [f.result() for f in frees] == ["length"] * 4
    for text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_schema_on_completions_and_vllm_extras(live_server):
    client = _client(live_server)
    m = live_server.model
    r = client.completions.create(model=m, prompt="JSON:", max_tokens=100, temperature=1.0, seed=3,
                                  extra_body={"response_format": _json_schema_format(PERSON)})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.completions.create(model=m, prompt="x", max_tokens=20, extra_body={
        "structured_outputs": {"choice": ["left", "right"]}})
    assert r.choices[0].text in ("left", "right") and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=m, messages=USER, max_tokens=20, extra_body={
        "guided_regex": "[a-c]{2}-[0-9]"})
    assert len(r.choices[0].message.content) == 4 and r.choices[0].message.content[2] == "-"
    r = client.chat.completions.create(model=m, messages=USER, max_tokens=20, extra_body={
        "guided_choice": ["one", "two"]})
    assert r.choices[0].message.content in ("one", "two")
    r = client.completions.create(model=m, prompt="x", max_tokens=20, extra_body={
        "structured_outputs": {"json": {"type": "boolean"}}})
    assert json.loads(r.choices[0].text) in (True, False)


def test_json_object_cut_off_is_length(live_server):
    r = _client(live_server).chat.completions.create(
        model=live_server.model, messages=USER, max_tokens=4, temperature=1.0, seed=1,
        response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("{")


M = "MODEL"
BAD = [
    ("rf-unknown-type", {"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ("rf-not-object", {"response_format": "json"}, "response_format", None),
    ("rf-schema-missing", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "schema"),
    ("rf-strict-not-bool", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": 1}}},
     "response_format", "strict"),
    ("rf-unsupported-keyword", {"response_format": _json_schema_format({"not": {"type": "string"}})},
     "response_format", "not"),
    ("rf-look-around", {"response_format": _json_schema_format({"type": "string", "pattern": "(?=a)b"})},
     "response_format", "look-around"),
    ("two-constraints", {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", None),
    ("so-two-keys", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", None),
    ("guided-choice-empty", {"guided_choice": []}, "guided_choice", None),
    ("guided-regex-bad", {"guided_regex": "(unclosed"}, "guided_regex", None),
    ("guided-json-not-schema", {"guided_json": 3}, "guided_json", None),
    ("tools-not-list", {"tools": {"type": "function"}}, "tools", None),
    ("tools-not-function", {"tools": [{"type": "retrieval"}]}, "tools", None),
    ("tools-duplicate", {"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ("tools-bad-params", {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "tools", None),
    ("tool-choice-unknown-fn", {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                    "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ("tool-choice-bad-string", {"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", None),
    ("tool-choice-without-tools", {"tool_choice": "required"}, "tool_choice", None),
    ("parallel-not-bool", {"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", None),
    ("forced-tool-unsupported-schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}], "tool_choice": "required"},
     "tools", "not"),
    ("forced-tool-and-response-format", {"tools": [WEATHER], "tool_choice": "required",
                                         "response_format": {"type": "json_object"}}, "response_format", None),
    ("tool-message-without-id", {"messages": USER + [{"role": "tool", "content": "22C"}]}, "messages", None),
]


@pytest.mark.parametrize("row", BAD, ids=[r[0] for r in BAD])
def test_bad_structured_and_tool_fields_are_openai_400s(live_server, row):
    _, extra, param, needle = row
    body = {"model": live_server.model, "messages": USER, "max_tokens": 5, **extra}
    err = _assert_error_body(_post(live_server, "/v1/chat/completions", body), 400, "invalid_request_error",
                             None, param)
    if needle:
        assert needle in err["message"], err


# ---- tool calling --------------------------------------------------------------------------------


def _assert_valid_call(call, names=("get_weather",)) -> tuple[str, dict]:
    assert call.type == "function" and call.function.name in names
    assert len(call.id) >= 9
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return call.function.name, args


def _streamed_calls(client, **kwargs) -> tuple[list[tuple[str, dict]], str | None, str]:
    """Assemble streamed tool-call deltas as clients do (by index, arguments concatenated)."""
    calls: dict[int, dict] = {}
    finish, content = None, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            content.append(choice.delta.content or "")
            for d in choice.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = d.id or entry["id"]
                if d.function is not None:
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
    assert all(c["id"] for c in calls.values())
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish, "".join(content)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_named_tool_choice_always_parses_streamed_equals_non_streamed(live_server, seed):
    client = _client(live_server)
    kwargs = dict(model=live_server.model, messages=USER, tools=[WEATHER, TIME], max_tokens=80, temperature=1.0,
                  seed=seed, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    whole = [_assert_valid_call(c) for c in choice.message.tool_calls]
    streamed, finish, content = _streamed_calls(client, **kwargs)
    assert finish == "tool_calls" and content == ""
    assert streamed == whole  # same seed, same tokens: the same calls either way


def test_forced_tool_calls_with_n_choices(live_server):
    """Each choice gets its own grammar in the engine and its own parser in the Router."""
    client = _client(live_server)
    kwargs = dict(model=live_server.model, messages=USER, tools=[TIME], tool_choice="required", n=3,
                  parallel_tool_calls=False, max_tokens=60, temperature=1.0, seed=9)
    r = client.chat.completions.create(**kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _assert_valid_call(choice.message.tool_calls[0], names=("get_time",))
    finishes: dict[int, str] = {}
    calls: dict[int, list] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
            for d in choice.delta.tool_calls or ():
                calls.setdefault(choice.index, []).append((d.function.name, json.loads(d.function.arguments)))
    assert finishes == {0: "tool_calls", 1: "tool_calls", 2: "tool_calls"}
    assert calls == {i: [(c.message.tool_calls[0].function.name, json.loads(c.message.tool_calls[0].function.arguments))]
                     for i, c in enumerate(r.choices)}


def test_required_tool_choice_picks_a_declared_function(live_server):
    """Parallel calls are not bounded in number (as OpenAI's), and the random model keeps adding
    them about 3 times in 4 after each call: one parallel row offers only the short get_time,
    whose calls fit many times into max_tokens."""
    client = _client(live_server)
    for seed, parallel, tools in [(4, False, [WEATHER, TIME]), (5, True, [TIME, WEATHER]), (6, True, [TIME])]:
        r = client.chat.completions.create(model=live_server.model, messages=USER, tools=tools,
                                           tool_choice="required", parallel_tool_calls=parallel, max_tokens=260,
                                           temperature=1.0, seed=seed)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(calls) >= 1 if parallel else len(calls) == 1
        for call in calls:
            _assert_valid_call(call, names=("get_weather", "get_time"))
        assert len({c.id for c in calls}) == len(calls)


def test_history_with_tool_calls_and_results_round_trips(live_server):
    """A forced call, its result sent back (OpenAI-style ids too), and the next turn."""
    client = _client(live_server)
    m = live_server.model
    first = client.chat.completions.create(model=m, messages=USER, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, temperature=0.0)
    call = first.choices[0].message.tool_calls[0]
    history = USER + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 22})},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_Xy12-openai-style", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city": "Rome", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_Xy12-openai-style", "content": "25C"},
        {"role": "user", "content": "Thanks. And in Oslo?"},
    ]
    r = client.chat.completions.create(model=m, messages=history, tools=[WEATHER], max_tokens=10, temperature=0.0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the tool definitions and results reached the prompt, encoded by mistral-common
    tok = _post(live_server, "/tokenize", {"model": m, "messages": history}).json()
    assert tok["count"] > 20
    r = client.chat.completions.create(model=m, messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=5, temperature=0.0)
    assert r.choices[0].message.tool_calls is None


def test_auto_tool_choice_answers_content_or_calls(live_server):
    client = _client(live_server)
    kwargs = dict(model=live_server.model, messages=USER, tools=[WEATHER], max_tokens=12, temperature=0.0)
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.finish_reason in ("stop", "length")
        assert "[TOOL_CALLS]" not in (choice.message.content or "") and "</s>" not in (choice.message.content or "")
        text, finish = _chat_stream_text(client, **kwargs)
        assert (text, finish) == (choice.message.content, choice.finish_reason)


# ---- LangChain ----------------------------------------------------------------------------------


def _chat_model(live):
    lc_openai = pytest.importorskip("langchain_openai")
    return lc_openai.ChatOpenAI(model=live.model, base_url=live.base_url + "/v1", api_key=live.api_keys["alpha"],
                                temperature=0.0, max_tokens=100, max_retries=0, timeout=120)


def test_langchain_bind_tools_forced_and_tool_message_round_trip(live_server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_time(tz: Literal["UTC", "CET"]) -> str:
        """Local time in a timezone."""
        return "12:00"

    # LangChain's own schema for the @tool, beside a plain OpenAI dict tool; strict=True makes
    # LangChain send additionalProperties: false, without which the random model adds keys
    llm = _chat_model(live_server).bind_tools([WEATHER, get_time], tool_choice="get_time", strict=True)
    ai = llm.invoke([HumanMessage("What time is it in Paris?")])
    assert [c["name"] for c in ai.tool_calls] == ["get_time"]
    assert ai.tool_calls[0]["args"]["tz"] in ("UTC", "CET")
    streamed = None
    for chunk in llm.stream([HumanMessage("What time is it in Paris?")]):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in ai.tool_calls]
    follow = llm.bind(tool_choice="none").invoke(
        [HumanMessage("What time is it in Paris?"), ai, ToolMessage("12:00", tool_call_id=ai.tool_calls[0]["id"])])
    assert follow.response_metadata["finish_reason"] in ("stop", "length")


def test_langchain_with_structured_output(live_server):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=120)

    llm = _chat_model(live_server)
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method, strict=True).invoke("Describe someone.")
        assert isinstance(person, Person), method
