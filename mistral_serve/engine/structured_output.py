"""Constrained decoding (structured outputs) with llguidance.

A request's constraint is a :class:`StructuredOutputSpec` (a JSON schema, a regex, a list of
choices or a Lark/GBNF grammar), a small frozen value that rides in ``SamplingParams`` across
the Router → replica boundary and is the cache key of its compiled grammar.

Why llguidance (pyproject.toml says the same): it has no Python dependencies at all (xgrammar
0.2.9 requires torch, triton and apache-tvm-ffi, which would pull a second torch), computes a
token mask in ~50-200 us per row on the CPU without a per-token-trie Python walk, reports
unsupported JSON-schema features as errors we can return as 400s, and is one of vLLM's
structured-output backends.

Life of a constrained request:

* the Router calls :func:`check_spec` (no tokenizer needed) so an unsupported schema is a 400
  with llguidance's reason, before anything is queued;
* the engine's :class:`GrammarCompiler` turns the spec into an ``LLMatcher`` for the model's
  vocabulary. Building one is the expensive part (lexer construction), so a pristine matcher is
  cached per spec and each request gets a ``deep_copy`` (microseconds). The engine core compiles
  in its receiver thread before it queues the request, never in the engine loop;
* every step the sampler asks :func:`allowed_tokens` for the rows that carry a
  :class:`GrammarState`: one call into llguidance fills all their bitmasks in parallel (GIL
  released) and one ``np.unpackbits`` turns them into a [rows, V] 0/1 array, applied to the
  logits as one masked write. Unconstrained rows are never touched, and a batch without any
  constrained row pays one list comprehension;
* the engine feeds each sampled token to the row's matcher; when the grammar can accept no
  more bytes (``is_stopped``) the request finishes with ``finish_reason: "stop"``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from mistral_serve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SpecKind = Literal["json_schema", "regex", "choice", "grammar"]

# JSON is generated as json.dumps writes it by default ({"a": 1, "b": [2, 3]}): what models
# saw in training, and no free whitespace for a (random or weak) model to loop in. A schema's
# own "x-guidance" options override these.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    """One decoding constraint. ``value``: its text (a compact JSON schema, a regex, a JSON list
    of choices, or a grammar), also the compile cache's key. Schema key order is kept: JSON
    objects are generated with their properties in the schema's order, as OpenAI does."""

    kind: SpecKind
    value: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> StructuredOutputSpec:
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> StructuredOutputSpec:
        """OpenAI's JSON mode: any JSON object."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutputSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutputSpec:
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def grammar(cls, text: str) -> StructuredOutputSpec:
        """A Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's)."""
        return cls("grammar", text)

    def llguidance_grammar(self) -> str:
        """The llguidance grammar definition of this constraint (not yet checked)."""
        import llguidance

        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.value, defaults=_JSON_DEFAULTS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            choices = json.loads(self.value)
            lark = "start: " + " | ".join(json.dumps(c) for c in choices)
            return llguidance.LLMatcher.grammar_from_lark(lark)
        return llguidance.grammar_from("grammar", self.value)


@functools.lru_cache(maxsize=1024)
def check_spec(spec: StructuredOutputSpec) -> str | None:
    """None if llguidance can compile ``spec``, else its reason (client-facing: an unsupported
    schema keyword, a bad regex, a grammar syntax error). Cached: clients resend one schema."""
    import llguidance

    if spec.kind == "choice" and not json.loads(spec.value):
        return "the list of choices is empty"
    try:
        grammar = spec.llguidance_grammar()
    except ValueError as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return "; ".join(messages) if is_error else None


class GrammarState:
    """One request's position in its grammar (an ``LLMatcher``), advanced by each sampled token."""

    __slots__ = ("matcher", "vocab_size", "failed")

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the grammar tokenizer's, the width of its bitmask
        self.failed = False

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id) and not self.failed:
            # Cannot happen for tokens the mask allowed; min_tokens / a stop id outside the
            # grammar could force one. The request then ends (``done``) instead of looping.
            self.failed = True
            logger.warning("structured output: token %d rejected by the grammar: %s", token_id,
                           self.matcher.get_error()[:200])

    @property
    def done(self) -> bool:
        """The grammar accepts nothing more (or broke): the request is complete."""
        return self.failed or self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles specs for one model's vocabulary; pristine matchers cached per spec (LRU).

    Thread-safe: the engine core compiles in its receiver thread while the engine loop runs."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...],
                 cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._ll_tokenizer = None
        self._cache: OrderedDict[StructuredOutputSpec, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        if self._ll_tokenizer is None:  # built on first use (~0.1-1 s): free traffic never pays it
            self._ll_tokenizer = self._tokenizer.grammar_tokenizer(self._vocab_size, self._eos)
        return self._ll_tokenizer

    def new_state(self, spec: StructuredOutputSpec) -> GrammarState:
        """A fresh GrammarState for ``spec``; raises ValueError (client-facing) if it does not
        compile for this vocabulary. A copy of the cached matcher when there is one."""
        template = self.prepare(spec)
        return GrammarState(template.deep_copy(), self._ll_tokenizer.vocab_size)

    def prepare(self, spec: StructuredOutputSpec):
        """The pristine matcher of ``spec``, compiled now unless cached (the slow part: call it
        off the engine loop first, as the engine core's receiver thread does)."""
        import llguidance

        with self._lock:
            template = self._cache.get(spec)
            if template is not None:
                self._cache.move_to_end(spec)
                return template
            tok = self._llg_tokenizer()
        reason = check_spec(spec)
        if reason is not None:
            raise ValueError(f"invalid structured output constraint: {reason}")
        template = llguidance.LLMatcher(tok, spec.llguidance_grammar(), log_level=0)
        if template.is_error():
            raise ValueError(f"invalid structured output constraint: {template.get_error()[:500]}")
        with self._lock:
            self._cache[spec] = template
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template


@functools.cache
def _executor():
    """llguidance's thread pool for batched mask computation (GIL released), sized to leave
    the model's threads alone on small CPU machines."""
    import llguidance

    return llguidance.LLExecutor(num_threads=max(1, min(4, (os.cpu_count() or 2) // 2)))


def allowed_tokens(states: list[GrammarState], vocab: int) -> np.ndarray:
    """A [len(states), vocab] uint8 array, 1 where the row's grammar allows the token.

    One llguidance call fills every row's bitmask in parallel; one unpack expands them.
    Token ids past the grammar tokenizer's vocabulary (padding rows of the embedding) are 0."""
    import llguidance.numpy as lln

    width = states[0].vocab_size
    bitmask = lln.allocate_token_bitmask(len(states), width)
    lln.fill_next_token_bitmask_par(_executor(), [(s.matcher, j) for j, s in enumerate(states)], bitmask)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, count=min(width, vocab), bitorder="little")
    if width < vocab:
        allowed = np.pad(allowed, ((0, 0), (0, vocab - width)))
    return allowed
