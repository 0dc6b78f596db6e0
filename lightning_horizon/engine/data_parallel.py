"""Data parallelism over several processes (GPUs): one host store per node, gradients averaged, updates shared out.

Every process runs the whole model on its own micro-batches, as with DDP: the result of a step equals one process
with the global batch. What differs from DDP is where the state lives:

* **One store per node.** The FP32 masters (and frozen parameters) of a node are one POSIX shared-memory buffer
  (:class:`~.shared_memory.NodeBuffer`) that every local process maps: the model's parameters of each process are
  views into it. Local rank 0 fills it from its model (what DDP's broadcast from rank 0 does); the other processes'
  own copies are freed. With several nodes, each node holds a full replica (``replicated``): node 0's values are
  broadcast to the other nodes' leaders once, at setup.
* **Gradients averaged on the host.** Each process keeps FP32 host gradients of its micro-batches (the engine's
  accumulation buffers); :meth:`DataParallel.reduce_gradients` averages them over every process (an all-reduce over
  a gloo group of host tensors), so clipping and hooks see the same gradient in every process.
* **Updates shared out within a node.** Each group of the store (a decoder layer, the embedding, ...) is owned by
  one local process (:func:`assign_owners`, balanced by size): only its owner steps it (and holds its optimizer
  state), writing the shared masters in place; the others drop their gradients of it. A step ends with a barrier:
  no process reads a master while its owner updates it.

Host memory per node: the masters (and optimizer state) once, whatever the number of processes; each process adds
its FP32 gradient buffers and its compute buffers.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .shared_memory import NodeBuffer
from .store import GradState, HostStore, StoreGroup

_PAGE = 4096


@dataclass(eq=False)
class DataParallel:
    """The processes of a data-parallel run as the engine sees them (``torch.distributed`` must be initialised).

    Args:
        local_rank: This process's index on its node.
        local_world_size: Processes per node (every node runs as many).
        timeout: Of the host collectives (the gloo group): a process that stops answering makes the others raise
            after this long instead of waiting forever.
    """

    local_rank: int
    local_world_size: int
    timeout: datetime.timedelta = field(default=datetime.timedelta(minutes=10))

    def __post_init__(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel needs torch.distributed initialised (init_process_group) first")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(
                f"{self.world_size} processes cannot form nodes of {self.local_world_size} processes each: every node "
                "must run the same number of processes"
            )
        if not 0 <= self.local_rank < self.local_world_size or self.rank % self.local_world_size != self.local_rank:
            raise ValueError(
                f"local rank {self.local_rank} of {self.local_world_size} does not match global rank {self.rank}: "
                "processes must be numbered node by node (rank = node_rank * local_world_size + local_rank)"
            )
        self.node_rank = self.rank // self.local_world_size
        self.num_nodes = self.world_size // self.local_world_size
        # Host tensors travel over gloo whatever the default backend is (NCCL reduces only GPU tensors). new_group is
        # collective: every process creates the same groups in the same order.
        self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        leaders = list(range(0, self.world_size, self.local_world_size))
        self.leaders = dist.new_group(ranks=leaders, backend="gloo", timeout=self.timeout)
        nodes = [list(range(n * self.local_world_size, (n + 1) * self.local_world_size)) for n in range(self.num_nodes)]
        self.node = None
        for ranks in nodes:  # every process takes part in creating every node's group
            group = dist.new_group(ranks=ranks, backend="gloo", timeout=self.timeout)
            if self.rank in ranks:
                self.node = group
        self._owners: dict[str, int] = {}

    @property
    def is_leader(self) -> bool:
        """Local rank 0: creates and fills its node's store."""
        return self.local_rank == 0

    # ------------------------------------------------------------------------------------------ the shared store
    def build_store(
        self,
        groups: list[tuple[str, list[tuple[str, torch.nn.Parameter]]]],
        frozen_dtype: torch.dtype | None,
        pin: bool = False,
        pin_frozen: bool = False,
    ) -> HostStore:
        """A :class:`~.store.HostStore` of ``groups`` whose buffers are one shared-memory buffer per node
        (collective: every process calls it). Every process's parameters become views into its node's buffer,
        holding the values of global rank 0's model."""
        from .store import split_frozen

        layout, total = {}, 0
        for name, named, dtype in split_frozen(groups, frozen_dtype):
            numel = max(HostStore.layout_numel(named), 1)
            layout[name] = (total, numel, dtype)
            total += (numel * dtype.itemsize + _PAGE - 1) // _PAGE * _PAGE
        token = [uuid.uuid4().hex[:12]]
        dist.broadcast_object_list(token, src=0, group=self.group)  # one name for the job, chosen by rank 0
        tag = f"store-{token[0]}-node{self.node_rank}"
        buffer = NodeBuffer.create(tag, max(total, 1)) if self.is_leader else None
        names = [None] * self.world_size
        dist.all_gather_object(names, buffer.name if buffer is not None else None, group=self.group)
        if buffer is None:
            buffer = NodeBuffer.open(names[self.node_rank * self.local_world_size], max(total, 1))
        dist.barrier(group=self.group)  # every process has mapped its node's buffer: the name can go
        if self.is_leader:
            buffer.unlink()  # from now on the memory goes away with the last process, however it ends

        def allocate(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
            offset, size, expected = layout[name]
            assert size == max(numel, 1) and expected == dtype, (name, size, numel, expected, dtype)
            return buffer.view(dtype, size, offset)

        store = HostStore(
            groups, pin=pin, frozen_dtype=frozen_dtype, pin_frozen=pin_frozen, allocate=allocate, fill=self.is_leader
        )
        store.node_buffers = [buffer]  # lives while the store (or a parameter viewing it) does
        dist.barrier(group=self.group)  # the leaders have filled their buffers
        if self.num_nodes > 1 and self.is_leader:
            for group in store.groups:  # node 0's values on every node (each node's store is a replica)
                dist.broadcast(group.master, src=0, group=self.leaders)
        dist.barrier(group=self.group)
        self._owners = assign_owners(store.groups, self.local_world_size)
        return store

    def owns(self, group: StoreGroup) -> bool:
        """Whether this process steps ``group`` (and holds its optimizer state)."""
        return self._owners.get(group.name, 0) == self.local_rank

    def owner(self, group: StoreGroup) -> int:
        """Local rank that steps ``group``."""
        return self._owners.get(group.name, 0)

    # ----------------------------------------------------------------------------------------------- gradients
    def reduce_gradients(self, store: HostStore, expose: Callable[[], None]) -> None:
        """Averages every trainable parameter's FP32 host gradient over all processes (collective).

        A parameter that has a gradient in some process but not in another (no token reached an expert, say)
        counts as zero where it has none; one with no gradient anywhere keeps none (its update is skipped, as in one
        process). ``expose`` is called at the end to set ``param.grad`` to the averaged views."""
        params = [(g, sp) for g in store.groups if not g.frozen for sp in g.params if sp.trainable]
        flags = torch.tensor([sp.has_grad for _, sp in params], dtype=torch.int32)
        if flags.numel():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        reduce: dict[int, StoreGroup] = {}
        for (group, sp), anywhere in zip(params, flags.tolist()):
            if not anywhere:
                continue
            if sp.grad_state is GradState.COMPUTE:
                raise RuntimeError(
                    f"{sp.name}: data-parallel gradients must be kept in FP32 on the host (the engine's accumulation "
                    "buffers); this gradient is in the compute dtype"
                )
            if not sp.has_grad:
                group.ensure_grad()
                group.grad_view(sp).zero_()
                sp.land(GradState.FP32)
            sp.grad_norm = None  # a norm recorded as the gradient landed is this process's, not the average's
            reduce[id(group)] = group
        for group in reduce.values():
            assert group.grad is not None
            dist.all_reduce(group.grad, group=self.group)
            group.grad.div_(self.world_size)
        expose()

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast_object(self, obj, src: int = 0):
        """Global rank ``src``'s ``obj`` in every process (a picklable object; collective)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every process's ``obj``, in rank order (collective)."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def owned_names(self, store: HostStore) -> set[str]:
        """Names of the parameters this process steps (whose optimizer state it holds)."""
        return {sp.name for g in store.groups if not g.frozen and self.owns(g) for sp in g.params}


def assign_owners(groups: list[StoreGroup], ranks: int) -> dict[str, int]:
    """Each trainable group's owner among ``ranks`` local processes: largest group first, to the least loaded
    process (ties to the lowest rank); deterministic, so every process computes the same assignment."""
    load = [0] * ranks
    owners = {}
    trainable = [g for g in groups if not g.frozen]
    for group in sorted(trainable, key=lambda g: (-g.numel, g.name)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[group.name] = rank
        load[rank] += group.numel
    return owners


def local_topology() -> tuple[int, int]:
    """``(local_rank, local_world_size)`` from the launcher's environment (``torchrun``, Lightning's launcher)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return local_rank, local_world


def data_parallel_config(config):
    """``config`` as a data-parallel run needs it: FP32 host gradients kept until the step (they are averaged over
    the processes before clipping and the update), no updates during the backward, no gradient pool, and no
    per-process BF16 weight copy (it would grow host memory with the number of processes; uploads pack the
    shared masters instead). Refuses settings that ask for what it turns off."""
    import dataclasses

    if config.weight_copy:
        raise ValueError(
            "weight_copy=True keeps a BF16 copy of the masters per process: with several processes (devices > 1) "
            "host memory would grow with the number of GPUs. Leave weight_copy unset"
        )
    if config.grad_pool_buffers:
        raise ValueError(
            "grad_pool_buffers: the gradient pool serves updates during the backward, which a data-parallel run "
            "cannot do (gradients are averaged over the processes first). Leave grad_pool_buffers unset"
        )
    return dataclasses.replace(
        config, accumulate_grads=True, updates_in_backward=False, weight_copy=False, grad_pool_buffers=0
    )
