"""Turns a scheduled step into tensors, runs the model once, and returns the sampling logits.

All per-token index math (positions, cache slots, attention gather indices, masks) is done
once per step on the host (``model.attention.build_attention_metadata``), with tensor ops
over the whole step and no device reads; Python touches each *sequence* once to collect its
new token ids and block table, never each token inside the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mistral_serve.engine.sequence import Sequence
from mistral_serve.model.attention import AttentionMetadata, build_attention_metadata
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.loader import load_model


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    meta: AttentionMetadata
    logits_index: torch.Tensor
    sample_seqs: list[Sequence]  # sequences that sample a token this step, in logits order
    # prompt_logprobs: (sequence, first position, end position) of the prompt positions whose
    # logits rows follow the sampling rows, in this order; position p predicts prompt token p + 1.
    prompt_spans: list[tuple[Sequence, int, int]] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        block_size: int,
        quantization: str = "none",
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.sliding_window = config.sliding_window
        self.model = load_model(model_dir, config, dtype, device, max_model_len, quantization)
        self.quantization = self.model.quantization  # the method in effect (a checkpoint's own, if any)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One K and one V tensor per layer, [num_blocks * block_size, kv_heads, head_dim].

        Left uninitialised so the OS maps pages only as blocks are first used: the block manager
        hands out recently freed blocks first, so RSS follows peak KV use, not the budget.
        ``zero_new_blocks`` zeroes each block before its first use, because attention reads
        whole blocks (padding repeats a sequence's last block) and garbage (NaN) in masked slots
        would leak through the softmax.
        """
        cfg = self.config
        shape = (num_blocks * self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.empty(shape, dtype=self.dtype, device=self.device),
             torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(cfg.num_hidden_layers)
        ]
        self._zeroed_blocks = 0
        self.zero_new_blocks(1)

    def zero_new_blocks(self, num_touched: int) -> None:
        """Zero blocks [previously zeroed, num_touched) before they are first read."""
        if num_touched > self._zeroed_blocks:
            lo, hi = self._zeroed_blocks * self.block_size, num_touched * self.block_size
            for k, v in self.kv_caches:
                k[lo:hi].zero_()
                v[lo:hi].zero_()
            self._zeroed_blocks = num_touched

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> StepInputs:
        """Lay the step out decode-first (one token per sequence, longest KV first), then
        prefill chunks; all index math happens once per step in ``build_attention_metadata``."""
        q_start = [seq.num_computed_tokens for seq, _ in scheduled]
        q_len = [n for _, n in scheduled]
        layout = build_attention_metadata(
            q_start, q_len, [seq.block_offset for seq, _ in scheduled], [seq.block_table for seq, _ in scheduled],
            self.block_size, self.sliding_window, self.device,
        )
        token_ids: list[int] = []
        logits_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[int] = []
        prompt_spans: list[tuple[Sequence, int, int]] = []
        for i in layout.order:
            seq, n = scheduled[i]
            start = q_start[i]
            token_ids.extend(seq.token_ids[start : start + n])
            if start + n == seq.num_tokens:
                logits_rows.append(len(token_ids) - 1)
                sample_seqs.append(seq)
            if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.prompt_len:
                self._prompt_rows(seq, start, n, len(token_ids) - n, prompt_rows, prompt_spans)
        meta = layout.meta
        meta.cos, meta.sin = self.model.rope.tables_at(layout.positions)
        return StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.long).to(self.device),
            meta=meta,
            logits_index=torch.tensor(logits_rows + prompt_rows, dtype=torch.long).to(self.device),
            sample_seqs=sample_seqs,
            prompt_spans=prompt_spans,
        )

    @staticmethod
    def _prompt_rows(seq: Sequence, start: int, n: int, base: int, rows: list[int],
                     spans: list[tuple[Sequence, int, int]]) -> None:
        """Rows of this chunk's prompt positions whose logprob entry is still missing (a
        recompute after preemption finds them all present and adds none)."""
        first = len(seq.prompt_logprobs) - 1  # the position predicting the first missing token
        if start > first:
            raise RuntimeError(f"{seq.request_id}: prompt logprobs need every prompt position prefilled, but the "
                               f"prefill starts at {start} (a prefix cache must not serve such requests)")
        lo, hi = first, min(start + n, seq.prompt_len - 1)
        if lo < hi:
            rows.extend(range(base + lo - start, base + hi - start))
            spans.append((seq, lo, hi))

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """One forward over the whole ragged batch → float32 logits [num sampling seqs (+ prompt
        logprob rows), vocab]."""
        return self.model(inputs.input_ids, self.kv_caches, inputs.meta, inputs.logits_index)
