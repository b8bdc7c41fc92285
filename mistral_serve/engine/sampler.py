"""Batched sampling with per-request parameters.

All rows are processed together; each transformation runs only on the rows that asked for
it (penalties, min_tokens, temperature, top-k/top-p/min-p). Random draws use the
exponential-race form of categorical sampling (argmax p/E with E ~ Exp(1)): a seeded
request draws its E from its own generator, one draw per generated token, so its samples
do not depend on what else is in the batch or on preemptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistral_serve.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: {token id: logprob} for the chosen token and the top-k alternatives, or None.
    logprobs: list[dict[int, float] | None]


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """Choose one token per row of ``logits`` [N, V] (float32) for the matching ``seqs``."""
    want_logprobs = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None

    _apply_penalties(logits, seqs)
    _suppress_stop_before_min_tokens(logits, seqs)
    chosen = argmax_rows(logits)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled_rows:
        chosen[sampled_rows] = _sample_rows(logits[sampled_rows], [seqs[i] for i in sampled_rows])
    token_ids = chosen.tolist()

    logprobs: list[dict[int, float] | None] = [None] * len(seqs)
    if raw_logprobs is not None:
        for row_in_lp, row in enumerate(want_logprobs):
            lp = raw_logprobs[row_in_lp]
            k = seqs[row].params.logprobs
            entry = {token_ids[row]: float(lp[token_ids[row]])}
            if k:
                values, ids = lp.topk(k)
                entry.update(zip(ids.tolist(), values.tolist()))
            logprobs[row] = entry
    return SampleResult(token_ids, logprobs)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum (first one on ties, as ``torch.argmax``).

    On CPU this goes through NumPy: torch's CPU argmax over a 32K vocabulary is several
    times slower than NumPy's vectorised one (2.6 ms vs 0.45 ms for [64, 32768] float32 on
    2 cores), and greedy decoding runs it on every step."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.contiguous().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """OpenAI presence/frequency penalties over generated tokens; HF repetition penalty over
    prompt + generated tokens (positive logits divided, negative multiplied)."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.uses_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _suppress_stop_before_min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens and seq.stop_ids:
            logits[row, list(seq.stop_ids)] = float("-inf")


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype, device=logits.device)
    logits = logits / temps[:, None]
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor([s.params.min_p for s in seqs], dtype=probs.dtype, device=probs.device)
    if bool((min_p > 0).any()):
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs < threshold, 0.0, probs)
    noise = torch.empty_like(probs)
    unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for i, s in enumerate(seqs):
        if s.generator is not None:
            noise[i] = torch.empty(probs.shape[1]).exponential_(generator=s.generator).to(probs.device)
    return argmax_rows(probs / noise)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask everything outside each row's top-k and its top-p nucleus to -inf."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    p = torch.tensor(top_p, dtype=probs.dtype, device=logits.device)
    drop |= before >= p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
