"""What stays on the GPU between uses, sized after the first step: kept layers and resident slots.

* **Kept layers** (``EngineConfig.keep_activations``, see :mod:`.passes`): the last layers of a pass keep their
  forward graph and weight slot until their backward, which then needs no recomputation.
* **Resident slots** (``EngineConfig.resident_layers``): extra one-layer GPU slots, so the backward finds the layers
  the forward left and the micro-batches of a step reuse them: a unit is uploaded (and packed) once per weight
  version instead of once per pass.

With ``None`` (the default on CUDA) both are sized after the first step from the GPU memory it left unused: kept
layers first (each costs its measured graph and a slot), then resident slots from what remains. The decisions are
the pure functions below; the engine measures and applies them.
"""

from __future__ import annotations

import torch

RESIDENT_HEADROOM = 0.2
"""Fraction of the GPU's memory left free when resident slots are sized from the first step's peak."""


def spare_gpu_bytes(free: int, total: int, reserved: int, peak: int, slot_bytes: int) -> float:
    """GPU memory a step left unused, keeping free ``RESIDENT_HEADROOM`` of the device or, if larger, as much again
    as the step's working set beyond the weight slots (a later batch may be longer).

    Args:
        free, total: ``torch.cuda.mem_get_info``.
        reserved: Memory the caching allocator holds now; ``peak``: the most it held (the first step's peak).
        slot_bytes: Bytes of every weight slot together.
    """
    headroom = max(RESIDENT_HEADROOM * total, peak - slot_bytes)
    return free + reserved - peak - headroom


def measure_spare_gpu_bytes(device: torch.device, slot_bytes: int) -> float:
    """:func:`spare_gpu_bytes` of ``device`` now."""
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    peak = torch.cuda.max_memory_reserved(device)
    return spare_gpu_bytes(free, total, reserved, peak, slot_bytes)


def layers_to_keep(spare: float, graph_bytes: int, layer_slot_bytes: int, num_layers: int) -> int:
    """Layers whose graph (``graph_bytes`` each, measured) and weight slot fit in ``spare`` bytes."""
    if graph_bytes <= 0:
        return 0
    return min(num_layers, max(0, int(spare // (graph_bytes + layer_slot_bytes))))


def resident_slots_to_add(spare: float, layer_slot_bytes: int, reserved: float = 0.0) -> int:
    """One-layer slots that fit in ``spare`` bytes less ``reserved`` (graphs of kept layers not allocated yet)."""
    return max(0, int((spare - reserved) // layer_slot_bytes))
