"""The offline workloads: the reference ``shared/bench/workload-64.json`` (no sharing) and two
that chat traffic looks like, each with its recipe and a committed file
(``bench/workloads/``): ``shared-prefix`` (64 requests behind one 1,024-token system prompt)
and ``multi-turn`` (conversations whose every prompt extends the previous turn)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORKLOAD_PATHS = (_REPO.parent / "shared" / "bench" / "workload-64.json", Path("../shared/bench/workload-64.json"))
NAMED_WORKLOAD_DIR = _REPO / "bench" / "workloads"


@dataclass(frozen=True)
class Workload:
    prompt_token_ids: list[list[int]]
    max_tokens: list[int]
    source: str

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompt_token_ids)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    def __len__(self) -> int:
        return len(self.max_tokens)

    def head(self, n: int) -> "Workload":
        """The first ``n`` requests (all of them when there are fewer), for warm-up passes."""
        return Workload(self.prompt_token_ids[:n], self.max_tokens[:n], f"{self.source}[:{n}]")


def synthetic_workload(n: int = 64, seed: int = 0) -> Workload:
    """The recipe behind workload-64.json: numpy default_rng(seed); prompt lengths U[16, 256],
    output lengths U[16, 128], ids U[1000, 32000). With n=64, seed=0 it equals the file."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(16, 257, n)
    output_lens = rng.integers(16, 129, n)
    prompts = [rng.integers(1000, 32000, int(length)).tolist() for length in prompt_lens]
    return Workload(prompts, [int(x) for x in output_lens], f"synthetic(n={n}, seed={seed})")


def shared_prefix_workload(n: int = 64, prefix_len: int = 1024, own_len: int = 32, max_tokens: int = 64,
                           seed: int = 1) -> Workload:
    """One system prompt of ``prefix_len`` ids shared by ``n`` requests, each with ``own_len``
    ids of its own (numpy default_rng(seed), ids U[1000, 32000))."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(1000, 32000, prefix_len).tolist()
    prompts = [prefix + rng.integers(1000, 32000, own_len).tolist() for _ in range(n)]
    return Workload(prompts, [max_tokens] * n, f"shared-prefix(n={n}, prefix={prefix_len}, own={own_len})")


def multi_turn_workload(conversations: int = 4, turns: int = 16, system_len: int = 128, user_len: int = 24,
                        reply_len: int = 24, max_tokens: int = 24, seed: int = 2) -> Workload:
    """``conversations`` chats of ``turns`` turns: turn t's prompt is turn t-1's prompt plus a
    reply of ``reply_len`` ids (standing in for the model's answer) and a user message of
    ``user_len`` ids. All turns of all chats are requests of one pass (64 by default)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(conversations):
        prompt = rng.integers(1000, 32000, system_len).tolist()
        for t in range(turns):
            if t:
                prompt = prompt + rng.integers(1000, 32000, reply_len).tolist()
            prompt = prompt + rng.integers(1000, 32000, user_len).tolist()
            prompts.append(prompt)
    return Workload(prompts, [max_tokens] * len(prompts), f"multi-turn({conversations} chats x {turns} turns)")


RECIPES = {"shared-prefix": shared_prefix_workload, "multi-turn": multi_turn_workload}


def load_workload(path: str | Path | None = None) -> Workload:
    """A named workload (``RECIPES``: its committed file, else its recipe), the given file, else
    the shared reference file, else its recipe (identical content)."""
    if path in RECIPES:
        committed = NAMED_WORKLOAD_DIR / f"{path}-64.json"
        if committed.is_file():
            data = json.loads(committed.read_text())
            return Workload(data["prompt_token_ids"], [int(m) for m in data["max_tokens"]], str(path))
        return RECIPES[path]()
    candidates = [Path(path)] if path else list(DEFAULT_WORKLOAD_PATHS)
    for candidate in candidates:
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            return Workload(data["prompt_token_ids"], [int(m) for m in data["max_tokens"]], str(candidate))
    if path:
        raise FileNotFoundError(f"workload file {path} not found")
    return synthetic_workload()
