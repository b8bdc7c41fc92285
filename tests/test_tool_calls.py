"""Tool calling without Ray (serving/tool_calls.py, serving/response_format.py): validation,
history encoding for mistral-common and a chat template, forced-call grammars run through the
real engine, and parsing of whole and streamed answers."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest

from mistral_serve.engine.llm import LLM
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.serving.admission import AdmissionError
from mistral_serve.serving.response_format import constraint_from_request
from mistral_serve.serving.tool_calls import ToolContext, encode_messages, prepare_tools
from mistral_serve.tokenizer import load_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                       "required": ["tz"], "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}

# A Llama-3.1-shaped chat template (tools as JSON in the system turn, calls as JSON objects)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nTools: "
    "{% for t in tools %}{{ t | tojson }}{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": "
    "{{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def mistral_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=32 << 20)


@pytest.fixture(scope="module")
def llama_dir(tiny_llama31_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_tools") / "m"
    shutil.copytree(tiny_llama31_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAMA_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _ctx(tok, tools, choice=None, parallel=None) -> ToolContext:
    ctx = prepare_tools(tools, choice, parallel, tok)
    assert ctx is not None
    return ctx


def test_validation_and_none(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert prepare_tools(None, None, None, tok) is None
    assert prepare_tools([WEATHER], "none", None, tok) is None  # tools left out, nothing parsed
    for tools, choice, param in [([{"type": "function", "function": {"name": "a b"}}], None, "tools"),
                                 ([WEATHER], {"type": "function", "function": {"name": "zzz"}}, "tool_choice"),
                                 (None, "auto", "tool_choice"), ([WEATHER] * 2, None, "tools"),
                                 ([WEATHER], 3, "tool_choice")]:
        with pytest.raises(AdmissionError) as err:
            prepare_tools(tools, choice, None, tok)
        assert err.value.status == 400 and err.value.param == param
    # no parameters: an object without declared properties
    ctx = _ctx(tok, [{"type": "function", "function": {"name": "ping"}}])
    assert ctx.tools[0]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_mistral_history_ids_are_mapped_consistently(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_0123456789abcdef", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
            {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": "3C"}]
    enc = encode_messages(msgs, mistral=True)
    new_id = enc[1]["tool_calls"][0]["id"]
    assert len(new_id) == 9 and new_id.isalnum() and enc[2]["tool_call_id"] == new_id
    assert enc[1]["content"] is None
    text = tok.decode(tok.encode_chat(enc, [WEATHER]), skip_special_tokens=False)
    assert "[AVAILABLE_TOOLS]" in text and "[TOOL_CALLS]" in text and "[TOOL_RESULTS]" in text
    assert f'"call_id": "{new_id}"' in text and '"get_weather"' in text
    with pytest.raises(AdmissionError):
        encode_messages([{"role": "tool", "content": "x"}], mistral=True)
    with pytest.raises(AdmissionError):
        encode_messages([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f",
                                                                                         "arguments": "{bad"}}]}],
                        mistral=True)


def test_parse_mistral_answers(tiny_model_dir):
    ctx = _ctx(load_tokenizer(tiny_model_dir), [WEATHER, TIME])
    content, calls = ctx.parse('[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "UTC"}}, '
                               '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}]</s>')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Oslo", "unit": "C"})]
    assert len({c.id for c in calls}) == 2
    assert ctx.parse("Hello there</s>") == ("Hello there", [])
    assert ctx.parse("[TOOL_CALLS][{broken") == ("[TOOL_CALLS][{broken", [])  # not a call: content


@pytest.mark.parametrize("answer", [
    '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "CET"}}]</s>',
    "  Plain answer, no call.</s>",
    "[TOOL_CALLS][not json",
])
def test_streamed_deltas_assemble_to_the_whole_answer(tiny_model_dir, answer):
    ctx = _ctx(load_tokenizer(tiny_model_dir), [TIME])
    whole_content, whole_calls = ctx.parse(answer)
    for step in (1, 3, 7):
        stream = ctx.stream()
        deltas = []
        for i in range(0, len(answer), step):
            deltas += stream.feed(answer[i:i + step])
        deltas += stream.finish()
        content = "".join(d.get("content", "") for d in deltas)
        calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert content == (whole_content or "")
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
            (c.name, c.arguments) for c in whole_calls]
        assert [c["index"] for c in calls] == list(range(len(calls)))
        assert stream.finish_reason("stop") == ("tool_calls" if whole_calls else "stop")


@pytest.mark.parametrize("choice,parallel", [("required", False), ("required", True),
                                             ({"type": "function", "function": {"name": "get_time"}}, None)])
def test_forced_mistral_calls_always_parse(mistral_llm, choice, parallel):
    tok = mistral_llm.tokenizer
    ctx = _ctx(tok, [WEATHER, TIME], choice, parallel)
    ids = tok.encode_chat([{"role": "user", "content": "weather?"}], ctx.tools)
    params = [SamplingParams(max_tokens=300, temperature=1.0, seed=s, skip_special_tokens=False,
                             structured_output=ctx.forced) for s in range(4)]
    for out in mistral_llm.generate([ids] * 4, params):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.token_ids[0] == tok.control_token_id("[TOOL_CALLS]")
        content, calls = ctx.parse(c.text)
        assert content is None and calls, c.text
        if parallel is False or isinstance(choice, dict):
            assert len(calls) == 1
        if isinstance(choice, dict):
            assert calls[0].name == "get_time"
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_llama_chat_template_tools_and_forced_json_calls(llama_dir):
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=32 << 20)
    tok = llm.tokenizer
    ctx = _ctx(tok, [WEATHER, TIME], "required")
    assert not ctx.mistral and ctx.forced.kind == "json_schema"
    history = encode_messages([{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": None, "tool_calls": [
                                   {"id": "call_1", "type": "function",
                                    "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
                               {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
                               {"role": "user", "content": "and the weather?"}], mistral=False)
    prompt = tok.encode_chat(history, ctx.tools)
    text = tok.decode(prompt)
    assert '"get_weather"' in text and '{"name": "get_time", "parameters": {"tz": "UTC"}}' in text
    outs = llm.generate([prompt] * 3, [SamplingParams(max_tokens=120, temperature=1.0, seed=s,
                                                      structured_output=ctx.forced) for s in range(3)])
    for out in outs:
        content, calls = ctx.parse(out.outputs[0].text)
        assert content is None and len(calls) == 1, out.outputs[0].text
        jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])


class _Req:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def test_constraint_from_request_names_and_errors():
    assert constraint_from_request(_Req(response_format={"type": "text"})) is None
    assert constraint_from_request(_Req(response_format={"type": "json_object"})).kind == "json_schema"
    spec = constraint_from_request(_Req(structured_outputs={"json": '{"type": "integer"}'}))
    assert spec.kind == "json_schema" and json.loads(spec.value) == {"type": "integer"}
    assert constraint_from_request(_Req(guided_choice=["a", "b"])).kind == "choice"
    assert constraint_from_request(_Req(guided_grammar='start: "a"+')).kind == "grammar"
    with pytest.raises(AdmissionError, match="grammar"):
        constraint_from_request(_Req(guided_grammar="start: ((("))
    with pytest.raises(AdmissionError) as err:
        constraint_from_request(_Req(response_format={"type": "json_schema",
                                                      "json_schema": {"schema": {"type": "nope"}}}))
    assert err.value.param == "response_format" and "nope" in err.value.message


def test_parse_json_format_answers(llama_dir):
    ctx = _ctx(load_tokenizer(llama_dir), [WEATHER, TIME])
    content, calls = ctx.parse('<|python_tag|>{"name": "get_weather", "parameters": {"city": "a;b", "unit": "C"}}; '
                               '{"name": "get_time", "parameters": {"tz": "UTC"}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "a;b", "unit": "C"}), ("get_time", {"tz": "UTC"})]
    assert ctx.parse('{"just": "json"}') == ('{"just": "json"}', [])  # no name: content
    assert ctx.parse("Hi there") == ("Hi there", [])
