"""CUDA graphs for decode-only steps: capture once per batch size, replay instead of launching.

A decode step of Mistral 7B launches ~1,200 small kernels; at batch 1 their launch time
exceeds the step's HBM floor several times over. A captured graph launches them all at once.

* **Sizes**: ``capture_sizes(max_num_seqs)`` = 1, 2, 4, 8, 16, 24, 32, ... (multiples of 8) up
  to ``max_num_seqs``, which is always included. A decode-only step of B sequences runs the
  graph of the smallest size P >= B; larger or mixed (prefill) steps run eagerly.
* **Padding** (``pad_decode_batch``, used by every padded step, captured or eager): the P - B
  pad rows are one-token sequences at position 0 whose block table is the *scratch block*, a
  block the model runner allocates past the block manager's pool, so no sequence ever owns
  it. A pad row writes its K/V into slot 0 of that block and attends only to it: real rows
  never read it, and pad rows never touch real rows' blocks. Pad rows come last in the flat
  batch, and their logits rows are dropped.
* **Static buffers**: input ids and the logits index here; positions, the cache-write indices
  and the page table in the attention backend's graph metadata (``build_metadata(geom,
  graph_size=P)`` fills them in place and re-plans before each replay). The logits are copied
  into one shared output buffer, so the graphs (one memory pool, largest captured first, as
  nano-vllm does) keep no per-size output alive.
* **Backends**: graphs need attention whose shapes and addresses do not change from step to
  step. Only the ``flashinfer`` backend has that (its decode wrapper with
  ``use_cuda_graph=True`` over fixed buffers); with ``torch`` attention, whose SDPA groups and
  masks change shape every step, the engine runs eagerly and says so at start-up.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mistral_serve.engine.model_runner import ModelRunner, StepInputs
    from mistral_serve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

PAD_TOKEN_ID = 0


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def pad_decode_batch(q_start: list[int], q_len: list[int], block_offset: list[int], block_tables: list[list[int]],
                     size: int, scratch_block: int) -> None:
    """Append pad rows (in place) until the step has ``size`` sequences: one query at position
    0, reading and writing only ``scratch_block``."""
    n = size - len(q_start)
    if n < 0:
        raise ValueError(f"a step of {len(q_start)} sequences cannot be padded to {size}")
    q_start.extend([0] * n)
    q_len.extend([1] * n)
    block_offset.extend([0] * n)
    block_tables.extend([scratch_block] for _ in range(n))


class DecodeGraphs:
    """The captured decode graphs of one model runner."""

    def __init__(self, runner: ModelRunner, sizes: list[int]) -> None:
        self.runner = runner
        self.sizes = sorted(sizes)
        device, largest = runner.device, self.sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.logits_index = torch.arange(largest, device=device)
        self.logits = torch.empty(largest, runner.config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def size_for(self, scheduled: list[tuple[Sequence, int]]) -> int | None:
        """The captured size a step runs at, or None to run it eagerly (not decode-only, or
        more sequences than the largest graph)."""
        if not scheduled or len(scheduled) > self.sizes[-1]:
            return None
        for seq, n in scheduled:
            if n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens or self.runner.needs_prompt_rows(seq):
                return None
        return self.sizes[bisect.bisect_left(self.sizes, len(scheduled))]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size on an all-padding step (only the scratch block is touched)."""
        t = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            inputs = self.runner.prepare_step([], pad_to=size, graph=True)
            ids, index = self.input_ids[:size], self.logits_index[:size]

            def run() -> None:
                self.logits[:size].copy_(self.runner.forward(ids, inputs.positions, inputs.meta, index))

            run()  # warm-up outside the graph: FlashInfer's JIT modules, cuBLAS workspaces
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run()
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info("CUDA graphs for decode: captured batch sizes %s in %.1f s", self.sizes, time.perf_counter() - t)

    def replay(self, inputs: StepInputs) -> torch.Tensor:
        """Logits of the real rows of a step prepared with ``graph=True``."""
        size = inputs.input_ids.numel()
        self.input_ids[:size].copy_(inputs.input_ids, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[: size - inputs.num_pad_rows]
