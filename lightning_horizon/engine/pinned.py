"""Page-locked host memory without the caching host allocator's rounding.

``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds every request up
to a power of two: pinning a store tensor by tensor can waste a large fraction of host RAM. Instead we allocate
ordinary tensors and register them with ``cudaHostRegister`` (measured 4-8x faster than ``pin_memory`` for large
buffers, exact size). Without CUDA these helpers return plain memory, so the same code runs on CPU.
"""

from __future__ import annotations

import torch

_registered: dict[int, int] = {}


def register_pinned(t: torch.Tensor) -> torch.Tensor:
    """Page-locks ``t``'s memory in place (no-op without CUDA); returns ``t``."""
    if not torch.cuda.is_available() or t.numel() == 0 or t.data_ptr() in _registered:
        return t
    nbytes = t.numel() * t.element_size()
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**20:.1f} MiB failed with CUDA error {int(err)}")
    _registered[t.data_ptr()] = nbytes
    return t


def unregister_pinned(t: torch.Tensor) -> None:
    if _registered.pop(t.data_ptr(), None) is not None:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def pinned_empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A flat host tensor, page-locked when ``pin`` (and CUDA is present)."""
    t = torch.empty(numel, dtype=dtype)
    return register_pinned(t) if pin else t


def chunk_spans(spans, cap: int):
    """Groups ``(key, offset, flat tensor)`` spans into chunks of at most ``cap`` elements for a pinned buffer of that
    size: a span crossing a chunk's end is split (the offset follows the split); empty spans are kept."""
    chunk, used = [], 0
    for key, offset, src in spans:
        at = 0
        while True:
            n = min(src.numel() - at, cap - used)
            if n > 0 or src.numel() == 0:
                chunk.append((key, offset + at, src[at : at + n]))
            used += n
            at += n
            if used == cap:
                yield chunk
                chunk, used = [], 0
            if at >= src.numel():
                break
    if chunk:
        yield chunk
