"""Autograd functions of the streamed model: the embedding, each decoder layer and the head.

No autograd graph spans more than one layer. Each call of a decoder layer is one :class:`LayerFunction` node that
runs the streamed layer without a graph and saves nothing but, every ``checkpoint_every`` (K) layers, its input (a
*segment checkpoint*). The backward of layer ``i`` needs its input: either it is a checkpoint, or the backward
recomputes the segment forward from the last checkpoint, without a graph, keeping the inputs of the segment's layers
(uploading those layers again). Then it re-runs layer ``i`` with a graph local to that layer, takes the input and
weight gradients with ``torch.autograd.grad``, frees the graph and hands the weight gradients to the gradient sink.

Because the nodes are ordinary autograd nodes, an unmodified ``loss.backward()`` drives the whole streamed backward,
and whatever the user computes around the model output (loss scaling, extra terms) composes with it. The first
backward node (the head) announces the whole backward upload order to the streamer, so uploads run ahead of compute.

The nodes call back into whatever runs the passes through the small :class:`Passes` protocol (the engine's
:class:`~.passes.PassRunner`), so this module depends on nothing of the engine. :class:`Segments` says which layers
start a segment, which the backward recomputes and in which order it needs them: the engine and the planner both
count with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Passes(Protocol):
    """What the autograd nodes of a pass call (implemented by :class:`~.passes.PassRunner`)."""

    def embed_forward(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def embed_backward(self, input_ids: torch.Tensor, grad_hidden: torch.Tensor) -> None: ...
    def finish_backward(self) -> None: ...
    def layer_forward(self, fpass: ForwardPass, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor: ...
    def layer_backward(self, fpass: ForwardPass, index: int, grad_out: torch.Tensor) -> torch.Tensor: ...
    def norm_forward(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def norm_backward(self, hidden: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor: ...
    def head_loss_forward(self, loss_fn, hidden: torch.Tensor) -> torch.Tensor: ...
    def head_loss_backward(self, loss_fn, hidden: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor: ...
    def head_logits_forward(self, hidden: torch.Tensor, norm: bool) -> torch.Tensor: ...
    def head_logits_backward(self, hidden: torch.Tensor, grad_logits: torch.Tensor, norm: bool) -> torch.Tensor: ...
    def plan_backward(self, fpass: ForwardPass) -> None: ...


@dataclass(frozen=True)
class Segments:
    """The segment structure of a pass: ``num_layers`` decoder layers in segments of ``checkpoint_every`` (K),
    of which the last ``num_layers - first_kept`` keep their forward graph (whole segments; no recomputation)."""

    num_layers: int
    checkpoint_every: int
    first_kept: int | None = None
    """First layer that keeps its graph (a segment start), or None: every layer is recomputed."""

    @property
    def recomputed(self) -> int:
        """Layers whose backward needs their input again (checkpointed or recomputed): those before ``first_kept``."""
        return self.num_layers if self.first_kept is None else min(self.first_kept, self.num_layers)

    @property
    def starts(self) -> range:
        """Layers whose input the forward keeps (segment checkpoints)."""
        return range(0, self.recomputed, self.checkpoint_every)

    @property
    def num_checkpoints(self) -> int:
        return len(self.starts)

    def start_of(self, index: int) -> int:
        return index - index % self.checkpoint_every

    def backward_order(self) -> list[tuple[int, bool]]:
        """Layers in the order the backward runs them: ``(layer, is_recompute)``, last segment first. Within a
        segment the layers before its last are first run again without a graph (their inputs), then every layer is
        run with a graph, last first. Kept layers are not in it (their graph and slot are kept)."""
        order: list[tuple[int, bool]] = []
        for start in reversed(self.starts):
            end = min(start + self.checkpoint_every, self.recomputed)
            order += [(i, True) for i in range(start, end - 1)]
            order += [(i, False) for i in reversed(range(start, end))]
        return order

    @property
    def num_recompute_runs(self) -> int:
        """Forward runs without a graph that the backward adds (the layers that are not the last of a segment)."""
        return sum(1 for _, recompute in self.backward_order() if recompute)

    def kept_from(self, count: int) -> Segments:
        """The same layers with the last ``count`` kept (rounded down to whole segments)."""
        if count <= 0:
            return Segments(self.num_layers, self.checkpoint_every)
        k = self.checkpoint_every
        return Segments(self.num_layers, k, -(-(self.num_layers - min(count, self.num_layers)) // k) * k)


@dataclass
class KeptLayer:
    """A layer of a pass that keeps its forward graph for its backward (``EngineConfig.keep_activations``)."""

    slot: Any
    """Its weight slot, claimed until the backward (the weights are part of the graph)."""
    x: torch.Tensor
    """Its input (a leaf of the graph)."""
    out: torch.Tensor
    routed: list[torch.Tensor]
    """Router logits of its MoE routers (with their graph), for the aux loss."""
    hits: dict[str, set[int]]
    """Experts that received tokens, per expert module path (expert-sparse units)."""


class ForwardPass:
    """What one forward pass keeps for its backward: segment checkpoints and each layer's call arguments."""

    def __init__(self, runner: Passes, keep: bool, train_mode: bool, segments: Segments) -> None:
        self.runner = runner
        self.keep = keep
        """Grad mode was on: keep checkpoints and call arguments for a backward."""
        self.train_mode = train_mode
        """The model was in training mode (dropout active)."""
        self.inputs: dict[int, torch.Tensor] = {}
        self.kwargs: dict[int, dict[str, Any]] = {}
        self.rng: dict[int, Any] = {}
        self.tuple_output = False
        self.backward_started = False
        self.offload = False
        """Segment checkpoints of this pass live in pinned host memory (see .activations)."""
        self.router_logits: dict[int, list[torch.Tensor]] | None = None
        """Each MoE layer's router logits, graph-free, when the aux loss is on (see :mod:`.moe`)."""
        self.router_grads: dict[int, list[torch.Tensor]] = {}
        """d(aux loss)/d(router logits) per layer, set by the aux loss's backward for the layers' backward."""
        self.segments = segments
        """Which layers start a segment, are recomputed or keep their graph."""
        self.kept: dict[int, KeptLayer] = {}
        self.head_nodes = 0
        """Autograd nodes of this pass that run the head in their backward (the loss or logits, the final norm when
        it runs on its own): the backward's upload plan starts with that many uses of the head."""

    def add_head_node(self, ctx) -> None:
        if any(ctx.needs_input_grad):
            self.head_nodes += 1

    def start_backward(self) -> None:
        if not self.backward_started:
            self.backward_started = True
            self.runner.plan_backward(self)


class EmbedFunction(torch.autograd.Function):
    """Embedding lookup on the host masters (only the rows in the batch are read), uploaded in the compute dtype."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, runner: Passes, input_ids: torch.Tensor) -> torch.Tensor:
        ctx.runner, ctx.input_ids = runner, input_ids
        return runner.embed_forward(input_ids)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        ctx.runner.embed_backward(ctx.input_ids, grad_hidden)
        ctx.runner.finish_backward()  # the last node of the backward: host gradients are complete on return
        return None, None, None


class LayerFunction(torch.autograd.Function):
    """One streamed decoder layer."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, anchor: torch.Tensor, fpass: ForwardPass, index: int, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        ctx.fpass, ctx.index = fpass, index
        return fpass.runner.layer_forward(fpass, index, hidden, kwargs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        return fpass.runner.layer_backward(fpass, ctx.index, grad_out), None, None, None, None


class NormFunction(torch.autograd.Function):
    """The final norm on its own, when its output goes back to the caller (``output_hidden_states``, a call of the
    decoder itself): the head then takes the normalised hidden states."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, anchor: torch.Tensor, fpass: ForwardPass) -> torch.Tensor:
        ctx.fpass = fpass
        fpass.add_head_node(ctx)
        ctx.save_for_backward(hidden)
        return fpass.runner.norm_forward(hidden)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        (hidden,) = ctx.saved_tensors
        return fpass.runner.norm_backward(hidden, grad_out), None, None


class HeadLossFunction(torch.autograd.Function):
    """Final norm (unless it ran on its own) + lm_head + cross-entropy, chunked (see :mod:`.loss`)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, anchor: torch.Tensor, fpass: ForwardPass, loss_fn) -> torch.Tensor:
        ctx.fpass, ctx.loss_fn = fpass, loss_fn
        fpass.add_head_node(ctx)
        ctx.save_for_backward(hidden)
        return fpass.runner.head_loss_forward(loss_fn, hidden)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        (hidden,) = ctx.saved_tensors
        return fpass.runner.head_loss_backward(ctx.loss_fn, hidden, grad_loss), None, None, None


class HeadLogitsFunction(torch.autograd.Function):
    """Final norm (when ``norm``) + lm_head returning full logits (used when no labels are given)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, anchor: torch.Tensor, fpass: ForwardPass, norm: bool) -> torch.Tensor:
        ctx.fpass, ctx.norm = fpass, norm
        fpass.add_head_node(ctx)
        ctx.save_for_backward(hidden)
        return fpass.runner.head_logits_forward(hidden, norm)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        (hidden,) = ctx.saved_tensors
        return fpass.runner.head_logits_backward(hidden, grad_logits, ctx.norm), None, None, None


def local_grads(
    outputs, grad_outputs, x: torch.Tensor, params: list[torch.nn.Parameter], allow_unused: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Gradients of a graph local to one streamed unit: w.r.t. its input ``x`` and each of ``params`` (None for a
    frozen parameter), in the order of ``params``."""
    trainable = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(outputs, [x, *trainable], grad_outputs, allow_unused=allow_unused)
    it = iter(grads[1:])
    return grads[0], [next(it) if p.requires_grad else None for p in params]


class _rng_replay:  # noqa: N801 (used as a context manager, like torch.no_grad)
    """Records the RNG state at a layer's first run and replays it on recomputation (dropout stays identical)."""

    def __init__(self, fpass: ForwardPass, index: int, device: torch.device, enabled: bool) -> None:
        self.fpass, self.index, self.device, self.enabled = fpass, index, device, enabled

    def __enter__(self) -> None:
        if not self.enabled:
            return
        cuda = self.device.type == "cuda"
        if self.index not in self.fpass.rng:
            self.fpass.rng[self.index] = (
                torch.get_rng_state(),
                torch.cuda.get_rng_state(self.device) if cuda else None,
            )
            self._restore = None
            return
        self._restore = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)
        cpu, gpu = self.fpass.rng[self.index]
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state(gpu, self.device)

    def __exit__(self, *exc) -> None:
        if self.enabled and self._restore is not None:
            cpu, gpu = self._restore
            torch.set_rng_state(cpu)
            if gpu is not None:
                torch.cuda.set_rng_state(gpu, self.device)
