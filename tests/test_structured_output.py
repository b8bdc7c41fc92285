"""Constrained decoding in the engine (engine/structured_output.py, the sampler's mask stage).

The tiny model has random weights, so whatever it "wants" to write is noise: an output that
parses and validates can only come from the grammar mask. Schemas bound their strings, arrays
and numbers so that a random walk through them ends well within max_tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from mistral_serve.engine.llm import LLM
from mistral_serve.engine.llm_engine import RequestError
from mistral_serve.engine.sampler import sample
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.sequence import Sequence
from mistral_serve.engine.structured_output import (
    GrammarCompiler,
    StructuredOutputSpec,
    allowed_tokens,
    check_spec,
)
from mistral_serve.tokenizer import load_tokenizer

S = StructuredOutputSpec

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 150}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "ok": {"type": "boolean"}},
                 "required": ["id", "ok"], "additionalProperties": False},
        "note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["user", "note"], "additionalProperties": False},
    "array_of_enums": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}},
        "required": ["tags"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                                 "n": {"type": "integer", "minimum": -5, "maximum": 5}},
                "required": ["x", "n"], "additionalProperties": False},
    "array_top": {"type": "array", "items": {"type": "object", "properties": {"k": {"const": "v"}},
                                             "required": ["k"], "additionalProperties": False},
                  "minItems": 1, "maxItems": 3},
    "enum_top": {"enum": ["alpha", "beta", 3, None]},
    "defs_ref": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}},
                                  "required": ["x"], "additionalProperties": False}},
                 "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
                 "required": ["a", "b"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=16,
               kv_cache_memory_bytes=64 << 20)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_constrained_output_validates_batched_with_free_requests(llm, temperature):
    prompts, params, schemas = [], [], []
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        prompts.append(f"Write {name} as JSON:")
        params.append(SamplingParams(max_tokens=120, temperature=temperature, seed=i,
                                     structured_output=S.json_schema(schema)))
        schemas.append(schema)
        prompts.append(f"Free text {i}")  # unconstrained neighbours in the same steps
        params.append(SamplingParams(max_tokens=24, temperature=temperature, seed=100 + i, top_k=50))
        schemas.append(None)
    outs = llm.generate(prompts, params)
    for out, schema in zip(outs, schemas):
        c = out.outputs[0]
        if schema is None:
            assert c.finish_reason == "length" and len(c.token_ids) == 24
            continue
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)


def test_json_object_and_properties_in_schema_order(llm):
    schema = {"type": "object", "properties": {"z": {"type": "boolean"}, "a": {"type": "boolean"}},
              "required": ["z", "a"], "additionalProperties": False}
    out = llm.generate("x", SamplingParams(max_tokens=40, temperature=0.0,
                                           structured_output=S.json_schema(schema)))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert list(json.loads(out.text)) == ["z", "a"]  # as OpenAI: the schema's order
    assert re.fullmatch(r'\{"z": (true|false), "a": (true|false)\}', out.text)  # json.dumps spacing


def test_regex_and_choice(llm):
    outs = llm.generate(["a", "b", "c"], [
        SamplingParams(max_tokens=30, temperature=1.0, seed=1, structured_output=S.regex(r"[0-9]{3}-[a-z]{2,4}")),
        SamplingParams(max_tokens=30, temperature=1.0, seed=2, structured_output=S.choice(["yes", "no", "maybe"])),
        SamplingParams(max_tokens=30, temperature=0.0, structured_output=S.grammar('start: "x" ("y" | "z")')),
    ])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", outs[0].outputs[0].text)
    assert outs[1].outputs[0].text in ("yes", "no", "maybe")
    assert outs[2].outputs[0].text in ("xy", "xz")
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)


def test_max_tokens_cut_off_is_length(llm):
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    out = llm.generate("x", SamplingParams(max_tokens=5, temperature=1.0, seed=3,
                                           structured_output=S.json_schema(schema)))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.text.startswith('{"s": "')
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_unsupported_schema_is_a_request_error_with_the_reason(llm):
    assert "not" in check_spec(S.json_schema({"not": {"type": "string"}}))
    assert "look-around" in check_spec(S.json_schema({"type": "string", "pattern": "(?=a)b"}))
    assert check_spec(S.json_schema(SCHEMAS["nested"])) is None
    with pytest.raises(RequestError, match="Unimplemented keys"):
        llm.engine.add_request("bad-schema", "x", SamplingParams(structured_output=S.json_schema({"not": {}})))
    assert "bad-schema" not in llm.engine.requests


def test_mask_touches_only_constrained_rows(tiny_model_dir):
    """One sample() call, greedy: free rows give exactly the argmax of their logits; the
    constrained row gives a token its grammar allows."""
    tok = load_tokenizer(tiny_model_dir)
    vocab = 32768
    compiler = GrammarCompiler(tok, vocab, tok.eos_token_ids)
    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams(temperature=0.0), (2,), None) for i in range(3)]
    seqs[1].grammar = compiler.new_state(S.choice(["yes", "no"]))
    torch.manual_seed(0)
    logits = torch.randn(3, vocab)
    expected = logits.argmax(dim=-1).tolist()
    allowed = allowed_tokens([seqs[1].grammar], vocab)[0]
    result = sample(logits.clone(), seqs)
    assert result.token_ids[0] == expected[0] and result.token_ids[2] == expected[2]
    assert allowed[result.token_ids[1]] == 1
    assert 0 < allowed.sum() < 10


def test_grammar_cache_reuses_compiled_matchers(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    compiler = GrammarCompiler(tok, 32768, tok.eos_token_ids, cache_size=2)
    spec = S.json_schema(SCHEMAS["flat"])
    assert compiler.prepare(spec) is compiler.prepare(S.json_schema(json.loads(spec.value)))
    a, b = compiler.new_state(spec), compiler.new_state(spec)
    a.accept(int(np.flatnonzero(allowed_tokens([a], 32768)[0])[0]))  # copies advance independently
    assert not np.array_equal(allowed_tokens([a], 32768), allowed_tokens([b], 32768))
    compiler.prepare(S.regex("a+"))
    compiler.prepare(S.regex("b+"))
    assert spec not in compiler._cache  # LRU bound


def test_sentencepiece_token_bytes_round_trip(tiny_model_dir):
    """The byte table handed to llguidance spells every token as the tokenizer decodes it."""
    from mistral_serve.tokenizer.tokenizer import _SentencePieceBytes

    tok = load_tokenizer(tiny_model_dir)
    table = _SentencePieceBytes(tok._tok._model, [2])
    for text in ['{"a": 1}', "Hello world\nnew line", "é日本 ok", "  two spaces"]:
        ids = table(text)
        assert b"".join(table.tokens[i] for i in ids) == text.encode()
    assert table.tokens[2] == b"</s>" and 2 in table.special_token_ids


def test_hf_tokenizer_models_are_constrained_too(tiny_llama31_dir):
    llm = LLM(str(tiny_llama31_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=32 << 20)
    schema = SCHEMAS["array_of_enums"]
    out = llm.generate("x", SamplingParams(max_tokens=60, temperature=1.0, seed=5,
                                           structured_output=S.json_schema(schema)))[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), schema)


def test_n_choices_each_follow_the_schema(llm):
    """n > 1: every choice gets its own grammar state (copies advance independently)."""
    schema = SCHEMAS["array_of_enums"]
    out = llm.generate("x", SamplingParams(max_tokens=60, temperature=1.0, seed=11, n=4,
                                           structured_output=S.json_schema(schema)))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    texts = [c.text for c in out.outputs]
    for c in out.outputs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)
    assert len(set(texts)) > 1, texts
