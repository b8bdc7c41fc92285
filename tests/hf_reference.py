"""Hugging Face transformers as the correctness reference for the engine."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@lru_cache(maxsize=4)
def hf_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ids from ``generate`` with EOS ignored (exactly ``max_new_tokens`` tokens)."""
    model = hf_model(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def hf_logits(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position, float32 [len(prompt), vocab]."""
    with torch.no_grad():
        return hf_model(model_dir)(torch.tensor([prompt])).logits[0].float()


def random_prompts(n: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(5, 32000, (length,), generator=g).tolist() for length in lens]
