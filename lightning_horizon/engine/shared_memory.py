"""Host buffers shared by the processes of one node: the storage of a per-node host store (several GPUs, one store).

With several GPUs on a node, every local rank must see the same masters (the embedding rows it gathers for its
tokens, its shard of each layer to upload, the views the model's ``state_dict`` reads) without a copy per process:
host memory must not grow with the number of GPUs. A :class:`NodeBuffer` is a POSIX shared-memory file under
``/dev/shm``, mapped by every local process (each may page-lock its mapping with ``cudaHostRegister``, see
:mod:`.pinned`).

Lifetime: local rank 0 creates the file, the others open it, and once every process has mapped it (a barrier of the
caller's) rank 0 removes the name with :meth:`NodeBuffer.unlink`. From then on the kernel frees the memory when the
last mapping goes away, whatever ends the processes, SIGKILL included: nothing is left in ``/dev/shm``. A creator
killed before the unlink leaves its file behind; names carry the creator's PID, and every :meth:`NodeBuffer.create`
first removes the files of creators that no longer run (:func:`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
PREFIX = "lightning_horizon"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-[\w.-]+$")


class NodeBuffer:
    """``nbytes`` of host memory shared by the processes of one node under ``name`` (see the module docstring).

    Use :meth:`create` (one process) and :meth:`open` (the others); :attr:`tensor` is a ``uint8`` view of the whole
    buffer and :meth:`view` a typed view of a part of it; :meth:`lock` is a mutex shared by the node's processes.
    """

    def __init__(self, path: Path, nbytes: int, fd: int) -> None:
        self.path, self.nbytes = path, nbytes
        try:
            self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        """Kept open for :meth:`lock` (record locks belong to an open file; closing it releases them)."""
        self._close_fd = weakref.finalize(self, os.close, fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        """The whole buffer, ``uint8``; its memory is the shared mapping."""

    @classmethod
    def create(cls, tag: str, nbytes: int) -> NodeBuffer:
        """A new zero-filled buffer named after this process and ``tag`` (letters, digits, ``._-``)."""
        if not re.fullmatch(r"[\w.-]+", tag):
            raise ValueError(f"NodeBuffer tag {tag!r}: use letters, digits, '.', '_' or '-'")
        if nbytes <= 0:
            raise ValueError(f"NodeBuffer {tag!r}: nbytes must be positive, got {nbytes}")
        if not SHM_DIR.is_dir():
            raise OSError(f"{SHM_DIR} does not exist: a host store shared by several GPUs needs POSIX shared memory")
        sweep_stale()
        path = SHM_DIR / f"{PREFIX}-{os.getpid()}-{tag}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)  # sparse: pages are allocated when first written
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, nbytes, fd)

    @classmethod
    def open(cls, name: str, nbytes: int) -> NodeBuffer:
        """The buffer another process of this node created (``name``: its :attr:`name`)."""
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no shared host buffer {name!r} in {SHM_DIR}: it was never created, or already unlinked (every "
                "process must open it before the creator unlinks it)"
            ) from None
        size = os.fstat(fd).st_size
        if size != nbytes:
            os.close(fd)
            raise ValueError(f"shared host buffer {name!r} holds {size} bytes, expected {nbytes}")
        return cls(path, nbytes, fd)

    @property
    def name(self) -> str:
        """What the other processes pass to :meth:`open`."""
        return self.path.name

    @property
    def resident_bytes(self) -> int:
        """Bytes of host memory the buffer holds now: its pages written so far (the buffer is sparse), whichever
        process wrote them."""
        return os.fstat(self._fd).st_blocks * 512

    def view(self, dtype: torch.dtype, numel: int, offset_bytes: int = 0) -> torch.Tensor:
        """``numel`` elements of ``dtype`` from ``offset_bytes`` (a multiple of the dtype's size)."""
        size = torch.empty((), dtype=dtype).element_size()
        end = offset_bytes + numel * size
        if offset_bytes % size or end > self.nbytes or offset_bytes < 0:
            raise ValueError(f"view of {numel} x {dtype} at byte {offset_bytes} does not fit {self.nbytes} bytes")
        return self.tensor[offset_bytes:end].view(dtype)

    @contextlib.contextmanager
    def lock(self, index: int) -> Iterator[None]:
        """Holds mutex ``index`` (any non-negative integer) of this buffer against the node's other processes.

        A POSIX record lock on byte ``index`` of the buffer's file: one per process (threads of one process do not
        exclude each other: take each mutex from one thread), released by the kernel if the process dies."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, index)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, index)

    def unlink(self) -> None:
        """Removes the name (call once every process has opened it): the memory lives until the last mapping goes."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmaps this process's view (tensors viewing it must be gone: ``BufferError`` otherwise)."""
        del self.tensor
        self._map.close()
        self._close_fd()


def sweep_stale() -> list[str]:
    """Removes the shared buffers of this package whose creating process no longer runs; returns their names."""
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}-*"):
        match = _NAME.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
