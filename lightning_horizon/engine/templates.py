"""The template bank: the modules that run on the GPU slots.

A *template* is a copy of a streamed unit's module (a decoder layer, or the head: final norm + lm_head) whose
parameters are views into one slot's buffer. The bank makes one template per distinct unit structure per slot, from
a parameterless *prototype* of each structure taken before the engine hooks the model. It owns what is wired onto
the templates: their parameters in binding order, ``torch.compile`` of the dense decoder layers' forward
(``EngineConfig.compile_layers``), the router taps of the MoE aux loss (:class:`~.moe.RouterTap`) and the forward
pre-hooks that upload routed experts on demand (expert-sparse streaming). Before a template runs as unit ``i``,
:meth:`TemplateBank.prepare` binds it to unit ``i``'s own state (buffers, ``layer_idx``, PEFT adapter switches) and
makes each parameter trainable exactly when the model's own parameter is now.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import torch
import torch._dynamo
from torch import nn

from .adapter import DecoderParts, bind_layer_state, module_state
from .moe import RouterTap
from .store import check_trainable
from .units import Unit

log = logging.getLogger(__name__)

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class TemplateBank:
    """Templates of every unit structure for every slot (see the module docstring).

    Args:
        units: The streamed units (decoder layers, then the head as the last one).
        parts: Where the model keeps its parts (layer state, experts, router spec).
        streamer: Uploads the experts a template's tokens are routed to (expert-sparse units).
        device: Compute device (template buffers live there).
        compile_layers: ``EngineConfig.compile_layers`` (resolved): compile the dense decoder layers' forward.
    """

    def __init__(
        self, units: list[Unit], parts: DecoderParts, streamer, device: torch.device, compile_layers: bool
    ) -> None:
        self.units, self.parts, self.streamer, self.device = units, parts, streamer, device
        self.head_uid = len(units) - 1
        self.routers = RouterTap([], parts.router_spec())
        self.active: tuple[Any, Unit, dict[str, set[int]]] | None = None
        """(slot, unit, experts hit per expert module) of the layer running now, for the expert-upload hooks."""
        self._templates: dict[tuple[int, tuple], nn.Module] = {}
        self._params: dict[tuple[int, tuple], list[nn.Parameter]] = {}
        self._expert_hooks: list = []
        self._state = [parts.layer_state(i) for i in range(parts.num_layers)]
        self._state.append(module_state(units[self.head_uid].source, buffers=False))
        self._prototypes: dict[tuple, nn.Module] = {}
        for unit in units:  # each structure's first unit
            if unit.structure not in self._prototypes:
                self._prototypes[unit.structure] = _prototype(unit.source)
        stochastic = parts.is_stochastic()  # recomputation replays dropout through PyTorch's own RNG: eager only
        self.compiled = (
            {u.structure for i, u in enumerate(units[: self.head_uid]) if not parts.expert_modules(i)}
            if compile_layers and not stochastic
            else set()
        )
        """Unit structures whose templates run through ``torch.compile`` (dense decoder layers)."""
        if self.compiled:
            # Hugging Face layer forwards share one decorated code object, and Dynamo caches a bounded number of
            # variants per code object: make room for each template with and without grad, static and dynamic shapes.
            needed = 8 + 4 * len(self.compiled)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)

    def add_slots(self, slots) -> None:
        """Makes the templates of every unit structure that fits in each of ``slots`` (up front, never lazily under
        ``inference_mode``) and wires them: compile, router taps, expert-upload hooks."""
        for slot in slots:
            for unit in {u.structure: u for u in self.units if u.numel <= slot.buf.numel()}.values():
                template = self._make(unit, slot)
                if unit.structure in self.compiled:
                    template.forward = torch.compile(template.forward)
                self._templates[(slot.index, unit.structure)] = template
                self._params[(slot.index, unit.structure)] = [template.get_parameter(b.name) for b in unit.bindings]
                self.routers.add([template])
                for eset in unit.experts:
                    module = template.get_submodule(eset.path)
                    hook = functools.partial(self._experts_pre_hook, eset.path)
                    self._expert_hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def prepare(self, slot, uid: int) -> tuple[nn.Module, list[nn.Parameter]]:
        """The template of unit ``uid`` in ``slot``, set up to run as that unit, and its parameters in binding order."""
        unit = self.units[uid]
        key = (slot.index, unit.structure)
        template, params = self._templates[key], self._params[key]
        bind_layer_state(template, self._state[uid])
        for p, b in zip(params, unit.bindings):
            if p.requires_grad != b.entry.param.requires_grad:  # frozen or unfrozen since the template was made
                check_trainable(b.group, b.entry)
                p.requires_grad_(b.entry.param.requires_grad)
        return template, params

    def params(self, slot, uid: int) -> list[nn.Parameter]:
        """The parameters of unit ``uid``'s template in ``slot``, in binding order (as :meth:`prepare` left them)."""
        return self._params[(slot.index, self.units[uid].structure)]

    def close(self) -> None:
        for hook in self._expert_hooks:
            hook.remove()
        self._expert_hooks = []
        self.routers.close()
        self._templates.clear()
        self._params.clear()

    def _make(self, unit: Unit, slot) -> nn.Module:
        with torch.inference_mode(False):
            template = copy.deepcopy(self._prototypes[unit.structure])
            for b in unit.bindings:
                owner, leaf = _owner(template, b.name)
                # ``.data``: a view with a version counter of its own. Views of one buffer share one counter, so an
                # in-place write to one parameter (PEFT's parameter adapters re-set theirs at every call) would look
                # like a change to every other parameter of the slot that a layer's graph saved.
                view = slot.buf[b.offset : b.offset + b.entry.numel].view(b.entry.shape).data
                owner._parameters[leaf] = nn.Parameter(view, requires_grad=b.entry.param.requires_grad)
            for name, buf in list(template.named_buffers()):
                owner, leaf = _owner(template, name)
                owner._buffers[leaf] = buf.to(self.device)
        return template

    def _experts_pre_hook(self, path: str, module: nn.Module, args: tuple, kwargs: dict):
        """Before a template's experts module runs: uploads the experts its tokens are routed to (one small sync)."""
        if self.active is None:
            return None
        slot, unit, hits = self.active
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


def _prototype(source: nn.Module) -> nn.Module:
    """A parameterless copy of ``source`` (taken before the engine hooks the model: templates made later copy it,
    never the hooked module). Module hooks are not copied: hooks on the model's own modules (Hugging Face's output
    recording, a user's observer) fire where the model's modules are called, not once per template run."""
    memo = {}
    with torch.inference_mode(False):
        for p in source.parameters():
            memo[id(p)] = nn.Parameter(torch.empty(0), requires_grad=p.requires_grad)
        prototype = copy.deepcopy(source, memo)
    for module in prototype.modules():
        for name in _HOOK_DICTS:
            getattr(module, name, {}).clear()
    return prototype


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf
