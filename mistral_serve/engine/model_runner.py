"""Turns a scheduled step into tensors, runs the model once, and returns the sampling logits.

All per-token index math (positions, cache slots, attention metadata) is done once per step on
the host (``model.step_layout.lay_out_step``, then the attention backend's ``build_metadata``),
with tensor ops over the whole step and no device reads; Python touches each *sequence* once to
collect its new token ids and block table, never each token inside the forward pass.

The attention backend (``model.attention_select``) is chosen here at start-up and logged, and
so is whether decode steps replay CUDA graphs (``engine.cuda_graphs``). The KV pool has one
block more than the block manager hands out: the scratch block that padded decode rows write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mistral_serve.engine.cuda_graphs import PAD_TOKEN_ID, DecodeGraphs, capture_sizes, pad_decode_batch
from mistral_serve.engine.sequence import Sequence
from mistral_serve.model.attention_backend import KVCache, StepMetadata
from mistral_serve.model.attention_select import create_attention_backend, resolve_attention_backend
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.loader import load_model
from mistral_serve.model.step_layout import lay_out_step

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: StepMetadata
    logits_index: torch.Tensor
    sample_seqs: list[Sequence]  # sequences that sample a token this step, in logits order
    # prompt_logprobs: (sequence, first position, end position) of the prompt positions whose
    # logits rows follow the sampling rows, in this order; position p predicts prompt token p + 1.
    prompt_spans: list[tuple[Sequence, int, int]] = field(default_factory=list)
    num_pad_rows: int = 0  # padded decode step: pad rows come last and their logits are dropped
    graph: bool = False  # replay the captured decode graph of this step's (padded) size


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
        attention_backend: str = "auto",
        enforce_eager: bool = False,
        max_num_seqs: int = 128,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.sliding_window = config.sliding_window
        self.enforce_eager = enforce_eager
        self.max_num_seqs = max_num_seqs
        self.model = load_model(model_dir, config, dtype, device, max_model_len, quantization)
        self.quantization = self.model.quantization  # the method in effect (a checkpoint's own, if any)
        name, reason = resolve_attention_backend(attention_backend, device, dtype, config.head_dim)
        self.attention = create_attention_backend(name, config, dtype, device, block_size, max_num_seqs,
                                                  max_model_len)
        logger.info("attention backend: %s (%s)", name, reason)
        self.kv_caches: list[KVCache] = []
        self.scratch_block = -1  # set by allocate_kv_cache
        self.graphs: DecodeGraphs | None = None

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One K and one V tensor per layer in the attention backend's layout, for ``num_blocks``
        blocks plus the scratch block (index ``num_blocks``, owned by no sequence: padded
        decode rows write there), then the decode graphs when they apply.

        Left uninitialised so the OS maps pages only as blocks are first used: the block manager
        hands out recently freed blocks first, so RSS follows peak KV use, not the budget.
        ``zero_new_blocks`` zeroes each block before its first use, because attention reads
        whole blocks (padding repeats a sequence's last block) and garbage (NaN) in masked slots
        would leak through the softmax.
        """
        cfg = self.config
        shape = self.attention.kv_cache_shape(num_blocks + 1, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.empty(shape, dtype=self.dtype, device=self.device),
             torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(cfg.num_hidden_layers)
        ]
        self.scratch_block = num_blocks
        self._zero_slots(num_blocks * self.block_size, (num_blocks + 1) * self.block_size)
        self._zeroed_blocks = 0
        self.zero_new_blocks(1)
        self.graphs = self._capture_decode_graphs()

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        """Capture decode graphs when they apply; otherwise log why not."""
        if self.enforce_eager:
            why = "enforce_eager"
        elif self.device.type != "cuda":
            why = f"device is {self.device.type}"
        elif not self.attention.supports_decode_graphs:
            why = f"the {self.attention.name} attention backend has no static-shape decode path"
        else:
            graphs = DecodeGraphs(self, capture_sizes(self.max_num_seqs))
            try:
                graphs.capture()
                return graphs
            except Exception as e:  # a kernel that cannot be captured: run eagerly, loudly
                why = f"capture failed ({type(e).__name__}: {e})"
                logger.warning("CUDA graphs for decode: capture failed, running eagerly", exc_info=True)
        logger.info("CUDA graphs for decode: off (%s)", why)
        return None

    def _zero_slots(self, lo: int, hi: int) -> None:
        for k, v in self.kv_caches:
            k.view(-1, *k.shape[-2:])[lo:hi].zero_()
            v.view(-1, *v.shape[-2:])[lo:hi].zero_()

    def zero_new_blocks(self, num_touched: int) -> None:
        """Zero blocks [previously zeroed, num_touched) before they are first read."""
        if num_touched > self._zeroed_blocks:
            self._zero_slots(self._zeroed_blocks * self.block_size, num_touched * self.block_size)
            self._zeroed_blocks = num_touched

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay captured CUDA graphs."""
        return self.graphs is not None

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> StepInputs:
        """The step's inputs; a decode-only step that fits a captured graph is padded to it."""
        size = self.graphs.size_for(scheduled) if self.graphs is not None else None
        return self.prepare_step(scheduled, pad_to=size, graph=size is not None)

    def prepare_step(self, scheduled: list[tuple[Sequence, int]], pad_to: int | None = None,
                     graph: bool = False) -> StepInputs:
        """Lay the step out decode-first (one token per sequence, longest KV first), then
        prefill chunks. ``pad_to``: pad a decode-only step with scratch rows to that many
        sequences (``cuda_graphs.pad_decode_batch``); ``graph``: build the attention metadata
        the captured graph of that size reads. The padding is the same with or without a graph."""
        q_start = [seq.num_computed_tokens for seq, _ in scheduled]
        q_len = [n for _, n in scheduled]
        offsets = [seq.block_offset for seq, _ in scheduled]
        tables = [seq.block_table for seq, _ in scheduled]
        if pad_to is not None:
            pad_decode_batch(q_start, q_len, offsets, tables, pad_to, self.scratch_block)
        geom = lay_out_step(q_start, q_len, offsets, tables, self.block_size, self.sliding_window)
        layout = self.attention.build_metadata(geom, pad_to if graph else None)
        num_real = len(scheduled)
        if any(i >= num_real for i in layout.order[:num_real]):
            raise RuntimeError("pad rows must come after every real row of the step")
        token_ids: list[int] = []
        logits_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[int] = []
        prompt_spans: list[tuple[Sequence, int, int]] = []
        for i in layout.order:
            if i >= num_real:  # a pad row: its logits row keeps the padded shape, then is dropped
                token_ids.append(PAD_TOKEN_ID)
                logits_rows.append(len(token_ids) - 1)
                continue
            seq, n = scheduled[i]
            start = q_start[i]
            token_ids.extend(seq.token_ids[start : start + n])
            if start + n == seq.num_tokens:
                logits_rows.append(len(token_ids) - 1)
                sample_seqs.append(seq)
            if self.needs_prompt_rows(seq):
                self._prompt_rows(seq, start, n, len(token_ids) - n, prompt_rows, prompt_spans)
        return StepInputs(
            input_ids=self._to_device(token_ids),
            positions=layout.positions,
            meta=layout.meta,
            logits_index=self._to_device(logits_rows + prompt_rows),
            sample_seqs=sample_seqs,
            prompt_spans=prompt_spans,
            num_pad_rows=len(geom.order) - num_real,
            graph=graph,
        )

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """A long tensor on the device; on CUDA through pinned memory, without waiting."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=torch.long)
        return torch.tensor(values, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)

    @staticmethod
    def needs_prompt_rows(seq: Sequence) -> bool:
        """Whether the step must return prompt-logprob rows for ``seq``."""
        return seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.prompt_len

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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                logits_index: torch.Tensor) -> torch.Tensor:
        """One forward pass; also what a decode graph captures (RoPE tables included)."""
        meta.cos, meta.sin = self.model.rope.tables_at(positions)
        return self.model(input_ids, self.kv_caches, meta, logits_index)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """One forward over the whole ragged batch → float32 logits [num sampling seqs (+ prompt
        logprob rows), vocab]; a graph step replays its captured graph instead."""
        if inputs.graph:
            return self.graphs.replay(inputs)
        logits = self.forward(inputs.input_ids, inputs.positions, inputs.meta, inputs.logits_index)
        return logits[: logits.shape[0] - inputs.num_pad_rows]
