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

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import CheckpointOffloader, materialize, prefetch
from .adapter import DecoderParts, bind_layer_state, describe
from .gradients import GradientSink
from .loss import ChunkedLoss, head_logits
from .moe import RouterAuxFunction, RouterTap
from .optimizer import LayerOptimizer, clip_coefficient
from .pinned import unregister_pinned
from .segments import (
    EmbedFunction,
    ForwardPass,
    HeadLogitsFunction,
    HeadLossFunction,
    LayerFunction,
    segment_backward_order,
)
from .store import HostStore
from .streamer import LayerStreamer, Unit, make_unit

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def as_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(_DTYPES)}") from None


@dataclass
class EngineConfig:
    """Settings of the streaming engine (the same names are used by the strategy and the recipes' ``strategy:``)."""

    device: str | torch.device | None = None
    """Compute device; None picks ``cuda`` when available, else ``cpu``."""
    compute_dtype: str | torch.dtype = "bf16"
    """Dtype of the streamed weights and activations (masters stay FP32)."""
    checkpoint_every: int = 1
    """K: keep every K-th layer's input in the forward; backward recomputes the K-1 layers in between."""
    num_slots: int = 2
    """GPU weight slots (2 = double buffering)."""
    num_grad_slabs: int = 3
    """Pinned slabs for gradients in flight to the host."""
    loss_chunk_tokens: int = 2048
    """Rows of logits computed at once by the chunked loss."""
    pin_masters: bool = False
    """Page-lock the FP32 master buffers too (uploads come from pinned BF16 staging, so this is rarely useful)."""
    track_grad_norm: bool = False
    """Record per-parameter gradient norms as gradients land (makes clipping by norm free); the strategy sets it."""
    weight_copy: bool = True
    """Keep a copy of the masters in the compute dtype in pinned host memory (+2 bytes/param for BF16), refreshed
    by the optimizer: uploads then need no FP32 -> BF16 packing on the way. Off: every upload packs from FP32."""
    offload_checkpoints: bool | None = None
    """Move segment checkpoints to pinned host memory during the forward and back one segment ahead in the
    backward, so GPU memory does not grow with depth. None: only when a pass's checkpoints would take more than a
    fifth of the GPU's memory. Ignored on the CPU."""
    fused_optimizer: bool | None = None
    """Step a plain ``torch.optim.AdamW`` with the one-pass CPU kernel of ``cuda/fused_adamw.cpp`` (reads the BF16
    gradient, writes the BF16 weight copy in the same pass; matches ``AdamW(fused=True)`` to ~1 ulp). None: on for
    CUDA compute, off on the CPU (where the tests compare with PyTorch's own AdamW bit for bit)."""
    accumulate_grads: bool = False
    """Gradients are summed over several backward passes per step: keep them in FP32 on the host (4 bytes/param).
    Off: they stay in the compute dtype (2 bytes/param for BF16); a second backward before a step switches over."""

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CUDA device or 'cpu', got {self.device}")
        self.compute_dtype = as_dtype(self.compute_dtype)
        for name in ("checkpoint_every", "loss_chunk_tokens", "num_grad_slabs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (double buffering), got {self.num_slots}")


class HorizonEngine:
    """Streams a Hugging Face decoder-only causal LM from host memory (see the module docstring).

    Args:
        model: A ``...ForCausalLM`` whose parameters are on the CPU. Its parameters become views into the store.
        config: Engine settings.
    """

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = EngineConfig(**overrides)
        elif overrides:
            raise TypeError("pass either an EngineConfig or keyword overrides, not both")
        self.config = config
        self.device: torch.device = config.device  # type: ignore[assignment]
        self.dtype: torch.dtype = config.compute_dtype  # type: ignore[assignment]
        for name, p in model.named_parameters():
            if p.device.type != "cpu":
                raise ValueError(
                    f"parameter {name!r} is on {p.device}; build the model on the CPU, the engine keeps masters in "
                    "host memory and streams layers to the compute device"
                )
        self.parts: DecoderParts = describe(model)
        self.model = model
        # adopt: a model loaded straight into the store's layout (lightning_horizon.loading) is taken over, not copied
        self.store = HostStore.adopt(self.parts.store_groups(), pin=config.pin_masters and self.device.type == "cuda")
        self.units: list[Unit] = [
            make_unit(i, f"layers.{i}", self.parts.layer_structure_key(i), layer, self.store)
            for i, layer in enumerate(self.parts.layers)
        ]
        head = nn.ModuleDict({"norm": self.parts.norm, "lm_head": self.parts.lm_head})
        self.head_uid = len(self.units)
        self.units.append(make_unit(self.head_uid, "head", ("head",), head, self.store))
        self.streamer = LayerStreamer(self.units, self.store, self.device, self.dtype, config.num_slots)
        slab = max(u.numel for u in self.units)
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
        self.num_overlapped_updates = 0
        """Group updates started during a backward (rather than after it)."""
        self.optim = LayerOptimizer(self.store, self.device)
        fused = config.fused_optimizer if config.fused_optimizer is not None else self.device.type == "cuda"
        if fused:
            from .fused_adam import fused_adamw_available

            self.optim.use_fused = fused_adamw_available()  # builds the kernel now, not on the first step
        self.streamer.extra_checks = (self.sink.worker, self.optim.worker)
        self.sink.extra_checks = (self.streamer.worker, self.optim.worker)
        self.streamer.poll = self.optim.worker.check
        self._template_params = {
            (slot.index, u.structure): [_get_param(slot.templates[u.structure], b.name) for b in u.bindings]
            for slot in self.streamer.slots
            for u in self.units
        }
        self.anchor = torch.zeros(0, requires_grad=True)
        self._current: ForwardPass | None = None
        self._stochastic = self.parts.is_stochastic()
        self._moved_buffers: list[tuple[nn.Module, str, torch.device]] = []
        templates = [t for slot in self.streamer.slots for t in slot.templates.values()]
        self.routers = RouterTap(templates, self.parts.router_spec())
        self._record_routers = False
        self._install()

    # ------------------------------------------------------------------------------------------ public API
    def begin_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Announces that the next backward completes the gradients of a step of ``optimizer`` and that nothing
        (no clipping, no gradient edits) happens between that backward and :meth:`step`: each group's update then
        starts as soon as its gradients are on the host, overlapping the rest of the backward."""
        self.optim.begin(optimizer)
        self._overlap = True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Schedules ``optimizer``'s step on the CPU; equivalent to ``optimizer.step()`` after the full backward."""
        self.finish_backward()
        self._overlap = False
        self.optim.step(optimizer)

    def gradient(self, param: nn.Parameter) -> torch.Tensor | None:
        """The current FP32 gradient of ``param`` (``param.grad`` is only set where the gradients are kept in FP32)."""
        group, sp = self.store.entry(param)
        return self.sink.gradient(group, sp)

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.Tensor:
        """Clips the gradients of the next step by their global norm (as ``torch.nn.utils.clip_grad_norm_``).

        The scaling itself is applied by the CPU optimizer, group by group, just before each update.
        Returns the total norm before clipping.
        """
        self.finish_backward()
        entries = self._grad_entries(optimizer)
        norms = []
        for group, sp in entries:
            if norm_type != 2.0 or sp.grad_norm is None or not self.sink.track_norms:
                sp.grad_norm = torch.linalg.vector_norm(self.sink.gradient(group, sp), norm_type)
            norms.append(sp.grad_norm)
        total, coef = clip_coefficient(norms, float(max_norm), norm_type)
        self.optim.clip_coef = coef if float(coef) < 1.0 else None
        return total

    def clip_grad_value_(self, clip_value: float) -> None:
        """Clamps the gradients of the next step to ``[-clip_value, clip_value]`` (applied per group by the optimizer)."""
        self.optim.clip_value = float(clip_value)

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
        """Stops the workers, restores the model's own forward methods and moves buffers back to the CPU."""
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
                    group.copy = None
            for module in (self.parts.embed, self.parts.norm, self.parts.model, *self.parts.layers):
                module.__dict__.pop("forward", None)
            for module, name, device in self._moved_buffers:
                module._buffers[name] = module._buffers[name].to(device)
            for hook in self._hooks:
                hook.remove()
            self.routers.close()

    @property
    def stats(self) -> dict[str, float]:
        """Cumulative counters: bytes moved, uploads, and seconds spent by each worker and waiting for one."""
        return {
            "bytes_h2d": self.streamer.bytes_h2d,
            "bytes_d2h": self.sink.bytes_d2h,
            "num_uploads": self.streamer.num_uploads,
            "num_optimizer_steps": self.optim.num_steps,
            "num_overlapped_updates": self.num_overlapped_updates,
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
        if fpass.keep:
            fpass.kwargs[index] = kwargs
            k = self.config.checkpoint_every
            if index == 0:
                fpass.offload = self.offloader.decide(hidden, -(-self.parts.num_layers // k))
            if index % k == 0:
                fpass.inputs[index] = self.offloader.offload(hidden) if fpass.offload else hidden
        return self._run_layer(fpass, index, hidden, kwargs, grad=False)

    def layer_backward(self, fpass: ForwardPass, index: int, grad_out: torch.Tensor) -> torch.Tensor:
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
        slot, head = self.streamer.acquire(self.head_uid)
        with torch.no_grad():
            loss = loss_fn.forward(head, hidden)
        self.streamer.release(slot)
        return loss

    def head_loss_backward(self, loss_fn: ChunkedLoss, hidden: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
        slot, head = self.streamer.acquire(self.head_uid)
        grad_hidden, grads = loss_fn.backward(head, hidden, grad_loss)
        self.streamer.release(slot)
        self._submit(self.head_uid, [None if g is None else g.to(self.dtype) for g in grads])
        return grad_hidden

    def head_logits_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slot, head = self.streamer.acquire(self.head_uid)
        with torch.no_grad():
            logits = head_logits(head, hidden, self.parts.logit_softcap())
        self.streamer.release(slot)
        return logits

    def head_logits_backward(self, hidden: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        slot, head = self.streamer.acquire(self.head_uid)
        params = self._template_params[(slot.index, ("head",))]
        trainable = [p for p in params if p.requires_grad]
        x = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head_logits(head, x, self.parts.logit_softcap())
            grads = torch.autograd.grad(logits, [x, *trainable], grad_logits)
        self.streamer.release(slot)
        it = iter(grads[1:])
        self._submit(self.head_uid, [next(it) if p.requires_grad else None for p in params])
        return grads[0]

    def plan_backward(self, fpass: ForwardPass) -> None:
        k = self.config.checkpoint_every
        order = [self.head_uid] + [i for i, _ in segment_backward_order(self.parts.num_layers, k)]
        self.streamer.plan(order)
        prefetch(fpass.inputs.get((self.parts.num_layers - 1) // k * k))

    # ----------------------------------------------------------------------------------------------- internals
    def _run_layer(self, fpass: ForwardPass, index: int, hidden: torch.Tensor, kwargs: dict, grad: bool, grad_out=None):
        slot, module = self.streamer.acquire(index)
        bind_layer_state(module, self._layer_state[index])
        module.train(fpass.train_mode)
        rng = _rng_replay(fpass, index, self.device, enabled=self._stochastic and fpass.train_mode and fpass.keep)
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
            params = self._template_params[(slot.index, self.units[index].structure)]
            trainable = [p for p in params if p.requires_grad]
            with torch.enable_grad():
                out = module(hidden, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                router_grads = fpass.router_grads.pop(index, [])  # d(aux loss)/d(router logits), see .moe
                outputs, grad_outputs = [out, *routed[: len(router_grads)]], [grad_out, *router_grads]
                grads = torch.autograd.grad(outputs, [hidden, *trainable], grad_outputs, allow_unused=True)
        self.streamer.release(slot)
        it = iter(grads[1:])
        self._submit(index, [next(it) if p.requires_grad else None for p in params])
        return out, grads[0]

    def _submit(self, uid: int, grads: list[torch.Tensor | None]) -> None:
        unit = self.units[uid]
        targets = [(b.group, b.entry) for b in unit.bindings]
        embed = self.store.entry(self.parts.embed.weight)[0]
        # Every group of a unit is complete after its backward, except the embedding (tied lm_head): that one also
        # receives the embedding's own gradient at the very end of the backward.
        self.sink.submit(targets, grads, final=[g for g in unit.groups if g is not embed])

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
        if optimizer is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            entries = [self.store.entry(p) for p in params]
        else:
            entries = [(g, sp) for g in self.store.groups for sp in g.params]
        return [(g, sp) for g, sp in entries if sp.trainable and not sp.fresh]

    def _layer_call(self, index: int, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if args:
            raise TypeError(f"decoder layer {index} got unexpected positional arguments; pass them by keyword")
        if index == 0 or self._current is None:
            self._current = ForwardPass(self, keep=torch.is_grad_enabled(), train_mode=self.model.training)
            self._current.router_logits = {} if self._record_routers else None
            self.streamer.plan([*range(index, self.parts.num_layers), self.head_uid])
        fpass = self._current
        out = LayerFunction.apply(hidden_states, self.anchor, fpass, index, kwargs)
        return (out,) if fpass.tuple_output else out

    def _embed_call(self, input_ids: torch.Tensor) -> torch.Tensor:
        return EmbedFunction.apply(self.anchor, self, input_ids)

    def _causal_lm_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ):
        from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

        if past_key_values is not None or use_cache:
            raise ValueError("the horizon engine trains without a KV cache: pass use_cache=False / no past_key_values")
        for key in ("output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(key, None)
        aux_spec = self.parts.aux_loss(kwargs.pop("output_router_logits", None))
        to_dev = lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        self._current = None
        self._record_routers = aux_spec is not None
        try:
            out = self.parts.base(
                input_ids=input_ids,
                attention_mask=to_dev(attention_mask),
                position_ids=to_dev(position_ids),
                inputs_embeds=to_dev(inputs_embeds),
                use_cache=False,
                **{k: to_dev(v) for k, v in kwargs.items()},
            )
            hidden = out.last_hidden_state  # before the final norm: the head applies it
            fpass = self._current
            assert fpass is not None
            aux = None
            if aux_spec is not None:  # the routers' load-balancing loss (see .moe)
                hidden, aux = RouterAuxFunction.apply(hidden, self.anchor, fpass, aux_spec, to_dev(attention_mask))
            if labels is not None:
                loss_fn = ChunkedLoss(
                    hidden, labels, num_items_in_batch, self.config.loss_chunk_tokens, self.parts.logit_softcap()
                )
                loss = HeadLossFunction.apply(hidden, self.anchor, fpass, loss_fn)
                if aux is None:
                    return CausalLMOutputWithPast(loss=loss, logits=None)
                loss = loss + aux_spec.coef * aux
                return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=None)
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden = hidden[:, logits_to_keep.to(hidden.device)]
            logits = HeadLogitsFunction.apply(hidden, self.anchor, fpass)
            if aux is None:
                return CausalLMOutputWithPast(loss=None, logits=logits)
            return MoeCausalLMOutputWithPast(loss=None, aux_loss=aux, logits=logits)
        finally:
            self._current = None
            self._record_routers = False

    def _install(self) -> None:
        parts = self.parts
        parts.embed.forward = self._embed_call
        for i, layer in enumerate(parts.layers):
            layer.forward = functools.partial(self._layer_call, i)
        parts.norm.forward = _identity
        parts.model.forward = self._causal_lm_forward
        # Layer buffers move too: templates are bound to layer i's own buffers before running as layer i.
        streamed = {id(m) for top in (parts.embed, parts.norm, parts.lm_head) for m in top.modules()}
        for module in parts.model.modules():
            if id(module) in streamed:
                continue
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device != self.device:
                    self._moved_buffers.append((module, name, buf.device))
                    module._buffers[name] = buf.to(self.device)
        self._layer_state = [parts.layer_state(i) for i in range(parts.num_layers)]
        self._hooks = [
            parts.model.register_state_dict_pre_hook(lambda *a, **k: self.synchronize()),
            parts.model.register_load_state_dict_pre_hook(lambda *a, **k: self.synchronize()),
            parts.model.register_load_state_dict_post_hook(lambda *a, **k: self.streamer.invalidate()),
        ]


def _identity(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def _get_param(module: nn.Module, dotted: str) -> nn.Parameter:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    return module._parameters[leaf]


class _rng_replay:
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
