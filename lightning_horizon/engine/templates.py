"""The engine's view of the GPU slots' layer templates (a mixin of the engine): their parameters by binding, the
router taps and expert-upload hooks installed on them, and ``torch.compile`` of the dense decoder layers' forward
(``EngineConfig.compile_layers``)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil

import torch
import torch._dynamo
from torch import nn

from .config import EngineConfig
from .units import ExpertSet, Unit

log = logging.getLogger(__name__)


class Templates:
    """Template wiring, mixed into :class:`~.runtime.HorizonEngine` (uses its streamer, units, parts and routers)."""

    def _setup_templates(self, config: EngineConfig) -> None:
        """Decides which layer templates are compiled and wires the streamer's first slots."""
        self._sparse_active: tuple | None = None  # (slot, unit, hit experts per path) of the layer running now
        self._expert_hooks = []
        self._template_params: dict[tuple[int, tuple], list[nn.Parameter]] = {}
        compile_layers = config.compile_layers
        if compile_layers is None:
            compile_layers = self.device.type == "cuda" and _can_compile()
        self._compiled_structures = {
            u.structure for i, u in enumerate(self.units[: self.head_uid]) if not self.parts.expert_modules(i)
        } if compile_layers and not self._stochastic else set()  # fmt: skip
        """Layer templates run through ``torch.compile`` (dense layers, when compile_layers is on)."""
        if self._compiled_structures:
            # Hugging Face layer forwards share one decorated code object, and Dynamo caches a bounded number of
            # variants per code object: make room for each template with and without grad, static and dynamic shapes.
            needed = 8 + 4 * len(self._compiled_structures)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
        self._wire_templates(self.streamer.slots)

    def _expert_sets(self, index: int, unit: Unit) -> list[ExpertSet]:
        by_name = {b.name: b for b in unit.bindings}
        sets = []
        for em in self.parts.expert_modules(index):
            bindings = [by_name.get(f"{em.path}.{n}") for n in em.params]
            if any(b is None or b.entry.numel % em.num_experts or b.entry.shape[0] != em.num_experts for b in bindings):
                continue  # a tied or reshaped parameter: keep it dense
            sets.append(ExpertSet(em.path, em.num_experts, bindings, em.index_arg))
        return sets

    def _experts_pre_hook(self, path: str, module: nn.Module, args: tuple, kwargs: dict):
        """Before a template's experts module runs: uploads the experts its tokens are routed to (one small sync)."""
        active = self._sparse_active
        if active is None:
            return None
        slot, unit, hits = active
        eset = next((e for e in unit.experts if e.path == path), None)
        if eset is None:
            return None
        index = args[1] if len(args) > 1 else kwargs.get(eset.index_arg)
        if isinstance(index, torch.Tensor):
            with torch.no_grad():
                hit = [e for e in torch.unique(index.detach()).tolist() if 0 <= e < eset.num_experts]
        else:  # no routing indices to read: every expert
            hit = list(range(eset.num_experts))
        hits.setdefault(path, set()).update(hit)
        self.streamer.upload_experts(slot, eset, hit)
        return None

    def _wire_templates(self, slots) -> None:
        """The engine's view of new slots' templates: their parameters by binding, router and expert hooks (and
        ``torch.compile`` of the decoder layers' templates when asked)."""
        for slot in slots:
            for structure, template in slot.templates.items():
                if structure in self._compiled_structures:
                    template.forward = torch.compile(template.forward)
            for u in self.units:
                if u.structure in slot.templates:
                    template = slot.templates[u.structure]
                    self._template_params[(slot.index, u.structure)] = [
                        template.get_parameter(b.name) for b in u.bindings
                    ]
            self.routers.add(slot.templates.values())
            for unit in {u.structure: u for u in self.units if u.experts}.values():
                template = slot.templates.get(unit.structure)
                for eset in unit.experts if template is not None else ():
                    module = template.get_submodule(eset.path)
                    hook = functools.partial(self._experts_pre_hook, eset.path)
                    self._expert_hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))


def _can_compile() -> bool:
    """Whether ``torch.compile`` can build GPU kernels here (Triton, and the C compiler its launchers need); the
    default then compiles the layers, otherwise they run eager with a note in the log."""
    missing = []
    if importlib.util.find_spec("triton") is None:
        missing.append("triton")
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        missing.append("a C compiler")
    if missing:
        log.info("horizon: layers run eager (compile_layers needs %s)", " and ".join(missing))
    return not missing
