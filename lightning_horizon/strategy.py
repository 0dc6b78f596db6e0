"""``HorizonStrategy``: Lightning glue over the Lightning-free :class:`~lightning_horizon.engine.HorizonEngine`.

``Trainer(strategy="horizon", precision="bf16-mixed")`` keeps the wrapped Hugging Face causal LM's FP32 masters and
optimizer state in host memory and streams its layers to one GPU (or computes on the CPU with
``accelerator="cpu"``). The LightningModule stays ordinary: build the model in ``__init__`` or ``configure_model``
(on the CPU in any dtype, converted group by group into the FP32 store; or on the meta device, materialised straight
into it and initialised by the model's own ``init_weights``: setup never holds more than the masters plus one
layer), call ``self.model(**batch).loss`` in ``training_step``, return ``torch.optim.AdamW(...)`` from
``configure_optimizers``. ``self.device`` is the compute device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Generator
from typing import Any

import torch
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.init import _EmptyInit
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_horizon import checkpoint as horizon_ckpt
from lightning_horizon.engine import EngineConfig, HorizonEngine, find_causal_lm
from lightning_horizon.engine.data_parallel import DataParallel
from lightning_horizon.loading import initialize_on_host
from lightning_horizon.precision import HorizonPrecision


class HorizonStrategy(ParallelStrategy):
    """Train a model far larger than GPU memory on one GPU, with host memory as the store of record.

    With ``Trainer(devices=N, num_nodes=M)`` it runs one process per device, data parallel (the result of a step
    equals one process with the global batch, as with DDP), launched as Lightning launches DDP (its subprocess
    launcher, ``torchrun``, SLURM and the other cluster environments): the processes of a node share one host store
    (:mod:`lightning_horizon.engine.data_parallel`).

    Args:
        config: The engine's settings (:class:`~lightning_horizon.engine.EngineConfig`, where each is documented);
            None: the defaults.
        **settings: Fields of :class:`~lightning_horizon.engine.EngineConfig` by name, over ``config``
            (``HorizonStrategy(checkpoint_every=2)``). The run's own fields (device, compute dtype, gradient
            accumulation, norm tracking, updates during the backward) come from the Trainer (``accelerator``,
            ``precision``, ``accumulate_grad_batches``, ``gradient_clip_val``, the module's
            ``automatic_optimization``) and are refused here.
    """

    strategy_name = "horizon"

    def __init__(
        self,
        config: EngineConfig | None = None,
        accelerator=None,
        precision_plugin: Precision | None = None,
        cluster_environment=None,
        process_group_backend: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator, cluster_environment=cluster_environment, precision_plugin=precision_plugin
        )
        config = dataclasses.replace(config or EngineConfig(), **settings)  # validated now, not at fit time
        defaults = EngineConfig()
        for name, trainer_arg in EngineConfig.run_fields().items():
            if getattr(config, name) != getattr(defaults, name):
                raise ValueError(
                    f"HorizonStrategy: {name} is not a strategy setting: the Trainer's {trainer_arg} sets it"
                )
        self.config = config
        """The engine settings as given (the engine's own ``config`` holds them resolved for the run)."""
        self._parallel_devices: list[torch.device] | None = None
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._data_parallel: DataParallel | None = None
        self._sync_gradients = True
        self.engine: HorizonEngine | None = None

    # ---------------------------------------------------------------------------------------- devices / precision
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        self._parallel_devices = [torch.device(d) for d in devices] if devices is not None else None

    @property
    @override
    def root_device(self) -> torch.device:
        if not self._parallel_devices:
            return torch.device("cpu")
        return self._parallel_devices[self.local_rank if len(self._parallel_devices) > 1 else 0]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        """Processes (devices) per node."""
        return len(self._parallel_devices) if self._parallel_devices else 1

    @property
    def is_distributed(self) -> bool:
        """Whether the run has several processes (``devices * num_nodes > 1``): data parallel."""
        return self.num_processes * self.num_nodes > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any] | None:
        if not self.is_distributed:
            return None
        return {"num_replicas": self.num_processes * self.num_nodes, "rank": self.global_rank}

    # ------------------------------------------------------------------------------------- several processes
    @override
    def _configure_launcher(self) -> None:
        if self.is_distributed:
            assert self.cluster_environment is not None
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.is_distributed:
            reset_seed()
            self.set_world_ranks()
            backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
            assert self.cluster_environment is not None
            device_id = self.root_device if self.root_device.type != "cpu" else None
            _init_dist_connection(self.cluster_environment, backend, device_id=device_id)

    @override
    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            torch.distributed.barrier()

    @override
    def broadcast(self, obj, src: int = 0):
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(self, tensor, group: Any | None = None, reduce_op: Any | None = "mean"):
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    @contextlib.contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning's micro-batches before the last of an accumulated step: their gradients are averaged over the
        processes with the last one's (one all-reduce per step, as DDP's ``no_sync``)."""
        self._sync_gradients = False
        try:
            yield
        finally:
            self._sync_gradients = True

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any):
        # Strategy.backward, with the gradients averaged over the processes before on_after_backward (as DDP does)
        self.pre_backward(closure_loss)
        assert self.lightning_module is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.precision_plugin.backward(closure_loss, self.lightning_module, optimizer, *args, **kwargs)
        if self.engine is not None and self.engine.parallel is not None and self._sync_gradients:
            self.engine.reduce_gradients()
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def process_dataloader(self, dataloader: object) -> object:
        workers = getattr(dataloader, "num_workers", 0)
        context = getattr(dataloader, "multiprocessing_context", None)
        start = context.get_start_method() if context is not None else torch.multiprocessing.get_start_method()
        if workers and start == "fork":
            rank_zero_warn(
                f"a DataLoader forks {workers} worker processes: the kernel copies page-locked (pinned) memory eagerly "
                "into a forked child, so each worker duplicates the horizon engine's pinned host buffers (gradients, "
                "weight copy). Pass multiprocessing_context='spawn' (or 'forkserver') to the DataLoader."
            )
        return dataloader

    @property
    @override
    def precision_plugin(self) -> Precision:
        if self._precision_plugin is None:
            self.precision_plugin = HorizonPrecision()
        return self._precision_plugin  # type: ignore[return-value]

    @precision_plugin.setter
    @override
    def precision_plugin(self, plugin: Precision | None) -> None:
        if plugin is None or isinstance(plugin, HorizonPrecision):
            pass
        elif type(plugin) is Precision:
            plugin = HorizonPrecision("32-true")
        elif isinstance(plugin, MixedPrecision):
            plugin = HorizonPrecision(plugin.precision)
        else:
            plugin = HorizonPrecision(getattr(plugin, "precision", type(plugin).__name__))
        if plugin is not None:
            plugin._engine = lambda: self.engine
        self._precision_plugin = plugin

    # ------------------------------------------------------------------------------------------------- setup
    @override
    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # The model is built on the CPU: host memory is where the masters live.
        with _EmptyInit(enabled=bool(empty_init)), self.precision_plugin.tensor_init_context():
            yield

    @override
    def model_to_device(self) -> None:
        pass  # the engine owns placement: masters on the host, computation on root_device

    @override
    def setup(self, trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self._build_engine(trainer)
        self.model = self._setup_model(self.model)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            _check_optimizers(self.optimizers, self.engine)
            for optimizer in self.optimizers:
                self.engine.watch(optimizer)  # zero_grad() discards the host gradients too
        self.setup_precision_plugin()

    @property
    @override
    def optimizers(self) -> list[Optimizer]:
        return self._optimizers

    @optimizers.setter
    @override
    def optimizers(self, optimizers: list[Optimizer]) -> None:
        self._optimizers = optimizers
        self._lightning_optimizers = [_lightning_optimizer(opt, self) for opt in optimizers]

    def _build_engine(self, trainer) -> None:
        module = self.lightning_module
        model = find_causal_lm(module)
        if self.engine is not None:  # teardown did not run (an interrupted setup): not ours to reuse
            self.engine.close()
            self.engine = None
        accumulate = trainer.accumulate_grad_batches > 1
        if trainer.state.fn == TrainerFn.FITTING and _reads_gradients(module, trainer):
            accumulate = True  # param.grad must exist when hooks read it: FP32 host gradients (+2 bytes/param)
        clip_alg = getattr(trainer, "gradient_clip_algorithm", None)
        in_backward = not accumulate and not trainer.gradient_clip_val and module.automatic_optimization
        config = dataclasses.replace(
            self.config,
            device=self.root_device,
            compute_dtype=self.precision_plugin.compute_dtype,
            accumulate_grads=accumulate,
            track_grad_norm=bool(trainer.gradient_clip_val) and clip_alg in (None, "norm"),
            # what HorizonPrecision.optimizer_step checks before it calls begin_step: the updates then run during
            # the backward, and the gradients may go through the engine's bounded pool (no whole-model buffer)
            updates_in_backward=trainer.state.fn == TrainerFn.FITTING and in_backward,
        )
        if self.is_distributed and self._data_parallel is None:  # its process groups serve every later engine
            self._data_parallel = DataParallel(local_rank=self.local_rank, local_world_size=self.num_processes)
        parallel = self._data_parallel
        if parallel is not None and config.node_store == "sharded" and parallel.num_nodes > 1:
            if trainer.state.fn == TrainerFn.FITTING and _reads_gradients(module, trainer):
                raise ValueError(
                    "node_store='sharded': a hook of the LightningModule or of a callback reads gradients "
                    "(on_after_backward, on_before_optimizer_step or configure_gradient_clipping is overridden), but "
                    "each node holds only its share of the layers: the other layers' parameters are on the meta "
                    "device here and have no param.grad. Use the Trainer's gradient_clip_val (clipping measures every "
                    "node's layers), drop the hook, or set node_store='replicated'"
                )
        # A model built on the meta device is materialised straight into the store's layout (nothing copied) and
        # initialised; with several processes only where it fills its node's store (local rank 0): the others'
        # parameters only become views into that store (DataParallel.prepare_model, without touching memory). With a
        # sharded node store the other nodes' layers may stay on the meta device (loaded per node, or after an
        # earlier sharded store): only a model wholly on the meta device is initialised
        if parallel is None or (parallel.is_leader and all(p.is_meta for p in model.parameters())):
            initialize_on_host(model)
        self.engine = HorizonEngine(model, config, parallel=self._data_parallel)
        self.engine.guard_zero_grad(module)  # the LightningModule's zero_grad() discards the host gradients too
        _place_rest(module, model, self.root_device)
        module._device = self.root_device

    # --------------------------------------------------------------------------------------- checkpoint state
    # Checkpoints are directories of per-group safetensors shards (see lightning_horizon/checkpoint.py), written
    # straight from the store's views and restored after setup, straight into the store.
    @property
    @override
    def checkpoint_io(self):
        if self._checkpoint_io is None:
            self._checkpoint_io = horizon_ckpt.HorizonCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    @override
    def checkpoint_io(self, io) -> None:
        self._checkpoint_io = io

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.engine is not None:
            self.engine.synchronize()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.engine is not None:
            self.engine.synchronize()
        return super().optimizer_state(optimizer)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self.engine is not None:
            self.engine.synchronize()
        if isinstance(self.checkpoint_io, horizon_ckpt.HorizonCheckpointIO):  # also after teardown (fit, then save)
            module = self.lightning_module
            optimizers = self.optimizers if "optimizer_states" in checkpoint else []
            layout = horizon_ckpt.store_layout(find_causal_lm(module), module, optimizers)
            checkpoint = {**checkpoint, horizon_ckpt.LAYOUT_KEY: layout}
            if self._data_parallel is not None:  # every process writes the optimizer shards it holds
                if storage_options is not None:
                    raise TypeError(f"HorizonCheckpointIO does not support storage_options (got {storage_options!r})")
                horizon_ckpt.save_sharded(
                    checkpoint, filepath, fsync=self.checkpoint_io.fsync, parallel=self._data_parallel
                )
                return
        elif self._data_parallel is not None and self._data_parallel.sharded_nodes:
            raise ValueError(
                f"checkpoint_io={type(self.checkpoint_io).__name__}: with node_store='sharded' each node holds only its "
                "share of the layers (the others are on the meta device in its processes), and only the horizon "
                "checkpoint format writes every node's share. Use the default checkpoint_io (HorizonCheckpointIO)"
            )
        elif self._data_parallel is not None and "optimizer_states" in checkpoint:
            raise ValueError(
                f"checkpoint_io={type(self.checkpoint_io).__name__}: with several processes each holds the optimizer "
                "state of the layers it steps, and only the horizon checkpoint format writes them all. Use the "
                "default checkpoint_io (HorizonCheckpointIO), or save weights only"
            )
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        state_dict = checkpoint["state_dict"]
        if self.engine is None:
            super().load_model_state_dict(checkpoint, strict=strict)
            return
        self.engine.synchronize()
        parallel = self.engine.parallel
        if parallel is not None and not parallel.is_leader:
            pass  # its node's leader fills the shared masters
        elif isinstance(state_dict, horizon_ckpt.ShardedStateDict):
            horizon_ckpt.load_into_store(state_dict, self.engine, self.lightning_module, strict=strict)
        else:
            super().load_model_state_dict(checkpoint, strict=strict)
        if parallel is not None:
            parallel.barrier()
        self.engine.invalidate()  # also re-derives the compute-dtype copies of the masters
        horizon_ckpt.restore_rng(checkpoint.get("horizon_rng"))

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        if self.engine is not None:
            self.engine.synchronize()
            states = checkpoint["optimizer_states"]
            if isinstance(states, horizon_ckpt.LazyOptimizerStates):
                horizon_ckpt.check_optimizers(states.reader, self.optimizers, self.engine)
            # Not super(): it moves the state to root_device, and the optimizer state stays in host memory.
            parallel = self.engine.parallel
            for i, optimizer in enumerate(self.optimizers):
                if parallel is None:
                    opt_state = states[i]
                elif isinstance(states, horizon_ckpt.LazyOptimizerStates):  # only what this process steps is read
                    opt_state = states.read(i, parallel.owned_names(self.engine.store))
                else:
                    raise ValueError(
                        "with several processes the horizon strategy resumes the optimizer state from horizon "
                        "checkpoint directories only (each process reads the state of the layers it steps)"
                    )
                self.engine.load_optimizer_state_dict(optimizer, opt_state)
            return
        super().load_optimizer_state_dict(checkpoint)

    @override
    def teardown(self) -> None:
        # The engine is ours: closed at the end of every fit/validate/test (threads, pinned registrations, GPU
        # slots, the model's hooks). A later call, of this Trainer or another, builds a fresh one, which adopts the
        # store's FP32 buffers (the model's parameters stay views into them) without copying them.
        if self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="Host-memory FP32 masters and optimizer, BF16 layers streamed to one GPU",
            )


def _check_optimizers(optimizers: list[Optimizer], engine: HorizonEngine | None) -> None:
    assert engine is not None
    owner: dict[int, Optimizer] = {}
    for optimizer in optimizers:
        name = type(optimizer).__name__
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
        if isinstance(optimizer, torch.optim.LBFGS) or (closure is not None and closure.default is closure.empty):
            raise ValueError(
                f"configure_optimizers returned {name}, whose step() re-evaluates the model through a closure: the "
                "horizon strategy steps the optimizer on a CPU thread after the backward, where the model cannot run "
                "again. Use an optimizer whose update needs only the gradients (AdamW, Adam, SGD, Adafactor, ...)"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in engine.store.by_param:
                    raise ValueError(
                        f"configure_optimizers returned {name} over a parameter of shape {tuple(p.shape)} that is not "
                        "part of the streamed Hugging Face model; the horizon strategy steps only the streamed "
                        "model's parameters"
                    )
                other = owner.setdefault(id(p), optimizer)
                if other is not optimizer:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in two optimizers ({type(other).__name__} and "
                        f"{name}): the horizon strategy hands each parameter's gradient to one optimizer's step"
                    )


def _lightning_optimizer(optimizer: Optimizer, strategy: HorizonStrategy) -> LightningOptimizer:
    """Lightning's wrapper of ``optimizer``, whose ``zero_grad`` is the optimizer's own (the engine watches it) and
    whose destructor does nothing: the wrapper's class derives from the optimizer's, and an optimizer that frees
    native state in ``__del__`` (DeepSpeedCPUAdam) would otherwise free the live optimizer's state whenever a wrapper
    is rebuilt and the old one collected."""
    wrapper = LightningOptimizer._to_lightning_optimizer(optimizer, strategy)
    if not isinstance(optimizer, LightningOptimizer):
        cls = type(wrapper)  # made for this wrapper alone
        cls.zero_grad = lambda self, *args, **kwargs: self._optimizer.zero_grad(*args, **kwargs)
        cls.__del__ = lambda self: None
    return wrapper


def _reads_gradients(module: torch.nn.Module, trainer) -> bool:
    """Whether a hook of the module or of a callback may read ``param.grad`` between the backward and the step."""
    from lightning.pytorch import Callback, LightningModule
    from lightning.pytorch.utilities.model_helpers import is_overridden

    hooks = ("on_before_optimizer_step", "on_after_backward")
    if any(is_overridden(h, module, parent=LightningModule) for h in (*hooks, "configure_gradient_clipping")):
        return True
    return any(is_overridden(h, cb, parent=Callback) for cb in trainer.callbacks for h in hooks)


def _place_rest(module: torch.nn.Module, model: torch.nn.Module, device: torch.device) -> None:
    """Moves what lies outside the streamed model (metrics, other modules, buffers) to the compute device with each
    module's own ``to`` (torchmetrics' ``Metric`` moves its states there); modules that contain the streamed model
    (the LightningModule, PEFT wrappers) move only their own tensors."""
    inside = {id(m) for m in model.modules()}
    outside = [(name, m) for name, m in module.named_modules() if id(m) not in inside]
    holders = {id(m) for _, m in outside if any(c is model for c in m.modules())}
    for name, sub in outside:
        if id(sub) in holders:
            _move_own_tensors(sub, device, name or type(module).__name__)
            continue
        if not any(id(parent) in holders for _, parent in outside if any(c is sub for c in parent.children())):
            continue  # moved with its parent
        for pname, p in sub.named_parameters():
            if p.requires_grad:
                raise ValueError(
                    f"{type(module).__name__} has a trainable parameter {name}.{pname} outside the Hugging Face "
                    "model; the horizon strategy trains only the streamed model's parameters (freeze it, or make it "
                    "part of the model)"
                )
        sub.to(device)


def _move_own_tensors(module: torch.nn.Module, device: torch.device, name: str) -> None:
    for pname, p in module._parameters.items():
        if p is None:
            continue
        if p.requires_grad:
            raise ValueError(
                f"{name} has a trainable parameter {pname!r} outside the Hugging Face model; the horizon strategy "
                "trains only the streamed model's parameters"
            )
        p.data = p.data.to(device)
    for bname, buf in module._buffers.items():
        if buf is not None:
            module._buffers[bname] = buf.to(device)


HorizonStrategy.register_strategies(StrategyRegistry)
