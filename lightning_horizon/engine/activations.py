"""Segment checkpoints offloaded to pinned host memory, so GPU memory does not grow with depth.

With ``checkpoint_every=K`` the forward keeps ``ceil(L/K)`` layer inputs for the backward: ``L/K x B x S x H`` in
the compute dtype. On the GPU that term grows with the number of layers. When offloading is on, each checkpoint is
copied to pinned host memory on ``d2h_stream`` as soon as it exists (the GPU tensor is released once the copy has
run: ``record_stream`` keeps the allocator from reusing it earlier), and the backward brings it back on its own
``h2d_stream`` one segment ahead of use, ordered by events: at most two checkpoints are on the GPU at a time.
The GPU copy of a checkpoint can only be reused by the allocator once its D2H copy has run; if the forward ran far
ahead of ``d2h_stream`` (fast layers, slow copies), freed checkpoints would pile up on the GPU in proportion to the
depth. So the forward waits (host-side, on that one copy's event) until the copy ``max_in_flight`` checkpoints back
has finished: the GPU holds a bounded number of checkpoints whatever the depth.
The host copies come from PyTorch's pinned caching allocator: checkpoint shapes repeat every step, so the blocks are
reused rather than pinned again.
"""

from __future__ import annotations

from collections import deque

import torch


class OffloadedTensor:
    """A tensor that lives in pinned host memory until the backward asks for it back."""

    def __init__(self, owner: CheckpointOffloader, tensor: torch.Tensor) -> None:
        self.owner = owner
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.d2h_event = torch.cuda.Event()
        stream = owner.d2h_stream
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)
            self.d2h_event.record(stream)
        self.device_copy: torch.Tensor | None = None
        self.h2d_event: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        if self.device_copy is not None:
            return
        stream = self.owner.h2d_stream
        with torch.cuda.stream(stream):
            stream.wait_event(self.d2h_event)
            self.device_copy = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.owner.device)
            self.device_copy.copy_(self.host, non_blocking=True)
            self.h2d_event = torch.cuda.Event()
            self.h2d_event.record(stream)

    def get(self) -> torch.Tensor:
        self.prefetch()
        current = torch.cuda.current_stream(self.owner.device)
        current.wait_event(self.h2d_event)
        self.device_copy.record_stream(current)
        return self.device_copy


class CheckpointOffloader:
    """Moves segment checkpoints to pinned host memory and back (CUDA only).

    Args:
        device: The CUDA compute device.
        mode: True (always offload), False (never) or None (offload when a pass's checkpoints would take more than
            ``auto_fraction`` of the GPU's memory).
        auto_fraction: See ``mode``.
        max_in_flight: Checkpoints whose D2H copy may still be running when the next one is offloaded.
    """

    def __init__(
        self, device: torch.device, mode: bool | None, auto_fraction: float = 0.2, max_in_flight: int = 2
    ) -> None:
        self.device = device
        self.mode = mode
        self.max_in_flight = max_in_flight
        self._in_flight: deque[OffloadedTensor] = deque()
        if device.type == "cuda":
            self.d2h_stream = torch.cuda.Stream(device)
            self.h2d_stream = torch.cuda.Stream(device)
            self.budget = auto_fraction * torch.cuda.get_device_properties(device).total_memory
        self.bytes_offloaded = 0

    def decide(self, sample: torch.Tensor, num_checkpoints: int) -> bool:
        """Whether a pass whose checkpoints look like ``sample`` offloads them (called at its first layer)."""
        if self.device.type != "cuda" or self.mode is False:
            return False
        if self.mode is True:
            return True
        return num_checkpoints * sample.numel() * sample.element_size() > self.budget

    def offload(self, tensor: torch.Tensor) -> OffloadedTensor:
        self.bytes_offloaded += tensor.numel() * tensor.element_size()
        moved = OffloadedTensor(self, tensor)
        self._in_flight.append(moved)
        if len(self._in_flight) > self.max_in_flight:
            self._in_flight.popleft().d2h_event.synchronize()  # bounds the checkpoints awaiting their copy
        return moved


def materialize(value: torch.Tensor | OffloadedTensor) -> torch.Tensor:
    return value.get() if isinstance(value, OffloadedTensor) else value


def prefetch(value: torch.Tensor | OffloadedTensor | None) -> None:
    if isinstance(value, OffloadedTensor):
        value.prefetch()
