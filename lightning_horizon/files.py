"""Files written safely: safetensors tensor by tensor with a running crc32, and atomic publication of a directory.

Used by the checkpoints (:mod:`lightning_horizon.checkpoint`) and the Hugging Face export
(:mod:`lightning_horizon.export`): both write into a hidden temporary directory next to the target, then
:func:`publish` renames it into place (an atomic exchange with ``renameat2`` where a previous one exists), and
:func:`remove_stale` clears temporaries left by processes that were killed mid-write.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_READ_BYTES = 16 << 20


def write_safetensors(
    path: str | os.PathLike,
    specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    fsync: bool = True,
) -> dict[str, Any]:
    """Writes a safetensors file tensor by tensor; returns ``{"bytes", "crc32"}`` of the file.

    ``specs`` lists ``(name, dtype, shape)`` in file order (the header is written first); ``produce(name)`` returns
    each tensor when its turn comes (so at most one converted tensor exists at a time). CPU tensors of the declared
    dtype that are contiguous are written from their own memory, without a copy.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    crc = zlib.crc32(head)
    total = len(head)
    with open(path, "wb") as f:
        f.write(head)
        for name, dtype, shape in specs:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
            t = t.detach().to("cpu").contiguous().reshape(-1)
            if t.numel() == 0:
                continue
            mv = memoryview(t.view(torch.uint8).numpy())
            f.write(mv)
            crc = zlib.crc32(mv, crc)
            total += len(mv)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return {"bytes": total, "crc32": f"{crc:08x}"}


def file_crc32(path: str | os.PathLike) -> tuple[int, str]:
    crc, total = 0, 0
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            total += n
    return total, f"{crc:08x}"


def numel(shape: Sequence[int]) -> int:
    """Elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n


def publish(tmp: Path, path: Path) -> None:
    """Moves the finished temporary ``tmp`` to ``path``, replacing what is there atomically where the OS allows."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if _rename_exchange(tmp, path):
        _remove(tmp)  # now holds the previous checkpoint
        return
    trash = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    os.rename(tmp, path)
    _remove(trash)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def remove_stale(path: Path) -> None:
    """Removes temporary directories of earlier saves of ``path`` whose process is gone."""
    if not path.parent.is_dir():
        return
    for entry in path.parent.glob(f".{glob_escape(path.name)}.*-*-*"):
        m = re.search(r"\.(?:tmp|old)-(\d+)-[0-9a-f]+$", entry.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(entry)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    """Makes a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
