"""Gradients from the compute device to FP32 host gradients.

Per-layer gradients come off the GPU in the compute dtype on their own ``d2h_stream`` into a bounded pool of
pinned slabs (the main thread blocks when all slabs are in flight: back-pressure, bounded pinned memory). A fold
worker waits on each slab's event, adds the slab into the FP32 gradient buffers of the host store (overwriting on
the first fold after an optimizer step) and returns the slab. FP32 accumulation on the host keeps gradient
accumulation exact across micro-batches. With norm tracking on, the fold also records each parameter's gradient
norm while the data is hot, so clipping by global norm needs no extra pass over the store.
"""

from __future__ import annotations

import queue

import torch

from .pinned import pinned_empty, unregister_pinned
from .store import HostStore, StoreGroup, StoreParam
from .workers import Worker

Target = tuple[StoreGroup, StoreParam]


class GradientSink:
    """Moves per-unit gradients to the host and folds them into the store's FP32 gradient buffers.

    Args:
        store: The host store.
        device: Compute device.
        dtype: Dtype gradients arrive in (the compute dtype).
        slab_numel: Elements per pinned slab (the largest unit).
        num_slabs: Slabs in the pool (bounds pinned memory and the number of gradients in flight).
    """

    def __init__(
        self, store: HostStore, device: torch.device, dtype: torch.dtype, slab_numel: int, num_slabs: int = 3
    ) -> None:
        self.store, self.device, self.dtype = store, device, dtype
        self.cuda = device.type == "cuda"
        self.track_norms = False
        self.worker = Worker("gradient", device)
        self.extra_checks: tuple[Worker, ...] = ()
        self.bytes_d2h = 0
        self._slabs: queue.Queue[torch.Tensor] = queue.Queue()
        self._all_slabs: list[torch.Tensor] = []
        if self.cuda:
            self.d2h_stream = torch.cuda.Stream(device)
            for _ in range(num_slabs):
                slab = pinned_empty(slab_numel, dtype, pin=True)
                self._all_slabs.append(slab)
                self._slabs.put(slab)

    def submit(self, targets: list[Target], grads: list[torch.Tensor | None]) -> None:
        """Queues ``grads`` (on the compute device, produced on the current stream) to be folded into ``targets``."""
        pairs = [(t, g) for t, g in zip(targets, grads) if g is not None]
        if not pairs:
            return
        if not self.cuda:
            self.worker.submit(lambda: self._fold(pairs))
            return
        slab = self._take_slab()
        event = torch.cuda.Event()
        self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
        views, offset = [], 0
        with torch.cuda.stream(self.d2h_stream):
            for target, g in pairs:
                n = g.numel()
                view = slab[offset : offset + n]
                view.copy_(g.reshape(-1), non_blocking=True)
                g.record_stream(self.d2h_stream)
                views.append((target, view))
                offset += n
            event.record(self.d2h_stream)
        self.bytes_d2h += offset * slab.element_size()

        def fold() -> None:
            event.synchronize()
            try:
                self._fold(views)
            finally:
                self._slabs.put(slab)

        self.worker.submit(fold)

    def submit_embedding(
        self, target: Target, ids: torch.Tensor, grad_hidden: torch.Tensor, padding_idx: int | None
    ) -> None:
        """Queues the embedding gradient: rows ``ids`` receive ``grad_hidden`` (as ``nn.Embedding`` would)."""
        ids = ids.reshape(-1).to("cpu")
        rows = grad_hidden.reshape(ids.numel(), -1).to("cpu")
        self.bytes_d2h += rows.numel() * rows.element_size() if self.cuda else 0
        if padding_idx is not None:
            keep = ids != padding_idx
            ids, rows = ids[keep], rows[keep]
        group, sp = target

        def fold() -> None:
            dst = group.ensure_grad()[sp.offset : sp.offset + sp.numel].view(sp.shape)
            if sp.fresh:
                dst.zero_()
                sp.fresh = False
            dst.index_add_(0, ids, rows.to(torch.float32))
            if self.track_norms:
                sp.grad_norm = torch.linalg.vector_norm(dst)

        self.worker.submit(fold)

    def wait(self) -> None:
        """Blocks until every queued gradient has been folded."""
        self.worker.drain(self.extra_checks)

    def close(self) -> None:
        self.worker.close()
        for slab in self._all_slabs:
            unregister_pinned(slab)

    def _take_slab(self) -> torch.Tensor:
        while True:
            self.worker.check()
            try:
                return self._slabs.get(timeout=0.05)
            except queue.Empty:
                continue

    def _fold(self, pairs: list[tuple[Target, torch.Tensor]]) -> None:
        for (group, sp), src in pairs:
            dst = group.ensure_grad()[sp.offset : sp.offset + sp.numel]
            src = src.reshape(-1)
            if sp.fresh:
                dst.copy_(src)
                sp.fresh = False
            else:
                dst.add_(src)
            if self.track_norms:
                sp.grad_norm = torch.linalg.vector_norm(dst)
