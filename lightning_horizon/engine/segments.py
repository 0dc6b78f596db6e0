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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .runtime import HorizonEngine


class ForwardPass:
    """What one forward pass keeps for its backward: segment checkpoints and each layer's call arguments."""

    def __init__(self, engine: HorizonEngine, keep: bool, train_mode: bool) -> None:
        self.engine = engine
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
        self.first_kept = 1 << 30
        """Layers from this index on keep their forward graph (``EngineConfig.keep_activations``)."""
        self.kept: dict[int, tuple] = {}
        """Kept layers: ``(slot, input, output, router logits, hit experts)``; the slot stays claimed until the
        layer's backward (its weights are part of the graph)."""
        self.head_nodes = 0
        """Autograd nodes of this pass that run the head in their backward (the loss or logits, the final norm when
        it runs on its own): the backward's upload plan starts with that many uses of the head."""

    def add_head_node(self, ctx) -> None:
        if any(ctx.needs_input_grad):
            self.head_nodes += 1

    def start_backward(self) -> None:
        if not self.backward_started:
            self.backward_started = True
            self.engine.plan_backward(self)


class EmbedFunction(torch.autograd.Function):
    """Embedding lookup on the host masters (only the rows in the batch are read), uploaded in the compute dtype."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, engine: HorizonEngine, input_ids: torch.Tensor) -> torch.Tensor:
        ctx.engine, ctx.input_ids = engine, input_ids
        return engine.embed_forward(input_ids)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        ctx.engine.embed_backward(ctx.input_ids, grad_hidden)
        ctx.engine.finish_backward()  # the last node of the backward: host gradients are complete on return
        return None, None, None


class LayerFunction(torch.autograd.Function):
    """One streamed decoder layer."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, anchor: torch.Tensor, fpass: ForwardPass, index: int, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        ctx.fpass, ctx.index = fpass, index
        return fpass.engine.layer_forward(fpass, index, hidden, kwargs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        return fpass.engine.layer_backward(fpass, ctx.index, grad_out), None, None, None, None


class NormFunction(torch.autograd.Function):
    """The final norm on its own, when its output goes back to the caller (``output_hidden_states``, a call of the
    decoder itself): the head then takes the normalised hidden states."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, anchor: torch.Tensor, fpass: ForwardPass) -> torch.Tensor:
        ctx.fpass = fpass
        fpass.add_head_node(ctx)
        ctx.save_for_backward(hidden)
        return fpass.engine.norm_forward(hidden)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        (hidden,) = ctx.saved_tensors
        return fpass.engine.norm_backward(hidden, grad_out), None, None


class HeadLossFunction(torch.autograd.Function):
    """Final norm (unless it ran on its own) + lm_head + cross-entropy, chunked (see :mod:`.loss`)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, anchor: torch.Tensor, fpass: ForwardPass, loss_fn) -> torch.Tensor:
        ctx.fpass, ctx.loss_fn = fpass, loss_fn
        fpass.add_head_node(ctx)
        ctx.save_for_backward(hidden)
        return fpass.engine.head_loss_forward(loss_fn, hidden)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        (hidden,) = ctx.saved_tensors
        return fpass.engine.head_loss_backward(ctx.loss_fn, hidden, grad_loss), None, None, None


class HeadLogitsFunction(torch.autograd.Function):
    """Final norm (when ``norm``) + lm_head returning full logits (used when no labels are given)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, anchor: torch.Tensor, fpass: ForwardPass, norm: bool) -> torch.Tensor:
        ctx.fpass, ctx.norm = fpass, norm
        fpass.add_head_node(ctx)
        ctx.save_for_backward(hidden)
        return fpass.engine.head_logits_forward(hidden, norm)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        fpass: ForwardPass = ctx.fpass
        fpass.start_backward()
        (hidden,) = ctx.saved_tensors
        return fpass.engine.head_logits_backward(hidden, grad_logits, ctx.norm), None, None, None


def local_grads(
    outputs, grad_outputs, x: torch.Tensor, params: list[torch.nn.Parameter], allow_unused: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Gradients of a graph local to one streamed unit: w.r.t. its input ``x`` and each of ``params`` (None for a
    frozen parameter), in the order of ``params``."""
    trainable = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(outputs, [x, *trainable], grad_outputs, allow_unused=allow_unused)
    it = iter(grads[1:])
    return grads[0], [next(it) if p.requires_grad else None for p in params]


def segment_backward_order(num_layers: int, k: int) -> list[tuple[int, bool]]:
    """Upload order of the backward: ``(layer, is_recompute)`` for each segment, last segment first."""
    order: list[tuple[int, bool]] = []
    for start in reversed(range(0, num_layers, k)):
        end = min(start + k, num_layers)
        order += [(i, True) for i in range(start, end - 1)]
        order += [(i, False) for i in reversed(range(start, end))]
    return order


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
