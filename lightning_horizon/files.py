"""Files written safely: safetensors tensor by tensor with a running crc32, and atomic publication of a directory.

Used by the checkpoints (:mod:`lightning_horizon.checkpoint`) and the Hugging Face export
(:mod:`lightning_horizon.export`): both write into a hidden temporary directory next to the target
(``.NAME.tmp-PID-RANDOM``), then :func:`publish` renames it into place (an atomic exchange with ``renameat2`` where a
previous one exists; the replaced one is renamed ``.NAME.old-PID-RANDOM`` and removed). A process killed mid-write
leaves such a temporary behind: :func:`remove_stale_temporaries` clears every one of a dead process in a directory,
:func:`remove_stale` those of one target name. :func:`link_tree` builds a directory of hard links to another one's
files (the ``last`` checkpoint, without a second copy of the data).
"""

from __future__ import annotations

import contextlib
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
    trash = temporary_path(path, "old")
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
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def temporary_path(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of ``path`` for a write in progress (``tmp``) or a replaced copy (``old``), named with
    this process's id so that :func:`remove_stale_temporaries` can tell when its writer is gone."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Removes the temporaries (``.NAME.tmp-PID-RANDOM``, ``.NAME.old-PID-RANDOM``) directly inside ``directory``
    whose process is gone, of every target name or only of ``name``; returns what it removed.

    Process ids are those of this machine: a directory shared with another host that writes into it at the same time
    must not be swept (the recipes write one run directory per process).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        m = _TEMPORARY.match(entry.name)
        if m is None or (name is not None and m["name"] != name) or _pid_alive(int(m["pid"])):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def remove_stale(path: Path) -> None:
    """Removes temporaries of earlier saves of ``path`` whose process is gone."""
    remove_stale_temporaries(path.parent, name=path.name)


def link_tree(src: Path, dst: Path) -> int:
    """Creates ``dst`` with the directory tree of ``src``, every file a hard link to ``src``'s (no data is copied);
    where the file system refuses hard links, the file is copied. Returns how many files were copied."""
    copied = 0
    dst.mkdir()
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        for d in dirs:
            (dst / rel / d).mkdir()
        for f in files:
            try:
                os.link(Path(root) / f, dst / rel / f)
            except OSError:  # EXDEV, EPERM, ENOTSUP: file systems without hard links
                shutil.copy2(Path(root) / f, dst / rel / f)
                copied += 1
    return copied


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
