"""The layer streamer: BF16 copies of host layers flow into a few GPU slots, ahead of compute.

Streams, events and threads
---------------------------
The GPU keeps no persistent weights. It owns ``num_slots`` flat *slot* buffers in the compute dtype, each as large
as the largest streamed unit (a decoder layer, or the head = final norm + lm_head). Each slot has *template* modules
(:class:`~.templates.TemplateBank`): copies of a layer, one per distinct layer structure, whose parameters are views
into that slot. Running layer ``i`` means: fill a slot with layer ``i``'s weights, then call the template of layer
``i``'s structure bound to that slot.

A prefetch thread walks a *plan* (the unit ids the main thread will ask for, in order) and, for each entry, picks a
slot, waits until the unit's pending optimizer update has been applied on the host, and issues the H2D copy on its
own ``h2d_stream``: from the group's pinned BF16 copy of the weights when there is one; otherwise, with
``cast_on_gpu``, from the page-locked FP32 masters themselves, in chunks through one FP32 GPU buffer where they are
cast to BF16, or else by packing the FP32 masters (cast to BF16 on the CPU) into two alternating 128 MiB pinned
staging buffers, chunk by chunk. Ordering is kept by events only, never by device-wide synchronisation:

* ``copy_event`` (recorded on ``h2d_stream`` after the copy): the compute stream waits on it before it runs the
  template. Each staging buffer has an event of its own, which the prefetch thread synchronises on before it packs
  into that buffer again.
* ``free_event`` (recorded on the compute stream after the last kernel that reads the slot): ``h2d_stream`` waits on
  it before it overwrites the slot with another unit.
* ``group.h2d_event`` (recorded after an upload that reads the group's host buffer directly: its BF16 copy, or its
  FP32 masters with ``cast_on_gpu``): the optimizer synchronises on it before it rewrites that buffer, so a copy in
  flight never reads a half-updated layer.

A slot is *claimed* from the moment the prefetch thread assigns it to a plan entry until the main thread releases
it, so a claimed slot is never overwritten. When a unit is still resident (same unit, same weight version) the
entry reuses that slot without any copy: the forward -> backward turn (head, last layer) and the layer that ends a
recomputed segment cost no upload; with resident slots (``EngineConfig.resident_layers``) every layer can stay.
Eviction follows the plan (a slot whose resident unit is stale or not needed again goes first, then the one needed
latest). If the main thread asks for a unit that is not next in the plan, the plan is dropped and that unit is
loaded on demand: unusual call orders stay correct, they only lose the prefetch.

Expert-sparse streaming (MoE layers, ``EngineConfig.sparse_experts``): a unit's :class:`ExpertSet` lists the stacked
expert parameters ``(num_experts, ...)`` of its routed-experts modules. The prefetched upload leaves their regions of
the slot out; a forward pre-hook on the template's experts module (installed by the engine) reads the routing
indices (one small device -> host sync), and :meth:`LayerStreamer.upload_experts` copies the experts that received
tokens and are not yet in the slot, on the compute stream (so the experts' kernels are ordered after them and the
slot's ``free_event`` covers them). ``_Slot.experts`` records which experts of the resident unit are in the slot; a
load resets it, so a slot reused for the same unit and version (forward -> backward turn) keeps its experts.

Sharded streaming (data parallel, ``EngineConfig.sharded_streaming``): the node's N processes each upload only their
shard of a unit, elements ``[r s, (r + 1) s)`` of its slot layout with ``s = ceil(numel / N)`` (slots are padded to a
multiple of N), and :meth:`LayerStreamer.acquire` all-gathers the slot in place over the node
(:meth:`.data_parallel.NodeReduce.all_gather`) before it returns: on a GPU on ``gather_stream``, after the slot's
``copy_event``, with the compute stream waiting on the gather's event. The gather is issued by the main thread at
every acquire, resident slot or not: the prefetch thread's decisions (which slot, whether a copy is needed) depend
on timing and differ between processes, while the sequence of acquires is the program's and the same in all of
them, so the collectives match. A gather into a resident slot rewrites the values it already holds, except in the
regions of routed experts, which each process uploads itself afterwards (the experts its own tokens reach).

On a CPU compute device the same code runs: the slot is host memory, the copy is a plain copy, events are no-ops.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from .footprint import CAST_STAGE_NUMEL, STAGING_NUMEL
from .host_kernels import pack_bf16_
from .pinned import StagingPool, cast_copy, staged_copy
from .store import HostStore
from .units import ExpertSet, Unit, expert_runs
from .workers import WorkerGroup, wait_until

if TYPE_CHECKING:
    from .data_parallel import NodeReduce

EXPERT_STAGING_NUMEL = 16 * 2**20
"""Elements per pinned staging buffer of expert uploads without a compute-dtype copy (32 MiB in BF16; two), and per
GPU chunk of those uploads with ``cast_on_gpu`` (64 MiB in FP32)."""


class _Slot:
    def __init__(self, index: int, numel: int, device: torch.device, dtype: torch.dtype) -> None:
        self.index = index
        self.cuda = device.type == "cuda"
        with torch.inference_mode(False):
            self.buf = torch.zeros(numel, dtype=dtype, device=device)  # finite everywhere, even where never uploaded
        self.copy_event = torch.cuda.Event() if self.cuda else None
        self.gather_event = torch.cuda.Event() if self.cuda else None
        self.free_event = torch.cuda.Event() if self.cuda else None
        self.resident: tuple[int, tuple[int, ...]] | None = None
        self.experts: dict[str, set[int]] = {}
        """Experts of the resident unit already in the slot, per expert module path (reset when a unit is loaded)."""
        self.claims = 0
        self.last_use = 0


class LayerStreamer:
    """Streams units into GPU slots on a prefetch thread (see the module docstring for the ordering rules).

    Args:
        units: The streamed units; ``uid`` is the index into this list.
        store: The host store (for waiting on optimizer updates).
        device: Compute device.
        dtype: Compute dtype of the slots.
        num_slots: Number of slots (2 = double buffering).
        workers: The engine's workers (the prefetch thread joins them; waits check them all).
        kernels: Pack FP32 -> compute dtype with :func:`.host_kernels.pack_bf16_` (a bounded thread count) instead of
            torch's ``copy_``.
        pack_threads: Threads of the pack kernel.
        cast_on_gpu: Units without a compute-dtype copy upload their FP32 masters (page-locked) and cast them on the
            GPU (:func:`.pinned.cast_copy`) instead of packing them on the CPU.
        prefer_small_slots: Load a unit into the smallest free slot it fits in (when layers may hold slots across a
            pass, so the large slots stay free for the head); otherwise any free slot, by next use.
        shard: The processes of the node (sharded streaming): upload this process's shard of each unit and
            all-gather the rest at :meth:`acquire`.
    """

    def __init__(
        self,
        units: list[Unit],
        store: HostStore,
        device: torch.device,
        dtype: torch.dtype,
        num_slots: int,
        workers: WorkerGroup,
        kernels: bool = False,
        pack_threads: int | None = None,
        cast_on_gpu: bool = False,
        prefer_small_slots: bool = False,
        shard: NodeReduce | None = None,
    ) -> None:
        if num_slots < 2:
            raise ValueError(f"num_slots must be at least 2 (double buffering), got {num_slots}")
        self.units, self.store, self.device, self.dtype = units, store, device, dtype
        self.cuda = device.type == "cuda"
        self.shard = shard
        slot_numel = max(u.numel for u in units)
        self.slots = [_Slot(i, self._padded(slot_numel), device, dtype) for i in range(num_slots)]
        self.h2d_stream = torch.cuda.Stream(device) if self.cuda else None
        self.gather_stream = torch.cuda.Stream(device) if self.cuda and shard is not None else None
        self.cond = threading.Condition()
        self._plan: deque[int] = deque()
        self._ready: deque[tuple[int, _Slot]] = deque()
        self._tick = 0
        self._loading = False
        self.bytes_h2d = 0
        self.bytes_gathered = 0
        """Bytes this process received from the node's other processes by all-gathers (sharded streaming)."""
        self.num_uploads = 0
        self.wait_s = 0.0
        """Seconds the compute thread waited for a unit to be packed and queued."""
        self.pack_s = 0.0
        """Seconds the prefetch thread spent packing FP32 masters into staging."""
        self.update_wait_s = 0.0
        """Seconds the prefetch thread waited for a unit's optimizer update."""
        self.workers = workers
        self.worker = workers.worker("prefetch")
        self._pump_running = False
        self._staging: StagingPool | None = None
        """Pinned buffers FP32 masters are packed into for upload (CUDA, units without a compute-dtype copy)."""
        self._expert_staging: StagingPool | None = None
        """The same for expert uploads, which run on the compute thread."""
        self.prefer_small_slots = prefer_small_slots
        self.kernels = kernels
        self.pack_threads = pack_threads
        self.cast_on_gpu = cast_on_gpu and self.cuda
        self._cast_stage: torch.Tensor | None = None
        """The GPU buffer of ``cast_on_gpu`` uploads (used on ``h2d_stream`` only)."""

    # ----------------------------------------------------------------------------------------------- main thread
    def plan(self, uids: list[int]) -> None:
        """Announces the units the main thread will acquire next, in order (replaces an unconsumed plan)."""
        with self.cond:
            self._drop_plan()
            self._plan.extend(uids)
            self._kick()

    def acquire(self, uid: int) -> _Slot:
        """Returns the slot holding unit ``uid``; the compute stream is ordered after the copy."""
        with self.cond:
            if not (self._ready and self._ready[0][0] == uid) and not (
                not self._ready and self._plan and self._plan[0] == uid
            ):
                self._drop_plan()
                self._plan.append(uid)
                self._kick()
            start = time.perf_counter()
            wait_until(self.cond, lambda: bool(self._ready), self.workers.check)
            self.wait_s += time.perf_counter() - start
            got, slot = self._ready.popleft()
            assert got == uid
        if self.shard is not None:
            self._gather(self.units[uid], slot)
        elif self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.copy_event)
        return slot

    def _gather(self, unit: Unit, slot: _Slot) -> None:
        """All-gathers ``unit`` in ``slot`` over the node (each process holds its shard; sharded streaming). Through an
        alias of the buffer: a resident slot may be read by a graph already, and gets the same values again. The
        routed experts' regions (expert-sparse streaming) come from the other processes' slots, whatever experts
        they hold: this process's experts are uploaded again as its tokens reach them (:meth:`upload_experts`)."""
        slot.experts = {}
        shard = self.shard.bounds(unit.numel)[0]
        out = slot.buf.data[: shard * self.shard.size]
        home = unit_home(unit)
        mine = out[self.shard.rank * shard : (self.shard.rank + 1) * shard]
        if self.cuda:
            self.gather_stream.wait_event(slot.free_event)  # (a process whose shard is empty copied nothing)
            self.gather_stream.wait_event(slot.copy_event)
            with torch.cuda.stream(self.gather_stream):
                if home is not None:  # its shard from the layer's node first
                    self.shard.from_home(mine, home)
                self.shard.all_gather(out)
                slot.gather_event.record(self.gather_stream)
            torch.cuda.current_stream(self.device).wait_event(slot.gather_event)
        else:
            if home is not None:
                self.shard.from_home(mine, home)
            self.shard.all_gather(out)
        received = self.shard.size - 1 + int(unit.groups[0].away)  # (another node's layer: this shard too)
        self.bytes_gathered += received * shard * out.element_size()

    def _padded(self, numel: int) -> int:
        """Slot elements for units of up to ``numel`` elements: a multiple of the node's processes when sharded."""
        return numel if self.shard is None else -(-numel // self.shard.size) * self.shard.size

    def release(self, slot: _Slot) -> None:
        """Marks the end of the compute that reads ``slot`` (enqueued on the current stream)."""
        if self.cuda:
            slot.free_event.record(torch.cuda.current_stream(self.device))
        with self.cond:
            slot.claims -= 1
            self._tick += 1
            slot.last_use = self._tick
            self._kick()

    def num_unclaimed(self) -> int:
        """Slots no plan entry or caller holds now."""
        with self.cond:
            return sum(1 for s in self.slots if s.claims == 0)

    def make_slots(self, count: int, numel: int) -> list[_Slot]:
        """``count`` more slots of ``numel`` elements, not yet used (give them templates, then :meth:`attach`)."""
        first = len(self.slots)
        return [_Slot(first + i, self._padded(numel), self.device, self.dtype) for i in range(count)]

    def attach(self, slots: list[_Slot]) -> None:
        """Makes slots from :meth:`make_slots` available to the prefetch thread."""
        with self.cond:
            self.slots.extend(slots)
            self._kick()

    def quiesce(self) -> None:
        """Waits until no upload is being issued or still copying (the host buffers uploads read may then change)."""
        with self.cond:
            wait_until(self.cond, lambda: not self._loading, self.worker.check)
        if self.cuda:
            self.h2d_stream.synchronize()

    def invalidate(self) -> None:
        """Forgets resident copies (after masters changed outside the optimizer, e.g. a checkpoint load)."""
        with self.cond:
            wait_until(self.cond, lambda: not self._loading, self.worker.check)
            for slot in self.slots:
                slot.resident = None

    def close(self) -> None:
        with self.cond:
            self._drop_plan()
        self.worker.close()
        if self.cuda:  # no copy may still read host memory that is unregistered or freed after this
            self.h2d_stream.synchronize()
        self._cast_stage = None  # GPU memory goes back now, not when a garbage collection finds the engine
        for slot in self.slots:  # the same for the slots, whose views (template parameters) may outlive the engine
            slot.resident = None
            slot.buf.untyped_storage().resize_(0)
        for pool in (self._staging, self._expert_staging):
            if pool is not None:
                pool.close()

    # ------------------------------------------------------------------------------------------------- internals
    def _drop_plan(self) -> None:
        self._plan.clear()
        wait_until(self.cond, lambda: not self._loading, self.worker.check)
        while self._ready:
            _, slot = self._ready.popleft()
            slot.claims -= 1

    def _kick(self) -> None:
        """Makes sure a prefetch job is queued while there is plan left (called with ``cond`` held)."""
        if self._plan and not self._pump_running:
            self._pump_running = True
            self.worker.submit(self._pump)
        self.cond.notify_all()

    def _pick_slot(self, uid: int) -> tuple[_Slot | None, bool]:
        version = self.units[uid].version
        for slot in self.slots:
            if slot.resident == (uid, version):
                return slot, False
        numel = self.units[uid].numel
        free = [s for s in self.slots if s.claims == 0 and s.buf.numel() >= numel]
        if not free:
            return None, False
        if self.prefer_small_slots:  # keep the large slots for the units only they can hold
            smallest = min(s.buf.numel() for s in free)
            free = [s for s in free if s.buf.numel() == smallest]
        upcoming = list(self._plan)

        def next_use(slot: _Slot) -> tuple[int, int]:
            if slot.resident is not None and slot.resident[0] in upcoming:
                if slot.resident[1] == self.units[slot.resident[0]].version:
                    return (upcoming.index(slot.resident[0]), -slot.last_use)
            return (len(upcoming) + 1, -slot.last_use)  # empty, stale or not needed again: evicted first

        return max(free, key=next_use), True

    def _pump(self) -> None:
        """Prefetch job: loads plan entries into slots until the plan is empty."""
        while True:
            with self.cond:
                while True:
                    if not self._plan:
                        self._pump_running = False
                        self.cond.notify_all()
                        return
                    slot, needs_copy = self._pick_slot(self._plan[0])
                    if slot is not None:
                        break
                    self.cond.wait(0.05)  # every slot is claimed: wait for a release
                uid = self._plan.popleft()
                slot.claims += 1
                self._loading = True
            try:
                if needs_copy:
                    self._load(self.units[uid], slot)
            except BaseException:
                with self.cond:
                    self._loading = False
                    self._pump_running = False
                    self.cond.notify_all()
                raise
            with self.cond:
                self._loading = False
                self._ready.append((uid, slot))
                self.cond.notify_all()

    def upload_experts(self, slot: _Slot, eset: ExpertSet, hit: list[int]) -> None:
        """Makes experts ``hit`` of ``eset`` resident in ``slot`` (which holds their unit, acquired by the caller).

        Called on the compute thread just before the experts module runs: the copies are issued on the current stream
        (from the pinned compute-dtype copy, else cast from the FP32 masters through pinned memory), so the experts'
        kernels are ordered after them and the slot's ``free_event`` covers them.
        """
        have = slot.experts.setdefault(eset.path, set())
        missing = sorted(e for e in hit if e not in have)
        if not missing:
            return
        runs = expert_runs(missing)
        # An alias with its own version counter: the template's graph may already hold other parameters of this slot
        # (views of ``buf``) for backward, and these regions were not read before, so autograd must not see a write.
        raw = slot.buf.data
        nbytes = 0
        groups = []
        packed = []  # (None, offset in the slot, FP32 master rows) of groups without a compute-dtype copy
        for b in eset.bindings:
            per = b.entry.numel // eset.num_experts
            for a, z in runs:
                lo, hi = b.entry.offset + a * per, b.entry.offset + z * per
                if b.group.copy is not None:
                    raw[b.offset + a * per : b.offset + z * per].copy_(b.group.copy[lo:hi], non_blocking=self.cuda)
                else:
                    packed.append((None, b.offset + a * per, b.group.master[lo:hi]))
                source = b.group.master if b.group.copy is None and self.cast_on_gpu else raw
                nbytes += (z - a) * per * source.element_size()
            if b.group not in groups:
                groups.append(b.group)
        if packed and not self.cuda:
            for _, offset, src in packed:
                raw[offset : offset + src.numel()].copy_(src)
        elif packed and self.cast_on_gpu:  # a stage from the caching allocator: ordered on this stream, then reused
            stage = torch.empty(min(EXPERT_STAGING_NUMEL, max(s.numel() for *_, s in packed)), device=self.device)
            cast_copy(stage, packed, raw, torch.cuda.current_stream(self.device))
        elif packed:  # through a small pinned pool: host memory does not grow with the number of experts hit
            if self._expert_staging is None:
                self._expert_staging = StagingPool(EXPERT_STAGING_NUMEL, self.dtype)
            staged_copy(self._expert_staging, packed, raw, torch.cuda.current_stream(self.device), self._pack)
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            for group in groups:
                if group.copy is not None or self.cast_on_gpu:
                    group.h2d_event = done
        have.update(missing)
        with self.cond:
            self.bytes_h2d += nbytes

    def _load(self, unit: Unit, slot: _Slot) -> None:
        slot.resident = None
        slot.experts = {}
        start = time.perf_counter()
        for group in unit.groups:
            self.store.wait_updated(group, poll=self.workers.check)
        self.update_wait_s += time.perf_counter() - start
        masters = False
        if unit.groups and unit.groups[0].away:  # another node uploads it: its shards arrive at the gather
            spans = []
        elif all(g.copy is not None for g in unit.groups):
            spans = self._mine(unit, self._copy_spans(unit))
            self._upload_copy(unit, spans, slot)
        elif self.cast_on_gpu:
            spans = self._mine(unit, self._master_spans(unit))
            self._cast_and_upload(unit, spans, slot)
            masters = True
        else:
            spans = self._mine(unit, self._master_spans(unit))
            self._pack_and_upload(spans, slot)
        with self.cond:
            if masters:  # what crossed PCIe: each source in its own dtype (FP32 masters, compute-dtype frozen groups)
                self.bytes_h2d += sum(src.numel() * src.element_size() for *_, src in spans)
            elif self.shard is not None:
                self.bytes_h2d += sum(src.numel() for *_, src in spans) * slot.buf.element_size()
            elif unit.experts:
                self.bytes_h2d += sum(b.entry.numel for b in unit.dense_bindings) * slot.buf.element_size()
            else:
                self.bytes_h2d += unit.numel * slot.buf.element_size()
        self.num_uploads += 1
        slot.resident = (unit.uid, unit.version)

    def _mine(self, unit: Unit, spans: list[tuple[None, int, torch.Tensor]]) -> list[tuple[None, int, torch.Tensor]]:
        """``spans`` cut to this process's shard of the unit's slot layout (all of them unless sharded)."""
        if self.shard is None:
            return spans
        _, lo, hi = self.shard.bounds(unit.numel)
        out = []
        for tag, offset, src in spans:
            a, z = max(offset, lo), min(offset + src.numel(), hi)
            if a < z:
                out.append((tag, a, src[a - offset : z - offset]))
        return out

    def _copy_spans(self, unit: Unit) -> list[tuple[None, int, torch.Tensor]]:
        """``(None, offset in the slot, pinned compute-dtype source)`` of the unit's dense parameters."""
        whole = None if unit.experts else unit.whole_group
        if whole is not None:
            return [(None, 0, whole.copy[: unit.numel])]
        return [
            (None, b.offset, b.group.copy[b.entry.offset : b.entry.offset + b.entry.numel]) for b in unit.dense_bindings
        ]

    def _upload_copy(self, unit: Unit, spans: list[tuple[None, int, torch.Tensor]], slot: _Slot) -> None:
        """Uploads straight from the groups' pinned compute-dtype copies: no packing on the way."""
        pairs = [(slot.buf[offset : offset + src.numel()], src) for _, offset, src in spans]
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return
        with torch.cuda.stream(self.h2d_stream):
            self.h2d_stream.wait_event(slot.free_event)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            slot.copy_event.record(self.h2d_stream)
            # An event of its own (not the slot's, which later uploads re-record): the optimizer waits on it before
            # it rewrites this copy, and must not wait for unrelated uploads.
            done = torch.cuda.Event()
            done.record(self.h2d_stream)
        for group in unit.groups:
            group.h2d_event = done

    def _master_spans(self, unit: Unit) -> list[tuple[None, int, torch.Tensor]]:
        """``(None, offset in the slot, host source)`` of the unit's dense parameters: its FP32 masters (frozen groups:
        their compute-dtype buffer); the routed experts of an expert-sparse unit are left out (``upload_experts``)."""
        whole = None if unit.experts else unit.whole_group
        if whole is not None:
            return [(None, 0, whole.master[: unit.numel])]
        return [
            (None, b.offset, b.group.master[b.entry.offset : b.entry.offset + b.entry.numel])
            for b in unit.dense_bindings
        ]

    def _cast_and_upload(self, unit: Unit, spans: list[tuple[None, int, torch.Tensor]], slot: _Slot) -> None:
        """Copies the unit's page-locked FP32 masters to the GPU and casts them there (:func:`.pinned.cast_copy`), on
        ``h2d_stream``; the groups' ``h2d_event`` then holds their optimizer updates until the copies are done."""
        if self._cast_stage is None:
            with torch.cuda.stream(self.h2d_stream):  # allocated for, and only ever used on, this stream
                self._cast_stage = torch.empty(
                    min(CAST_STAGE_NUMEL, max(u.numel for u in self.units)), dtype=torch.float32, device=self.device
                )
        cast_copy(self._cast_stage, spans, slot.buf, self.h2d_stream, after=slot.free_event)
        with torch.cuda.stream(self.h2d_stream):
            slot.copy_event.record(self.h2d_stream)
            done = torch.cuda.Event()  # its own event, as in _upload_copy
            done.record(self.h2d_stream)
        for group in unit.groups:
            group.h2d_event = done

    def _pack_and_upload(self, spans: list[tuple[None, int, torch.Tensor]], slot: _Slot) -> None:
        """Casts the unit's FP32 masters (``spans``) to the compute dtype and uploads them, through a small pool of
        pinned staging buffers (``STAGING_NUMEL`` elements each): packing one chunk overlaps the upload of the previous
        one, and the pinned memory does not grow with the largest unit."""
        if not self.cuda:
            start = time.perf_counter()
            for _, offset, src in spans:
                slot.buf[offset : offset + src.numel()].copy_(src)
            self.pack_s += time.perf_counter() - start
            return
        if self._staging is None:
            self._staging = StagingPool(min(STAGING_NUMEL, slot.buf.numel()), self.dtype)
        self.pack_s += staged_copy(self._staging, spans, slot.buf, self.h2d_stream, self._pack, after=slot.free_event)
        with torch.cuda.stream(self.h2d_stream):
            slot.copy_event.record(self.h2d_stream)

    def _pack(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.kernels and src.dtype == torch.float32:  # (a frozen group is already in the compute dtype)
            pack_bf16_(dst, src, num_threads=self.pack_threads)
        else:
            dst.copy_(src)


def unit_home(unit: Unit) -> int | None:
    """The node that holds ``unit``'s groups (a sharded node store), or None when every node holds them."""
    homes = {g.home for g in unit.groups}
    if len(homes) != 1:
        raise RuntimeError(f"unit {unit.uid}: its groups are held by different nodes ({sorted(map(str, homes))})")
    return homes.pop()
