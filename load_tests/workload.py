"""Request specs: what each request asks for (prompt and max_tokens).

Length distributions:
    workload  the shared workload file (``{"prompt_token_ids": [[...]], "max_tokens": [...]}``),
              cycled in order; the reference workload is ``../shared/bench/workload-64.json``
    fixed     every prompt ``--prompt-len`` tokens, every output ``--output-len`` tokens
    uniform   lengths drawn uniformly from ``A:B`` ranges (inclusive)
    longtail  chat-like: log-normal lengths (median ``--prompt-len`` / ``--output-len``) clipped to
              ``--max-prompt-len`` / ``--max-output-len``; most requests short, a few very long

Prompts are sent as token-id lists (``"prompt": [ids]``, which ``/v1/completions`` accepts) or as
text.  Text prompts are synthetic words; one word is roughly one to two tokens with the
Mistral tokenizers, so text lengths are approximate.  The chat endpoint always uses text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKLOAD = REPO_ROOT / ".." / "shared" / "bench" / "workload-64.json"

DISTRIBUTIONS = ("workload", "fixed", "uniform", "longtail")

# Token ids for synthetic id prompts: the same range as the shared workload (valid for any
# Mistral vocabulary of 32k+ and clear of the control tokens at the bottom).
_ID_LOW, _ID_HIGH = 1000, 32000

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no what "
    "can out other into more some time could them than may only new about any these two first "
    "model server request token batch cache memory latency throughput queue replica stream "
    "river mountain window garden yellow quick brown fox jumps over lazy dog paper light music"
).split()


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. ``prompt`` is a token-id list or a string."""

    prompt: list[int] | str
    prompt_len: int  # tokens (ids) or words (text)
    max_tokens: int


def parse_range(text: str | int | None, default: tuple[int, int]) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"16:256"`` -> (16, 256)."""
    if text is None:
        return default
    s = str(text)
    if ":" in s:
        a, b = s.split(":", 1)
        lo, hi = int(a), int(b)
    else:
        lo = hi = int(s)
    if lo < 1 or hi < lo:
        raise ValueError(f"bad length range {text!r}: need 1 <= A <= B")
    return lo, hi


def load_workload_file(path: str | Path) -> tuple[list[list[int]], list[int]]:
    """Read a workload file: ``prompt_token_ids`` (list of id lists) and ``max_tokens`` (list)."""
    with open(path) as f:
        data = json.load(f)
    prompts = data.get("prompt_token_ids")
    outs = data.get("max_tokens")
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{path}: expected a non-empty 'prompt_token_ids' list")
    if isinstance(outs, int):
        outs = [outs] * len(prompts)
    if not isinstance(outs, list) or len(outs) != len(prompts):
        raise ValueError(f"{path}: 'max_tokens' must be an int or a list as long as the prompts")
    return [[int(t) for t in p] for p in prompts], [int(o) for o in outs]


class Workload:
    """An endless, seeded stream of :class:`RequestSpec`."""

    def __init__(
        self,
        dist: str = "fixed",
        *,
        prompt_format: str = "ids",
        prompt_len: str | int | None = None,
        output_len: str | int | None = None,
        max_prompt_len: int = 2048,
        max_output_len: int = 512,
        workload_path: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {dist!r}; choose from {DISTRIBUTIONS}")
        if prompt_format not in ("ids", "text"):
            raise ValueError("prompt_format must be 'ids' or 'text'")
        self.dist = dist
        self.prompt_format = prompt_format
        self.rng = np.random.default_rng(seed)
        self.max_prompt_len = max_prompt_len
        self.max_output_len = max_output_len
        self._i = 0
        self.workload_path: str | None = None
        if dist == "workload":
            p = Path(workload_path) if workload_path else DEFAULT_WORKLOAD
            self.workload_path = str(p.resolve())
            self._prompts, self._outs = load_workload_file(p)
        if dist == "longtail":
            # medians; the ranges' upper bound is ignored for long-tail
            self.prompt_range = parse_range(prompt_len, (128, 128))
            self.output_range = parse_range(output_len, (64, 64))
        elif dist == "uniform":
            self.prompt_range = parse_range(prompt_len, (16, 256))
            self.output_range = parse_range(output_len, (16, 128))
        else:
            self.prompt_range = parse_range(prompt_len, (128, 128))
            self.output_range = parse_range(output_len, (64, 64))

    def describe(self) -> dict:
        d = {"dist": self.dist, "prompt_format": self.prompt_format}
        if self.dist == "workload":
            d.update(workload=self.workload_path, n_prompts=len(self._prompts))
        elif self.dist == "longtail":
            d.update(prompt_len_median=self.prompt_range[0], output_len_median=self.output_range[0],
                     max_prompt_len=self.max_prompt_len, max_output_len=self.max_output_len)
        else:
            d.update(prompt_len=list(self.prompt_range), output_len=list(self.output_range))
        return d

    # -- lengths -------------------------------------------------------------------------------
    def _lognormal(self, median: int, sigma: float, cap: int) -> int:
        v = int(round(float(self.rng.lognormal(np.log(median), sigma))))
        return max(1, min(cap, v))

    def _lengths(self) -> tuple[int, int, list[int] | None]:
        if self.dist == "workload":
            k = self._i % len(self._prompts)
            ids = self._prompts[k]
            return len(ids), self._outs[k], ids
        if self.dist == "fixed":
            return self.prompt_range[0], self.output_range[0], None
        if self.dist == "uniform":
            p = int(self.rng.integers(self.prompt_range[0], self.prompt_range[1] + 1))
            o = int(self.rng.integers(self.output_range[0], self.output_range[1] + 1))
            return p, o, None
        # longtail: ShareGPT-like shapes, heavy right tail
        p = self._lognormal(self.prompt_range[0], 1.0, self.max_prompt_len)
        o = self._lognormal(self.output_range[0], 0.8, self.max_output_len)
        return p, o, None

    # -- prompts -------------------------------------------------------------------------------
    def _ids(self, n: int) -> list[int]:
        return self.rng.integers(_ID_LOW, _ID_HIGH, size=n).tolist()

    def _text(self, n: int) -> str:
        idx = self.rng.integers(0, len(_WORDS), size=n)
        return " ".join(_WORDS[i] for i in idx)

    def next(self) -> RequestSpec:
        plen, olen, ids = self._lengths()
        self._i += 1
        if self.prompt_format == "ids":
            prompt: list[int] | str = ids if ids is not None else self._ids(plen)
        else:
            prompt = self._text(plen)
        return RequestSpec(prompt=prompt, prompt_len=plen, max_tokens=int(olen))

    def __iter__(self) -> Iterator[RequestSpec]:
        while True:
            yield self.next()


def build_body(
    spec: RequestSpec,
    *,
    endpoint: str,
    model: str,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    include_usage: bool = True,
    extra: dict | None = None,
) -> dict:
    """The JSON body for one streamed request."""
    body: dict = {"model": model, "max_tokens": spec.max_tokens, "stream": True,
                  "temperature": temperature}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        content = spec.prompt if isinstance(spec.prompt, str) else " ".join(map(str, spec.prompt))
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = spec.prompt
    if extra:
        body.update(extra)
    return body


def length_stats(specs: Sequence[RequestSpec]) -> dict:
    p = np.array([s.prompt_len for s in specs], dtype=float)
    o = np.array([s.max_tokens for s in specs], dtype=float)
    return {"n": len(specs), "prompt_mean": float(p.mean()), "prompt_max": int(p.max()),
            "output_mean": float(o.mean()), "output_max": int(o.max())}
