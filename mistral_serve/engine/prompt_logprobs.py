"""Prompt logprobs (``SamplingParams.prompt_logprobs``), computed chunk by chunk in the prefill.

The model runner appends the logits rows of the prompt positions still missing an entry after
the step's sampling rows (``StepInputs.prompt_spans``). Here each step reduces those rows to
what the client gets back, the prompt token's logprob and the top-k, with one log-sum-exp,
one gather and one top-k over all of them; the [rows, vocab] logits are dropped with the step,
so no full-vocabulary row is kept for any prompt position. Values are raw log-probabilities of
the model's distribution, as the sampler's ``logprobs``.
"""

from __future__ import annotations

import torch

from mistral_serve.engine.sequence import Sequence


@torch.inference_mode()
def append_prompt_logprobs(rows: torch.Tensor, spans: list[tuple[Sequence, int, int]]) -> None:
    """Extend each span's ``seq.prompt_logprobs`` with the entries of tokens lo + 1 .. hi.

    ``rows`` [sum of (hi - lo), vocab] float32: the logits of positions lo .. hi - 1 of each
    span, in span order; position p's row predicts prompt token p + 1."""
    targets = [t for seq, lo, hi in spans for t in seq.token_ids[lo + 1 : hi + 1]]
    target_ids = torch.tensor(targets, dtype=torch.long, device=rows.device)
    lse = torch.logsumexp(rows, dim=-1)
    chosen = (rows.gather(1, target_ids[:, None])[:, 0] - lse).tolist()
    kmax = max(seq.params.prompt_logprobs for seq, _, _ in spans)
    top_vals = top_ids = None
    if kmax:
        top = rows.topk(min(kmax, rows.shape[1]), dim=-1)
        top_vals, top_ids = (top.values - lse[:, None]).tolist(), top.indices.tolist()
    r = 0
    for seq, lo, hi in spans:
        k = seq.params.prompt_logprobs
        entries = seq.prompt_logprobs
        for j in range(r, r + hi - lo):
            entry = {targets[j]: chosen[j]}
            if k:
                entry.update(zip(top_ids[j][:k], top_vals[j][:k]))
            entries.append(entry)
        r += hi - lo
