"""The pass runner: the forward and backward of the embedding, each decoder layer, the final norm and the head.

The autograd nodes of :mod:`.segments` call it through the :class:`~.segments.Passes` protocol. For each unit it
acquires the unit's slot from the :class:`~.streamer.LayerStreamer`, prepares the slot's template
(:class:`~.templates.TemplateBank`), runs it (without a graph in the forward; with a graph local to the unit in the
backward), releases the slot and hands the weight gradients to the :class:`~.gradients.GradientSink`.

Layers of a pass are *recomputed* (the backward re-runs the segment from its checkpoint, see
:class:`~.segments.Segments`) or *kept* (``EngineConfig.keep_activations``): the last layers of a pass run with their
graph in the forward and keep it, with their weight slot claimed, until their backward, which then needs no
recomputation. At most (unclaimed slots - 2) layers are kept, whole segments only; a pass dropped before its
backward releases their slots. With kept layers configured, the streamer loads a unit into the smallest slot it
fits in, so kept layers take the one-layer slots first and the two large slots stay for the head.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import gradients
from .activations import CheckpointOffloader, materialize, prefetch
from .adapter import DecoderParts
from .config import EngineConfig
from .gradients import GradientSink, add_rows_
from .loss import ChunkedLoss, head_logits
from .moe import ExpertGrad
from .segments import ForwardPass, KeptLayer, LayerFunction, Segments, _rng_replay, local_grads
from .store import HostStore, StoreGroup, check_trainable
from .streamer import LayerStreamer
from .templates import TemplateBank
from .units import Unit, expert_runs


class PassRunner:
    """Runs the streamed units of each pass (see the module docstring).

    Args:
        units: Decoder layers, then the head (``units[-1]``).
        parts: The model's parts (embedding, family specifics).
        store, streamer, bank, sink, offloader: The engine's components.
        config: Engine settings (``checkpoint_every``, ``keep_activations``, ``loss_chunk_tokens``).
        measure_graphs: Measure the GPU memory of one layer's graph in the backward (sizing of kept layers).
        on_grad_pass: Called when a forward pass with gradients starts.
        agree_kept: With sharded streaming: the kept-layer count every process of the node can keep (collective,
            given this process's count; every process starts the same passes), so they all skip the same uploads.
    """

    def __init__(
        self,
        units: list[Unit],
        parts: DecoderParts,
        store: HostStore,
        streamer: LayerStreamer,
        bank: TemplateBank,
        sink: GradientSink,
        offloader: CheckpointOffloader,
        config: EngineConfig,
        measure_graphs: bool,
        on_grad_pass: Callable[[], None],
        agree_kept: Callable[[int], int] | None = None,
    ) -> None:
        self.units, self.parts, self.store, self.streamer = units, parts, store, streamer
        self.bank, self.sink, self.offloader, self.config = bank, sink, offloader, config
        self.device: torch.device = config.device  # type: ignore[assignment]
        self.dtype: torch.dtype = config.compute_dtype  # type: ignore[assignment]
        self.head_uid = len(units) - 1
        self.segments = Segments(parts.num_layers, config.checkpoint_every)
        self.on_grad_pass = on_grad_pass
        self.agree_kept = agree_kept
        self.anchor = torch.zeros(0, requires_grad=True)
        """A leaf that requires grad: every node takes it, so the nodes are part of the graph whatever the inputs."""
        self.stochastic = parts.is_stochastic()
        self.current: ForwardPass | None = None
        """The pass whose layers run now (started at layer 0)."""
        self.record_routers = False
        """The pass keeps its router logits (the aux loss is on)."""
        self.forward_head_uses = 1
        """Head runs the forward of a pass makes after its last layer (the final norm on its own, then the head)."""
        self.keep_layers = config.keep_activations or 0
        """Layers a pass keeps (``keep_activations``, or the count sized after the first step)."""
        self.keep_sized = False
        """``keep_layers`` was sized from the first step's tokens (``graph_tokens``): longer passes keep fewer."""
        self.measure_graphs = measure_graphs
        self.graph_bytes = 0
        """Largest GPU memory one layer's recompute graph took (measured in the backward while ``measure_graphs``)."""
        self.graph_tokens = 0
        """Tokens of the pass ``graph_bytes`` was measured on."""
        self.num_layer_runs = 0
        """Decoder-layer runs that streamed their weights in (forward, recomputation, backward; not kept layers')."""
        embed = store.entry(parts.embed.weight)[0]
        head = units[self.head_uid]
        norm = {id(b.group): b.group for b in head.bindings if b.name.startswith("norm.")}
        self.norm_groups = [g for g in norm.values() if g is not embed]
        self.lm_head_groups = [g for g in head.groups if id(g) not in norm and g is not embed]
        self.embed_group = embed
        self.tied_index = next((j for j, b in enumerate(head.bindings) if b.group is embed), None)
        """Position of the embedding's weight among the head's parameters when the lm_head is tied to it."""
        self.tied_grad: torch.Tensor | None = None
        """The tied weight's FP32 gradient from the head, held on the compute device until the embedding's rows
        are added to it (see :meth:`_hold_tied`)."""

    # ------------------------------------------------------------------------------------------- forward passes
    def layer_call(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor | tuple:
        """Decoder layer ``index`` as the model calls it: layer 0 starts a pass."""
        if index == 0 or self.current is None:
            self.current = self._new_pass(hidden.shape[:-1].numel())
            head = [self.head_uid] * self.forward_head_uses
            self.streamer.plan([*range(index, self.parts.num_layers), *head])
        fpass = self.current
        out = LayerFunction.apply(hidden, self.anchor, fpass, index, kwargs)
        return (out,) if fpass.tuple_output else out

    def _new_pass(self, tokens: int) -> ForwardPass:
        keep = torch.is_grad_enabled()
        segments = self.segments
        if keep:
            self.on_grad_pass()
            self.tied_grad = None  # a backward that did not finish leaves nothing behind for the next
            count = self._kept_count(tokens)
            if self.agree_kept is not None:
                count = self.agree_kept(count)
            segments = segments.kept_from(count)
        fpass = ForwardPass(self, keep, self.parts.model.training, segments)
        fpass.router_logits = {} if self.record_routers else None
        if fpass.segments.first_kept is not None:
            weakref.finalize(fpass, self._release_kept, fpass.kept)
        return fpass

    def _kept_count(self, tokens: int) -> int:
        """Layers a new pass of ``tokens`` tokens keeps: ``keep_layers`` (fewer in proportion for a pass with more
        tokens than the first step's, when sized from it), while two unclaimed slots remain for the others."""
        count = self.keep_layers
        if self.keep_sized and tokens > self.graph_tokens > 0:
            count = count * self.graph_tokens // tokens  # a layer's graph grows with its tokens
        return min(count, max(0, self.streamer.num_unclaimed() - 2), self.parts.num_layers)

    def _release_kept(self, kept: dict[int, KeptLayer]) -> None:
        """Frees the slots of kept layers whose backward never ran (the pass was dropped)."""
        for layer in kept.values():
            self.streamer.release(layer.slot)
        kept.clear()

    # ---------------------------------------------------------------------------------------------- embedding
    def embed_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_trainable(*self.store.entry(self.parts.embed.weight))  # before any compute of a pass it would fail
        self.store.wait_updated(self.embed_group, poll=self.streamer.workers.check)
        ids = input_ids.to("cpu").reshape(-1)
        weight = self.parts.embed.weight.detach()
        scale = self.parts.embed_scale()
        out = torch.empty(ids.numel(), weight.shape[-1], dtype=self.dtype, device=self.device)
        # The rows in FP32 a chunk at a time: the whole batch's were a transient of 6 bytes per token and hidden unit
        # on the host (FP32 rows, then their compute-dtype cast; 0.66 GiB at 16 x 2048 tokens of the Qwen2.5-7B shape)
        for span in gradients.row_spans(ids.numel(), weight.shape[-1], gradients.EMBEDDING_FOLD_NUMEL):
            rows = F.embedding(ids[span], weight)
            if scale is not None:
                rows = rows.float() * scale  # (a frozen embedding is held in the compute dtype: scale in FP32 anyway)
            out[span].copy_(rows.to(self.dtype))
        return out.view(*input_ids.shape, weight.shape[-1])

    def embed_backward(self, input_ids: torch.Tensor, grad_hidden: torch.Tensor) -> None:
        weight = self.parts.embed.weight
        if not weight.requires_grad:
            return
        scale = self.parts.embed_scale()
        if scale is not None:
            grad_hidden = grad_hidden * scale
        padding_idx = self.parts.padding_idx()
        tied = self.tied_grad
        if tied is None:  # the rows go to the host and are scattered into its FP32 gradient there
            self.sink.submit_embedding(self.store.entry(weight), input_ids, grad_hidden, padding_idx)
            return
        ids = input_ids.reshape(-1).to(tied.device)
        rows = grad_hidden.reshape(ids.numel(), -1)
        if padding_idx is not None:  # nn.Embedding gives its padding row no gradient (the lm_head's row keeps its own)
            keep = ids != padding_idx
            ids, rows = ids[keep], rows[keep]
        add_rows_(tied, ids, rows)
        self.flush_tied()

    def finish_backward(self) -> None:
        self.flush_tied()
        self.sink.finish()

    def flush_tied(self) -> None:
        """Sends a held tied-head gradient to the sink: a backward without the embedding's node (``inputs_embeds``)
        ends with the head's part alone, and whatever reads or discards the gradients (step, clipping, zero_grad,
        synchronize) must see it first."""
        tied, self.tied_grad = self.tied_grad, None
        if tied is not None:
            self.sink.submit_fp32(self.store.entry(self.parts.embed.weight), tied, final=[self.embed_group])

    def _hold_tied(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Takes the tied embedding's gradient out of the head's ``grads`` (in bindings order) and holds it in FP32
        on the compute device (added to one already held: several passes in one backward), when the sink lands
        gradients directly and this weight has none on the host yet. The embedding's backward then adds its rows
        there and the sum crosses to the host once, in FP32: no compute-dtype copy of the head's part on the host,
        no upcast and no scatter there (CPU work at the end of the backward, which the next forward waits for)."""
        j = self.tied_index
        if j is None or grads[j] is None:
            return grads
        _, sp = self.store.entry(self.parts.embed.weight)
        if self.tied_grad is None and not (self.sink.direct and not sp.has_grad and self.sink.shared is None):
            return grads
        grads = list(grads)
        g, grads[j] = grads[j].float(), None
        self.tied_grad = g if self.tied_grad is None else self.tied_grad.add_(g)
        return grads

    # ------------------------------------------------------------------------------------------ decoder layers
    def layer_forward(self, fpass: ForwardPass, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        first_kept = fpass.segments.first_kept
        if fpass.keep and first_kept is not None and index >= first_kept:  # keeps its graph and slot
            return self._run_layer(fpass, index, hidden, kwargs, grad=False, keep=True)
        if fpass.keep:
            fpass.kwargs[index] = kwargs
            if index == 0:
                fpass.offload = self.offloader.decide(hidden, self.segments.num_checkpoints)
            if index % self.config.checkpoint_every == 0:
                fpass.inputs[index] = self.offloader.offload(hidden) if fpass.offload else hidden
        return self._run_layer(fpass, index, hidden, kwargs, grad=False)

    def layer_backward(self, fpass: ForwardPass, index: int, grad_out: torch.Tensor) -> torch.Tensor:
        if index in fpass.kept:
            layer = fpass.kept.pop(index)
            return self._local_backward(
                fpass, index, layer.slot, layer.x, layer.out, layer.routed, layer.hits, grad_out
            )
        k = self.config.checkpoint_every
        start = fpass.segments.start_of(index)
        if index not in fpass.inputs:
            hidden = materialize(fpass.inputs[start])
            prefetch(fpass.inputs.get(start - k))  # the previous segment's checkpoint comes back meanwhile
            for j in range(start, index):
                hidden = self._run_layer(fpass, j, hidden, fpass.kwargs[j], grad=False)
                fpass.inputs[j + 1] = hidden
        elif index == start:
            prefetch(fpass.inputs.get(start - k))
        x = materialize(fpass.inputs.pop(index)).detach().requires_grad_(True)
        _, grad_in = self._run_layer(fpass, index, x, fpass.kwargs.pop(index), grad=True, grad_out=grad_out)
        return grad_in

    def plan_backward(self, fpass: ForwardPass) -> None:
        order = [self.head_uid] * fpass.head_nodes + [i for i, _ in fpass.segments.backward_order()]
        self.streamer.plan(order)
        recomputed = fpass.segments.recomputed  # kept layers hold their slots already
        if recomputed:
            prefetch(fpass.inputs.get(fpass.segments.start_of(recomputed - 1)))

    def _run_layer(
        self, fpass: ForwardPass, index: int, hidden: torch.Tensor, kwargs: dict, grad: bool, grad_out=None, keep=False
    ):
        slot = self.streamer.acquire(index)
        module, _ = self.bank.prepare(slot, index)
        module.train(fpass.train_mode)
        self.num_layer_runs += not keep
        rng = _rng_replay(fpass, index, self.device, enabled=self.stochastic and fpass.train_mode and fpass.keep)
        hits: dict[str, set[int]] = {}
        self.bank.active = (slot, self.units[index], hits) if self.units[index].experts else None
        try:
            if keep:
                return self._run_kept(fpass, index, slot, module, hidden, kwargs, rng, hits)
            return self._run_template(fpass, index, slot, module, hidden, kwargs, grad, grad_out, rng, hits)
        finally:
            self.bank.active = None

    def _run_template(self, fpass, index, slot, module, hidden, kwargs, grad, grad_out, rng, hits):
        with rng, self.bank.routers.record() as routed:
            if not grad:
                with torch.no_grad():
                    out = module(hidden, **kwargs)
                self.streamer.release(slot)
                if fpass.router_logits is not None and routed and not fpass.backward_started:
                    fpass.router_logits[index] = routed
                if isinstance(out, tuple):
                    fpass.tuple_output = True
                    out = out[0]
                return out
            measure = self.measure_graphs  # CUDA only: the first backward measures one layer's graph
            before = torch.cuda.memory_allocated(self.device) if measure else 0
            with torch.enable_grad():
                out = module(hidden, **kwargs)
                graph = torch.cuda.memory_allocated(self.device) - before if measure else 0
                if graph > self.graph_bytes:
                    self.graph_bytes, self.graph_tokens = graph, hidden.shape[:-1].numel()
                out = out[0] if isinstance(out, tuple) else out
                grad_in = self._local_backward(fpass, index, slot, hidden, out, routed, hits, grad_out)
        return out, grad_in

    def _run_kept(self, fpass: ForwardPass, index: int, slot, module, hidden, kwargs, rng, hits) -> torch.Tensor:
        """The forward of a kept layer (acquired and prepared by ``_run_layer``): runs it with a graph local to it
        and keeps graph and slot for its backward."""
        try:
            with rng, self.bank.routers.record() as routed, torch.enable_grad():
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
        fpass.kept[index] = KeptLayer(slot, x, out, routed, hits)
        return out.detach()

    def _local_backward(self, fpass, index, slot, x, out, routed, hits, grad_out) -> torch.Tensor:
        """Backward through one layer's own graph (recomputed, or kept from the forward): the gradient of its input
        ``x`` and of its weights, which go to the host; the layer's slot is released."""
        params = self.bank.params(slot, index)
        router_grads = fpass.router_grads.pop(index, [])  # d(aux loss)/d(router logits), see .moe
        outputs, grad_outputs = [out, *routed[: len(router_grads)]], [grad_out, *router_grads]
        grad_in, grads = local_grads(outputs, grad_outputs, x, params, allow_unused=True)
        self.streamer.release(slot)
        self._submit(index, grads, hits)
        return grad_in

    # ------------------------------------------------------------------------------------------ norm and head
    def norm_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slot = self.streamer.acquire(self.head_uid)
        head, _ = self.bank.prepare(slot, self.head_uid)
        with torch.no_grad():
            out = head["norm"](hidden)
        self.streamer.release(slot)
        return out

    def norm_backward(self, hidden: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        slot = self.streamer.acquire(self.head_uid)
        head, params = self.bank.prepare(slot, self.head_uid)
        x = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            grad_x, grads = local_grads(head["norm"](x), grad_out, x, params, allow_unused=True)
        self.streamer.release(slot)
        self._submit(self.head_uid, self._hold_tied(grads), final=self.norm_groups)
        return grad_x

    def head_loss_forward(self, loss_fn: ChunkedLoss, hidden: torch.Tensor) -> torch.Tensor:
        slot = self.streamer.acquire(self.head_uid)
        head, _ = self.bank.prepare(slot, self.head_uid)
        with torch.no_grad():
            loss = loss_fn.forward(head, hidden)
        self.streamer.release(slot)
        return loss

    def head_loss_backward(self, loss_fn: ChunkedLoss, hidden: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
        slot = self.streamer.acquire(self.head_uid)
        head, params = self.bank.prepare(slot, self.head_uid)
        grad_hidden, grads = loss_fn.backward(head, params, hidden, grad_loss)
        self.streamer.release(slot)
        grads = [None if g is None else g.to(self.dtype) for g in self._hold_tied(grads)]
        self._submit(self.head_uid, grads, final=None if loss_fn.norm else self.lm_head_groups)
        return grad_hidden

    def head_logits_forward(self, hidden: torch.Tensor, norm: bool) -> torch.Tensor:
        slot = self.streamer.acquire(self.head_uid)
        head, _ = self.bank.prepare(slot, self.head_uid)
        with torch.no_grad():
            logits = head_logits(head, hidden, self.parts.logit_softcap(), norm)
        self.streamer.release(slot)
        return logits

    def head_logits_backward(self, hidden: torch.Tensor, grad_logits: torch.Tensor, norm: bool) -> torch.Tensor:
        slot = self.streamer.acquire(self.head_uid)
        head, params = self.bank.prepare(slot, self.head_uid)
        x = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head_logits(head, x, self.parts.logit_softcap(), norm)
            grad_x, grads = local_grads(logits, grad_logits, x, params, allow_unused=not norm)
        self.streamer.release(slot)
        self._submit(self.head_uid, self._hold_tied(grads), final=None if norm else self.lm_head_groups)
        return grad_x

    # ------------------------------------------------------------------------------------------------- gradients
    def _submit(
        self,
        uid: int,
        grads: list[torch.Tensor | None],
        hits: dict[str, set[int]] | None = None,
        final: list[StoreGroup] | None = None,
    ) -> None:
        """Hands a unit's weight gradients to the sink. ``final``: the groups complete once they land (default: every
        group of the unit but the embedding's, which also receives the embedding's own gradient at the very end of
        the backward: a tied lm_head)."""
        unit = self.units[uid]
        if unit.experts and hits is not None:
            grads = list(grads)
            position = {id(b): j for j, b in enumerate(unit.bindings)}
            for eset in unit.experts:
                runs = expert_runs(list(hits.get(eset.path, ())))
                for b in eset.bindings:
                    j = position[id(b)]
                    if grads[j] is not None:  # exactly zero outside the experts that received tokens
                        grads[j] = ExpertGrad(grads[j], runs, eset.num_experts)
        targets = [(b.group, b.entry) for b in unit.bindings]
        final = [g for g in unit.groups if g is not self.embed_group] if final is None else final
        self.sink.submit(targets, grads, final=final)
