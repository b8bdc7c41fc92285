"""The reference offline workload (``shared/bench/workload-64.json``) and its recipe."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORKLOAD_PATHS = (_REPO.parent / "shared" / "bench" / "workload-64.json", Path("../shared/bench/workload-64.json"))


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


def load_workload(path: str | Path | None = None) -> Workload:
    """The given file, else the shared reference file, else its recipe (identical content)."""
    candidates = [Path(path)] if path else list(DEFAULT_WORKLOAD_PATHS)
    for candidate in candidates:
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            return Workload(data["prompt_token_ids"], [int(m) for m in data["max_tokens"]], str(candidate))
    if path:
        raise FileNotFoundError(f"workload file {path} not found")
    return synthetic_workload()
