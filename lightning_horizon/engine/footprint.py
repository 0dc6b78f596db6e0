"""What the engine allocates, computed without allocating it: the one place the engine's memory rules live.

:class:`StoreShape` counts the elements of a model's host store and streamed units exactly as the engine lays them
out (each parameter padded to 128 elements, tied weights once), from the model or from its meta-device twin, so the
planner (before anything exists) and the engine (deciding its automatic settings) count with the same numbers, and
a test checks them against a real engine's allocations. :func:`host_bytes` is the host footprint by component;
:func:`weight_copy_fits` is the single rule for ``EngineConfig.weight_copy=None``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from .adapter import DecoderParts
from .config import STATE_DTYPE_NAMES
from .host_kernels import QBLOCK
from .store import _align, split_frozen

log = logging.getLogger(__name__)

STAGING_NUMEL = 64 * 2**20
"""Elements per pinned staging buffer of layer uploads (128 MiB in BF16); two buffers alternate."""
REDUCE_STAGE_NUMEL = 32 * 2**20
"""Elements of each of the two page-locked FP32 stages through which a process's shard of a reduced gradient comes
down (``EngineConfig.grad_reduce="device"``; 128 MiB each): a larger shard comes in pieces."""

CAST_STAGE_NUMEL = 32 * 2**20
"""Elements of the GPU buffer FP32 masters are copied into and cast from with ``cast_on_gpu`` (128 MiB)."""
MAX_SLAB_NUMEL = 256 * 2**20
"""Largest pinned gradient slab (elements): 512 MiB in BF16; bigger layers are sent in several slabs."""
HOST_OVERHEAD_BYTES = 2 * 2**30
"""Host memory of the process beyond the engine's buffers (torch, Python; CUDA's host side is
:data:`CUDA_OVERHEAD_BYTES` more)."""
CUDA_OVERHEAD_BYTES = 2 * 2**30
"""What a GPU run's process holds beyond :data:`HOST_OVERHEAD_BYTES`. Measured on an H200 host (Qwen2.5-7B shape,
2026-12-03): 2.0 GiB beyond the engine's buffers at the end of a step, and on a machine's first run (the layers
compiled for the first time) 2.0 GiB more of shared memory that stays; 4 GiB in all."""
ADAMW_STATE_BYTES = 8
"""Optimizer state per parameter assumed before the optimizer exists: AdamW's two FP32 moments."""
ADAMW_TRAFFIC_BYTES = 28
"""Host-memory bytes per parameter of one AdamW update with FP32 moments in the one-pass kernel: reads master 4,
BF16 gradient 2, moments 8; writes master 4, moments 8, BF16 weight copy 2."""


@dataclass(frozen=True)
class StoreShape:
    """Element counts of a model's host store and streamed units, as the engine allocates them."""

    num_params: int
    """Unique parameters (tied weights once)."""
    store_numel: int
    """Elements of every group buffer together (the FP32 masters; also the weight copy and FP32 gradients)."""
    embedding_numel: int
    """Elements of the embedding's group (its gradient is FP32 on the host even without accumulation)."""
    layer_numel: int
    """Elements of the largest decoder layer unit: resident slots and gradient slabs are this large."""
    unit_numel: int
    """Elements of the largest streamed unit (a layer or the head = final norm + lm_head): a weight slot."""
    tied: bool = False
    """lm_head shares the embedding's weight (its gradient is summed with the embedding's rows on the compute device
    and lands in the embedding's FP32 buffer: no compute-dtype buffer for that group)."""
    grad_group_numel: int = 0
    """Elements of the largest group whose gradient lands in the compute dtype (every group but the embedding's):
    each buffer of the gradient pool is this large."""
    frozen_numel: int = 0
    """Elements of the frozen groups, held in the compute dtype (``EngineConfig.frozen_dtype='compute'``): not in
    ``store_numel``, no gradients, no weight copy."""
    trainable_params: int | None = None
    """Parameters that require gradients (the optimizer's state is this large); None: every parameter."""

    @classmethod
    def of(cls, parts: DecoderParts, frozen: bool = False) -> StoreShape:
        """The counts of the model ``parts`` describes (real or on the meta device); ``frozen``: its parameters that do
        not require gradients are held in the compute dtype (:func:`.store.split_frozen`)."""
        groups = split_frozen(parts.store_groups(), torch.bfloat16 if frozen else None)
        sizes = {name: max(1, sum(_align(p.numel()) for _, p in named)) for name, named, _ in groups}
        fp32 = {name: size for (name, _, dtype), size in zip(groups, sizes.values()) if dtype == torch.float32}
        layers = [_unit_numel(layer) for layer in parts.layers]
        head = _unit_numel(parts.norm) + _unit_numel(parts.lm_head)
        landing = [size for name, size in fp32.items() if name != "embed"]
        return cls(
            num_params=sum(p.numel() for _, named, _ in groups for _, p in named),
            store_numel=sum(fp32.values()),
            embedding_numel=fp32.get("embed", 0),
            layer_numel=max(layers),
            unit_numel=max(*layers, head),
            tied=parts.tied,
            grad_group_numel=max(landing, default=1),
            frozen_numel=sum(sizes.values()) - sum(fp32.values()),
            trainable_params=sum(p.numel() for _, named, _ in groups for _, p in named if p.requires_grad),
        )

    @property
    def optimizer_params(self) -> int:
        """Parameters the optimizer keeps state for (those that require gradients)."""
        return self.num_params if self.trainable_params is None else self.trainable_params

    @property
    def staging_numel(self) -> int:
        """Elements of each of the two pinned staging buffers of packed uploads."""
        return min(STAGING_NUMEL, self.unit_numel)

    @property
    def slab_numel(self) -> int:
        """Elements of each pinned gradient slab (folded gradients; larger gradients take several)."""
        return min(MAX_SLAB_NUMEL, self.layer_numel)


def _unit_numel(module: torch.nn.Module) -> int:
    return sum(_align(p.numel()) for _, p in module.named_parameters(remove_duplicate=False))


def host_bytes(
    shape: StoreShape,
    compute_dtype: torch.dtype,
    accumulate: bool,
    weight_copy: bool,
    num_grad_slabs: int,
    on_gpu: bool,
    optimizer_state_bytes: float = ADAMW_STATE_BYTES,
    master_bytes: int = 4,
    grad_pool: int = 0,
    cast_on_gpu: bool = False,
) -> dict[str, int]:
    """Host memory by component of an engine over ``shape`` (with its optimizer's state): FP32 masters, optimizer
    state, gradients (FP32 when accumulating; else in the compute dtype, the embedding's in FP32, a tied lm_head's
    gradient summed into it on the compute device; with ``grad_pool`` buffers, ``EngineConfig.pooled_grads``,
    only the embedding's FP32 rows, and the pool's buffers, pinned on a GPU, instead of the rest),
    pinned upload staging (only for a GPU without the weight copy, and then not with ``cast_on_gpu``, whose uploads
    read the masters themselves), pinned gradient slabs (only when accumulating on a GPU), the weight copy, and the
    process's own overhead."""
    c = compute_dtype.itemsize
    n = shape.store_numel
    if accumulate:
        gradients = 4 * n
    elif grad_pool:
        gradients = 4 * shape.embedding_numel
    else:
        gradients = c * (n - shape.embedding_numel) + 4 * shape.embedding_numel
    out = {
        "masters": master_bytes * n,
        "optimizer state": int(optimizer_state_bytes * shape.optimizer_params),
        "gradients": gradients,
    }
    if shape.frozen_numel:
        out["frozen parameters"] = c * shape.frozen_numel
    if grad_pool and not accumulate:
        out["gradient pool"] = grad_pool * shape.grad_group_numel * c
    if on_gpu and not weight_copy and not cast_on_gpu:
        out["upload staging"] = 2 * shape.staging_numel * c
    if on_gpu and accumulate:
        out["gradient slabs"] = num_grad_slabs * shape.slab_numel * c
    if weight_copy:
        out["weight copy"] = c * n
    out["process overhead"] = HOST_OVERHEAD_BYTES + (CUDA_OVERHEAD_BYTES if on_gpu else 0)
    return out


def existing_bytes(footprint: dict[str, int]) -> int:
    """What of ``footprint`` (:func:`host_bytes`) the model's own parameters already hold when the engine is built:
    the masters and the frozen parameters (the store takes them over, or copies them group by group, each source freed
    as it is copied). The automatic settings count it as available: MemAvailable no longer does. A LoRA base of 61 GiB
    in BF16 otherwise read as 61 GiB missing, and the adapters' 0.3 GB weight copy was dropped on a 125 GiB host."""
    return footprint["masters"] + footprint.get("frozen parameters", 0)


def weight_copy_fits(on_gpu: bool, footprint_with_copy: dict[str, int], memory_bytes: float) -> bool:
    """The rule of ``EngineConfig.weight_copy=None``: keep the copy when compute runs on a GPU (on the CPU the layers
    are used in place: it would cost memory and buy nothing) and the host footprint with it fits ``memory_bytes``."""
    return on_gpu and sum(footprint_with_copy.values()) <= memory_bytes


def grad_pool_needed(footprint_whole: dict[str, int], memory_bytes: float) -> bool:
    """The rule of ``EngineConfig.grad_pool_buffers=None``: the pool only when the host footprint with whole-model
    gradient buffers (and without the weight copy) exceeds ``memory_bytes``."""
    return sum(footprint_whole.values()) > memory_bytes


def auto_grad_pool(
    shape: StoreShape,
    compute_dtype: torch.dtype,
    num_grad_slabs: int,
    on_gpu: bool,
    available_bytes: float,
    state_dtype: torch.dtype = torch.float32,
) -> bool:
    """``grad_pool_buffers=None`` for an engine whose masters already exist: :func:`grad_pool_needed` with its
    footprint against the host memory available now plus what the masters and frozen parameters take
    (:func:`existing_bytes`)."""
    footprint = host_bytes(
        shape, compute_dtype, False, False, num_grad_slabs, on_gpu,
        optimizer_state_bytes=adamw_state_bytes(state_dtype),
    )  # fmt: skip
    needed = grad_pool_needed(footprint, available_bytes + existing_bytes(footprint))
    if needed:
        log.info(
            "horizon: whole-model gradient buffers do not fit (%.1f GiB with them): gradients go through a pool of "
            "a few layers straight into their updates",
            sum(footprint.values()) / 2**30,
        )
    return needed


def auto_weight_copy(
    shape: StoreShape,
    compute_dtype: torch.dtype,
    accumulate: bool,
    num_grad_slabs: int,
    on_gpu: bool,
    available_bytes: float,
    state_dtype: torch.dtype = torch.float32,
    grad_pool: int = 0,
) -> bool:
    """``weight_copy=None`` for an engine whose masters already exist: :func:`weight_copy_fits` with its footprint
    against the host memory available now plus what the masters and frozen parameters take (:func:`existing_bytes`);
    warns when a GPU run goes without it."""
    footprint = host_bytes(
        shape,
        compute_dtype,
        accumulate,
        True,
        num_grad_slabs,
        on_gpu,
        optimizer_state_bytes=adamw_state_bytes(state_dtype),
        grad_pool=grad_pool,
    )
    memory = available_bytes + existing_bytes(footprint)
    fits = weight_copy_fits(on_gpu, footprint, memory)
    if on_gpu and not fits:
        warnings.warn(
            f"not enough host memory for the {compute_dtype.itemsize}-byte/param weight copy (the footprint with "
            f"it, {sum(footprint.values()) / 2**30:.1f} GiB, exceeds {memory / 2**30:.1f} GiB): uploads will pack "
            f"FP32 -> {compute_dtype} on the way (pass weight_copy=True to force it)",
            stacklevel=2,
        )
    return fits


PREFLIGHT_MARGIN_BYTES = 2**30
"""Host memory a preflight leaves free beyond what the run still allocates (page cache, allocator slack)."""


def adamw_state_bytes(state_dtype: torch.dtype = torch.float32) -> float:
    """Bytes per parameter of AdamW's two moments in ``state_dtype`` (``EngineConfig.optimizer_state_dtype``; int8
    codes carry an FP32 scale per moment and block of ``QBLOCK`` elements)."""
    if state_dtype == torch.int8:
        return 2 + 2 * 4 / QBLOCK
    return 2 * state_dtype.itemsize


def adamw_traffic_bytes(state_dtype: torch.dtype = torch.float32) -> float:
    """Host-memory bytes per parameter of one one-pass AdamW update with moments in ``state_dtype`` (each moment
    byte saved is read and written once less)."""
    return ADAMW_TRAFFIC_BYTES - 2 * (ADAMW_STATE_BYTES - adamw_state_bytes(state_dtype))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, state_dtype: torch.dtype = torch.float32) -> float:
    """Bytes per parameter of ``optimizer``'s state once it has stepped: AdamW's moments in ``state_dtype``, Adam 8
    (12 with ``amsgrad``), SGD 4 with momentum and 0 without, anything else assumed 8 (Adam-like)."""
    defaults = optimizer.defaults
    if type(optimizer) is torch.optim.AdamW and not defaults.get("amsgrad"):
        return adamw_state_bytes(state_dtype)
    if isinstance(optimizer, torch.optim.SGD):
        return 4 if defaults.get("momentum", 0) else 0
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return 12 if defaults.get("amsgrad") else 8
    return ADAMW_STATE_BYTES


def still_to_allocate(
    shape: StoreShape,
    compute_dtype: torch.dtype,
    accumulate: bool,
    weight_copy: bool,
    num_grad_slabs: int,
    on_gpu: bool,
    optimizers: list[torch.optim.Optimizer],
    state_dtype: torch.dtype = torch.float32,
    processes: int = 1,
    cast_on_gpu: bool = False,
    grad_reduce: str = "host",
    node_share: float = 1.0,
) -> dict[str, int]:
    """Host memory an engine built over ``shape`` allocates after its construction: the state of ``optimizers`` that
    have not stepped yet (PyTorch allocates it at the first step), FP32 gradients (at the first accumulated fold; the
    embedding's at the first backward), pinned staging and slabs (at the first packed upload or fold). What the
    engine allocates when it is built (masters, compute-dtype gradients, whole or the pool of
    ``EngineConfig.pooled_grads``, the weight copy) is not in it: the same with and without the pool.

    ``processes``: the processes of a data-parallel node sharing one store (:mod:`.data_parallel`): the optimizer
    state and the FP32 gradients are allocated once over them (each process holds its groups' share of the state;
    the gradients are one buffer of the node), the staging and slabs once per process, and with
    ``grad_reduce="device"`` each process's two page-locked FP32 stages for its shards of the reduced gradients.
    ``node_share``: the fraction of the trainable parameters the node holds (a sharded node store): the optimizer
    state and the gradients scale with it."""
    c = compute_dtype.itemsize
    state = sum(
        optimizer_state_bytes(opt, state_dtype)
        * sum(p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad)
        for opt in optimizers
        if not opt.state
    )
    out = {"optimizer state": int(state * node_share)}
    each = f" (x {processes} processes)" if processes > 1 else ""
    out["gradients"] = int(4 * shape.store_numel * node_share) if accumulate else 4 * shape.embedding_numel
    if on_gpu and not weight_copy and not cast_on_gpu:
        out["upload staging" + each] = processes * 2 * shape.staging_numel * c
    if on_gpu and accumulate:
        out["gradient slabs" + each] = processes * num_grad_slabs * shape.slab_numel * c
    if on_gpu and processes > 1 and grad_reduce == "device":
        out["reduced-gradient stages" + each] = processes * 2 * REDUCE_STAGE_NUMEL * 4
    return out


def check_host_memory(
    shape: StoreShape,
    config,
    optimizers: list[torch.optim.Optimizer],
    available_bytes: float,
    processes: int = 1,
    node_share: float = 1.0,
):
    """Refuses (``MemoryError`` naming every component and what to change) a run whose host memory still to be
    allocated (:func:`still_to_allocate`, with the engine's resolved ``config``; ``processes`` sharing the node)
    exceeds ``available_bytes``: the operating system would kill it minutes later, at its first step."""
    on_gpu = config.device.type == "cuda"
    needed = still_to_allocate(
        shape, config.compute_dtype, config.accumulate_grads, config.weight_copy, config.num_grad_slabs, on_gpu,
        optimizers, config.state_dtype, processes, config.cast_on_gpu, config.grad_reduce, node_share,
    )  # fmt: skip
    total = sum(needed.values())
    if total + PREFLIGHT_MARGIN_BYTES <= available_bytes:
        return
    rows = "\n".join(f"  {name:<32}{value / 2**30:10.2f} GiB" for name, value in needed.items() if value)
    options = []
    for label, total_then in _alternatives(shape, config, optimizers, on_gpu, processes):
        fits = total_then + PREFLIGHT_MARGIN_BYTES <= available_bytes
        options.append(f"  {label:<48}needs {total_then / 2**30:8.1f} GiB{'  (fits)' if fits else ''}")
    advice = "\n".join(options) or "  (no setting of this run frees enough)"
    if config.accumulate_grads:
        advice += "\n  without gradient accumulation the gradients stay in the compute dtype (2 instead of 4 B/param)"
    raise MemoryError(
        f"not enough host memory for this run: it still needs {total / 2**30:.1f} GiB "
        f"(+{PREFLIGHT_MARGIN_BYTES / 2**30:.0f} GiB margin) and {available_bytes / 2**30:.1f} GiB are available:\n"
        f"{rows}\nThe same run with (cheapest change first; or use a machine with more host memory or a smaller "
        f"model):\n{advice}\n(python -m recipes.sft ... plan=true prints the whole plan.)"
    )


def _alternatives(shape: StoreShape, config, optimizers: list[torch.optim.Optimizer], on_gpu: bool, processes: int = 1):
    """``(setting, host bytes it would still need)`` for the settings that use less host memory than ``config``,
    cheapest change first: without the weight copy (already allocated: freeing it counts as needing less), then
    compact AdamW state (only for optimizers the one-pass AdamW steps), then both. Bytes comparable with
    :func:`still_to_allocate`'s total for ``config``."""
    from .host_kernels import adamw_group_scalars

    c = config.compute_dtype.itemsize
    copy_bytes = c * shape.store_numel if config.weight_copy else 0
    compact = all(
        type(opt) is torch.optim.AdamW and all(adamw_group_scalars(opt, g) is not None for g in opt.param_groups)
        for opt in optimizers
    )
    dtypes = [d for d in (torch.bfloat16, torch.int8) if compact and optimizers and
              adamw_state_bytes(d) < adamw_state_bytes(config.state_dtype)]  # fmt: skip
    choices = [(True, None)] if copy_bytes else []
    choices += [(False, d) for d in dtypes] + [(True, d) for d in dtypes if copy_bytes]
    for drop_copy, dtype in choices:
        state = dtype or config.state_dtype
        needed = still_to_allocate(
            shape, config.compute_dtype, config.accumulate_grads, config.weight_copy and not drop_copy,
            config.num_grad_slabs, on_gpu, optimizers, state, processes, config.cast_on_gpu, config.grad_reduce,
        )  # fmt: skip
        parts = (["weight_copy=False"] if drop_copy else []) + (
            [f"optimizer_state_dtype={STATE_DTYPE_NAMES[dtype]}"] if dtype else []
        )
        yield ", ".join(parts), sum(needed.values()) - (copy_bytes if drop_copy else 0)
