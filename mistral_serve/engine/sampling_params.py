"""Per-request sampling parameters, named and defaulted as vLLM and the OpenAI API name them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mistral_serve.engine.structured_output import StructuredOutputSpec


@dataclass
class SamplingParams:
    """How one request is decoded.

    ``temperature == 0`` means greedy. ``seed`` makes sampling reproducible for this request
    whatever else is in the batch (each seeded request draws from its own generator).
    ``logprobs=k`` returns the chosen token's log-probability and the top-k alternatives,
    computed from the model's raw distribution (before temperature and filtering), as vLLM
    does by default.

    ``n``: sequences sampled for the one prompt (choices 0..n-1), each with its own sampling
    stream; with a ``seed``, choice i draws from a seed derived from (seed, i), so each choice
    is reproducible and choice 0 equals the n = 1 answer. ``prompt_logprobs=k``: the logprob of
    every prompt token (the first has none) and its top-k, computed chunk by chunk in the
    prefill. Such a request must prefill every prompt position itself, so a prefix cache
    must not reuse cached blocks for it (``needs_all_prompt_positions``).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    n: int = 1
    prompt_logprobs: int | None = None
    # Constrained decoding (engine/structured_output.py): a JSON schema, regex, choice or grammar.
    structured_output: StructuredOutputSpec | None = None

    MAX_LOGPROBS = 20
    MAX_N = 16  # sequences per request: n x max_tokens is what one request may cost
    MAX_STOP_STRINGS = 16

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a message fit for an API client on any invalid value."""
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if not isinstance(self.n, int) or not 1 <= self.n <= self.MAX_N:
            raise ValueError(f"n must be in [1, {self.MAX_N}], got {self.n}")
        if len(self.stop) > self.MAX_STOP_STRINGS:
            raise ValueError(f"at most {self.MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputSpec):
            raise ValueError("structured_output must be a StructuredOutputSpec")

    @property
    def needs_all_prompt_positions(self) -> bool:
        """True when the prefill must compute every prompt position (prompt logprobs): a
        prefix cache must then not skip positions by reusing cached KV blocks."""
        return self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)
