"""The ``flashinfer`` attention backend: FlashInfer's fused paged-attention kernels on CUDA.

Written against flashinfer-python 0.7.4 (pinned in pyproject's ``gpu`` extra). Calls used:
``BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")`` + ``plan(qo_indptr, kv_indptr,
kv_indices, kv_last_page_len, heads, kv_heads, head_dim, page_size, causal=True, window_left=,
sm_scale=, q_data_type=, kv_data_type=)`` + ``run(q, (k_cache, v_cache))``;
``BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_cuda_graph=True, use_tensor_cores=,
paged_kv_indptr_buffer=, paged_kv_indices_buffer=, paged_kv_last_page_len_buffer=)`` + ``plan``
+ ``run``; ``append_paged_kv_cache(k, v, batch_indices, positions, (k_cache, v_cache),
kv_indices, kv_indptr, kv_last_page_len, "NHD")``. FlashInfer has no float32 kernels (fp16,
bf16, fp8 only), so float32 engines use the torch backend (``attention_select``).

Which wrapper when:

* **eager steps** (any mix of prefill chunks and decode tokens): one
  ``BatchPrefillWithPagedKVCacheWrapper`` over the whole ragged batch, decode tokens being
  requests of one query. One plan per step, one kernel per layer, no split of the batch by
  kind, and causal masking aligned to each request's end handles chunked prefill and prefix
  hits the same way as whole prompts.
* **decode-only steps under CUDA graphs** (``engine.cuda_graphs``): one
  ``BatchDecodeWithPagedKVCacheWrapper`` per captured batch size, built with
  ``use_cuda_graph=True`` over fixed index buffers, as FlashInfer requires for capture (its
  plan writes the new page table into those buffers before each replay). The decode kernel
  splits long KV across CTAs, which batch-1 decode needs to approach the HBM floor; with GQA
  group >= 4 it runs on tensor cores (``use_tensor_cores``), as vLLM does.

``plan()`` runs once per step on host (pinned) arrays; every layer reuses it. GQA is native
(``num_qo_heads`` a multiple of ``num_kv_heads``). RoPE is applied by the model before the
cache write (``pos_encoding_mode="NONE"``), so the kernels never need absolute positions.

KV pool: per layer a K and a V tensor [num_blocks, block_size, kv_heads, head_dim], FlashInfer's
"NHD" paged layout as a (K, V) tuple: the same bytes as the torch backend's slot layout, read
in place, never copied.

Sliding window and freed blocks. A sequence's block table holds only its live blocks (the first
is logical block ``block_offset``). ``page_table`` passes each request only the blocks its
queries can see, from ``first_block = key_start(q_start) // block_size`` (>= block_offset), and
a KV length counted from that block: ``kv_len = ctx_end - first_block * block_size``. FlashInfer
places query i of a request at ``kv_len - qo_len + i`` and lets it see keys k with
``k <= kv_len - qo_len + i`` (causal) and ``k >= kv_len - qo_len + i - window_left``; both are
differences of positions, so numbering keys from ``first_block * block_size`` instead of 0
changes nothing, and ``window_left = sliding_window - 1`` gives exactly the keys
(p - W, p] the model attends to. The cache write uses the same numbering
(``kv_positions = position - first_block * block_size``). tests/test_attention_backends.py
checks this against the torch backend's own masks and gathers, key by key.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from mistral_serve.model.attention_backend import AttentionBackend, KVCache, StepLayout, StepMetadata
from mistral_serve.model.pinned_staging import PinnedInt32Staging
from mistral_serve.model.step_layout import StepGeometry

FLASHINFER_VERSION = "0.7.4"
# FlashInfer's recommended float workspace (split-KV partial results); shared by all wrappers,
# which never run concurrently.
WORKSPACE_BYTES = 128 * 1024 * 1024


def window_left(sliding_window: int | None) -> int:
    """FlashInfer's inclusive left window: a query at p sees keys [p - window_left, p]."""
    return -1 if sliding_window is None else sliding_window - 1


@dataclass
class PageTable:
    """FlashInfer's view of a step (CPU int32 tensors, requests in layout order)."""

    qo_indptr: torch.Tensor  # [B + 1] first flat token of each request
    kv_indptr: torch.Tensor  # [B + 1] first entry of each request in kv_indices
    kv_indices: torch.Tensor  # [kv_indptr[-1]] physical blocks each request reads, in order
    kv_last_page_len: torch.Tensor  # [B] entries used in each request's last block, 1..block_size
    batch_indices: torch.Tensor  # [T] request of each new token (the cache write)
    kv_positions: torch.Tensor  # [T] each new token's position within its request's blocks
    positions: torch.Tensor  # [T] absolute positions (RoPE)


def page_table(geom: StepGeometry) -> PageTable:
    """Block tables + block_offset + window → FlashInfer's indptr / indices / last_page_len and
    the write positions, numbering each request's keys from its first visible block."""
    bs = geom.block_size
    rows = range(len(geom.order))
    first = [geom.first_block[geom.order[r]] for r in rows]
    nblocks = [geom.nblocks[geom.order[r]] for r in rows]
    kv_len = [geom.ctx_end[geom.order[r]] - first[r] * bs for r in rows]
    kv_indptr = list(itertools.accumulate(nblocks, initial=0))
    counts = torch.tensor(nblocks, dtype=torch.long)
    base = torch.tensor([geom.shift[r] + first[r] for r in rows], dtype=torch.long)
    col = torch.arange(kv_indptr[-1]) - torch.repeat_interleave(torch.tensor(kv_indptr[:-1], dtype=torch.long), counts)
    kv_indices = geom.flat_table[torch.repeat_interleave(base, counts) + col]
    first_slot = torch.tensor(first, dtype=torch.long)[geom.seq_of_token] * bs
    i32 = torch.int32
    return PageTable(
        qo_indptr=torch.tensor(geom.tok_off, dtype=i32),
        kv_indptr=torch.tensor(kv_indptr, dtype=i32),
        kv_indices=kv_indices.to(i32),
        kv_last_page_len=torch.tensor([n - (b - 1) * bs for n, b in zip(kv_len, nblocks)], dtype=i32),
        batch_indices=geom.seq_of_token.to(i32),
        kv_positions=(geom.positions - first_slot).to(i32),
        positions=geom.positions.to(i32),
    )


@dataclass
class FlashInferMetadata(StepMetadata):
    """A planned wrapper plus the device arrays of the cache write, for one step."""

    wrapper: Any  # a planned Batch{Prefill,Decode}WithPagedKVCacheWrapper
    append: Any  # flashinfer.append_paged_kv_cache
    batch_indices: torch.Tensor
    kv_positions: torch.Tensor
    kv_indices: torch.Tensor
    kv_indptr: torch.Tensor
    kv_last_page_len: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    def write_kv(self, kv_cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.append(k, v, self.batch_indices, self.kv_positions, kv_cache, self.kv_indices, self.kv_indptr,
                    self.kv_last_page_len, "NHD")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
               scale: float) -> torch.Tensor:
        # ``scale`` was given to plan() (sm_scale): one value for every layer of the model.
        return self.wrapper.run(q, kv_cache)


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_decode_graphs = True

    def __init__(self, block_size: int, sliding_window: int | None, device: torch.device, *, num_heads: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_num_seqs: int,
                 max_model_len: int) -> None:
        import flashinfer

        super().__init__(block_size, sliding_window, device)
        self._fi = flashinfer
        self.num_heads, self.num_kv_heads, self.head_dim, self.dtype = num_heads, num_kv_heads, head_dim, dtype
        self.scale = head_dim**-0.5  # decoder.Attention.scale
        self.window_left = window_left(sliding_window)
        self.use_tensor_cores = num_heads // num_kv_heads >= 4
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        # Eager steps: arrays sized by the step, grown on demand. The wrapper reads kv_indices
        # from our device buffer (plan's .to(device) keeps it); indptr arrays it takes from the host.
        self.eager = PinnedInt32Staging(
            device, dict.fromkeys(("qo_indptr", "kv_indptr", "kv_last_page_len", "kv_indices", "batch_indices",
                                   "kv_positions", "positions"), 1024), grow=True, host_only=("qo_indptr",))
        # Decode graphs: one wrapper per captured size P over slices of shared fixed buffers;
        # plan() fills kv_indptr / kv_indices / kv_last_page_len there, and the captured cache
        # write reads the same buffers.
        max_pages = max_num_seqs * (-(-max_model_len // block_size) + 1)
        self.graph_pages = {"kv_indptr": torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device),
                            "kv_indices": torch.zeros(max_pages, dtype=torch.int32, device=device),
                            "kv_last_page_len": torch.zeros(max_num_seqs, dtype=torch.int32, device=device)}
        self.graph_staging = PinnedInt32Staging(
            device, {"kv_indptr": max_num_seqs + 1, "kv_last_page_len": max_num_seqs, "kv_indices": max_pages,
                     "batch_indices": max_num_seqs, "kv_positions": max_num_seqs, "positions": max_num_seqs},
            grow=False, host_only=("kv_indptr", "kv_last_page_len"))
        self.graph_steps: dict[int, StepLayout] = {}

    def kv_cache_shape(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, self.block_size, num_kv_heads, head_dim)

    def build_metadata(self, geom: StepGeometry, graph_size: int | None = None) -> StepLayout:
        pt = page_table(geom)
        arrays = {"kv_indptr": pt.kv_indptr, "kv_last_page_len": pt.kv_last_page_len, "kv_indices": pt.kv_indices,
                  "batch_indices": pt.batch_indices, "kv_positions": pt.kv_positions, "positions": pt.positions}
        if graph_size is not None:
            return self._graph_metadata(geom, arrays, graph_size)
        host, dev = self.eager.load(arrays | {"qo_indptr": pt.qo_indptr})
        self.prefill.plan(host["qo_indptr"], host["kv_indptr"], dev["kv_indices"], host["kv_last_page_len"],
                          self.num_heads, self.num_kv_heads, self.head_dim, self.block_size, causal=True,
                          window_left=self.window_left, sm_scale=self.scale, q_data_type=self.dtype,
                          kv_data_type=self.dtype, non_blocking=True)
        meta = FlashInferMetadata(self.prefill, self._fi.append_paged_kv_cache, dev["batch_indices"],
                                  dev["kv_positions"], dev["kv_indices"], dev["kv_indptr"], dev["kv_last_page_len"])
        return StepLayout(geom.order, dev["positions"], meta)

    def _graph_metadata(self, geom: StepGeometry, arrays: dict[str, torch.Tensor], size: int) -> StepLayout:
        """A decode-only step of exactly ``size`` requests (padded): plan the size's decode
        wrapper and return the step object whose tensors the captured graph reads."""
        if geom.num_tokens != size or len(geom.order) != size:
            raise ValueError(f"a decode graph of size {size} needs {size} one-token requests")
        host, dev = self.graph_staging.load(arrays)
        step = self.graph_steps.get(size) or self._new_graph_step(size)
        step.meta.wrapper.plan(host["kv_indptr"], dev["kv_indices"], host["kv_last_page_len"], self.num_heads,
                               self.num_kv_heads, self.head_dim, self.block_size, pos_encoding_mode="NONE",
                               window_left=self.window_left, sm_scale=self.scale, q_data_type=self.dtype,
                               kv_data_type=self.dtype, non_blocking=True)
        return StepLayout(geom.order, step.positions, step.meta)

    def _new_graph_step(self, size: int) -> StepLayout:
        pages, dev = self.graph_pages, self.graph_staging.dev
        wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.use_tensor_cores,
            paged_kv_indptr_buffer=pages["kv_indptr"][: size + 1], paged_kv_indices_buffer=pages["kv_indices"],
            paged_kv_last_page_len_buffer=pages["kv_last_page_len"][:size])
        meta = FlashInferMetadata(wrapper, self._fi.append_paged_kv_cache, dev["batch_indices"][:size],
                                  dev["kv_positions"][:size], pages["kv_indices"], pages["kv_indptr"][: size + 1],
                                  pages["kv_last_page_len"][:size])
        step = StepLayout(list(range(size)), dev["positions"][:size], meta)
        self.graph_steps[size] = step
        return step
