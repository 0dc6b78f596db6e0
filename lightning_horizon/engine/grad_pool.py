"""A bounded pool of pinned compute-dtype gradient buffers, leased group by group.

When every optimizer update is scheduled during the backward (``EngineConfig.updates_in_backward``, no
accumulation), a group's compute-dtype gradient is needed only from its landing until its update has read it. The
:class:`~.gradients.GradientSink` then takes a buffer from this pool when a group's first gradient lands (the lease
becomes the group's ``grad_lp``) and the pool takes it back when nothing will read it any more: the optimizer
worker gives it back right after the update has read it, and a gradient that moves to the FP32 buffer (the tied
lm_head's, when the embedding's rows land) or is discarded gives its lease back once no update is pending on the
group. The host then holds a few buffers (each as large as the largest group) instead of 2 bytes/param of BF16
gradients for the whole model. When every buffer is leased, the compute thread waits for one (back-pressure).

Ordering. A buffer is a D2H target on the sink's ``d2h_stream``; its only readers are CPU threads (the optimizer's
update, an upcast into FP32), which read it synchronously, after the gradient worker has waited on the copy's CUDA
event. A lease is given back only after the last such read returned, and taken again (on the compute thread, under
the pool's lock) before the next copy into it is enqueued: each copy into a buffer is ordered after every previous
reader and the previous copy. Waiting never hangs on a dead worker: every wait checks the engine's workers.

Progress. A leased buffer comes back without the compute thread's help as long as the group's update is scheduled
as soon as its gradients are complete; the sink leases a buffer only then (it asks the engine for every landing)
and gives the pool up for good as soon as that stops being true. Of the groups of a unit only the embedding's
(which a tied lm_head's gradient joins, and whose own gradient lands at the very end of the backward) keeps its
lease past its unit's landing, and a unit spans at most two groups (the head: final norm and lm_head): with two
buffers or more, a wait always ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from .pinned import pinned_empty, unregister_pinned
from .store import GradState, HostStore, StoreGroup
from .workers import wait_until

MIN_BUFFERS = 2
"""The fewest buffers that always make progress (see the module docstring)."""


class GradPool:
    """Pinned compute-dtype gradient buffers leased to store groups (see the module docstring).

    Args:
        store: The host store whose groups lease buffers (its condition orders the updates' versions).
        count: Buffers in the pool (at least :data:`MIN_BUFFERS`).
        numel: Elements of each buffer: the largest group that may lease one.
        dtype: The compute dtype.
        pin: Page-lock the buffers (on CUDA).
        check: Raises a worker's failure in the waiting thread (``WorkerGroup.check``).
    """

    def __init__(
        self, store: HostStore, count: int, numel: int, dtype: torch.dtype, pin: bool, check: Callable[[], None]
    ) -> None:
        if count < MIN_BUFFERS:
            raise ValueError(f"a gradient pool needs at least {MIN_BUFFERS} buffers, got {count}")
        self.store, self.numel, self.check = store, numel, check
        with torch.inference_mode(False):
            self.buffers = [pinned_empty(numel, dtype, pin=pin) for _ in range(count)]
        self._free = list(self.buffers)
        self._leases: dict[int, tuple[StoreGroup, torch.Tensor]] = {}
        self._cond = threading.Condition()
        self.peak_leased = 0
        """Most buffers leased at once (for tests and the benchmark's curiosity)."""

    @property
    def nbytes(self) -> int:
        """Host bytes of the pool's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @property
    def num_leased(self) -> int:
        with self._cond:
            return len(self._leases)

    def leased(self, group: StoreGroup) -> bool:
        with self._cond:
            return id(group) in self._leases

    def acquire(self, group: StoreGroup) -> None:
        """Leases a buffer to ``group`` (its ``grad_lp`` becomes a view of it), waiting while every buffer is leased.
        Called by the compute thread before it enqueues the copies into the buffer."""
        if group.master.numel() > self.numel:
            raise ValueError(f"group {group.name} ({group.master.numel()} elements) exceeds the pool's buffers")
        with self._cond:
            if id(group) in self._leases:
                return
            wait_until(self._cond, lambda: bool(self._free), self.check)
            buffer = self._free.pop()
            self._leases[id(group)] = (group, buffer)
            group.grad_lp = buffer[: group.master.numel()]
            self.peak_leased = max(self.peak_leased, len(self._leases))

    def release(self, group: StoreGroup, after_update: bool = False) -> None:
        """Takes ``group``'s buffer back when nothing will read it: no gradient of the group is in it any more and no
        update of the group is pending (``after_update``: called by that update itself, once it has read it)."""
        with self.store.cond:
            pending = group.done_version < group.version
        if (pending and not after_update) or any(sp.grad_state is GradState.COMPUTE for sp in group.params):
            return
        with self._cond:
            lease = self._leases.pop(id(group), None)
            if lease is None:
                return
            group.grad_lp = None
            self._free.append(lease[1])
            self._cond.notify_all()

    def wait_quiet(self) -> None:
        """Blocks until no pending update still reads a leased buffer (each such update gives its lease back)."""

        def quiet() -> bool:
            with self._cond:
                groups = [g for g, _ in self._leases.values()]
            return all(g.done_version >= g.version for g in groups)

        with self.store.cond:
            wait_until(self.store.cond, quiet, self.check)

    def end_lease(self, group: StoreGroup) -> torch.Tensor | None:
        """Ends ``group``'s lease whatever it holds, for a pool being given up (:meth:`wait_quiet` first: no update
        reads it), and returns the view the group had (None without a lease); the buffer is not leased again."""
        with self._cond:
            lease = self._leases.pop(id(group), None)
        return None if lease is None else lease[1][: group.master.numel()]

    def close(self) -> None:
        """Ends every lease (the groups' ``grad_lp`` become None) and unregisters the buffers."""
        with self._cond:
            for group, _ in self._leases.values():
                group.grad_lp = None
            self._leases.clear()
        for buffer in self.buffers:
            unregister_pinned(buffer)
