"""Mixture-of-experts layers: their routed experts, the routers' auxiliary loss and sparse expert gradients.

**Routed experts** (:func:`find_experts`): modules holding a layer's experts as stacked parameters, streamed expert
by expert (``EngineConfig.sparse_experts``); an :class:`ExpertGrad` carries the gradient of such a parameter, of
which only the experts that received tokens travel to the host.

**The routers' auxiliary (load-balancing) loss** through the streamed layers. Hugging Face computes the aux loss in ``...ForCausalLM.forward`` from router logits that it records with forward
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

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .segments import ForwardPass


@dataclass(frozen=True)
class RouterSpec:
    """Which modules of a decoder layer emit router logits, and where in their output (HF's ``OutputRecorder``)."""

    matches: Callable[[nn.Module], bool]
    index: int = 0

    def logits(self, output: Any) -> torch.Tensor:
        return output[self.index] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class AuxLossSpec:
    """The load-balancing loss the family's ``...ForCausalLM.forward`` adds to the loss."""

    loss_fn: Callable[..., torch.Tensor]
    """``load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)`` of the family's module."""
    coef: float
    num_experts: int
    top_k: int

    def __call__(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.loss_fn(router_logits, self.num_experts, self.top_k, attention_mask)


@dataclass(frozen=True)
class ExpertModule:
    """A module holding a layer's routed experts as stacked parameters (expert ``e`` is ``param[e]``)."""

    path: str
    """Path of the module inside the decoder layer."""
    num_experts: int
    params: tuple[str, ...]
    """Its parameters' names (each of shape ``(num_experts, ...)``)."""
    index_arg: str
    """Name of the forward argument carrying the routing indices (its second argument)."""


def find_experts(layer: nn.Module) -> list[ExpertModule]:
    """Expert modules of ``layer`` that only read (and only produce gradients for) the experts that tokens are routed to.

    Recognised generically: a module with an integer ``num_experts`` whose own parameters all have ``num_experts`` as
    their first dimension (stacked expert weights and biases, at least one of them 3D), with no parameters in its
    submodules, and whose ``forward``'s second argument is the routing index (``top_k_index``, ``router_indices``:
    the name mentions ``index``/``indices``). Hugging Face's ``...Experts`` of Mixtral, Qwen2/3-MoE, GPT-OSS,
    DeepSeek-V3 and GLM-4.5 match, with every ``experts_implementation`` (eager, ``batched_mm``, ``grouped_mm``: the
    weights of an expert without tokens are never read). Llama 4's experts (``forward(hidden_states)``, a dense bmm over
    all experts) do not match and stay dense.
    """
    found = []
    for path, module in layer.named_modules():
        num = getattr(module, "num_experts", None)
        if not isinstance(num, int) or isinstance(num, bool) or num < 2 or not path:
            continue
        own = list(module.named_parameters(recurse=False))
        if not own or any(p.ndim < 2 or p.shape[0] != num for _, p in own) or not any(p.ndim == 3 for _, p in own):
            continue
        if any(True for c in module.children() for _ in c.parameters()):
            continue
        try:
            sig = list(inspect.signature(type(module).forward).parameters.values())
        except (TypeError, ValueError):
            continue
        if len(sig) < 3 or sig[2].kind not in (sig[2].POSITIONAL_OR_KEYWORD, sig[2].POSITIONAL_ONLY):
            continue
        name = sig[2].name.lower()
        if "index" not in name and "indices" not in name:
            continue
        found.append(ExpertModule(path, num, tuple(n for n, _ in own), sig[2].name))
    return found


class ExpertGrad:
    """The gradient of a stacked expert parameter ``(num_experts, ...)`` of which only experts ``runs`` received tokens.

    Only those experts' rows travel to the host; the others' gradient is exactly zero. On the host the first landing
    after an optimizer step zero-fills the other rows (so the optimizer sees the dense gradient), later ones (gradient
    accumulation) add nothing to them. ``grad`` is the full device gradient.
    """

    def __init__(self, grad: torch.Tensor, runs: list[tuple[int, int]], rows: int) -> None:
        self.grad, self.runs, self.rows = grad, runs, rows
        self.count = sum(z - a for a, z in runs)

    def numel(self) -> int:
        return self.count * self.per if self.runs else 0

    @property
    def per(self) -> int:
        return self.grad.numel() // self.rows

    def element_size(self) -> int:
        return self.grad.element_size()

    def pieces(self):
        """``(first expert, end expert, rows)`` per run."""
        if not self.runs:
            return
        per = self.per
        flat = self.grad.reshape(-1)
        for a, z in self.runs:
            yield a, z, flat[a * per : z * per].view(z - a, per)

    def zero_others(self, dst: torch.Tensor) -> None:
        """Zero-fills the rows of ``dst`` (the parameter's host gradient) of experts outside ``runs``."""
        rows = dst.reshape(self.rows, -1)
        start = 0
        for a, z in [*self.runs, (self.rows, self.rows)]:
            if a > start:
                rows[start:a].zero_()
            start = z

    def norm(self) -> torch.Tensor:
        parts = [p for _, _, p in self.pieces()]
        if not parts:
            return torch.zeros((), dtype=torch.float32, device=self.grad.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p, dtype=torch.float32) for p in parts]))


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
