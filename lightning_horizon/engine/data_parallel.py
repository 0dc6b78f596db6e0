"""Data parallelism over several processes (GPUs): one host store per node, gradients averaged, updates shared out.

Every process runs the whole model on its own micro-batches, as with DDP: the result of a step equals one process
with the global batch. What differs from DDP is where the state lives:

* **One store per node.** The FP32 masters (and frozen parameters) of a node are one POSIX shared-memory buffer
  (:class:`~.shared_memory.NodeBuffer`) that every local process maps: the model's parameters of each process are
  views into it. Local rank 0 fills it from its model (what DDP's broadcast from rank 0 does); the other processes'
  own copies are freed. With several nodes, each node holds a full replica (``replicated``): node 0's values are
  broadcast to the other nodes' leaders once, at setup; or (``node_store="sharded"``) only its share of the decoder
  layers (:func:`assign_homes`), the others' parameters on the meta device and their pages of the buffer never
  touched: a layer's shards then come from its node at every use (:meth:`NodeReduce.from_home`), and its gradient
  shards are reduced to its node only (:meth:`NodeReduce.to_home`).
* **Gradients summed in one node buffer.** The FP32 gradients are one buffer per node too
  (:class:`NodeGradients`): every process's gradient worker adds its micro-batches' gradients straight into it,
  one process at a time per group (a mutex per group), so it holds the sum over the node's processes without a
  gradient buffer per process. :meth:`DataParallel.reduce_gradients` adds the other nodes' sums (each group's owner,
  an all-reduce among the processes of its local rank, one per node) and divides by the number of processes;
  every process then sees the averaged gradients as ``param.grad``, so clipping and hooks read the same values
  everywhere. Clipping by norm measures each group once, in its owner (the partial norms are gathered over the
  node). The order in which the node's processes add up a gradient is whichever reaches the mutex first: the sums
  equal DDP's to rounding, not bit for bit from run to run. With ``grad_reduce="device"`` the devices reduce-scatter
  each group's gradient over the node first (:class:`NodeReduce`; ``GradientSink._reduce_group``) and each process
  adds only its shard of the sum, without the mutex; the embedding's rows keep the host path.
* **Updates shared out within a node.** Each group of the store (a decoder layer, the embedding, ...) is owned by
  one local process (:func:`assign_owners`, balanced by size): only its owner steps it (and holds its optimizer
  state), writing the shared masters in place. A step starts with a barrier (no process still reads a gradient an
  owner's update may scale in place) and ends with one (no process reads a master while its owner updates it).

Host memory per node: the masters, the FP32 gradients and the optimizer state once, whatever the number of
processes; each process adds its compute buffers (and, on a GPU, its upload staging and gradient slabs) and its own
interpreter and libraries.
"""

from __future__ import annotations

import datetime
import functools
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .shared_memory import NodeBuffer
from .store import GradState, HostStore, StoreGroup, StoreParam

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
        self.peers = None
        """The processes of this local rank, one per node: they own the same groups and add up their nodes' sums."""
        if self.num_nodes > 1:
            for local in range(self.local_world_size):
                ranks = list(range(local, self.world_size, self.local_world_size))
                group = dist.new_group(ranks=ranks, backend="gloo", timeout=self.timeout)
                if self.local_rank == local:
                    self.peers = group
        # The same groups in the default backend (NCCL on GPUs), over which the devices sum gradients
        # (grad_reduce="device") and gather layers (sharded_streaming); with gloo as the default, the groups above
        # serve
        node, peers = self.node, self.peers
        if dist.get_backend() != "gloo":
            for ranks in nodes:
                group = dist.new_group(ranks=ranks, timeout=self.timeout)
                if self.rank in ranks:
                    node = group
            if self.num_nodes > 1:
                for local in range(self.local_world_size):
                    group = dist.new_group(ranks=list(range(local, self.world_size, self.local_world_size)))
                    if self.local_rank == local:
                        peers = group
        self.node_reduce = NodeReduce(node, self.local_rank, self.local_world_size, peers, self.num_nodes)
        """The node's collectives on the devices (``grad_reduce="device"``, ``sharded_streaming``)."""
        self._owners: dict[str, int] = {}
        self._writers: dict[str, int] = {}
        self._homes: dict[str, int] = {}
        self.away_ids: set[int] = set()
        """Ids of the parameters of the layers other nodes hold (a sharded node store), set by
        :meth:`prepare_model`: they may be on the meta device in every process."""
        self.node_store = "replicated"
        """``EngineConfig.node_store`` of the last store built."""

    @property
    def is_leader(self) -> bool:
        """Local rank 0: creates and fills its node's store."""
        return self.local_rank == 0

    # ------------------------------------------------------------------------------------------ the shared store
    def prepare_model(self, model: torch.nn.Module, node_store: str = "replicated") -> None:
        """Gives every process global rank 0's buffers (as DDP broadcasts them; collective), after giving the model
        of a process other than its node's local rank 0 CPU storage if it was built on the meta device.

        Only local rank 0 fills its node's store from its model (:meth:`build_store`); the others' parameters only
        become views into it. Building their models on the meta device (``lightning_horizon.models.build_model(...,
        device="meta")``, what ``recipes.sft`` does in those processes) therefore loses nothing and keeps setup from
        holding a model copy per process: their parameters get storage that is never written (``to_empty``; tied
        parameters stay tied), replaced by the store's views right after.

        With ``node_store="sharded"`` over several nodes, local rank 0 may leave the layers other nodes hold on the
        meta device (loaded per node, ``lightning_horizon.loading.load_hf_model(..., node=...)``, or left so by an
        earlier sharded store): :attr:`away_ids`."""
        self.away_ids = set()
        if node_store == "sharded" and self.num_nodes > 1:
            from lightning_horizon.loading import away_parameters

            from .adapter import find_causal_lm

            self.away_ids = set(away_parameters(find_causal_lm(model), self.node_rank, self.num_nodes))
        tensors = [*model.named_parameters(), *model.named_buffers()]
        meta = [n for n, t in tensors if t.is_meta]
        if meta and self.is_leader:
            wrong = [n for n, t in tensors if t.is_meta and id(t) not in self.away_ids]
            if wrong:
                raise ValueError(
                    f"{wrong[0]!r} is on the meta device in local rank 0, which fills its node's host store from its "
                    "model: build the model on the CPU there (only the other processes of a node may build theirs on "
                    "the meta device; with node_store='sharded', local rank 0 may leave the layers other nodes hold "
                    "on it)"
                )
            meta = []  # (the layers other nodes hold: they stay on the meta device)
        if meta:
            _to_empty_keeping_ties(model)
        for _, buffer in model.named_buffers():
            dist.broadcast(buffer, src=0, group=self.group)

    def build_store(
        self,
        groups: list[tuple[str, list[tuple[str, torch.nn.Parameter]]]],
        frozen_dtype: torch.dtype | None,
        pin: bool = False,
        pin_frozen: bool = False,
        node_store: str = "replicated",
    ) -> HostStore:
        """A :class:`~.store.HostStore` of ``groups`` whose buffers are one shared-memory buffer per node
        (collective: every process calls it). Every process's parameters become views into its node's buffer,
        holding the values of global rank 0's model.

        With ``node_store="sharded"`` and several nodes, each decoder layer's groups have a home node
        (:func:`assign_homes`): only there are they filled (with rank 0's values, sent by node 0's leader) and
        stepped; elsewhere their part of the buffer is never touched (no memory) and their parameters go to the
        meta device (:attr:`~.store.StoreGroup.away`). A later store (another engine over the same model) takes
        each node's layers from the earlier one."""
        from .store import split_frozen

        layout, total = {}, 0

        def place(name: str, numel: int, dtype: torch.dtype) -> None:
            nonlocal total
            layout[name] = (total, numel, dtype)
            total += (numel * dtype.itemsize + _PAGE - 1) // _PAGE * _PAGE

        split = split_frozen(groups, frozen_dtype)
        self.node_store = node_store
        homes = assign_homes(split, self.num_nodes) if self.sharded_nodes else {}
        away = {name for name, home in homes.items() if home != self.node_rank}
        if homes and self.is_leader:
            self._send_home(split, homes)
        for name, named, dtype in split:
            place(name, max(HostStore.layout_numel(named), 1), dtype)
        # The node's FP32 gradients (its sparse pages take memory as gradients first land) and a stamp per parameter
        grads = [
            (name, max(HostStore.layout_numel(named), 1))
            for name, named, _ in split
            if any(p.requires_grad for _, p in named)
        ]
        for name, numel in grads:
            place(f"grad:{name}", numel, torch.float32)
        num_params = sum(len(named) for _, named, _ in split)
        place("stamps", max(num_params, 1), torch.int64)
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

        def region(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
            offset, size, expected = layout[name]
            assert size == max(numel, 1) and expected == dtype, (name, size, numel, expected, dtype)
            return buffer.view(dtype, size, offset)

        store = HostStore(
            groups,
            pin=pin,
            frozen_dtype=frozen_dtype,
            pin_frozen=pin_frozen,
            allocate=region,
            fill=self.is_leader,
            away=away,
        )
        for group in store.groups:
            group.home = homes.get(group.name)
        self._homes = homes
        store.node_buffers = [buffer]  # lives while the store (or a parameter viewing it) does
        store.node_grads = NodeGradients(
            buffer,
            store,
            {name: region(f"grad:{name}", numel, torch.float32) for name, numel in grads},
            region("stamps", num_params, torch.int64),
            self.local_world_size,
        )
        dist.barrier(group=self.group)  # the leaders have filled their buffers
        if self.num_nodes > 1 and self.is_leader:
            for group in store.groups:  # node 0's values on every node (the groups every node holds)
                if group.home is None:
                    dist.broadcast(group.master, src=0, group=self.leaders)
        dist.barrier(group=self.group)
        # The groups every node holds first, alike on every node (their owners of the same local rank add up the
        # nodes' sums), then the node's own layers, on top of that load
        common = [g for g in store.groups if g.home is None]
        own = [g for g in store.groups if g.home is not None and not g.away]
        self._owners, self._writers = {}, {}
        for frozen, out in ((False, self._owners), (True, self._writers)):
            load = [0] * self.local_world_size
            out.update(assign_owners(common, self.local_world_size, frozen, load))
            out.update(assign_owners(own, self.local_world_size, frozen, load))
        return store

    @property
    def sharded_nodes(self) -> bool:
        """Each node holds only its share of the layers (``node_store="sharded"`` over several nodes, in the last
        store built): the other layers' parameters are on the meta device here."""
        return self.node_store == "sharded" and self.num_nodes > 1

    def _send_home(self, split, homes: dict[str, int]) -> None:
        """Node 0's leader sends each layer group's values (from its model) to the leader of the group's home node,
        which receives them into its own model's parameters before it fills its store (leaders only; collective
        among them): rank 0's weights, as DDP broadcasts them. A group whose parameters are on the meta device in
        node 0 is not sent: its home node holds its values already (loaded there from the same files, or kept from
        an earlier sharded store); every leader learns which from node 0."""
        named_of = {name: named for name, named, _ in split}
        other = [name for name, _, _ in split if homes.get(name, 0) != 0]
        box = [[not any(p.is_meta for _, p in named_of[n]) for n in other] if self.node_rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.leaders)
        for name, send in zip(other, box[0]):
            home = homes[name] * self.local_world_size  # its leader's global rank
            if self.node_rank not in (0, homes[name]):
                continue
            if not send:
                if self.node_rank != 0 and any(p.is_meta for _, p in named_of[name]):
                    raise ValueError(
                        f"{name} is held by node {homes[name]} (node_store='sharded'), but neither that node's local "
                        "rank 0 nor node 0's has its values (both are on the meta device): build the whole model in "
                        "node 0's local rank 0, or load each node's layers there (load_hf_model(..., node=...))"
                    )
                continue
            params = [p for _, p in named_of[name]]
            dtype = functools.reduce(torch.promote_types, [p.dtype for p in params], torch.float32)  # exact
            flat = torch.empty(sum(p.numel() for p in params), dtype=dtype)
            if self.node_rank == 0:
                torch.cat([p.detach().reshape(-1).to(flat.dtype) for p in params], out=flat)
                dist.send(flat, dst=home, group=self.leaders)
            else:
                dist.recv(flat, src=0, group=self.leaders)
                with torch.no_grad():
                    for p, part in zip(params, flat.split([p.numel() for p in params])):
                        p.copy_(part.view(p.shape))

    def node_share(self, store: HostStore) -> float:
        """The fraction of the store's trainable elements this node holds (1 unless the node store is sharded)."""
        trainable = [g for g in store.groups if not g.frozen]
        total = sum(g.numel for g in trainable)
        return sum(g.numel for g in trainable if not g.away) / total if total else 1.0

    def measures(self, group: StoreGroup) -> bool:
        """Whether this process counts ``group`` in a norm over every process's parameters: its owner does, on the
        group's home node, or (a group every node holds) on node 0 alone when the nodes' norms are gathered
        together (a sharded node store); with replicated nodes each node's owners measure the whole model."""
        if not self.owns(group):
            return False
        return not self.sharded_nodes or group.home is not None or self.node_rank == 0

    def owns(self, group: StoreGroup) -> bool:
        """Whether this process steps ``group`` (and holds its optimizer state); never a group its node does not
        hold (a sharded node store)."""
        return not group.away and self._owners.get(group.name, 0) == self.local_rank

    def writes(self, name: str) -> bool:
        """Whether this process writes the checkpoint's master file (and optimizer shard) of the store group named
        ``name``: the groups of its node, frozen ones too, balanced by size over its processes (local rank 0 writes
        what is in no group); with replicated nodes, or for a group every node holds, those of node 0 only."""
        home = self._homes.get(name)
        if self.node_rank != (0 if home is None else home):
            return False
        return self._writers.get(name, 0) == self.local_rank

    def writes_state(self, name: str) -> bool:
        """Whether this process writes the optimizer state it holds of the store group named ``name``: all of it with
        replicated nodes (only node 0 writes), with a sharded node store that of its node's layers, and of the
        groups every node holds (and steps alike) on node 0 only."""
        return self.node_rank == 0 or self._homes.get(name) is not None

    def owner(self, group: StoreGroup) -> int:
        """Local rank that steps ``group``."""
        return self._owners.get(group.name, 0)

    # ----------------------------------------------------------------------------------------------- gradients
    def reduce_gradients(self, store: HostStore, expose: Callable[[], None]) -> None:
        """Averages every trainable parameter's gradient over all processes (collective; every process's gradients
        must have landed: the engine waits for its gradient worker first).

        The node's buffer (:class:`NodeGradients`) already holds the sum over the node's processes; each group's
        owner adds the other nodes' sums (an all-reduce among the processes of that local rank, one per node) and
        divides by the number of processes. A parameter with a gradient in some process but not in another (no
        token reached an expert, say) counts as zero where it has none; one with no gradient anywhere keeps none
        (its update is skipped, as in one process). ``expose`` is called at the end to set ``param.grad`` to the
        averaged gradients, which every process of the node sees (the same buffer)."""
        grads: NodeGradients = store.node_grads
        params = [(g, sp) for g in store.groups if not g.frozen for sp in g.params if sp.trainable]
        dist.barrier(group=self.node)  # every local process's gradients are in the node's buffer
        flags = torch.tensor([grads.landed(sp) for _, sp in params], dtype=torch.int32)
        if flags.numel() and self.num_nodes > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        anywhere = [(group, sp) for (group, sp), flag in zip(params, flags.tolist()) if flag]
        reduce: dict[int, tuple[StoreGroup, list[StoreParam]]] = {}
        for group, sp in anywhere:
            if sp.grad_state is GradState.COMPUTE:
                raise RuntimeError(
                    f"{sp.name}: data-parallel gradients must be kept in FP32 on the host (the engine's accumulation "
                    "buffers); this gradient is in the compute dtype"
                )
            reduce.setdefault(id(group), (group, []))[1].append(sp)
        for group, sps in reduce.values():  # between the two node barriers no process lands a gradient: no mutex
            if not self.owns(group):
                continue
            if id(group) in grads.summed_everywhere:  # the devices summed it over every node already
                for sp in sps:
                    grads.to_sum(group, sp, share=self.world_size)
            else:
                for sp in sps:
                    grads.to_sum(group, sp)
                if self.num_nodes > 1:
                    dist.all_reduce(group.grad, group=self.peers)
            group.grad.div_(self.world_size)
            for sp in sps:
                grads.mark_averaged(sp)
        dist.barrier(group=self.node)  # every owner has averaged its groups
        for _, sp in anywhere:
            if not sp.has_grad:
                sp.land(GradState.FP32)
            sp.grad_norm = None  # a norm recorded as the gradient landed is not the average's
            grads.averaged_here.add(id(sp))
        expose()

    def reduce_norms(self, norms: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
        """The total ``norm_type`` norms of ``norms`` (this process's, one per parameter) of every process of the node
        (collective over the node): the norm of the result is the norm over the node's parameters. With a sharded
        node store, of every process (each node measures its own layers, :meth:`measures`)."""
        from .optimizer import clip_coefficient

        mine, _ = clip_coefficient(norms, 1.0, norm_type)
        group, size = (self.group, self.world_size) if self.sharded_nodes else (self.node, self.local_world_size)
        out = [torch.zeros((), dtype=torch.float32) for _ in range(size)]
        dist.all_gather(out, mine.to(torch.float32).reshape(()), group=group)
        return out

    def min_over_node(self, value: int) -> int:
        """The smallest ``value`` of the node's processes (collective over the node, on the host: no device sync);
        of every process with a sharded node store, where a layer's gather also crosses the nodes."""
        out = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(out, op=dist.ReduceOp.MIN, group=self.group if self.sharded_nodes else self.node)
        return int(out.item())

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


class NodeGradients:
    """The FP32 gradients of a node's store, one buffer shared by the node's processes (not one per GPU).

    Every process adds the gradients of its micro-batches straight into the node's buffer, one process at a time per
    group (:meth:`lock`, a mutex of the node buffer per group), so the buffer holds the sum over the node's
    processes; :meth:`DataParallel.reduce_gradients` turns it into the average over every process. A stamp per
    parameter (in the shared buffer) says what the buffer holds: nothing of the current step (stamped for an earlier
    discard count, :attr:`~.store.StoreParam.discards`, which advances alike in every process), the node's sum, or
    the average. The first process to land a gradient after a discard zero-fills it first; one landing on an
    averaged gradient (micro-batches after an explicit early average) first scales it back to this node's share of
    the sum.

    Args:
        buffer: The node's buffer (its mutexes).
        store: The store whose groups get ``grad`` from ``grads``.
        grads: Each trainable group's FP32 gradient, by group name (views of ``buffer``).
        stamps: One ``int64`` per parameter of the store, in its order (a view of ``buffer``).
        local_world_size: Processes on the node.
    """

    _SUM, _AVERAGE = 0, 1

    def __init__(
        self,
        buffer: NodeBuffer,
        store: HostStore,
        grads: dict[str, torch.Tensor],
        stamps: torch.Tensor,
        local_world_size: int,
    ) -> None:
        self.buffer, self.stamps, self.local_world_size = buffer, stamps, local_world_size
        self.summed_everywhere: set[int] = set()
        """Ids of the groups whose gradients the devices sum over every process of every node before they land
        (``grad_reduce="device"`` with several nodes): each node's buffer then holds the sum over all processes, and
        :meth:`DataParallel.reduce_gradients` only averages them (no all-reduce among the nodes' owners)."""
        self.averaged_here: set[int] = set()
        """Ids of this process's :class:`~.store.StoreParam` whose gradients were averaged and have not landed
        since: with ``grad_reduce="device"`` each process scales its own shard of them back to the node's share
        (:meth:`to_sum` would scale the whole gradient, and another process may have landed its shard already)."""
        self._index: dict[int, int] = {}
        self._mutex: dict[int, int] = {}
        for i, group in enumerate(store.groups):
            self._mutex[id(group)] = i
            for sp in group.params:
                self._index[id(sp)] = len(self._index)
            if group.name in grads:
                assert grads[group.name].numel() == group.master.numel(), group.name
                group.grad = grads[group.name]
        assert len(self._index) <= stamps.numel()

    def lock(self, group: StoreGroup):
        """Context manager: holds ``group``'s mutex (take it from one thread per process, the gradient worker)."""
        return self.buffer.lock(self._mutex[id(group)])

    def _stamp(self, sp: StoreParam) -> tuple[bool, int]:
        value = int(self.stamps[self._index[id(sp)]])
        return value >> 1 == sp.discards + 1, value & 1

    def _set(self, sp: StoreParam, state: int) -> None:
        self.stamps[self._index[id(sp)]] = ((sp.discards + 1) << 1) | state

    def landed(self, sp: StoreParam) -> bool:
        """Whether a process of the node landed ``sp``'s gradient since the processes last discarded it."""
        return self._stamp(sp)[0]

    def to_sum(self, group: StoreGroup, sp: StoreParam, share: int | None = None) -> None:
        """Makes ``sp``'s gradient this node's part of the sum over every process (under :meth:`lock` while other
        processes may land it): zero-filled if it holds an earlier step's, scaled back if it holds the average (by
        ``share``, the processes whose sum it stands for: by default the node's, whose shares add up to the sum)."""
        current, state = self._stamp(sp)
        if not current:
            group.grad_view(sp).zero_()
        elif state == self._AVERAGE:
            group.grad_view(sp).mul_(share or self.local_world_size)
        else:
            return
        self._set(sp, self._SUM)

    def mark_summed(self, sp: StoreParam) -> None:
        """Records that ``sp``'s gradient holds the node's sum of the current step (every process of the node writes
        the same value when the devices reduced it: each landed its shard)."""
        self._set(sp, self._SUM)

    def mark_averaged(self, sp: StoreParam) -> None:
        """Records that ``sp``'s gradient now holds the average over every process (while no process lands it)."""
        self._set(sp, self._AVERAGE)


@dataclass(eq=False)
class NodeReduce:
    """The processes of a node as the devices run collectives over them: the gradients' reduce-scatter
    (``grad_reduce="device"``) and the layers' all-gather (``sharded_streaming``).

    Args:
        group: Process group of the node's processes (the default backend: NCCL on GPUs, gloo on CPUs).
        rank: This process's index in it (its local rank): it receives shard ``rank`` of every reduce-scatter.
        size: Processes in it.
    """

    group: object
    rank: int
    size: int
    peers: object | None = None
    """With several nodes: the processes of this local rank, one per node, in the same backend; each shard is
    all-reduced over them, so every node's buffer holds the sum over all processes."""
    num_nodes: int = 1

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self.group))

    @property
    def summed(self) -> int:
        """Processes whose gradients a reduced shard sums."""
        return self.size * self.num_nodes

    def home_rank(self, home: int) -> int:
        """Global rank of this local rank's process on node ``home``."""
        return home * self.size + self.rank

    def from_home(self, out: torch.Tensor, home: int) -> None:
        """``out`` (this process's shard of a layer) from the process of its local rank on node ``home``, which
        uploaded it (a sharded node store; collective among :attr:`peers`)."""
        dist.broadcast(out, src=self.home_rank(home), group=self.peers)

    def to_home(self, out: torch.Tensor, home: int) -> None:
        """Sums ``out`` (this rank's shard of its node's sum) over the nodes into the process of its local rank on
        node ``home`` only (a sharded node store: the other nodes do not hold the group; collective among
        :attr:`peers`)."""
        dist.reduce(out, dst=self.home_rank(home), group=self.peers)

    def across_nodes(self, out: torch.Tensor) -> None:
        """Adds up ``out`` (this rank's shard of its node's sum) over the nodes (collective among :attr:`peers`)."""
        if self.peers is not None:
            dist.all_reduce(out, group=self.peers)

    def bounds(self, numel: int) -> tuple[int, int, int]:
        """``(shard, start, stop)``: ``numel`` elements cut into :attr:`size` shards of ``shard = ceil(numel / size)``
        elements; this process's shard holds ``start:stop``, shorter at the end, and empty when the elements run out
        before it (few elements, many processes)."""
        shard = -(-numel // self.size)
        start = min(self.rank * shard, numel)
        return shard, start, min(start + shard, numel)

    def all_gather(self, out: torch.Tensor) -> None:
        """Fills ``out`` (``size`` shards) with every process's shard of it, in place: this process's shard is
        ``out``'s shard ``rank`` (collective over the node, like :meth:`reduce_scatter`)."""
        shard = out.numel() // self.size
        collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        collective(out, out[self.rank * shard : (self.rank + 1) * shard], group=self.group)

    def reduce_scatter(self, out: torch.Tensor, flat: torch.Tensor) -> None:
        """``out`` = shard ``rank`` of the sum of every process's ``flat`` (``size`` shards of ``out``'s length;
        collective over the node: every process calls it for the same gradients in the same order)."""
        collective = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        collective(out, flat, group=self.group)


def _to_empty_keeping_ties(model: torch.nn.Module) -> None:
    """``model.to_empty(device="cpu")`` (storage never written: no memory is touched), with parameters and buffers
    shared by several modules (tied embeddings) still shared: ``to_empty`` gives each place its own tensor."""
    places: dict[int, list[tuple[torch.nn.Module, str, str]]] = {}
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, kind).items():
                if tensor is not None:
                    places.setdefault(id(tensor), []).append((module, kind, name))
    model.to_empty(device="cpu")
    for (first, kind, name), *others in places.values():
        tensor = getattr(first, kind)[name]
        for module, other_kind, other in others:
            getattr(module, other_kind)[other] = tensor


def assign_owners(
    groups: list[StoreGroup], ranks: int, frozen: bool = False, load: list[int] | None = None
) -> dict[str, int]:
    """Each trainable group's owner among ``ranks`` local processes (with ``frozen``, every group's): largest group
    first, to the least loaded process (ties to the lowest rank); deterministic, so every process computes the same
    assignment. ``load``: each process's elements assigned before (updated in place)."""
    load = [0] * ranks if load is None else load
    owners = {}
    trainable = [g for g in groups if frozen or not g.frozen]
    for group in sorted(trainable, key=lambda g: (-g.numel, g.name)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[group.name] = rank
        load[rank] += group.numel
    return owners


def assign_homes(split, num_nodes: int) -> dict[str, int]:
    """The home node of each decoder layer's groups (``layers.<i>`` and its frozen part together) among
    ``num_nodes``, balanced by size as :func:`assign_owners` balances processes (largest first, to the least loaded
    node; deterministic). ``split``: :func:`~.store.split_frozen`'s groups. The other groups (embedding, norm,
    head) are held by every node and have none."""
    from .store import FROZEN_SUFFIX

    sizes: dict[str, int] = {}
    for name, named, _ in split:
        layer = name.removesuffix(FROZEN_SUFFIX)
        if layer.startswith("layers."):
            sizes[layer] = sizes.get(layer, 0) + HostStore.layout_numel(named)
    load = [0] * num_nodes
    layer_home = {}
    for layer in sorted(sizes, key=lambda n: (-sizes[n], int(n.split(".")[1]))):
        node = min(range(num_nodes), key=lambda r: (load[r], r))
        layer_home[layer] = node
        load[node] += sizes[layer]
    return {
        name: layer_home[name.removesuffix(FROZEN_SUFFIX)]
        for name, _, _ in split
        if name.removesuffix(FROZEN_SUFFIX) in layer_home
    }


def local_topology() -> tuple[int, int]:
    """``(local_rank, local_world_size)`` from the launcher's environment (``torchrun``, Lightning's launcher)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return local_rank, local_world


def data_parallel_config(config, num_nodes: int = 1):
    """``config`` as a data-parallel run needs it: FP32 host gradients kept until the step (they are averaged over
    the processes before clipping and the update), no updates during the backward, no gradient pool, and no
    per-process BF16 weight copy (it would grow host memory with the number of processes; uploads pack the
    shared masters instead). Refuses settings that ask for what it turns off. With ``num_nodes > 1`` and
    ``node_store="sharded"``, refuses a run without the device collectives it needs and streams routed experts
    whole."""
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
    if config.node_store == "sharded" and num_nodes > 1:
        needs = [
            f"{name}={want!r} (got {got!r})"
            for name, want, got in (
                ("sharded_streaming", True, config.sharded_streaming),
                ("grad_reduce", "device", config.grad_reduce),
            )
            if got != want
        ]
        if needs:
            raise ValueError(
                f"node_store='sharded' over {num_nodes} nodes needs {' and '.join(needs)}: each node holds only its "
                "share of the layers, so a layer reaches the other nodes' GPUs by a gather on the devices and its "
                "gradient goes back by a reduction on the devices. Set them, or node_store='replicated'"
            )
        # routed experts stream whole: a process cannot upload the experts its own tokens reach, which only the
        # layer's node holds
        config = dataclasses.replace(config, sparse_experts=False)
    return dataclasses.replace(
        config,
        accumulate_grads=True,
        updates_in_backward=False,
        weight_copy=False,
        grad_pool_buffers=0,
        track_grad_norm=False,  # clipping measures the averaged gradients, each process those of its groups
    )
