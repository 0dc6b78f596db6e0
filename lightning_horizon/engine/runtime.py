"""The streaming engine: one object that turns a Hugging Face causal LM into a host-memory-backed, streamed model.

``HorizonEngine(model, config)`` moves the model's weights into a :class:`~.store.HostStore` (FP32, the only
persistent copy), builds the GPU slots and templates (:class:`~.streamer.LayerStreamer`), the gradient path
(:class:`~.gradients.GradientSink`) and the CPU optimizer (:class:`~.optimizer.LayerOptimizer`), and replaces what
the embedding, the decoder layers, the final norm and the model's ``forward`` do when called. The model object keeps
its parameters (now views into the store), names, ``state_dict`` and config; its own decoder ``forward`` still builds
the attention masks and rotary embeddings, so packing, padding and model-specific arguments work unchanged.

The engine knows nothing about Lightning. A plain PyTorch loop::

    engine = HorizonEngine(model, EngineConfig(device="cuda"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        engine.clip_grad_norm_(1.0)
        engine.step(optimizer)      # instead of optimizer.step(); zero_grad() is optional
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import CheckpointOffloader, materialize, prefetch
from .adapter import DecoderParts, bind_layer_state, describe, find_causal_lm, is_peft_wrapper, module_state
from .config import EngineConfig, as_dtype  # noqa: F401  (re-exported)
from .gradients import ExpertGrad, GradientSink
from .hooks import ModelHooks, check_not_streamed
from .loss import ChunkedLoss, head_logits
from .moe import RouterTap
from .optimizer import LayerOptimizer, clip_coefficient
from .pinned import unregister_pinned
from .residency import Residency
from .segments import ForwardPass, _rng_replay, local_grads, segment_backward_order
from .store import HostStore, StoreGroup
from .streamer import LayerStreamer
from .templates import Templates
from .units import Unit, expert_runs, make_unit

MAX_SLAB_NUMEL = 256 * 2**20
"""Largest pinned gradient slab (elements): 512 MiB in BF16; bigger layers are sent in several slabs."""


class HorizonEngine(ModelHooks, Residency, Templates):
    """Streams a Hugging Face decoder-only causal LM from host memory (see the module docstring).

    Args:
        model: A ``...ForCausalLM`` whose parameters are on the CPU (or a PEFT model around one: the causal LM inside
            it is streamed). Its parameters become views into the store.
        config: Engine settings.
    """

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = EngineConfig(**overrides)
        elif overrides:
            raise TypeError("pass either an EngineConfig or keyword overrides, not both")
        self.config = config
        self._closed = False
        self.device: torch.device = config.device  # type: ignore[assignment]
        self.dtype: torch.dtype = config.compute_dtype  # type: ignore[assignment]
        for name, p in model.named_parameters():
            if p.device.type != "cpu":
                raise ValueError(
                    f"parameter {name!r} is on {p.device}; build the model on the CPU, the engine keeps masters in "
                    "host memory and streams layers to the compute device"
                )
        if is_peft_wrapper(model):
            model = find_causal_lm(model)
        self.parts: DecoderParts = describe(model)
        check_not_streamed(self.parts.model)
        self.model = model
        # adopt: a model loaded straight into the store's layout (lightning_horizon.loading) is taken over, not copied
        self.store = HostStore.adopt(self.parts.store_groups(), pin=config.pin_masters and self.device.type == "cuda")
        self.units: list[Unit] = [
            make_unit(i, f"layers.{i}", self.parts.layer_structure_key(i), layer, self.store)
            for i, layer in enumerate(self.parts.layers)
        ]
        if config.sparse_experts:
            for i, unit in enumerate(self.units):
                unit.experts = self._expert_sets(i, unit)
        head = nn.ModuleDict({"norm": self.parts.norm, "lm_head": self.parts.lm_head})
        self.head_uid = len(self.units)
        self.units.append(make_unit(self.head_uid, "head", ("head",), head, self.store))
        self._head_state = module_state(head, buffers=False)
        self._norm_groups = list(
            {id(b.group): b.group for b in self.units[-1].bindings if b.name.startswith("norm.")}.values()
        )
        self._lm_head_groups = [g for g in self.units[-1].groups if g not in self._norm_groups]
        self.streamer = LayerStreamer(self.units, self.store, self.device, self.dtype, config.num_slots)
        # A slab holds one decoder layer's gradient (capped): the head's larger gradient travels in several slabs.
        slab = min(self._layer_slot_numel(), MAX_SLAB_NUMEL)
        if config.weight_copy:
            self._make_copies()
        self.sink = GradientSink(
            self.store, self.device, self.dtype, slab, config.num_grad_slabs, direct=not config.accumulate_grads
        )
        self.sink.track_norms = config.track_grad_norm
        self.sink.on_final = self._on_final
        self.sink.scattered = {id(self.store.entry(self.parts.embed.weight)[0])}
        self.sink.allocate()
        self.offloader = CheckpointOffloader(self.device, config.offload_checkpoints)
        self._overlap = False
        self._grad_passes = 0
        """Forward passes with gradients since :meth:`begin_step`: updates overlap the backward only with one."""
        self.num_overlapped_updates = 0
        self._overlapped_at_begin = 0
        """Group updates started during a backward (rather than after it)."""
        self.optim = LayerOptimizer(self.store, self.device)
        kernels = config.host_kernels if config.host_kernels is not None else self.device.type == "cuda"
        if kernels:
            from .host_kernels import host_kernels_available

            kernels = host_kernels_available()  # builds the kernels now, not on the first step
        threads = config.host_threads
        self.optim.use_fused, self.optim.threads = kernels, threads
        self.sink.kernels, self.sink.threads = kernels, threads
        self.streamer.kernels, self.streamer.pack_threads = kernels, threads
        self.streamer.extra_checks = (self.sink.worker, self.optim.worker)
        self.sink.extra_checks = (self.streamer.worker, self.optim.worker)
        self.streamer.poll = self.optim.worker.check
        self.anchor = torch.zeros(0, requires_grad=True)
        self._current: ForwardPass | None = None
        self._stochastic = self.parts.is_stochastic()
        self._moved_buffers: list[tuple[nn.Module, str, torch.device]] = []
        self.routers = RouterTap([], self.parts.router_spec())
        self._setup_templates(config)
        cuda = self.device.type == "cuda"
        self._resident_pending = config.resident_layers is None and cuda
        self._keep_pending = config.keep_activations is None and cuda
        self._keep_layers = config.keep_activations or 0
        self.streamer.prefer_small_slots = config.keep_activations != 0
        self._graph_bytes = 0
        """Largest GPU memory one layer's recompute graph took (measured in the first backward, CUDA)."""
        self._graph_tokens = 0
        """Tokens of the pass ``_graph_bytes`` was measured on."""
        if config.resident_layers:
            self._add_resident_slots(config.resident_layers)
        self._record_routers = False
        self._watched: list[_ZeroGradWatch] = []
        self._install()

    # ------------------------------------------------------------------------------------------ public API
    def begin_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Announces that the next backward completes the gradients of a step of ``optimizer`` and that nothing
        (no clipping, no gradient edits) happens between that backward and :meth:`step`: each group's update then
        starts as soon as its gradients are on the host, overlapping the rest of the backward. When the loss comes
        from more than one forward pass of the model, a group's gradient is complete only at the end of the whole
        backward, so the updates then wait for :meth:`step`."""
        self.optim.begin(optimizer)
        self._overlap = True
        self._grad_passes = 0
        self._overlapped_at_begin = self.num_overlapped_updates

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Schedules ``optimizer``'s step on the CPU; equivalent to ``optimizer.step()`` after the full backward. The
        step consumes the gradients of ``optimizer``'s parameters (as if ``zero_grad()`` followed it); the other
        parameters' gradients stay for another optimizer's step."""
        self.watch(optimizer)
        self.finish_backward()
        self._overlap = False
        self.optim.step(optimizer)
        if self._keep_pending or self._resident_pending:  # the first step's memory peak is known now
            self._size_from_first_step()

    def gradient(self, param: nn.Parameter) -> torch.Tensor | None:
        """The current FP32 gradient of ``param`` (``param.grad`` is only set where the gradients are kept in FP32)."""
        group, sp = self.store.entry(param)
        return self.sink.gradient(group, sp)

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.Tensor:
        """Clips the current gradients (of ``optimizer``'s parameters, or of every parameter) by their global norm, as
        ``torch.nn.utils.clip_grad_norm_`` does.

        The scaling itself is applied by the CPU optimizer, group by group, just before each update (a gradient
        discarded by ``zero_grad`` drops its scaling with it). Returns the total norm before clipping.
        """
        self.finish_backward()
        entries = self._grad_entries(optimizer)
        norms = []
        for group, sp in entries:
            tracked = self.sink.track_norms and norm_type == 2.0 and sp.grad_norm is not None  # recorded as it landed
            norm = sp.grad_norm if tracked else torch.linalg.vector_norm(self.sink.gradient(group, sp), norm_type)
            norms.append(norm if sp.clip_coef is None else norm * sp.clip_coef.to(norm.device))  # clipped before
        total, coef = clip_coefficient(norms, float(max_norm), norm_type)
        if float(coef) < 1.0:
            for _, sp in entries:
                sp.clip_coef = coef if sp.clip_coef is None else sp.clip_coef * coef
        return total

    def clip_grad_value_(self, clip_value: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Clamps the current gradients (of ``optimizer``'s parameters, or of every parameter) to
        ``[-clip_value, clip_value]``, as ``torch.nn.utils.clip_grad_value_`` does (applied by the optimizer)."""
        self.finish_backward()
        for _, sp in self._grad_entries(optimizer):
            if sp.clip_coef is not None or sp.clip_value is not None:
                raise ValueError(
                    "the horizon engine clips a gradient once per step: clip_grad_value_ after another clipping of "
                    "the same gradients is not supported"
                )
            sp.clip_value = float(clip_value)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Makes ``optimizer.zero_grad()`` discard the engine's host gradients of its parameters too, as PyTorch
        discards ``param.grad`` (the strategy watches every optimizer; :meth:`step` watches the ones it steps).
        :meth:`close` gives the optimizer its own ``zero_grad`` back."""
        if not any(w.optimizer() is optimizer for w in self._watched):
            self._watched.append(_ZeroGradWatch(self, optimizer))

    def discard_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Forgets the current gradients of ``optimizer``'s parameters (or of every parameter): the next backward
        writes them afresh, and a step before it skips them (what ``zero_grad()`` means)."""
        self.sink.wait()
        params = (p for g in optimizer.param_groups for p in g["params"]) if optimizer is not None else None
        for sp in self.store.params(params):
            sp.discard()

    def finish_backward(self) -> None:
        """Waits until every gradient is on the host and exposes them as ``param.grad``."""
        self.sink.wait()
        for group in self.store.groups:
            for sp in group.params:
                if not sp.fresh and sp.trainable:
                    sp.param.grad = self.sink.fp32_view(group, sp)

    def synchronize(self) -> None:
        """Waits for pending gradient folds and optimizer updates: the masters are then final."""
        self.sink.wait()
        self.optim.wait()

    def invalidate(self) -> None:
        """Call after changing masters outside the engine's optimizer (e.g. loading a checkpoint)."""
        self.synchronize()
        self.streamer.invalidate()
        for group in self.store.groups:
            if group.copy is not None:
                if group.h2d_event is not None:
                    group.h2d_event.synchronize()
                group.copy.copy_(group.master)

    def close(self) -> None:
        """Waits for pending updates (the masters are then final), stops the workers, frees the host gradients,
        weight copies and pinned registrations, gives the model its own forward methods and buffers back and the
        watched optimizers their own ``zero_grad``. The model stays usable as an ordinary CPU model (its parameters
        remain views into the store's FP32 buffers), and a later engine adopts those buffers without a copy."""
        if self._closed:
            return
        self._closed = True
        try:
            self.synchronize()
        finally:
            self.streamer.close()
            self.sink.close()
            self.optim.close()
            self.store.close()
            for group in self.store.groups:
                if group.copy is not None:
                    unregister_pinned(group.copy)
                for sp in group.params:
                    sp.param.grad = None
                    sp.discard()
                group.copy = group.grad = group.grad_lp = None
            self._uninstall()
            for hook in self._expert_hooks:
                hook.remove()
            self._expert_hooks = []
            self.routers.close()
            for watch in self._watched:
                watch.restore()
            self._watched = []
            self._current = self._finished = None

    @property
    def stats(self) -> dict[str, float]:
        """Cumulative counters: bytes moved, uploads, and seconds spent by each worker and waiting for one."""
        return {
            "bytes_h2d": self.streamer.bytes_h2d,
            "bytes_d2h": self.sink.bytes_d2h,
            "num_uploads": self.streamer.num_uploads,
            "num_optimizer_steps": self.optim.num_steps,
            "num_overlapped_updates": self.num_overlapped_updates,
            "bytes_checkpoints_offloaded": self.offloader.bytes_offloaded,
            "prefetch_busy_s": self.streamer.worker.busy_s,
            "pack_s": self.streamer.pack_s,
            "prefetch_update_wait_s": self.streamer.update_wait_s,
            "compute_wait_s": self.streamer.wait_s,
            "fold_busy_s": self.sink.worker.busy_s,
            "optimizer_busy_s": self.optim.worker.busy_s,
        }

    # ------------------------------------------------------------------------------ called by the autograd nodes
    def embed_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        group, _ = self.store.entry(self.parts.embed.weight)
        self.store.wait_updated(group, poll=self.optim.worker.check)
        ids = input_ids.to("cpu")
        rows = F.embedding(ids, self.parts.embed.weight.detach())
        scale = self.parts.embed_scale()
        if scale is not None:
            rows = rows * scale
        return rows.to(self.dtype).to(self.device)

    def embed_backward(self, input_ids: torch.Tensor, grad_hidden: torch.Tensor) -> None:
        weight = self.parts.embed.weight
        if not weight.requires_grad:
            return
        scale = self.parts.embed_scale()
        if scale is not None:
            grad_hidden = grad_hidden * scale
        self.sink.submit_embedding(self.store.entry(weight), input_ids, grad_hidden, self.parts.padding_idx())

    def layer_forward(self, fpass: ForwardPass, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if fpass.keep and index >= fpass.first_kept:  # keeps its graph and slot for the backward (.residency)
            return self._run_layer(fpass, index, hidden, kwargs, grad=False, keep=True)
        if fpass.keep:
            fpass.kwargs[index] = kwargs
            k = self.config.checkpoint_every
            if index == 0:
                fpass.offload = self.offloader.decide(hidden, -(-self.parts.num_layers // k))
            if index % k == 0:
                fpass.inputs[index] = self.offloader.offload(hidden) if fpass.offload else hidden
        return self._run_layer(fpass, index, hidden, kwargs, grad=False)

    def layer_backward(self, fpass: ForwardPass, index: int, grad_out: torch.Tensor) -> torch.Tensor:
        if index in fpass.kept:
            return self._kept_backward(fpass, index, grad_out)
        k = self.config.checkpoint_every
        start = index - index % k
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

    def head_loss_forward(self, loss_fn: ChunkedLoss, hidden: torch.Tensor) -> torch.Tensor:
        slot, head, _ = self._acquire(self.head_uid)
        with torch.no_grad():
            loss = loss_fn.forward(head, hidden)
        self.streamer.release(slot)
        return loss

    def head_loss_backward(self, loss_fn: ChunkedLoss, hidden: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
        slot, head, params = self._acquire(self.head_uid)
        grad_hidden, grads = loss_fn.backward(head, params, hidden, grad_loss)
        self.streamer.release(slot)
        grads = [None if g is None else g.to(self.dtype) for g in grads]
        self._submit(self.head_uid, grads, final=None if loss_fn.norm else self._lm_head_groups)
        return grad_hidden

    def head_logits_forward(self, hidden: torch.Tensor, norm: bool) -> torch.Tensor:
        slot, head, _ = self._acquire(self.head_uid)
        with torch.no_grad():
            logits = head_logits(head, hidden, self.parts.logit_softcap(), norm)
        self.streamer.release(slot)
        return logits

    def head_logits_backward(self, hidden: torch.Tensor, grad_logits: torch.Tensor, norm: bool) -> torch.Tensor:
        slot, head, params = self._acquire(self.head_uid)
        x = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head_logits(head, x, self.parts.logit_softcap(), norm)
            grad_x, grads = local_grads(logits, grad_logits, x, params, allow_unused=not norm)
        self.streamer.release(slot)
        self._submit(self.head_uid, grads, final=None if norm else self._lm_head_groups)
        return grad_x

    def norm_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slot, head, _ = self._acquire(self.head_uid)
        with torch.no_grad():
            out = head["norm"](hidden)
        self.streamer.release(slot)
        return out

    def norm_backward(self, hidden: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        slot, head, params = self._acquire(self.head_uid)
        x = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            grad_x, grads = local_grads(head["norm"](x), grad_out, x, params, allow_unused=True)
        self.streamer.release(slot)
        self._submit(self.head_uid, grads, final=self._norm_groups)
        return grad_x

    def plan_backward(self, fpass: ForwardPass) -> None:
        k = self.config.checkpoint_every
        recomputed = min(fpass.first_kept, self.parts.num_layers)  # kept layers hold their slots already
        order = [self.head_uid] * fpass.head_nodes + [i for i, _ in segment_backward_order(recomputed, k)]
        self.streamer.plan(order)
        if recomputed:
            prefetch(fpass.inputs.get((recomputed - 1) // k * k))

    # ----------------------------------------------------------------------------------------------- internals
    def _run_layer(
        self, fpass: ForwardPass, index: int, hidden: torch.Tensor, kwargs: dict, grad: bool, grad_out=None, keep=False
    ):
        slot, module, _ = self._acquire(index)
        module.train(fpass.train_mode)
        rng = _rng_replay(fpass, index, self.device, enabled=self._stochastic and fpass.train_mode and fpass.keep)
        hits: dict[str, set[int]] = {}
        self._sparse_active = (slot, self.units[index], hits) if self.units[index].experts else None
        try:
            if keep:
                return self._run_kept(fpass, index, slot, module, hidden, kwargs, rng, hits)
            return self._run_template(fpass, index, slot, module, hidden, kwargs, grad, grad_out, rng, hits)
        finally:
            self._sparse_active = None

    def _run_template(self, fpass, index, slot, module, hidden, kwargs, grad, grad_out, rng, hits):
        with rng, self.routers.record() as routed:
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
            measure = self._keep_pending  # CUDA only: the first backward measures one layer's graph
            before = torch.cuda.memory_allocated(self.device) if measure else 0
            with torch.enable_grad():
                out = module(hidden, **kwargs)
                graph = torch.cuda.memory_allocated(self.device) - before if measure else 0
                if graph > self._graph_bytes:
                    self._graph_bytes, self._graph_tokens = graph, hidden.shape[:-1].numel()
                out = out[0] if isinstance(out, tuple) else out
                grad_in = self._local_backward(fpass, index, slot, hidden, out, routed, hits, grad_out)
        return out, grad_in

    def _local_backward(self, fpass, index, slot, x, out, routed, hits, grad_out) -> torch.Tensor:
        """Backward through one layer's own graph (recomputed, or kept from the forward): the gradient of its input
        ``x`` and of its weights, which go to the host; the layer's slot is released."""
        params = self._template_params[(slot.index, self.units[index].structure)]
        router_grads = fpass.router_grads.pop(index, [])  # d(aux loss)/d(router logits), see .moe
        outputs, grad_outputs = [out, *routed[: len(router_grads)]], [grad_out, *router_grads]
        grad_in, grads = local_grads(outputs, grad_outputs, x, params, allow_unused=True)
        self.streamer.release(slot)
        self._submit(index, grads, hits)
        return grad_in

    def _acquire(self, uid: int) -> tuple[Any, nn.Module, list[nn.Parameter]]:
        """The slot holding unit ``uid``, its template set up to run as that unit (its buffers, identity and adapter
        state bound; each parameter trainable exactly when the model's own one is now) and the template's
        parameters in binding order."""
        slot, module = self.streamer.acquire(uid)
        unit = self.units[uid]
        bind_layer_state(module, self._head_state if uid == self.head_uid else self._layer_state[uid])
        params = self._template_params[(slot.index, unit.structure)]
        for p, b in zip(params, unit.bindings):
            if p.requires_grad != b.entry.param.requires_grad:  # frozen or unfrozen since the template was made
                p.requires_grad_(b.entry.param.requires_grad)
        return slot, module, params

    def _submit(
        self,
        uid: int,
        grads: list[torch.Tensor | None],
        hits: dict[str, set[int]] | None = None,
        final: list[StoreGroup] | None = None,
    ) -> None:
        """Hands a unit's weight gradients to the sink. ``final``: the groups complete once they land (default: every
        group of the unit but the embedding's)."""
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
        embed = self.store.entry(self.parts.embed.weight)[0]
        # Every group of a unit is complete after its backward, except the embedding (tied lm_head): that one also
        # receives the embedding's own gradient at the very end of the backward.
        final = unit.groups if final is None else final
        self.sink.submit(targets, grads, final=[g for g in final if g is not embed])

    def _on_final(self, groups) -> None:
        if self._overlap:
            self.optim.schedule(groups)
            self.num_overlapped_updates += len(groups)

    def _make_copies(self) -> None:
        from .pinned import pinned_empty

        with torch.inference_mode(False):
            for group in self.store.groups:
                group.copy = pinned_empty(group.master.numel(), self.dtype, pin=self.device.type == "cuda")
                group.copy.copy_(group.master)

    def _grad_entries(self, optimizer: torch.optim.Optimizer | None):
        params = None if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
        return [self.store.entry(sp.param) for sp in self.store.params(params) if sp.trainable and not sp.fresh]


class _ZeroGradWatch:
    """``optimizer.zero_grad`` replaced by one that first discards the engine's gradients of its parameters."""

    def __init__(self, engine: HorizonEngine, optimizer: torch.optim.Optimizer) -> None:
        self.engine = weakref.ref(engine)
        self.optimizer = weakref.ref(optimizer)
        self.own = optimizer.__dict__.get("zero_grad")  # an instance attribute to give back, if there was one
        self.original = optimizer.zero_grad
        optimizer.zero_grad = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        engine, optimizer = self.engine(), self.optimizer()
        if engine is not None and optimizer is not None:
            engine.discard_gradients(optimizer)
        return self.original(*args, **kwargs)

    def restore(self) -> None:
        optimizer = self.optimizer()
        if optimizer is None or optimizer.__dict__.get("zero_grad") is not self:
            return
        if self.own is None:
            del optimizer.zero_grad
        else:
            optimizer.zero_grad = self.own
