"""Background threads whose failures reach the main thread.

Every worker of the engine (the prefetch thread, the gradient folder, the CPU optimizer) is a :class:`Worker`. A
worker that raises stores the exception with its traceback and stops; every later interaction of the main thread
with the engine calls :meth:`Worker.check` (directly or through :func:`wait_until`), which re-raises it as a
:class:`WorkerError` whose message carries the worker's traceback. Waiting in the main thread always happens in
short slices so that a dead worker is noticed within a fraction of a second instead of hanging the trainer.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

_POLL_S = 0.05


class WorkerError(RuntimeError):
    """A background worker of the engine failed; the message holds its traceback."""


class WorkerGroup:
    """The workers of one engine: a wait on any of them checks all of them, so a failure in one worker (the
    optimizer's, say) reaches a main thread that waits on another (the prefetch thread's upload)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.workers: list[Worker] = []

    def worker(self, name: str, prioritized: bool = False) -> Worker:
        """A new worker of the group (see :class:`Worker`)."""
        worker = Worker(name, self.device, prioritized, group=self)
        self.workers.append(worker)
        return worker

    def check(self) -> None:
        """Re-raises the first failure of any worker of the group in the calling thread."""
        for worker in self.workers:
            worker.check()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


class Worker:
    """A daemon thread that runs jobs from a FIFO queue, in order.

    Args:
        name: Thread name, used in error messages.
        device: The compute device; CUDA workers bind to it (threads don't inherit the current device).
        prioritized: Run the queued job with the lowest priority value first (FIFO among equals).
        group: The group whose other workers a wait on this one also checks.
    """

    def __init__(
        self,
        name: str,
        device: torch.device | None = None,
        prioritized: bool = False,
        group: WorkerGroup | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.group = group
        # FIFO, or (prioritized) lowest priority value first, FIFO among equals.
        self._jobs: queue.Queue = queue.PriorityQueue() if prioritized else queue.Queue()
        self._prioritized = prioritized
        self._seq = 0
        self._error: BaseException | None = None
        self._error_text = ""
        self._pending = 0
        self.busy_s = 0.0
        """Seconds spent running jobs (for the benchmark's step-time breakdown), waits included."""
        self.wait_s = 0.0
        """Of ``busy_s``, the seconds jobs spent blocked in :meth:`wait_event` (a copy not yet landed): ``busy_s -
        wait_s`` is the worker's own work."""
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"horizon-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any], priority: int = 0) -> None:
        """Queues ``job``; raises at once if the worker already failed."""
        self.check()
        with self._idle:
            self._pending += 1
            self._seq += 1
            seq = self._seq
        self._jobs.put((priority, seq, job) if self._prioritized else job)

    def wait_event(self, event: Any) -> None:
        """Blocks the calling job until ``event`` (a CUDA event) has completed, counting the time in ``wait_s``."""
        start = time.perf_counter()
        event.synchronize()
        self.wait_s += time.perf_counter() - start

    def check(self) -> None:
        """Re-raises the worker's exception, if it had one, in the calling thread."""
        if self._error is not None:
            raise WorkerError(f"the engine's {self.name} worker failed:\n{self._error_text}") from self._error

    def drain(self) -> None:
        """Blocks until every queued job has run (or a worker of the group failed, which then raises)."""
        with self._idle:
            while self._pending and self._error is None:
                self.check_group()
                self._idle.wait(_POLL_S)
        self.check()

    def check_group(self) -> None:
        """:meth:`check` of every worker of this one's group (or of this one alone)."""
        if self.group is not None:
            self.group.check()
        else:
            self.check()

    def close(self) -> None:
        self._jobs.put((float("inf"), 0, None) if self._prioritized else None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            job = self._jobs.get()
            if self._prioritized:
                job = job[2]
            if job is None:
                return
            if self._error is None:
                start = time.perf_counter()
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self._error_text = traceback.format_exc()
                    self._error = exc
                self.busy_s += time.perf_counter() - start
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()


def wait_until(cond: threading.Condition, predicate: Callable[[], bool], check: Callable[[], None]) -> None:
    """Waits on ``cond`` (held by the caller) until ``predicate()``, calling ``check`` (which raises a worker's
    failure) between short waits."""
    while not predicate():
        check()
        cond.wait(_POLL_S)
