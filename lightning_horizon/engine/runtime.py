"""The streaming engine: one object that turns a Hugging Face causal LM into a host-memory-backed, streamed model.

``HorizonEngine(model, config)`` composes the components, each owning its state (``docs/architecture.md`` draws
them): the :class:`~.store.HostStore` (FP32 masters, the only persistent copy), the
:class:`~.streamer.LayerStreamer` (GPU slots, prefetch thread), the :class:`~.templates.TemplateBank` (the modules
that run on the slots), the :class:`~.gradients.GradientSink` (gradients to the host), the
:class:`~.optimizer.LayerOptimizer` (the user's optimizer, stepped group by group on a CPU thread), the
:class:`~.passes.PassRunner` (forward and backward of each unit) and the :class:`~.hooks.ModelPatch` (what the
model's modules do when called). The model object keeps its parameters (now views into the store), names,
``state_dict`` and config; its own decoder ``forward`` still builds the attention masks and rotary embeddings, so
packing, padding and model-specific arguments work unchanged.

The engine knows nothing about Lightning. A plain PyTorch loop::

    engine = HorizonEngine(model, EngineConfig(device="cuda"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        engine.clip_grad_norm_(1.0)
        engine.step(optimizer)      # instead of optimizer.step()
        optimizer.zero_grad()
    engine.close()
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch
from torch import nn

from .activations import CheckpointOffloader
from .adapter import DecoderParts, describe, find_causal_lm, is_peft_wrapper
from .config import EngineConfig, as_dtype, resolve
from .data_parallel import DataParallel, data_parallel_config
from .footprint import StoreShape, auto_grad_pool, auto_weight_copy, check_host_memory
from .gradients import GradientSink
from .hooks import ModelPatch, check_not_streamed
from .optimizer import LayerOptimizer, ZeroGradWatch, clip_coefficient, load_optimizer_state
from .passes import PassRunner
from .pinned import pinned_empty, unregister_pinned
from .residency import layers_to_keep, measure_spare_gpu_bytes, resident_slots_to_add
from .store import HostStore
from .streamer import LayerStreamer
from .templates import TemplateBank
from .units import Unit, expert_sets, make_unit
from .workers import WorkerGroup

log = logging.getLogger(__name__)


class HorizonEngine:
    """Streams a Hugging Face decoder-only causal LM from host memory (see the module docstring).

    Args:
        model: A ``...ForCausalLM`` whose parameters are on the CPU (or a PEFT model around one: the causal LM inside
            it is streamed). Its parameters become views into the store.
        config: Engine settings.
        parallel: The processes of a data-parallel run (:class:`~.data_parallel.DataParallel`): the store is then
            shared by the processes of each node, :meth:`reduce_gradients` averages the gradients over every
            process, and each process steps the groups it owns. None: one process.
    """

    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig | None = None,
        *,
        parallel: DataParallel | None = None,
        **overrides: Any,
    ) -> None:
        config = dataclasses.replace(config or EngineConfig(), **overrides)
        if parallel is not None:
            config = data_parallel_config(config, parallel.num_nodes)
        self.parallel = parallel
        self._grads_pending = False
        """A backward ran since the gradients were last averaged over the processes (data parallel only)."""
        self._closed = False
        if parallel is not None:  # rank 0's buffers everywhere; a model built on the meta device gets CPU storage
            parallel.prepare_model(model, config.node_store)
        for name, p in model.named_parameters():
            if p.is_meta and parallel is not None and id(p) in parallel.away_ids:
                continue  # a layer another node holds (a sharded node store)
            if p.device.type != "cpu":
                raise ValueError(
                    f"parameter {name!r} is on {p.device}; build the model on the CPU, the engine keeps masters in "
                    "host memory and streams layers to the compute device"
                )
        root = model
        if is_peft_wrapper(model):
            model = find_causal_lm(model)
        self.parts: DecoderParts = describe(model)
        check_not_streamed(self.parts.model)
        self.model = model
        frozen_dtype = config.frozen_store_dtype()
        self.shape = StoreShape.of(self.parts, frozen=frozen_dtype is not None)
        config = resolve(
            config, functools.partial(self._auto_weight_copy, config), functools.partial(self._auto_grad_pool, config)
        )
        self.config = config
        """The effective settings (every automatic value decided; logged once)."""
        log.info("horizon engine: %s", config.summary())
        self.device: torch.device = config.device  # type: ignore[assignment]
        self.dtype: torch.dtype = config.compute_dtype  # type: ignore[assignment]
        cuda = self.device.type == "cuda"
        pin = cuda and (config.pin_masters or config.cast_on_gpu)  # cast_on_gpu: uploads read the masters by DMA
        if parallel is not None:  # one store per node, shared by its processes
            self.store = parallel.build_store(
                self.parts.store_groups(), frozen_dtype, pin=pin, pin_frozen=cuda, node_store=config.node_store
            )
        else:  # adopt: a model loaded straight into the store's layout (lightning_horizon.loading) is not copied
            self.store = HostStore.adopt(self.parts.store_groups(), pin=pin, frozen_dtype=frozen_dtype, pin_frozen=cuda)
        self.units: list[Unit] = [
            make_unit(i, self.parts.layer_structure_key(i), layer, self.store)
            for i, layer in enumerate(self.parts.layers)
        ]
        if config.sparse_experts:
            for i, unit in enumerate(self.units):
                unit.experts = expert_sets(unit, self.parts.expert_modules(i))
        self.head_uid = len(self.units)
        head = nn.ModuleDict({"norm": self.parts.norm, "lm_head": self.parts.lm_head})
        self.units.append(make_unit(self.head_uid, ("head",), head, self.store))
        if config.weight_copy:
            with torch.inference_mode(False):
                for group in self.store.groups:
                    if not group.frozen:  # a frozen group is its own copy
                        group.copy = pinned_empty(group.master.numel(), self.dtype, pin=cuda)
                        group.copy.copy_(group.master)
        if parallel is not None and cuda and "nccl" not in parallel.node_reduce.backend:
            for name, on, off in (
                ("grad_reduce='device'", config.grad_reduce == "device", "grad_reduce='host'"),
                ("sharded_streaming=True", config.sharded_streaming, "sharded_streaming=False"),
            ):
                if on:
                    raise ValueError(
                        f"{name} runs collectives on the GPUs over NCCL, but the default process group's backend is "
                        f"{parallel.node_reduce.backend!r}: use NCCL (Lightning's default for GPUs; one GPU per "
                        f"process) or {off}"
                    )
        kernels = config.host_kernels
        self.workers = WorkerGroup(self.device)
        self.streamer = LayerStreamer(
            self.units,
            self.store,
            self.device,
            self.dtype,
            config.num_slots,
            self.workers,
            kernels=kernels,
            pack_threads=config.host_threads,
            cast_on_gpu=config.cast_on_gpu,
            prefer_small_slots=config.keep_activations != 0,
            shard=parallel.node_reduce if parallel is not None and config.sharded_streaming else None,
        )
        self.sink = GradientSink(
            self.store,
            self.device,
            self.dtype,
            self.shape.slab_numel,  # a decoder layer: the head's gradient travels in several slabs
            config.num_grad_slabs,
            direct=not config.accumulate_grads,
            workers=self.workers,
            scattered=[self.store.entry(self.parts.embed.weight)[0]],
            on_final=self._on_final,
            track_norms=config.track_grad_norm,
            kernels=kernels,
            threads=config.host_threads,
            pool_buffers=config.pooled_grads,
            pool_numel=self.shape.grad_group_numel,
            updates_follow=self._updates_follow,
            shared=self.store.node_grads if parallel is not None else None,
            reduce=parallel.node_reduce if parallel is not None and config.grad_reduce == "device" else None,
        )
        self.optim = LayerOptimizer(
            self.store,
            self.workers,
            use_fused=kernels,
            threads=config.host_threads,
            state_dtype=config.state_dtype,
            on_consumed=self.sink.consumed,
            owns=parallel.owns if parallel is not None else None,
        )
        self.bank = TemplateBank(self.units, self.parts, self.streamer, self.device, config.compile_layers)
        self.bank.add_slots(self.streamer.slots)
        self._keep_pending = config.keep_activations is None  # (resolved: only on CUDA) sized after the first step
        self._resident_pending = config.resident_layers is None
        self.runner = PassRunner(
            self.units,
            self.parts,
            self.store,
            self.streamer,
            self.bank,
            self.sink,
            CheckpointOffloader(self.device, config.offload_checkpoints),
            config,
            measure_graphs=self._keep_pending,
            on_grad_pass=self._on_grad_pass,
            # (with keep_activations=0 in the resolved config, the same in every process, every count is 0)
            agree_kept=(
                parallel.min_over_node
                if parallel is not None and config.sharded_streaming and config.keep_activations != 0
                else None
            ),
        )
        self._overlap = False
        self._step_params: set[int] = set()
        """Ids of the parameters of the optimizer of :meth:`begin_step` (their updates may overlap the backward)."""
        self._grad_passes = 0
        """Forward passes with gradients since :meth:`begin_step`: updates overlap the backward only with one."""
        self.num_overlapped_updates = 0
        """Group updates started during a backward (rather than after it)."""
        self._overlapped_at_begin = 0
        if config.resident_layers:
            self.add_resident_slots(config.resident_layers)
        self._watched: list[ZeroGradWatch] = []
        self.patch = ModelPatch(
            self.parts,
            self.runner,
            self.device,
            config.loss_chunk_tokens,
            self.synchronize,
            self.streamer.invalidate,
            self.discard_gradients,
        )
        self.patch.install()
        self.patch.guard_zero_grad(root)

    # ------------------------------------------------------------------------------------------ public API
    def begin_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Announces that the next backward completes the gradients of a step of ``optimizer`` and that nothing
        (no clipping, no gradient edits) happens between that backward and :meth:`step`: each group's update then
        starts as soon as its gradients are on the host, overlapping the rest of the backward. When the loss comes
        from more than one forward pass of the model, a group's gradient is complete only at the end of the whole
        backward, so the updates then wait for :meth:`step`. With several processes (``parallel``) the updates always
        wait for :meth:`step`: a gradient is complete only once averaged over the processes."""
        if self.parallel is not None:
            return
        self.optim.begin(optimizer)
        self._step_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._overlap = True
        self._grad_passes = 0
        self._overlapped_at_begin = self.num_overlapped_updates

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Schedules ``optimizer``'s step on the CPU; equivalent to ``optimizer.step()`` after the full backward. The
        step consumes the gradients of ``optimizer``'s parameters (as if ``zero_grad()`` followed it); the other
        parameters' gradients stay for another optimizer's step."""
        self.watch(optimizer)
        self.finish_backward()
        self._reduce_if_pending()
        self._overlap = False
        if self.parallel is not None:  # every process has read the shared gradients (clipping, hooks), and no copy
            self.streamer.quiesce()  # of this process still reads the shared masters (cast_on_gpu), before an
            self.parallel.barrier()  # owner's update may scale the gradients or rewrite the masters in place
        self.optim.step(optimizer)
        if self.parallel is not None:
            # Every process's updates are in the shared masters before any process reads one again
            self.optim.wait()
            self.parallel.barrier()
            self.streamer.invalidate()  # layers kept on the GPU hold the old values of groups other processes updated
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
        discarded by ``zero_grad`` drops its scaling with it). Returns the total norm before clipping. With several
        processes it is collective (every process calls it): each measures the groups it owns, and the partial norms
        are gathered over the node.
        """
        self.finish_backward()
        self._reduce_if_pending()
        entries = self._grad_entries(optimizer)
        parallel = self.parallel
        norms = []
        for group, sp in entries:
            if parallel is not None and not parallel.measures(group):
                continue  # the node's processes share the averaged gradients: each measures the groups it owns
            tracked = self.sink.track_norms and norm_type == 2.0 and sp.grad_norm is not None  # recorded as it landed
            norm = sp.grad_norm if tracked else torch.linalg.vector_norm(self.sink.gradient(group, sp), norm_type)
            norms.append(norm if sp.clip_coef is None else norm * sp.clip_coef.to(norm.device))  # clipped before
        if parallel is not None:
            norms = parallel.reduce_norms(norms, norm_type)
        total, coef = clip_coefficient(norms, float(max_norm), norm_type)
        if float(coef) < 1.0:
            for _, sp in entries:
                sp.clip_coef = coef if sp.clip_coef is None else sp.clip_coef * coef
        return total

    def clip_grad_value_(self, clip_value: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Clamps the current gradients (of ``optimizer``'s parameters, or of every parameter) to
        ``[-clip_value, clip_value]``, as ``torch.nn.utils.clip_grad_value_`` does (applied by the optimizer)."""
        self.finish_backward()
        self._reduce_if_pending()
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
            self._watched.append(ZeroGradWatch(self.discard_gradients, optimizer))
            self.preflight()

    def preflight(self) -> None:
        """Refuses, with a ``MemoryError`` that names each component, a run whose host memory still to be allocated
        (the state of the watched optimizers that have not stepped, lazily allocated gradients and pinned buffers)
        exceeds what this machine has available now: run at the strategy's setup and when :meth:`step` first sees
        an optimizer, before its state exists. Counted with the planner's own functions (:mod:`.footprint`)."""
        from lightning_horizon.hardware import _usable_host_memory_bytes

        optimizers = [o for o in (w.optimizer() for w in self._watched) if o is not None]
        parallel = self.parallel
        processes = parallel.local_world_size if parallel is not None else 1
        share = parallel.node_share(self.store) if parallel is not None else 1.0
        try:
            check_host_memory(self.shape, self.config, optimizers, _usable_host_memory_bytes(), processes, share)
        finally:
            if parallel is not None:  # no process allocates before every process has measured the free memory
                parallel.barrier()

    def guard_zero_grad(self, root: nn.Module) -> None:
        """Makes ``root.zero_grad()`` (e.g. the LightningModule holding the model) forget the engine's gradients too,
        as the model's own ``zero_grad()`` does."""
        self.patch.guard_zero_grad(root)

    def discard_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Forgets the current gradients of ``optimizer``'s parameters (or of every parameter): the next backward
        writes them afresh, and a step before it skips them (what ``zero_grad()`` means)."""
        self.runner.flush_tied()
        self.sink.wait()
        params = (p for g in optimizer.param_groups for p in g["params"]) if optimizer is not None else None
        for sp in self.store.params(params):
            sp.discard()
        for group in self.store.groups:
            self.sink.discarded(group)

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        """``optimizer.load_state_dict(state_dict)``, except that with compact moments
        (``optimizer_state_dtype="bf16"``) each parameter's moments go straight into that dtype: PyTorch's own load
        would first widen every moment to the parameter's FP32 (twice the state's memory at once)."""
        load_optimizer_state(optimizer, state_dict, self.config.state_dtype)

    def reduce_gradients(self) -> None:
        """Averages the host gradients over the processes of a data-parallel run (every process must call it; a
        no-op in one process). :meth:`clip_grad_norm_`, :meth:`clip_grad_value_` and :meth:`step` call it when a
        backward ran since the last average; call it yourself where the averaged gradients must be read earlier
        (until then a gradient is a running sum of the node's processes, which other processes may still be adding
        to: it is not this process's own gradient, as it would be under DDP's ``no_sync``). Averaging after every
        micro-batch of an accumulated step gives the same result (the next micro-batch adds to the average scaled
        back to a sum) at the cost of a collective per micro-batch; the strategy averages after the last one only,
        as DDP does."""
        self.finish_backward()
        if self.parallel is not None:
            self.parallel.reduce_gradients(self.store, self.sink.finish)
        self._grads_pending = False

    def _reduce_if_pending(self) -> None:
        if self.parallel is not None and self._grads_pending:
            self.reduce_gradients()

    def finish_backward(self) -> None:
        """Waits until every gradient is on the host and exposes them as ``param.grad`` (where they are FP32)."""
        self.runner.finish_backward()

    def synchronize(self) -> None:
        """Waits for pending gradient folds, optimizer updates and uploads: the masters are then final, and nothing
        reads them behind the caller's back (uploads with ``cast_on_gpu`` read them by DMA)."""
        self.runner.flush_tied()
        self.sink.wait()
        self.optim.wait()
        self.streamer.quiesce()

    def invalidate(self) -> None:
        """Call after changing masters outside the engine's optimizer (e.g. loading a checkpoint)."""
        self.synchronize()
        self.streamer.invalidate()
        for group in self.store.groups:
            if group.copy is not None and not group.frozen:
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
                if group.copy is not None and not group.frozen:  # a frozen group's buffer is the store's to unpin
                    unregister_pinned(group.copy)
                for sp in group.params:
                    sp.param.grad = None
                    sp.discard()
                group.copy = group.grad = group.grad_lp = None
            self.patch.uninstall()
            self.bank.close()
            for watch in self._watched:
                watch.restore()
            self._watched = []
            self.runner.current = None

    @property
    def num_resident_slots(self) -> int:
        """GPU slots beyond ``num_slots`` (``EngineConfig.resident_layers``)."""
        return len(self.streamer.slots) - self.config.num_slots

    @property
    def num_kept_layers(self) -> int:
        """Layers a pass keeps with their graph (``EngineConfig.keep_activations``, or as sized after the first step)."""
        return self.runner.keep_layers

    @property
    def stats(self) -> dict[str, float]:
        """Cumulative counters: bytes moved, uploads, and seconds spent by each worker and waiting for one."""
        return {
            "bytes_h2d": self.streamer.bytes_h2d,
            "bytes_d2h": self.sink.bytes_d2h,
            "num_uploads": self.streamer.num_uploads,
            "num_layer_runs": self.runner.num_layer_runs,
            "num_optimizer_steps": self.optim.num_steps,
            "num_overlapped_updates": self.num_overlapped_updates,
            "bytes_checkpoints_offloaded": self.runner.offloader.bytes_offloaded,
            "prefetch_busy_s": self.streamer.worker.busy_s,
            "pack_s": self.streamer.pack_s,
            "prefetch_update_wait_s": self.streamer.update_wait_s,
            "compute_wait_s": self.streamer.wait_s,
            "fold_busy_s": self.sink.worker.busy_s,
            "fold_wait_s": self.sink.worker.wait_s,
            "optimizer_busy_s": self.optim.worker.busy_s,
            "optimizer_wait_s": self.optim.worker.wait_s,
            "optimizer_kernel_s": self.optim.kernel_s,
        }

    # ----------------------------------------------------------------------------------------------- internals
    def _on_grad_pass(self) -> None:
        self._grads_pending = True
        self._grad_passes += 1
        if self._overlap and self._grad_passes > 1:
            if self.num_overlapped_updates != self._overlapped_at_begin:
                raise RuntimeError(
                    "a forward pass with gradients started after updates of this step began overlapping its backward"
                )
            self._overlap = False  # a group's gradient is complete only at the end of the whole backward
            self.sink.leave_pool("the loss of this step comes from more than one forward pass")

    def _updates_follow(self, params) -> bool:
        """Whether the updates of ``params`` (gradients about to land) start as soon as their groups' gradients are
        complete: :meth:`begin_step` announced this step, it has one forward pass, and its optimizer holds them."""
        return self._overlap and all(id(sp.param) in self._step_params for sp in params)

    def _on_final(self, groups) -> None:
        if self._overlap:
            self.optim.schedule(groups)
            self.num_overlapped_updates += len(groups)

    def _auto_grad_pool(self, config: EngineConfig, on_gpu: bool) -> bool:
        from lightning_horizon.hardware import _usable_host_memory_bytes

        dtype = as_dtype(config.compute_dtype or torch.bfloat16)
        return auto_grad_pool(
            self.shape, dtype, config.num_grad_slabs, on_gpu, _usable_host_memory_bytes(), config.state_dtype
        )

    def _auto_weight_copy(self, config: EngineConfig, on_gpu: bool, grad_pool: int) -> bool:
        from lightning_horizon.hardware import _usable_host_memory_bytes

        dtype = as_dtype(config.compute_dtype or torch.bfloat16)
        return auto_weight_copy(
            self.shape,
            dtype,
            config.accumulate_grads,
            config.num_grad_slabs,
            on_gpu,
            _usable_host_memory_bytes(),
            config.state_dtype,
            grad_pool,
        )

    def _size_from_first_step(self) -> None:
        """Kept layers first (with the slots they hold), then resident slots, from the first step's measurements
        (:mod:`.residency`)."""
        slot_bytes = self.shape.layer_numel * self.dtype.itemsize
        if self._keep_pending:
            self._keep_pending = self.runner.measure_graphs = False
            keep = layers_to_keep(self._spare_gpu_bytes(), self.runner.graph_bytes, slot_bytes, self.parts.num_layers)
            if keep:
                self.add_resident_slots(max(0, keep + 2 - len(self.streamer.slots)))
                self.runner.keep_layers = min(keep, len(self.streamer.slots) - 2)
                self.runner.keep_sized = True
                log.info("horizon: the last %d layers keep their activations (no recomputation)", self.num_kept_layers)
        if self._resident_pending:
            self._resident_pending = False
            graphs = self.runner.keep_layers * self.runner.graph_bytes  # the next step's kept graphs, not allocated
            self.add_resident_slots(resident_slots_to_add(self._spare_gpu_bytes(), slot_bytes, reserved=graphs))

    def _spare_gpu_bytes(self) -> float:
        slots = sum(s.buf.numel() * s.buf.element_size() for s in self.streamer.slots)
        return measure_spare_gpu_bytes(self.device, slots)

    def add_resident_slots(self, count: int) -> None:
        """Adds up to ``count`` GPU slots of one decoder layer each, so that layers stay on the GPU between uses (what
        ``resident_layers`` asks for up front, and what its automatic sizing does after the first step)."""
        count = min(count, len(self.units) - len(self.streamer.slots))  # every layer and the head resident
        if count <= 0:
            return
        slots = self.streamer.make_slots(count, self.shape.layer_numel)
        self.bank.add_slots(slots)
        self.streamer.attach(slots)
        log.info("horizon: %d extra GPU slots keep layers resident between uses", count)

    def _grad_entries(self, optimizer: torch.optim.Optimizer | None):
        params = None if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
        return [self.store.entry(sp.param) for sp in self.store.params(params) if sp.trainable and sp.has_grad]
