"""Gradients from the compute device to the host store.

Two modes, chosen per engine (``direct`` is the default; the first accumulated backward switches to ``fold``):

* ``direct`` (no gradient accumulation): every gradient is copied on its own ``d2h_stream`` straight into the
  group's pinned gradient buffer in the compute dtype (``StoreGroup.grad_lp``). Nothing is folded: the CPU
  optimizer upcasts one group at a time. Host cost: 2 bytes/param for BF16 compute, or, *pooled*, a few buffers:
  when every update is scheduled during the backward (``EngineConfig.updates_in_backward``: no clipping, no
  accumulation, nothing reads the gradients before the step), a group's buffer is needed only from its landing
  until its update has read it, so it is leased from a bounded :class:`~.grad_pool.GradPool` (each buffer the size
  of the largest group; the compute thread waits for a free one) and given back by the optimizer. The sink leases
  only while the engine confirms, for each landing, that the update follows it (``updates_follow``); the moment it
  does not (no ``begin_step``, a second forward pass in the step, a parameter outside the step's optimizer), the
  sink gives the pool up for good and every group gets its whole buffer, as without the pool (with a warning).
* ``fold`` (gradient accumulation): gradients arrive in a bounded pool of pinned slabs, each the size of a decoder
  layer's gradient at most (larger gradients, the head's, are split across slabs; the compute thread blocks when all
  slabs are in flight: back-pressure, bounded pinned memory); a fold worker adds each slab into the group's
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

import contextlib
import functools
import math
import queue
import warnings
from collections.abc import Callable

import torch

from .data_parallel import NodeGradients, NodeReduce
from .footprint import REDUCE_STAGE_NUMEL
from .grad_pool import GradPool
from .host_kernels import fold_
from .moe import ExpertGrad
from .pinned import chunk_spans, pinned_empty, register_pinned, unregister_pinned
from .store import GradState, HostStore, StoreGroup, StoreParam
from .workers import WorkerGroup

EMBEDDING_FOLD_NUMEL = 16 * 2**20
"""Elements of the embedding's rows handled at a time on the host (64 MiB in FP32): the forward gathers them from the
FP32 masters and casts them to the compute dtype (``Passes.embed_forward``); the backward brings the gradient's rows
down in chunks of this many (``GradientSink.submit_embedding``), upcasts them and scatters them into the host buffer.
The whole batch's rows at once were a transient of several bytes per token and hidden unit (FP32 rows alone: 470 MB
at 16 x 2048 tokens of the Qwen2.5-7B shape)."""


def row_spans(num_rows: int, width: int, chunk_numel: int) -> list[slice]:
    """Consecutive spans of ``num_rows`` rows of ``width`` elements, ``chunk_numel`` elements at most each (one row at
    least)."""
    step = max(1, chunk_numel // max(1, width))
    return [slice(start, start + step) for start in range(0, num_rows, step)]


def scatter_rows_(dst: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, chunk_numel: int = EMBEDDING_FOLD_NUMEL):
    """``dst.index_add_(0, ids, rows.to(dst.dtype))``, upcasting ``chunk_numel`` elements of ``rows`` at a time. The
    CPU ``index_add_`` adds the rows in index order, so the chunks give the same sums bit for bit."""
    for span in row_spans(ids.numel(), rows[0].numel() if len(rows) else 1, chunk_numel):
        dst.index_add_(0, ids[span], rows[span].to(dst.dtype))


def add_rows_(dst: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``dst[ids[i]] += rows[i]`` for every ``i``, repeated ids included, with the same sums on every run. CUDA's
    ``index_add_`` adds repeated ids with atomics in no fixed order (PyTorch lists it among the nondeterministic
    operations), so on CUDA this uses ``index_put_(..., accumulate=True)``, which sorts by id and adds in a fixed
    order; on the CPU ``index_add_`` adds in index order."""
    rows = rows.to(dst.dtype)
    if dst.is_cuda:
        return dst.index_put_((ids,), rows, accumulate=True)
    return dst.index_add_(0, ids, rows)


Target = tuple[StoreGroup, StoreParam]


class GradientSink:
    """Moves per-unit gradients to the host store (see the module docstring).

    Args:
        store: The host store.
        device: Compute device.
        dtype: Dtype gradients arrive in (the compute dtype).
        slab_numel: Elements per pinned slab (a decoder layer, capped); a larger gradient travels in several slabs.
            Slabs are allocated on the first fold.
        num_slabs: Slabs in the pool (bounds pinned memory and the number of gradients in flight in fold mode).
        direct: Start in direct mode (its compute-dtype gradient buffers are allocated now, not in the first backward).
        pool_buffers: In direct mode, lease compute-dtype gradient buffers from a pool of this many (allocated now)
            instead of one whole buffer per group; 0: whole buffers.
        pool_numel: Elements of each pooled buffer (the largest group whose gradient lands in the compute dtype).
        updates_follow: ``updates_follow(params)``: whether the updates of these parameters' groups are scheduled as
            soon as their gradients are complete (asked for every pooled landing, on the compute thread).
        workers: The engine's workers (the gradient worker joins them; waits check them all).
        scattered: Groups whose gradients always use the FP32 buffer (the embedding: its rows are scattered).
        on_final: Called (on the gradient worker) with the groups whose gradients are complete.
        track_norms: Record per-parameter gradient norms as they land (clipping by norm is then free).
        kernels: Fold with :func:`.host_kernels.fold_` (one pass, the norm on the way), else torch's ``copy_``/``add_``.
        threads: Threads of the fold kernel.
        shared: The FP32 gradients are one buffer shared by the processes of a data-parallel node: every fold adds
            into it under the group's mutex, and the first after a discard zero-fills it (fold mode only).
        reduce: With ``shared``: the node's processes reduce-scatter each group's gradient on the devices first
            (:meth:`_submit_reduced`), and each adds only its shard of the sum into the node's buffer, without the
            mutex (the shards are disjoint). The embedding's group keeps the host path.
    """

    def __init__(
        self,
        store: HostStore,
        device: torch.device,
        dtype: torch.dtype,
        slab_numel: int,
        num_slabs: int,
        direct: bool,
        workers: WorkerGroup,
        scattered: list[StoreGroup],
        on_final: Callable[[list[StoreGroup]], None],
        track_norms: bool = False,
        kernels: bool = False,
        threads: int | None = None,
        pool_buffers: int = 0,
        pool_numel: int = 0,
        updates_follow: Callable[[list[StoreParam]], bool] | None = None,
        shared: NodeGradients | None = None,
        reduce: NodeReduce | None = None,
    ) -> None:
        self.store, self.device, self.dtype = store, device, dtype
        self.cuda = device.type == "cuda"
        self.track_norms = track_norms
        self.direct = direct
        self.worker = workers.worker("gradient")
        self.workers = workers
        self.on_final = on_final
        self.bytes_d2h = 0
        self._slab_numel, self._num_slabs = slab_numel, num_slabs
        self._slabs: queue.Queue[torch.Tensor] = queue.Queue()
        self._all_slabs: list[torch.Tensor] = []
        self.d2h_stream = torch.cuda.Stream(device) if self.cuda else None
        self.scattered = {id(g) for g in scattered}
        self.kernels = kernels
        self.threads = threads
        self.updates_follow = updates_follow
        if shared is not None and direct:
            raise ValueError("gradients shared by a node's processes are folded in FP32: direct mode cannot serve them")
        self.shared = shared
        if reduce is not None and shared is None:
            raise ValueError("gradients reduced on the devices land in a node's shared buffer: pass shared too")
        self.reduce = reduce
        if reduce is not None and reduce.peers is not None:
            shared.summed_everywhere.update(id(g) for g in store.groups if g.trainable and id(g) not in self.scattered)
        self.reduce_stream = torch.cuda.Stream(device) if self.cuda and reduce is not None else None
        self._stages: queue.Queue[torch.Tensor] = queue.Queue()
        self._all_stages: list[torch.Tensor] = []
        self.pool: GradPool | None = None
        """The pooled compute-dtype gradient buffers (None: whole buffers, or fold mode)."""
        self._pinned_fp32: dict[int, torch.Tensor] = {}
        """FP32 gradient buffers this sink page-locked, by address (:meth:`submit_fp32` copies into them)."""
        if direct and pool_buffers:
            if updates_follow is None:
                raise ValueError("a gradient pool needs updates_follow (whether each landing's update follows it)")
            self.pool = GradPool(store, pool_buffers, pool_numel, dtype, self.cuda, workers.check)
        elif direct:
            for group in self.store.groups:
                if id(group) not in self.scattered:
                    self._ensure_lp(group)

    # ---------------------------------------------------------------------------------------- compute thread
    def submit(self, targets: list[Target], grads: list[torch.Tensor | None], final: list[StoreGroup]) -> None:
        """Queues ``grads`` (on the compute device, produced on the current stream) for ``targets``.

        ``final`` lists the groups whose gradients are complete once these have landed (reported to ``on_final``).
        """
        pairs = [(t, g) for t, g in zip(targets, grads) if g is not None]
        if self.direct and any(sp.has_grad for (_, sp), _ in pairs):
            self._switch_to_fold()
        if self.track_norms and self.direct:
            for (_, sp), g in pairs:  # on the GPU, where the gradient already is
                sp.grad_norm = (
                    g.norm() if isinstance(g, ExpertGrad) else torch.linalg.vector_norm(g, dtype=torch.float32)
                )
        if self.direct:
            self._submit_direct(pairs, final)
        elif self.reduce is not None:
            self._submit_reduced(targets, grads, final)
        else:
            self._submit_fold(pairs, final)

    def submit_embedding(
        self, target: Target, ids: torch.Tensor, grad_hidden: torch.Tensor, padding_idx: int | None
    ) -> None:
        """Queues the embedding gradient: rows ``ids`` receive ``grad_hidden`` (as ``nn.Embedding`` would).

        The embedding's gradient is dense on the host (its rows are scattered): it always uses the FP32 buffer. The
        rows come to the host ``EMBEDDING_FOLD_NUMEL`` elements at a time, at most two chunks at once (the worker
        scatters one while the next comes down): the whole batch's rows were a transient of 2 bytes per token and
        hidden unit (235 MB at 16 x 2048 tokens of the Qwen2.5-7B shape; 2 GiB at 128 Ki tokens of the 72B shape).
        """
        group, sp = target
        ids = ids.reshape(-1).to("cpu")
        rows = grad_hidden.reshape(ids.numel(), -1)
        spans = row_spans(ids.numel(), rows.shape[-1], EMBEDDING_FOLD_NUMEL) or [slice(0, 0)]
        on_host: queue.Queue[None] = queue.Queue()  # one item per chunk that may be on the host now
        for _ in range(2):
            on_host.put(None)

        def fold(chunk_ids: torch.Tensor, chunk: torch.Tensor, first: bool, last: bool) -> None:
            try:
                if first:
                    self._to_fp32(group, sp)
                dst = group.grad_view(sp)
                with self._locked(group):
                    if self.shared is not None:
                        self.shared.to_sum(group, sp)  # (once per step: the later chunks find the sum started)
                    elif first and not sp.has_grad:
                        dst.zero_()
                    scatter_rows_(dst, chunk_ids, chunk, EMBEDDING_FOLD_NUMEL)
            finally:
                on_host.put(None)
            if last:
                sp.land(GradState.FP32)
                if self.track_norms:
                    sp.grad_norm = torch.linalg.vector_norm(dst)
                self._report([group])

        for span in spans:
            self._wait_get(on_host)
            chunk_ids = ids[span]
            chunk = rows[span].to("cpu")
            self.bytes_d2h += chunk.numel() * chunk.element_size()
            if padding_idx is not None:
                keep = chunk_ids != padding_idx
                chunk_ids, chunk = chunk_ids[keep], chunk[keep]
            self.worker.submit(functools.partial(fold, chunk_ids, chunk, span is spans[0], span is spans[-1]))

    def submit_fp32(self, target: Target, grad: torch.Tensor, final: list[StoreGroup]) -> None:
        """Queues a whole FP32 gradient (on the compute device, produced on the current stream): the tied embedding's,
        summed on the compute device. In direct mode, for a parameter without a gradient yet, it is copied straight
        into the group's FP32 buffer (page-locked on first use); otherwise it takes the path of every gradient, in
        the compute dtype."""
        group, sp = target
        if not self.direct or sp.has_grad or self.shared is not None:
            self.submit([target], [grad.to(self.dtype)], final)
            return
        buf = group.ensure_grad()
        if self.cuda and buf.data_ptr() not in self._pinned_fp32:
            self._pinned_fp32[buf.data_ptr()] = register_pinned(buf)
        dst = group.grad_view(sp)
        sp.land(GradState.FP32)
        if self.track_norms:
            sp.grad_norm = torch.linalg.vector_norm(grad)  # on the compute device, as in direct mode
        self.bytes_d2h += grad.numel() * grad.element_size()
        if not self.cuda:

            def land() -> None:
                dst.copy_(grad.view_as(dst))
                self._report(final)

            self.worker.submit(land)
            return
        event = torch.cuda.Event()
        self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h_stream):
            dst.copy_(grad.view_as(dst), non_blocking=True)
            grad.record_stream(self.d2h_stream)
            event.record(self.d2h_stream)

        def landed() -> None:
            self.worker.wait_event(event)
            self._report(final)

        self.worker.submit(landed)

    def wait(self) -> None:
        """Blocks until every queued gradient has landed."""
        self.worker.drain()

    def finish(self) -> None:
        """Waits until every gradient is on the host and exposes them as ``param.grad`` where they are FP32."""
        self.wait()
        for group in self.store.groups:
            for sp in group.params:
                if sp.has_grad and sp.trainable and not group.away:  # (another node's: on the meta device)
                    sp.param.grad = self.fp32_view(group, sp)

    def close(self) -> None:
        self.worker.close()
        for slab in self._all_slabs + self._all_stages:
            unregister_pinned(slab)
        for buf in self._pinned_fp32.values():
            unregister_pinned(buf)
        self._pinned_fp32 = {}
        if self.pool is not None:
            self.pool.close()
        for group in self.store.groups:
            if group.grad_lp is not None:
                unregister_pinned(group.grad_lp)

    def gradient(self, group: StoreGroup, sp: StoreParam) -> torch.Tensor | None:
        """The current FP32 gradient of one parameter (a view in fold mode, an upcast copy in direct mode)."""
        if sp.grad_state is GradState.NONE:
            return None
        if sp.grad_state is GradState.FP32:
            return group.grad_view(sp)
        return group.lp_grad_view(sp).to(torch.float32)

    def fp32_view(self, group: StoreGroup, sp: StoreParam) -> torch.Tensor | None:
        """``param.grad``-compatible view (FP32 storage) or None when the gradient lives in the compute dtype."""
        if sp.grad_state is GradState.NONE:
            return None
        if sp.grad_state is GradState.COMPUTE:
            return group.lp_grad_view(sp) if group.grad_lp.dtype == torch.float32 else None
        return group.grad_view(sp)

    # ------------------------------------------------------------------------------------------------ internals
    def _ensure_lp(self, group: StoreGroup) -> None:
        """Gives ``group`` a whole compute-dtype gradient buffer (if it has none)."""
        if group.grad_lp is None and group.trainable:
            with torch.inference_mode(False):
                group.grad_lp = pinned_empty(group.master.numel(), self.dtype, pin=self.cuda)

    def consumed(self, group: StoreGroup) -> None:
        """Called by the optimizer worker once an update has read ``group``'s gradients: a pooled buffer goes back."""
        pool = self.pool
        if pool is not None:
            pool.release(group, after_update=True)

    def discarded(self, group: StoreGroup) -> None:
        """Called (after :meth:`wait`) once ``group``'s gradients were discarded: a pooled buffer goes back unless an
        update still reads it (that update gives it back)."""
        pool = self.pool
        if pool is not None:
            pool.release(group)

    def leave_pool(self, reason: str) -> None:
        """Gives the gradient pool up for good: ``reason`` says why an update may no longer follow each landing
        during the backward. Every group gets its whole compute-dtype buffer (as without the pool); gradients held
        in pooled buffers move there."""
        pool = self.pool
        if pool is None:
            return
        warnings.warn(
            f"{reason}: the horizon engine now keeps whole-model gradient buffers in the compute dtype "
            f"(+{self.dtype.itemsize} bytes/param, which its preflight did not count) instead of its gradient pool",
            stacklevel=3,
        )
        self.wait()
        pool.wait_quiet()
        self.pool = None
        for group in self.store.groups:
            held = pool.end_lease(group)
            group.grad_lp = None
            if held is not None and any(sp.grad_state is GradState.COMPUTE for sp in group.params):
                with torch.inference_mode(False):
                    group.grad_lp = pinned_empty(group.master.numel(), self.dtype, pin=self.cuda)
                group.grad_lp.copy_(held)
            elif id(group) not in self.scattered:
                self._ensure_lp(group)
        pool.close()

    def _lp_buffers(self, pairs: list[tuple[Target, torch.Tensor]]) -> None:
        """Gives every group of ``pairs`` its compute-dtype buffer: a pooled one (waiting for a free one) while the
        engine confirms that the updates follow, else a whole one (leaving the pool first)."""
        if self.pool is not None and pairs and not self.updates_follow([sp for (_, sp), _ in pairs]):
            self.leave_pool("a gradient landed whose optimizer update is not scheduled during the backward")
        for (group, _), _ in pairs:
            if self.pool is not None:
                self.pool.acquire(group)
            else:
                self._ensure_lp(group)

    def _report(self, groups: list[StoreGroup]) -> None:
        if groups and self.on_final is not None:
            self.on_final(groups)

    def _submit_direct(self, pairs: list[tuple[Target, torch.Tensor]], final: list[StoreGroup]) -> None:
        self._lp_buffers(pairs)
        for (_, sp), _ in pairs:
            sp.land(GradState.COMPUTE)
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
            self.worker.wait_event(event)
            self._report(final)

        self.worker.submit(landed)

    def _submit_fold(self, pairs: list[tuple[Target, torch.Tensor]], final: list[StoreGroup]) -> None:
        """Sends the gradients in chunks of at most one slab (a gradient may span several) and folds each chunk
        once it has landed; ``final`` is reported after the last chunk."""
        spans = _spans(pairs)
        self.bytes_d2h += sum(src.numel() for _, _, src in spans) * self.dtype.itemsize
        chunks = list(chunk_spans(spans, self._slab_numel))
        if not chunks:  # nothing trainable in this unit: still report it complete, in order
            self.worker.submit(lambda: self._report(final))
            return
        for chunk in chunks:
            for landing, _, _ in chunk:
                landing.left += 1
        if self.cuda:
            for _, g in pairs:
                (g.grad if isinstance(g, ExpertGrad) else g).record_stream(self.d2h_stream)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            if not self.cuda:  # nothing crosses a bus: fold straight from the gradients

                def fold_now(chunk=chunk, last=last) -> None:
                    self._fold(chunk)
                    if last:
                        self._report(final)

                self.worker.submit(fold_now)
                continue
            slab = self._take_slab()  # blocks while every slab is in flight (back-pressure)
            event = torch.cuda.Event()
            self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
            landed, at = [], 0
            with torch.cuda.stream(self.d2h_stream):
                for landing, offset, src in chunk:
                    view = slab[at : at + src.numel()]
                    view.copy_(src, non_blocking=True)
                    landed.append((landing, offset, view))
                    at += src.numel()
                event.record(self.d2h_stream)

            def fold(slab=slab, event=event, landed=landed, last=last) -> None:
                self.worker.wait_event(event)
                try:
                    self._fold(landed)
                finally:
                    self._slabs.put(slab)
                if last:
                    self._report(final)

            self.worker.submit(fold)

    def _submit_reduced(
        self, targets: list[Target], grads: list[torch.Tensor | ExpertGrad | None], final: list[StoreGroup]
    ) -> None:
        """Data parallel with ``grad_reduce="device"``: each group's gradients are summed over the node's processes
        on the devices (:meth:`_reduce_group`); the embedding's group (rows scattered on the host) takes the host
        path. Every process submits the same targets in the same order (the same model, the same backward), so the
        collectives match; which of them has a gradient may differ and travels with the sums."""
        held = [(t, g) for t, g in zip(targets, grads) if id(t[0]) in self.scattered and g is not None]
        groups: dict[int, tuple[StoreGroup, list[tuple[StoreParam, torch.Tensor | ExpertGrad | None]]]] = {}
        for (group, sp), g in zip(targets, grads):
            # (a group with no trainable parameter, such as the norms under LoRA, has nothing to reduce: the same
            # in every process, so the collectives still match)
            if id(group) not in self.scattered and group.trainable:
                groups.setdefault(id(group), (group, []))[1].append((sp, g))
        if held or not groups:
            self._submit_fold(held, [] if groups else final)
        for i, (group, items) in enumerate(groups.values()):
            self._reduce_group(group, items, final if i == len(groups) - 1 else [])

    def _reduce_group(
        self, group: StoreGroup, items: list[tuple[StoreParam, torch.Tensor | ExpertGrad | None]], final
    ) -> None:
        """Reduce-scatters ``group``'s gradients over the node's processes in FP32 and folds this process's shard
        into the node's buffer.

        The group's flat layout (its master's) is cut into ``size`` shards of ``ceil(numel / size)`` elements; each
        process sends a ``size x (P + shard)`` FP32 buffer: row ``r`` starts with one presence flag per parameter of
        ``items`` (P of them, the same in every row), then holds its gradients' elements of shard ``r`` (zeros where
        it has none: a missing gradient, an expert no token reached). After the reduce-scatter (and, with several
        nodes, an all-reduce of the shard over them) each process holds, per parameter, how many processes had a
        gradient, then shard ``rank`` of the sum: a parameter none had keeps no gradient (its update is skipped, as
        in one process), not a zero one. With a sharded node store the shard is summed into the group's node only
        (:meth:`~.data_parallel.NodeReduce.to_home`), and lands there only. On a GPU the collectives run on
        ``reduce_stream`` and the shard comes down through two page-locked FP32 stages of at most
        ``REDUCE_STAGE_NUMEL`` elements, chunk by chunk."""
        n = self.reduce.size
        numel = group.master.numel()
        shard, start, stop = self.reduce.bounds(numel)
        head = len(items)
        stream = self.reduce_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            flat = torch.zeros(n, head + shard, dtype=torch.float32, device=self.device)
            for i, (sp, g) in enumerate(items):
                if g is None:
                    continue
                flat[:, i] = 1
                if stream is not None:
                    (g.grad if isinstance(g, ExpertGrad) else g).record_stream(stream)
                for _, at, src in _spans([((group, sp), g)]):
                    begin, end = sp.offset + at, sp.offset + at + src.numel()
                    for r in range(begin // shard, -(-end // shard)):
                        a, z = max(begin, r * shard), min(end, (r + 1) * shard)
                        flat[r, head + a - r * shard : head + z - r * shard].copy_(src[a - begin : z - begin])
            out = torch.empty(head + shard, dtype=torch.float32, device=self.device)
            self.reduce.reduce_scatter(out, flat.view(-1))
            if group.home is None:
                self.reduce.across_nodes(out)
            else:  # a sharded node store: only the group's node holds (and lands) it
                self.reduce.to_home(out, group.home)
        if group.away:  # nothing lands here; the presence of each gradient comes from its node at the average
            self.worker.submit(lambda: self._report(final))
            return
        used = head + stop - start  # the last shard may be shorter than the others (padding)
        self.bytes_d2h += used * 4
        landing = _ShardLanding(self, group, items, start)
        step = max(head + 1, REDUCE_STAGE_NUMEL)
        if stream is None:  # nothing crosses a bus: fold straight from the result, in the same pieces
            for at in range(0, used, step):
                piece, last = out[at : min(at + step, used)], at + step >= used
                self.worker.submit(lambda p=piece, at=at, last=last: landing.fold(p, at, last))
            self.worker.submit(lambda: self._report(final))
            return
        out.record_stream(self.d2h_stream)
        self.d2h_stream.wait_stream(stream)
        for at in range(0, used, step):
            piece = min(step, used - at)
            stage = self._take_stage()
            event = torch.cuda.Event()
            with torch.cuda.stream(self.d2h_stream):
                stage[:piece].copy_(out[at : at + piece], non_blocking=True)
                event.record(self.d2h_stream)
            last = at + piece == used

            def fold(stage=stage, event=event, at=at, piece=piece, last=last) -> None:
                self.worker.wait_event(event)
                try:
                    landing.fold(stage[:piece], at, last)
                finally:
                    self._stages.put(stage)
                if last:
                    self._report(final)

            self.worker.submit(fold)

    def _take_stage(self) -> torch.Tensor:
        """A page-locked FP32 buffer for a piece of a reduced shard (two in all: one lands while the next comes down):
        the largest group's presence flags and shard, ``REDUCE_STAGE_NUMEL`` elements at most."""
        if not self._all_stages:
            n = self.reduce.size
            widest = max(
                (len(g.params) + -(-g.master.numel() // n) for g in self.store.groups if g.trainable), default=1
            )
            numel = min(widest, max(REDUCE_STAGE_NUMEL, max(len(g.params) for g in self.store.groups) + 1))
            for _ in range(2):
                stage = pinned_empty(numel, torch.float32, pin=True)
                self._all_stages.append(stage)
                self._stages.put(stage)
        return self._wait_get(self._stages)

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
                self._to_fp32(group, sp)
        if self.pool is not None:  # every lease was given back by the upcasts or is, by its update
            self.pool.wait_quiet()
            self.pool.close()
            self.pool = None

    def _to_fp32(self, group: StoreGroup, sp: StoreParam) -> None:
        """Moves a gradient held in the compute dtype into the FP32 buffer (allocated on first use)."""
        group.ensure_grad()
        if sp.grad_state is GradState.COMPUTE:
            group.grad_view(sp).copy_(group.lp_grad_view(sp))
            sp.land(GradState.FP32)
            if self.pool is not None:  # the tied lm_head's gradient, joined by the embedding's rows
                self.pool.release(group)

    def _take_slab(self) -> torch.Tensor:
        if not self._all_slabs:
            for _ in range(self._num_slabs):
                slab = pinned_empty(self._slab_numel, self.dtype, pin=True)
                self._all_slabs.append(slab)
                self._slabs.put(slab)
        return self._wait_get(self._slabs)

    def _wait_get(self, items: queue.Queue):
        """``items.get()``, raising the gradient worker's failure instead of waiting for an item it would free."""
        while True:
            self.worker.check()
            try:
                return items.get(timeout=0.05)
            except queue.Empty:
                continue

    def _locked(self, group: StoreGroup):
        """``group``'s mutex among the node's processes when the gradients are shared (else nothing to hold)."""
        return self.shared.lock(group) if self.shared is not None else contextlib.nullcontext()

    def _fold(self, spans: list[tuple[_Landing, int, torch.Tensor]]) -> None:
        """Adds (or, on the first landing after an optimizer step, copies) each span into the FP32 gradient."""
        for landing, offset, src in spans:
            group, sp = landing.target
            with self._locked(group):
                if landing.fresh is None:  # the first span of this gradient
                    self._to_fp32(group, sp)
                    if self.shared is not None:  # another process of the node may have landed it already
                        self.shared.to_sum(group, sp)
                        landing.fresh = False
                    else:
                        landing.fresh = not sp.has_grad
                    if landing.fresh and landing.expert is not None:
                        landing.expert.zero_others(group.grad_view(sp))
                dst = group.grad_view(sp).view(-1)[offset : offset + src.numel()]
                if self.kernels and src.device.type == "cpu" and src.is_contiguous():
                    landing.sumsq += fold_(dst, src, overwrite=landing.fresh, num_threads=self.threads)
                else:
                    landing.sumsq = None  # no statistic from this path: the norm is computed at the end
                    if landing.fresh:
                        dst.copy_(src)
                    else:
                        dst.add_(src)
            landing.left -= 1
            if landing.left == 0:
                sp.land(GradState.FP32)
                if self.track_norms:
                    if landing.sumsq is not None and landing.expert is None:  # the spans covered the whole gradient
                        sp.grad_norm = torch.tensor(math.sqrt(landing.sumsq), dtype=torch.float32)
                    else:
                        sp.grad_norm = torch.linalg.vector_norm(group.grad_view(sp))


class _ShardLanding:
    """This process's shard of one group's reduced gradients on its way into the node's buffer (on the gradient
    worker), possibly in several pieces: the first piece starts with the presence counts, which decide per parameter
    whether it lands at all and whether the shard overwrites (no gradient of this step yet) or adds (after scaling an
    averaged gradient back to the sum it stands for); the last piece lands the parameters. Every process lands the
    same parameters, so each process's own gradient states say what its shard holds."""

    def __init__(self, sink: GradientSink, group: StoreGroup, items, start: int) -> None:
        self.sink, self.group, self.items, self.start = sink, group, items, start
        self.head = len(items)
        self.plan: list[tuple[StoreParam, bool, bool]] | None = None

    def fold(self, piece: torch.Tensor, at: int, last: bool) -> None:
        """Folds ``piece``, elements ``at:at + len(piece)`` of the reduced result (counts, then the shard)."""
        shared = self.sink.shared
        if self.plan is None:
            assert at == 0 and piece.numel() >= self.head
            self.plan = []
            for (sp, _), count in zip(self.items, piece[: self.head].tolist()):
                if count > 0:  # else no process had a gradient
                    self.plan.append((sp, not sp.has_grad, id(sp) in shared.averaged_here))
                    shared.averaged_here.discard(id(sp))
        lo = self.start + max(at - self.head, 0)  # the piece's elements in the group's flat layout
        hi = self.start + at + piece.numel() - self.head
        flat = self.group.grad.view(-1)
        for sp, fresh, averaged in self.plan:
            a, z = max(sp.offset, lo), min(sp.offset + sp.numel, hi)
            if a >= z:
                continue
            dst, src = flat[a:z], piece[a - lo + max(self.head - at, 0) : z - lo + max(self.head - at, 0)]
            if fresh:
                dst.copy_(src)
            else:
                if averaged:  # back to the sum it stands for (the node's share with one node)
                    dst.mul_(self.sink.reduce.summed)
                dst.add_(src)
        if last:
            for sp, _, _ in self.plan:
                sp.land(GradState.FP32)
                shared.mark_summed(sp)


class _Landing:
    """One gradient on its way into the FP32 buffer, possibly in several spans (and slabs)."""

    def __init__(self, target: Target, expert: ExpertGrad | None) -> None:
        self.target, self.expert = target, expert
        self.left = 0
        """Spans of this gradient still to land."""
        self.fresh: bool | None = None
        """Whether the buffer held no gradient yet (decided when the first span lands)."""
        self.sumsq: float | None = 0.0
        """Sum of squares of the folded result over the spans so far (None when a span was folded without it)."""


def _spans(pairs: list[tuple[Target, torch.Tensor | ExpertGrad]]) -> list[tuple[_Landing, int, torch.Tensor]]:
    """Each gradient as ``(landing, offset in the flat parameter, flat source)`` spans; an expert gradient gives one
    span per run of hit experts (at least one span, maybe empty, so a gradient with no hit expert still lands)."""
    out = []
    for target, g in pairs:
        if isinstance(g, ExpertGrad):
            per = g.per if g.runs else 0
            parts = [(a * per, piece.reshape(-1)) for a, _, piece in g.pieces()] or [(0, g.grad.reshape(-1)[:0])]
            landing = _Landing(target, g)
            out.extend((landing, off, src) for off, src in parts)
        else:
            out.append((_Landing(target, None), 0, g.reshape(-1)))
    return out
