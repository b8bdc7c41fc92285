"""Persistent int32 device buffers filled from pinned host memory.

Per-step index arrays (page tables, positions) are built on the host. Copying a fresh CPU
tensor with ``.to(device)`` allocates, and from pageable memory the copy is synchronous. Here
each named array has a fixed pinned host buffer and a fixed device buffer; ``load`` writes the
host side and issues one ``non_blocking`` copy per array, so the host never waits for the GPU.
Fixed addresses also let a captured CUDA graph read the buffers at replay.

Reusing the host side is safe because every engine step reads its sampled token ids back to the
host before the next step prepares: the previous step's copies have completed by then.
"""

from __future__ import annotations

import torch


class PinnedInt32Staging:
    def __init__(self, device: torch.device, capacities: dict[str, int], grow: bool,
                 host_only: tuple[str, ...] = ()) -> None:
        """``grow``: reallocate an array that outgrows its capacity (eager use only: a
        captured graph would keep reading the old buffer, so graph staging must not grow).
        ``host_only``: arrays a consumer copies itself (FlashInfer's ``plan`` reads indptr
        arrays on the host and moves them with ``non_blocking``): pinned, no device buffer."""
        self.device = device
        self.grow = grow
        self.host_only = frozenset(host_only)
        self.host: dict[str, torch.Tensor] = {}
        self.dev: dict[str, torch.Tensor] = {}
        for name, n in capacities.items():
            self._allocate(name, n)

    def _allocate(self, name: str, n: int) -> None:
        self.host[name] = torch.empty(n, dtype=torch.int32, pin_memory=True)
        if name not in self.host_only:
            self.dev[name] = torch.empty(n, dtype=torch.int32, device=self.device)

    def load(self, arrays: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Copy each CPU array into its buffers; returns (pinned host views, device views), each
        exactly the array's length (no device view for ``host_only`` arrays)."""
        host, dev = {}, {}
        for name, a in arrays.items():
            n = a.numel()
            if n > self.host[name].numel():
                if not self.grow:
                    raise ValueError(f"{name}: {n} entries exceed the fixed capacity {self.host[name].numel()}")
                self._allocate(name, max(n, 2 * self.host[name].numel()))
            h = self.host[name][:n]
            h.copy_(a)
            host[name] = h
            if name not in self.host_only:
                dev[name] = self.dev[name][:n]
                dev[name].copy_(h, non_blocking=True)
        return host, dev
