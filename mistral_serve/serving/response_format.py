"""A request's structured-output constraint, from OpenAI's ``response_format`` or vLLM's extras.

Accepted (at most one constraint per request, else 400):

* ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any
  JSON object), ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
  "strict": ...}}`` (the schema; ``strict`` is accepted and changes nothing: the output always
  follows the schema);
* vLLM's current ``structured_outputs``: ``{"json": schema | str, "regex": str, "choice": [str],
  "grammar": str}`` (one key), and its older top-level names ``guided_json``, ``guided_regex``,
  ``guided_choice``, ``guided_grammar``.

Every constraint is checked by llguidance here, in the Router, so an unsupported schema
feature (``not``, an unknown ``format``, look-around in a ``pattern``...) is a 400 that names it
before anything is queued.
"""

from __future__ import annotations

import json
from typing import Any

from mistral_serve.engine.structured_output import StructuredOutputSpec, check_spec
from mistral_serve.serving.admission import AdmissionError

_VLLM_KEYS = ("json", "regex", "choice", "grammar")
MAX_CONSTRAINT_CHARS = 64 * 1024


def _bad(message: str, param: str) -> AdmissionError:
    return AdmissionError(400, message, reason="invalid_request", param=param)


def _schema(value: Any, param: str) -> StructuredOutputSpec:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _bad(f"{param} must be a JSON schema (an object, or a string holding one).", param) from None
    if not isinstance(value, (dict, bool)):
        raise _bad(f"{param} must be a JSON schema object.", param)
    return StructuredOutputSpec.json_schema(value)


def _from_vllm(key: str, value: Any, param: str) -> StructuredOutputSpec:
    if key == "json":
        return _schema(value, param)
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise _bad(f"{param} must be a non-empty list of non-empty strings.", param)
        return StructuredOutputSpec.choice(value)
    if not isinstance(value, str) or not value:
        raise _bad(f"{param} must be a non-empty string.", param)
    return StructuredOutputSpec.regex(value) if key == "regex" else StructuredOutputSpec.grammar(value)


def _from_response_format(rf: Any) -> StructuredOutputSpec | None:
    if not isinstance(rf, dict):
        raise _bad("response_format must be an object with a 'type'.", "response_format")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutputSpec.json_object()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise _bad("response_format.json_schema must be an object with a 'schema'.", "response_format")
        if "schema" not in js:
            raise _bad("response_format.json_schema.schema is required.", "response_format")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad("response_format.json_schema.name must be a string.", "response_format")
        if js.get("strict") is not None and not isinstance(js["strict"], bool):
            raise _bad("response_format.json_schema.strict must be a boolean.", "response_format")
        return _schema(js["schema"], "response_format")
    raise _bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
               "response_format")


def constraint_from_request(req: Any) -> StructuredOutputSpec | None:
    """The one constraint ``req`` asks for (checked by llguidance), or None."""
    found: list[tuple[str, StructuredOutputSpec]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        spec = _from_response_format(rf)
        if spec is not None:
            found.append(("response_format", spec))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("structured_outputs must be an object.", "structured_outputs")
        keys = [k for k in _VLLM_KEYS if so.get(k) is not None]
        if len(keys) != 1:
            raise _bad("structured_outputs must set exactly one of 'json', 'regex', 'choice', 'grammar'.",
                       "structured_outputs")
        found.append(("structured_outputs", _from_vllm(keys[0], so[keys[0]], "structured_outputs")))
    for key in _VLLM_KEYS:
        value = getattr(req, f"guided_{key}", None)
        if value is not None:
            found.append((f"guided_{key}", _from_vllm(key, value, f"guided_{key}")))
    if not found:
        return None
    if len(found) > 1:
        raise _bad(f"Give at most one structured-output constraint; got {', '.join(p for p, _ in found)}.",
                   found[1][0])
    param, spec = found[0]
    check_constraint(spec, param)
    return spec


def check_constraint(spec: StructuredOutputSpec, param: str) -> None:
    """400 with llguidance's reason when ``spec`` cannot be compiled."""
    if len(spec.value) > MAX_CONSTRAINT_CHARS:
        raise _bad(f"The {param} constraint is longer than {MAX_CONSTRAINT_CHARS} characters.", param)
    reason = check_spec(spec)
    if reason is not None:
        raise _bad(f"Unsupported {param}: {reason}", param)
