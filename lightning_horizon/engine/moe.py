"""The MoE routers' auxiliary (load-balancing) loss through the streamed layers.

Hugging Face computes the aux loss in ``...ForCausalLM.forward`` from router logits that it records with forward
hooks on the host model's router modules. Under the engine those modules never run: the GPU templates do, without
a graph in the forward and with a graph local to one layer in the backward. So:

* :class:`RouterTap` hooks the router modules of every template. In the forward, each layer's router logits are
  kept, graph-free, on the :class:`~.segments.ForwardPass` (``B*S x num_experts`` per MoE layer: small).
* :class:`RouterAuxFunction` sits between the last decoder layer and the head. Its forward computes the aux loss
  value from the kept logits with the family's own ``load_balancing_loss_func`` and passes the hidden states
  through. Because every layer's backward waits for it (it is downstream of all layers), its backward runs first:
  it recomputes the aux loss from the kept logits with a graph and stores ``d(aux)/d(router_logits)`` of each layer
  on the ForwardPass.
* Each layer's backward re-runs the layer with a graph, taps its router logits again and takes
  ``autograd.grad([hidden_out, *router_logits], ..., [grad_out, *grad_router])``: the aux gradient reaches the
  router weights (and everything upstream of them) exactly as in one big autograd graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapter import AuxLossSpec, RouterSpec

if TYPE_CHECKING:
    from .segments import ForwardPass


class RouterTap:
    """Forward hooks on the router modules of the templates; ``record()`` collects their logits in call order."""

    def __init__(self, templates: Iterable[nn.Module], spec: RouterSpec | None) -> None:
        self.spec = spec
        self._active: list[torch.Tensor] | None = None
        self._handles = []
        self.add(templates)

    def add(self, templates: Iterable[nn.Module]) -> None:
        """Hooks the routers of more templates (slots added later)."""
        if self.spec is not None:
            for template in templates:
                for module in template.modules():
                    if self.spec.matches(module):
                        self._handles.append(module.register_forward_hook(self._hook))

    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def _hook(self, module: nn.Module, args, output) -> None:
        if self._active is not None:
            self._active.append(self.spec.logits(output))  # type: ignore[union-attr]

    @contextmanager
    def record(self) -> Iterator[list[torch.Tensor]]:
        if not self._handles:
            yield []
            return
        self._active = got = []
        try:
            yield got
        finally:
            self._active = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class RouterAuxFunction(torch.autograd.Function):
    """``(hidden, aux_loss) = f(hidden)``: the aux loss from the kept router logits; hidden passes through."""

    @staticmethod
    def forward(ctx, hidden, anchor, fpass: ForwardPass, spec: AuxLossSpec, attention_mask):
        ctx.fpass, ctx.spec, ctx.attention_mask = fpass, spec, attention_mask
        ctx.set_materialize_grads(False)
        logits = _ordered(fpass)
        with torch.no_grad():
            aux = (
                spec(tuple(t for _, t in logits), attention_mask)
                if logits
                else hidden.new_zeros((), dtype=torch.float32)
            )
        return hidden.view_as(hidden), aux

    @staticmethod
    def backward(ctx, grad_hidden, grad_aux):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        logits = _ordered(fpass)
        if grad_aux is not None and logits:
            leaves = [t.detach().requires_grad_(True) for _, t in logits]
            with torch.enable_grad():
                aux = ctx.spec(tuple(leaves), ctx.attention_mask)
                grads = torch.autograd.grad(aux, leaves, grad_aux, allow_unused=True)
            for (index, _), leaf, g in zip(logits, leaves, grads):
                fpass.router_grads.setdefault(index, []).append(torch.zeros_like(leaf) if g is None else g)
        fpass.router_logits.clear()
        return grad_hidden, None, None, None, None


def _ordered(fpass: ForwardPass) -> list[tuple[int, torch.Tensor]]:
    """Router logits of the pass in layer order (the order Hugging Face records them in)."""
    return [(i, t) for i in sorted(fpass.router_logits) for t in fpass.router_logits[i]]
