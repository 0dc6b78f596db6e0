"""Gradients from the compute device to the host store.

Two modes, chosen per engine (``direct`` is the default; the first accumulated backward switches to ``fold``):

* ``direct`` (no gradient accumulation): every gradient is copied on its own ``d2h_stream`` straight into the
  group's pinned gradient buffer in the compute dtype (``StoreGroup.grad_lp``). Nothing is folded: the CPU
  optimizer upcasts one group at a time. Host cost: 2 bytes/param for BF16 compute.
* ``fold`` (gradient accumulation): gradients arrive in a bounded pool of pinned slabs (the compute thread blocks
  when all slabs are in flight: back-pressure, bounded pinned memory); a fold worker adds each slab into the group's
  FP32 gradient buffer (overwriting on the first fold after an optimizer step), so accumulation over micro-batches
  is exact FP32. Host cost: 4 bytes/param.

The gradient of a stacked expert parameter arrives as an :class:`ExpertGrad` (expert-sparse streaming): only the rows
of the experts that received tokens are copied (the others are exactly zero); the host zero-fills the other rows on
the first landing after an optimizer step and adds nothing to them afterwards, so the optimizer sees the dense
gradient (AdamW still decays those experts' moments and applies weight decay). ``bytes_d2h`` counts what a GPU run
copies (on a CPU compute device too, where nothing crosses a bus, so runs can be compared).

Either way a gradient worker waits on each copy's event and then reports the groups whose gradients are complete
(``on_final``), which lets the engine start their optimizer update while the backward goes on. With norm tracking
on, per-parameter gradient norms are recorded (on the GPU in direct mode, during the fold otherwise), so clipping by
global norm needs no extra pass over host memory.
"""

from __future__ import annotations

import queue
import warnings
from collections.abc import Callable

import torch

from .pinned import pinned_empty, unregister_pinned
from .store import HostStore, StoreGroup, StoreParam
from .workers import Worker

Target = tuple[StoreGroup, StoreParam]


class ExpertGrad:
    """The gradient of a stacked expert parameter ``(num_experts, ...)`` of which only experts ``runs`` received tokens.

    Only those experts' rows travel to the host; the others' gradient is exactly zero. On the host the first landing
    after an optimizer step zero-fills the other rows (so the optimizer sees the dense gradient), later ones (gradient
    accumulation) add nothing to them. ``grad`` is the full device gradient, or (``packed``) the hit rows back to back.
    """

    def __init__(self, grad: torch.Tensor, runs: list[tuple[int, int]], rows: int, packed: bool = False) -> None:
        self.grad, self.runs, self.rows, self.packed = grad, runs, rows, packed
        self.count = sum(z - a for a, z in runs)

    def numel(self) -> int:
        return self.count * self.per if self.runs else 0

    @property
    def per(self) -> int:
        return self.grad.numel() // (self.count if self.packed else self.rows)

    def element_size(self) -> int:
        return self.grad.element_size()

    def pieces(self):
        """``(first expert, end expert, rows)`` per run."""
        if not self.runs:
            return
        per = self.per
        flat = self.grad.reshape(-1)
        off = 0
        for a, z in self.runs:
            if self.packed:
                yield a, z, flat[off : off + (z - a) * per].view(z - a, per)
                off += (z - a) * per
            else:
                yield a, z, flat[a * per : z * per].view(z - a, per)

    def zero_others(self, dst: torch.Tensor) -> None:
        """Zero-fills the rows of ``dst`` (the parameter's host gradient) of experts outside ``runs``."""
        rows = dst.reshape(self.rows, -1)
        start = 0
        for a, z in [*self.runs, (self.rows, self.rows)]:
            if a > start:
                rows[start:a].zero_()
            start = z

    def norm(self) -> torch.Tensor:
        parts = [p for _, _, p in self.pieces()]
        if not parts:
            return torch.zeros((), dtype=torch.float32, device=self.grad.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p, dtype=torch.float32) for p in parts]))


class GradientSink:
    """Moves per-unit gradients to the host store (see the module docstring).

    Args:
        store: The host store.
        device: Compute device.
        dtype: Dtype gradients arrive in (the compute dtype).
        slab_numel: Elements per pinned slab (the largest unit); slabs are allocated on the first fold.
        num_slabs: Slabs in the pool (bounds pinned memory and the number of gradients in flight in fold mode).
        direct: Start in direct mode.
    """

    def __init__(
        self,
        store: HostStore,
        device: torch.device,
        dtype: torch.dtype,
        slab_numel: int,
        num_slabs: int = 3,
        direct: bool = True,
    ) -> None:
        self.store, self.device, self.dtype = store, device, dtype
        self.cuda = device.type == "cuda"
        self.track_norms = False
        self.direct = direct
        self.worker = Worker("gradient", device)
        self.extra_checks: tuple[Worker, ...] = ()
        self.on_final: Callable[[list[StoreGroup]], None] | None = None
        self.bytes_d2h = 0
        self._slab_numel, self._num_slabs = slab_numel, num_slabs
        self._slabs: queue.Queue[torch.Tensor] = queue.Queue()
        self._all_slabs: list[torch.Tensor] = []
        self.d2h_stream = torch.cuda.Stream(device) if self.cuda else None
        self.scattered: set[int] = set()
        """Groups whose gradients always use the FP32 buffer (the embedding: its rows are scattered)."""
        self._direct_at_start = direct

    def allocate(self) -> None:
        """Allocates the pinned compute-dtype gradient buffers up front (direct mode), not during the first backward."""
        if self._direct_at_start:
            for group in self.store.groups:
                if id(group) not in self.scattered:
                    self._ensure_lp(group)

    # ---------------------------------------------------------------------------------------- compute thread
    def submit(self, targets: list[Target], grads: list[torch.Tensor | None], final: list[StoreGroup]) -> None:
        """Queues ``grads`` (on the compute device, produced on the current stream) for ``targets``.

        ``final`` lists the groups whose gradients are complete once these have landed (reported to ``on_final``).
        """
        pairs = [(t, g) for t, g in zip(targets, grads) if g is not None]
        if self.direct and any(not sp.fresh for (_, sp), _ in pairs):
            self._switch_to_fold()
        if self.track_norms and self.direct:
            for (_, sp), g in pairs:  # on the GPU, where the gradient already is
                sp.grad_norm = (
                    g.norm() if isinstance(g, ExpertGrad) else torch.linalg.vector_norm(g, dtype=torch.float32)
                )
        if self.direct:
            self._submit_direct(pairs, final)
        else:
            self._submit_fold(pairs, final)

    def submit_embedding(
        self, target: Target, ids: torch.Tensor, grad_hidden: torch.Tensor, padding_idx: int | None
    ) -> None:
        """Queues the embedding gradient: rows ``ids`` receive ``grad_hidden`` (as ``nn.Embedding`` would).

        The embedding's gradient is dense on the host (its rows are scattered): it always uses the FP32 buffer.
        """
        ids = ids.reshape(-1).to("cpu")
        rows = grad_hidden.reshape(ids.numel(), -1).to("cpu")
        self.bytes_d2h += rows.numel() * rows.element_size()
        if padding_idx is not None:
            keep = ids != padding_idx
            ids, rows = ids[keep], rows[keep]
        group, sp = target

        def fold() -> None:
            self._to_fp32(group, sp)
            dst = group.grad_view(sp)
            if sp.fresh:
                dst.zero_()
                sp.fresh = False
            dst.index_add_(0, ids, rows.to(torch.float32))
            if self.track_norms:
                sp.grad_norm = torch.linalg.vector_norm(dst)
            self._report([group])

        self.worker.submit(fold)

    def wait(self) -> None:
        """Blocks until every queued gradient has landed."""
        self.worker.drain(self.extra_checks)

    def close(self) -> None:
        self.worker.close()
        for slab in self._all_slabs:
            unregister_pinned(slab)
        for group in self.store.groups:
            if group.grad_lp is not None:
                unregister_pinned(group.grad_lp)

    def gradient(self, group: StoreGroup, sp: StoreParam) -> torch.Tensor | None:
        """The current FP32 gradient of one parameter (a view in fold mode, an upcast copy in direct mode)."""
        if sp.fresh:
            return None
        if group.grad is not None and not sp.in_lp:
            return group.grad_view(sp)
        return group.lp_grad_view(sp).to(torch.float32)

    def fp32_view(self, group: StoreGroup, sp: StoreParam) -> torch.Tensor | None:
        """``param.grad``-compatible view (FP32 storage) or None when the gradient lives in the compute dtype."""
        if sp.fresh:
            return None
        if sp.in_lp:
            return group.lp_grad_view(sp) if group.grad_lp.dtype == torch.float32 else None
        return group.grad_view(sp)

    # ------------------------------------------------------------------------------------------------ internals
    def _ensure_lp(self, group: StoreGroup) -> None:
        if group.grad_lp is None and group.trainable:
            with torch.inference_mode(False):
                group.grad_lp = pinned_empty(group.master.numel(), self.dtype, pin=self.cuda)

    def _report(self, groups: list[StoreGroup]) -> None:
        if groups and self.on_final is not None:
            self.on_final(groups)

    def _submit_direct(self, pairs: list[tuple[Target, torch.Tensor]], final: list[StoreGroup]) -> None:
        for (group, _), _ in pairs:
            self._ensure_lp(group)
        for (_, sp), _ in pairs:
            sp.in_lp, sp.fresh = True, False
        if not self.cuda:

            def land() -> None:
                for (group, sp), g in pairs:
                    dst = group.lp_grad_view(sp)
                    if isinstance(g, ExpertGrad):
                        g.zero_others(dst)
                        rows = dst.view(g.rows, -1)
                        for a, z, piece in g.pieces():
                            rows[a:z].copy_(piece)
                    else:
                        dst.copy_(g)
                self._report(final)

            self.bytes_d2h += sum(g.numel() * g.element_size() for _, g in pairs)
            self.worker.submit(land)
            return
        event = torch.cuda.Event()
        self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h_stream):
            for (group, sp), g in pairs:
                if isinstance(g, ExpertGrad):
                    rows = group.lp_grad_view(sp).view(g.rows, -1)
                    for a, z, piece in g.pieces():
                        rows[a:z].copy_(piece, non_blocking=True)
                    g.grad.record_stream(self.d2h_stream)
                else:
                    group.lp_grad_view(sp).copy_(g, non_blocking=True)
                    g.record_stream(self.d2h_stream)
                self.bytes_d2h += g.numel() * g.element_size()
            event.record(self.d2h_stream)
        sparse = [((group, sp), g) for (group, sp), g in pairs if isinstance(g, ExpertGrad)]

        def landed() -> None:
            for (group, sp), g in sparse:  # host rows the copies do not touch: disjoint from the ones in flight
                g.zero_others(group.lp_grad_view(sp))
            event.synchronize()
            self._report(final)

        self.worker.submit(landed)

    def _submit_fold(self, pairs: list[tuple[Target, torch.Tensor]], final: list[StoreGroup]) -> None:
        if not self.cuda:

            def fold_now() -> None:
                self._fold(pairs)
                self._report(final)

            self.bytes_d2h += sum(g.numel() * g.element_size() for _, g in pairs)
            self.worker.submit(fold_now)
            return
        slab = self._take_slab()
        event = torch.cuda.Event()
        self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
        views, offset = [], 0
        with torch.cuda.stream(self.d2h_stream):
            for target, g in pairs:
                n = g.numel()
                view = slab[offset : offset + n]
                if isinstance(g, ExpertGrad):
                    at = 0
                    for _, _, piece in g.pieces():
                        view[at : at + piece.numel()].copy_(piece.reshape(-1), non_blocking=True)
                        at += piece.numel()
                    g.grad.record_stream(self.d2h_stream)
                    views.append((target, ExpertGrad(view, g.runs, g.rows, packed=True)))
                else:
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
            self._report(final)

        self.worker.submit(fold)

    def _switch_to_fold(self) -> None:
        """A second backward before the optimizer step: gradients must accumulate in FP32 from now on."""
        self.wait()
        if self.dtype != torch.float32:
            warnings.warn(
                "gradient accumulation detected: the horizon engine now keeps FP32 gradients on the host "
                "(+2 bytes/param). Tell it up front (HorizonStrategy does this from accumulate_grad_batches).",
                stacklevel=3,
            )
        self.direct = False
        for group in self.store.groups:
            for sp in group.params:
                if not sp.fresh and sp.in_lp:
                    self._to_fp32(group, sp)

    def _to_fp32(self, group: StoreGroup, sp: StoreParam) -> None:
        group.ensure_grad()
        if sp.in_lp:
            if not sp.fresh:
                group.grad_view(sp).copy_(group.lp_grad_view(sp))
            sp.in_lp = False

    def _take_slab(self) -> torch.Tensor:
        if not self._all_slabs:
            for _ in range(self._num_slabs):
                slab = pinned_empty(self._slab_numel, self.dtype, pin=True)
                self._all_slabs.append(slab)
                self._slabs.put(slab)
        while True:
            self.worker.check()
            try:
                return self._slabs.get(timeout=0.05)
            except queue.Empty:
                continue

    def _fold(self, pairs: list[tuple[Target, torch.Tensor]]) -> None:
        for (group, sp), src in pairs:
            self._to_fp32(group, sp)
            dst = group.grad_view(sp).view(-1)
            if isinstance(src, ExpertGrad):
                rows = dst.view(src.rows, -1)
                if sp.fresh:
                    src.zero_others(dst)
                for a, z, piece in src.pieces():
                    if sp.fresh:
                        rows[a:z].copy_(piece)
                    else:
                        rows[a:z].add_(piece)
                sp.fresh = False
                if self.track_norms:
                    sp.grad_norm = torch.linalg.vector_norm(dst)
                continue
            src = src.reshape(-1)
            if sp.fresh:
                dst.copy_(src)
                sp.fresh = False
            else:
                dst.add_(src)
            if self.track_norms:
                sp.grad_norm = torch.linalg.vector_norm(dst)
