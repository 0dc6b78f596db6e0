"""What stays on the GPU between uses: resident weight slots and kept activations (a mixin of the engine).

* **Resident slots** (``EngineConfig.resident_layers``): extra one-layer GPU slots, so the backward finds the layers
  the forward left and the micro-batches of a step reuse them: a unit is uploaded (and packed) once per weight
  version instead of once per pass. Added after the first step, sized from the GPU memory it left unused.
* **Kept layers** (``EngineConfig.keep_activations``): the last layers of a pass run with their graph in the forward
  and keep it, with their weight slot claimed, until their backward, which then needs no recomputation. At most
  (unclaimed slots - 2) layers are kept, whole segments only; a pass dropped before its backward releases its slots.

With kept layers configured, the streamer loads a unit into the smallest slot it fits in, so kept layers take the
one-layer slots first and the two large slots stay for the head.
"""

from __future__ import annotations

import logging
import weakref

import torch

from .segments import ForwardPass

log = logging.getLogger(__name__)

RESIDENT_HEADROOM = 0.2
"""Fraction of the GPU's memory left free when resident slots are sized from the first step's peak."""


class Residency:
    """Resident slots and kept layers, mixed into :class:`~.runtime.HorizonEngine` (uses its streamer, units,
    config and template parameters)."""

    @property
    def num_resident_slots(self) -> int:
        """GPU slots beyond ``num_slots`` (``EngineConfig.resident_layers``)."""
        return len(self.streamer.slots) - self.config.num_slots

    def _layer_slot_numel(self) -> int:
        return max(u.numel for u in self.units[: self.head_uid] or self.units)

    def _spare_gpu_bytes(self) -> float:
        """GPU memory the first step left unused, keeping free ``RESIDENT_HEADROOM`` of the device or, if larger, as
        much again as the first step's working set beyond the weight slots (a later batch may be longer)."""
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_reserved(self.device)
        slots = sum(s.buf.numel() * s.buf.element_size() for s in self.streamer.slots)
        headroom = max(RESIDENT_HEADROOM * total, peak - slots)
        return free + reserved - peak - headroom

    def _affordable_resident_slots(self, reserved: float = 0.0) -> int:
        """Layer slots that fit in the spare GPU memory (see ``_spare_gpu_bytes``) less ``reserved`` bytes."""
        slot_bytes = self._layer_slot_numel() * self.dtype.itemsize
        return max(0, int((self._spare_gpu_bytes() - reserved) // slot_bytes))

    def _size_from_first_step(self) -> None:
        """Kept layers first (with the slots they hold), then resident slots, from the first step's measurements."""
        slot_bytes = self._layer_slot_numel() * self.dtype.itemsize
        if self._keep_pending:
            self._keep_pending = False
            per_layer = self._graph_bytes + slot_bytes
            keep = min(self.parts.num_layers, max(0, int(self._spare_gpu_bytes() // per_layer)))
            if keep and self._graph_bytes:
                self._add_resident_slots(max(0, keep + 2 - len(self.streamer.slots)))
                self._keep_layers = min(keep, len(self.streamer.slots) - 2)
                log.info("horizon: the last %d layers keep their activations (no recomputation)", self._keep_layers)
        if self._resident_pending:
            self._resident_pending = False
            graphs = self._keep_layers * self._graph_bytes  # not allocated yet: the next step's kept graphs
            self._add_resident_slots(self._affordable_resident_slots(reserved=graphs))

    def _add_resident_slots(self, count: int) -> None:
        """Adds up to ``count`` slots of one decoder layer each, so that layers stay on the GPU between uses."""
        count = min(count, len(self.units) - len(self.streamer.slots))  # every layer and the head resident
        if count <= 0:
            return
        slots = self.streamer.make_slots(count, self._layer_slot_numel())
        self._wire_templates(slots)
        self.streamer.attach(slots)
        log.info("horizon: %d extra GPU slots keep layers resident between uses", count)

    # ------------------------------------------------------------------ kept layers (no recomputation in backward)
    def _start_keeping(self, fpass: ForwardPass, tokens: int) -> None:
        """Decides which layers of a new pass of ``tokens`` tokens keep their graph: the last ``keep_activations``
        (whole segments), as long as two unclaimed slots remain for streaming the others and the head. A count sized
        from the first step (None) shrinks in proportion for a pass with more tokens than that step's."""
        num_layers, k = self.parts.num_layers, self.config.checkpoint_every
        count = self._keep_layers
        if self.config.keep_activations is None and tokens > self._graph_tokens > 0:
            count = count * self._graph_tokens // tokens  # a layer's graph grows with its tokens
        count = min(count, max(0, self.streamer.num_unclaimed() - 2), num_layers)
        if count:
            fpass.first_kept = -(-(num_layers - count) // k) * k  # rounded up to a segment start
            weakref.finalize(fpass, self._release_kept, fpass.kept)

    def _release_kept(self, kept: dict[int, tuple]) -> None:
        """Frees the slots of kept layers whose backward never ran (the pass was dropped)."""
        for slot, *_ in kept.values():
            self.streamer.release(slot)
        kept.clear()

    def _run_kept(self, fpass: ForwardPass, index: int, slot, module, hidden, kwargs, rng, hits) -> torch.Tensor:
        """The forward of a kept layer (acquired and set up by ``_run_layer``): runs it with a graph local to it and
        keeps graph and slot for its backward."""
        try:
            with rng, self.routers.record() as routed, torch.enable_grad():
                x = hidden.detach().requires_grad_(True)
                out = module(x, **kwargs)
        except BaseException:
            self.streamer.release(slot)
            raise
        if isinstance(out, tuple):
            fpass.tuple_output = True
            out = out[0]
        if fpass.router_logits is not None and routed:
            fpass.router_logits[index] = [r.detach() for r in routed]
        fpass.kept[index] = (slot, x, out, routed, hits)
        return out.detach()

    def _kept_backward(self, fpass: ForwardPass, index: int, grad_out: torch.Tensor) -> torch.Tensor:
        slot, x, out, routed, hits = fpass.kept.pop(index)
        return self._local_backward(fpass, index, slot, x, out, routed, hits, grad_out)
