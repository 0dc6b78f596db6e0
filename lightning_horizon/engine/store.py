"""The host store: FP32 master weights (and their gradients) in flat host buffers.

Each *group* (the embedding, one decoder layer, the final norm, an untied lm_head) owns one contiguous buffer of
FP32 masters. The model's ``nn.Parameter`` objects keep their identity and their names but their ``.data`` become
views into these buffers, so ``model.state_dict()`` keys stay Hugging Face's and an optimizer built over
``model.parameters()`` steps the masters in place. Tied weights are one Parameter, stored once.

Gradients live in a second flat FP32 buffer per group with the same layout. They are owned by the engine: the
gradient folder writes them (overwriting on the first backward after an optimizer step, adding afterwards), the
CPU optimizer reads them, and ``param.grad`` is set to views of them only between the end of a backward and the
next optimizer step (exactly when plain PyTorch would have gradients).

Parameters that are frozen when the store is built can be held apart, in the compute dtype
(``EngineConfig.frozen_dtype="compute"``, :func:`split_frozen`): a group ``<name>.frozen`` whose buffer is both its
"masters" and its upload copy, with no gradients and no optimizer state.

Each group carries a version that the optimizer bumps when it schedules an update and a counter of completed
updates; the streamer uploads a group only once ``done_version == version`` so no layer is ever read while its
update is running.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .pinned import register_pinned, unregister_pinned

_ALIGN = 128  # elements: every parameter starts 512-byte aligned (256 bytes in the BF16 slot layout)


def _align(n: int, to: int = _ALIGN) -> int:
    return (n + to - 1) // to * to


class GradState(enum.Enum):
    """Where a parameter's current gradient is. Transitions: ``NONE -> COMPUTE`` (a gradient lands in the compute
    dtype), ``NONE -> FP32`` or ``COMPUTE -> FP32`` (lands or is upcast into the FP32 buffer), ``FP32 -> FP32`` (another
    backward adds to it); any -> ``NONE`` when an update consumes it or ``zero_grad`` discards it."""

    NONE = "none"
    """No gradient since the last update or ``zero_grad``: the next landing overwrites the buffer."""
    COMPUTE = "compute"
    """In the group's compute-dtype buffer (``grad_lp``)."""
    FP32 = "fp32"
    """In the group's FP32 buffer (``grad``)."""


_TRANSITIONS = {
    GradState.NONE: {GradState.COMPUTE, GradState.FP32},
    GradState.COMPUTE: {GradState.FP32},
    GradState.FP32: {GradState.FP32},
}


@dataclass(eq=False)
class StoreParam:
    """One parameter's place in its group buffer."""

    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    grad_state: GradState = GradState.NONE
    """Where the current gradient is (see :class:`GradState`)."""
    grad_norm: torch.Tensor | None = None
    """L2 norm of the current gradient (kept when norm tracking is on)."""
    clip_coef: torch.Tensor | None = None
    """Scale of the current gradient set by clipping by norm (applied by the optimizer, with the update)."""
    clip_value: float | None = None
    """Bound of the current gradient set by clipping by value (applied by the optimizer, with the update)."""
    discards: int = 0
    """Times the gradient was discarded: the processes of a data-parallel node, which discard in step, tell from it
    whether the gradient in their shared buffer is of the current step (:class:`~.data_parallel.NodeGradients`)."""

    @property
    def trainable(self) -> bool:
        return self.param.requires_grad

    @property
    def has_grad(self) -> bool:
        return self.grad_state is not GradState.NONE

    def land(self, state: GradState) -> None:
        """Records that the gradient is now in ``state`` (a transition of :class:`GradState`)."""
        if state not in _TRANSITIONS[self.grad_state]:
            raise RuntimeError(f"{self.name}: a gradient cannot go from {self.grad_state.name} to {state.name}")
        self.grad_state = state

    def discard(self) -> None:
        """Forgets the current gradient (consumed by an update, or dropped by ``zero_grad``)."""
        self.grad_state = GradState.NONE
        self.grad_norm = self.clip_coef = self.clip_value = None
        self.discards += 1


@dataclass(eq=False)
class StoreGroup:
    """One flat buffer of FP32 masters and its gradient buffer (or, for a frozen group, the frozen parameters)."""

    name: str
    params: list[StoreParam]
    numel: int
    master: torch.Tensor
    frozen: bool = False
    """Parameters frozen when the store was built, held in the compute dtype (``EngineConfig.frozen_dtype``):
    ``master`` is in that dtype and is also ``copy`` (uploads read it); no gradients, no optimizer state."""
    grad: torch.Tensor | None = None
    copy: torch.Tensor | None = None
    """Masters in the compute dtype (pinned on CUDA), refreshed by the optimizer: uploads need no packing."""
    grad_lp: torch.Tensor | None = None
    """Gradients in the compute dtype (pinned on CUDA): the D2H target when no accumulation happens. A whole buffer
    of the group's own, or, with pooled gradients, a view of a buffer leased from the sink's
    :class:`~.grad_pool.GradPool` from the group's landing until its update has read it (None in between)."""
    h2d_event: object | None = None
    """CUDA event after the last upload that read this group's host memory directly (``copy``, or the masters with
    ``cast_on_gpu``); the optimizer waits on it before rewriting what the upload read."""
    scheduled_step: int = -1
    """Index of the optimizer step whose update of this group was last scheduled."""
    version: int = 0
    """Bumped by the optimizer when it schedules an update of this group."""
    done_version: int = 0
    """Set by the optimizer worker when the update scheduled as ``version`` has been applied."""
    home: int | None = None
    """With a sharded node store (data parallel over several nodes, ``EngineConfig.node_store="sharded"``): the node
    that holds and steps this group. None: every node holds it."""
    away: bool = False
    """Another node holds this group (:attr:`home`): its buffer here is never written nor read (its pages take no
    memory), and its parameters are on the meta device in this process."""

    @property
    def trainable(self) -> bool:
        return any(p.trainable for p in self.params)

    def grad_view(self, sp: StoreParam) -> torch.Tensor:
        assert self.grad is not None
        return self.grad[sp.offset : sp.offset + sp.numel].view(sp.shape)

    def lp_grad_view(self, sp: StoreParam) -> torch.Tensor:
        assert self.grad_lp is not None
        return self.grad_lp[sp.offset : sp.offset + sp.numel].view(sp.shape)

    def ensure_grad(self) -> torch.Tensor:
        if self.grad is None:
            with torch.inference_mode(False):
                self.grad = torch.zeros_like(self.master)
        return self.grad


def release_free_heap() -> None:
    """Returns the C heap's free pages to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Building the store copies each parameter into its group's buffer and frees the source right after: sources
    smaller than glibc's mmap threshold (up to 32 MiB) were carved from the heap, and a group buffer allocated while
    they still lived cannot reuse their holes: without a trim after each group the process kept up to a few hundred
    MiB it no longer used, at the end of setup (193 MiB for a 0.5 GB BF16 model) and more at its peak
    (``tests/test_setup_memory.py``, case ``lora_model_path``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_trainable(group: StoreGroup, sp: StoreParam) -> None:
    """Refuses to compute a gradient for a parameter of a frozen group (it has no FP32 master to train)."""
    if group.frozen and sp.param.requires_grad:
        raise RuntimeError(
            f"parameter {sp.name!r} was frozen when the horizon engine was built, so it is held in "
            f"{str(group.master.dtype).removeprefix('torch.')} without an FP32 master (frozen_dtype='compute'), and "
            "now requires gradients: it cannot be trained. Set frozen_dtype='fp32' (HorizonStrategy(frozen_dtype="
            "'fp32'), or strategy.frozen_dtype=fp32 in a recipe) for runs that unfreeze parameters during training."
        )


def unique_groups(
    groups: list[tuple[str, list[tuple[str, nn.Parameter]]]],
) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """The store's groups: each parameter once, in the first group that lists it (tied weights), without the groups
    left empty. The layout a :class:`HostStore` of ``groups`` has, computed without allocating it."""
    seen: set[int] = set()
    out = []
    for name, named_params in groups:
        unique = []
        for n, p in named_params:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append((n, p))
        if unique:
            out.append((name, unique))
    return out


FROZEN_SUFFIX = ".frozen"
"""Name of a group's frozen part: ``layers.3`` holds the layer's trainable masters, ``layers.3.frozen`` its frozen
parameters in the compute dtype."""


def split_frozen(
    groups: list[tuple[str, list[tuple[str, nn.Parameter]]]], frozen_dtype: torch.dtype | None
) -> list[tuple[str, list[tuple[str, nn.Parameter]], torch.dtype]]:
    """The store's groups (:func:`unique_groups`) with their dtypes: with ``frozen_dtype``, each group's parameters
    that do not require gradients go to a group of their own (named ``name + FROZEN_SUFFIX``, right after it) held
    in ``frozen_dtype``; the rest stay FP32 masters. Without it, every group is FP32."""
    out = []
    for name, named in unique_groups(groups):
        if frozen_dtype is None:
            out.append((name, named, torch.float32))
            continue
        trainable = [(n, p) for n, p in named if p.requires_grad]
        frozen = [(n, p) for n, p in named if not p.requires_grad]
        if trainable:
            out.append((name, trainable, torch.float32))
        if frozen:
            out.append((name + FROZEN_SUFFIX, frozen, frozen_dtype))
    return out


class HostStore:
    """FP32 masters of a model in flat per-group host buffers (and frozen parameters in the compute dtype).

    Args:
        groups: ``(group name, [(parameter name, parameter), ...])`` in the order the model uses them. A parameter
            listed twice (tied weights) is stored once, in the first group that lists it.
        pin: Page-lock the FP32 buffers with ``cudaHostRegister`` (only useful when masters are copied to the GPU
            directly; the engine packs BF16 copies into its own pinned staging, so it is off by default).
        frozen_dtype: Hold the parameters that do not require gradients now in groups of this dtype
            (:func:`split_frozen`, ``EngineConfig.frozen_dtype``); None: every parameter in the FP32 masters.
        pin_frozen: Page-lock the frozen groups (uploads read them directly).
        allocate: ``allocate(group name, numel, dtype)`` gives each group's buffer (e.g. a part of a buffer shared by
            the processes of a node, :mod:`.data_parallel`); None: ``torch.empty``.
        fill: Copy the parameters' values into the buffers (False: another process fills the shared buffers; the
            parameters only become views into them).
        away: Names of the groups this process's node does not hold (a sharded node store, :mod:`.data_parallel`):
            their buffers are laid out but never filled nor pinned, and their parameters go to the meta device
            (:attr:`StoreGroup.away`).
    """

    def __init__(
        self,
        groups: list[tuple[str, list[tuple[str, nn.Parameter]]]],
        pin: bool = False,
        adopt: bool = False,
        frozen_dtype: torch.dtype | None = None,
        pin_frozen: bool = False,
        allocate: Callable[[str, int, torch.dtype], torch.Tensor] | None = None,
        fill: bool = True,
        away: Collection[str] = (),
    ) -> None:
        self.groups: list[StoreGroup] = []
        self.by_param: dict[int, tuple[StoreGroup, StoreParam]] = {}
        self.cond = threading.Condition()
        self._pinned: list[torch.Tensor] = []
        self.node_buffers: list = []
        """Shared-memory buffers the groups view (kept alive with the store), see :mod:`.data_parallel`."""
        for name, unique, dtype in split_frozen(groups, frozen_dtype):
            group = self._adopt_group(name, unique, dtype) if adopt else None
            if group is None:
                group = self._build_group(name, unique, dtype, allocate, fill, name in away)
                release_free_heap()  # the sources this group freed, before the next group's buffer is allocated
            if dtype != torch.float32:
                group.frozen = True
                group.copy = group.master
            self.groups.append(group)
            for sp in group.params:
                self.by_param[id(sp.param)] = (group, sp)
            if (pin if not group.frozen else pin_frozen) and not group.away:
                self._pinned.append(register_pinned(group.master))
        self.by_name = {g.name: g for g in self.groups}

    @staticmethod
    def layout_numel(named_params: list[tuple[str, nn.Parameter]]) -> int:
        """Elements of the flat buffer of a group of ``named_params`` (each parameter aligned)."""
        return sum(_align(p.numel()) for _, p in named_params)

    @staticmethod
    def _build_group(
        name: str,
        named_params: list[tuple[str, nn.Parameter]],
        dtype: torch.dtype = torch.float32,
        allocate: Callable[[str, int, torch.dtype], torch.Tensor] | None = None,
        fill: bool = True,
        away: bool = False,
    ) -> StoreGroup:
        offset, entries = 0, []
        for pname, p in named_params:
            if p.is_meta and not away:
                raise ValueError(
                    f"parameter {pname!r} is on the meta device: materialise the model (or load its weights) before"
                    " handing it to the engine"
                )
            if not p.is_floating_point():
                raise ValueError(f"parameter {pname!r} has dtype {p.dtype}; only floating-point parameters are stored")
            entries.append(StoreParam(pname, p, offset, p.numel(), p.shape))
            offset += _align(p.numel())
        if allocate is None:
            master = torch.empty(max(offset, 1), dtype=dtype)
        else:
            master = allocate(name, max(offset, 1), dtype)
        if away:  # another node's: no page of its buffer is touched here, the parameters hold no data
            for sp in entries:
                if not sp.param.is_meta:
                    meta = nn.Parameter(torch.empty(sp.shape, device="meta"), requires_grad=sp.param.requires_grad)
                    torch.utils.swap_tensors(sp.param, meta)  # (the object stays: optimizers hold it)
            return StoreGroup(name, entries, offset, master, away=True)
        if fill and offset > sum(e.numel for e in entries):
            master.zero_()  # alignment gaps: keep them deterministic for checksums
        with torch.no_grad():
            for sp in entries:
                view = master[sp.offset : sp.offset + sp.numel].view(sp.shape)
                if fill:
                    view.copy_(sp.param.data)
                # The source is freed here, parameter by parameter (if nothing else holds it): a model of any dtype
                # becomes FP32 masters with at most this group's buffer over the masters and the sources left
                # (tests/test_setup_memory.py measures it)
                sp.param.data = view
        return StoreGroup(name, entries, offset, master)

    def entry(self, param: nn.Parameter) -> tuple[StoreGroup, StoreParam]:
        try:
            return self.by_param[id(param)]
        except KeyError:
            raise ValueError("this parameter is not part of the streamed model's host store") from None

    def params(self, params: Iterable[nn.Parameter] | None = None) -> list[StoreParam]:
        """The entries of ``params`` (those the store holds, each once), or every entry in store order."""
        if params is None:
            return [sp for g in self.groups for sp in g.params]
        found = {id(p): self.by_param[id(p)][1] for p in params if id(p) in self.by_param}
        return list(found.values())

    @property
    def num_params(self) -> int:
        return sum(sp.numel for g in self.groups for sp in g.params)

    def wait_updated(self, group: StoreGroup, poll: callable | None = None) -> None:  # type: ignore[valid-type]
        """Blocks until every scheduled optimizer update of ``group`` has been applied."""
        with self.cond:
            while group.done_version < group.version:
                if poll is not None:
                    poll()
                self.cond.wait(0.05)

    def mark_updated(self, group: StoreGroup, version: int) -> None:
        with self.cond:
            group.done_version = version
            self.cond.notify_all()

    def close(self) -> None:
        for t in self._pinned:
            unregister_pinned(t)
        self._pinned.clear()

    # ------------------------------------------------------------------ building without copies (used by loading.py)
    @classmethod
    def from_meta(
        cls, model: nn.Module, groups: list[tuple[str, list[tuple[str, nn.Parameter]]]], pin: bool = False
    ) -> HostStore:
        """A store for a model built on the meta device: allocates the flat buffers (uninitialised), nothing copied.

        Every parameter listed in ``groups`` (meta or not) is replaced, in every module of ``model`` that holds it,
        by a new ``nn.Parameter`` that is a view into its group's buffer (tied weights stay one Parameter). The
        caller then fills the views (e.g. from safetensors); alignment gaps are zeroed. The layout is exactly the one
        ``HostStore(groups)`` builds, so :meth:`adopt` takes these buffers over as they are.
        """
        replaced: dict[int, nn.Parameter] = {}
        old: list[nn.Parameter] = []  # keeps the replaced objects alive: their ids stay unique until we are done
        for _, named_params in groups:
            unique = [(n, p) for n, p in named_params if id(p) not in replaced]
            offsets, offset = [], 0
            for pname, p in unique:
                if not p.is_floating_point():
                    raise ValueError(
                        f"parameter {pname!r} has dtype {p.dtype}; only floating-point parameters are stored"
                    )
                offsets.append(offset)
                offset += _align(p.numel())
            master = torch.empty(max(offset, 1), dtype=torch.float32)
            with torch.no_grad():
                for (_, p), start in zip(unique, offsets):
                    end = start + p.numel()
                    master[end : start + _align(p.numel())].zero_()
                    replaced[id(p)] = nn.Parameter(master[start:end].view(p.shape), requires_grad=p.requires_grad)
                    old.append(p)
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None and id(p) in replaced:
                    module._parameters[key] = replaced[id(p)]
        new_groups = [(name, [(n, replaced[id(p)]) for n, p in named]) for name, named in groups]
        return cls.adopt(new_groups, pin=pin)

    @classmethod
    def adopt(
        cls,
        groups: list[tuple[str, list[tuple[str, nn.Parameter]]]],
        pin: bool = False,
        frozen_dtype: torch.dtype | None = None,
        pin_frozen: bool = False,
    ) -> HostStore:
        """Like ``HostStore(groups, ...)``, but takes over groups whose parameters already are views into one flat
        buffer of the group's dtype with the store's layout (as :meth:`from_meta` or an earlier engine leave them):
        those are not copied. Other groups are built (copied) as the constructor does."""
        return cls(groups, pin=pin, adopt=True, frozen_dtype=frozen_dtype, pin_frozen=pin_frozen)

    @staticmethod
    def _adopt_group(
        name: str, named_params: list[tuple[str, nn.Parameter]], dtype: torch.dtype = torch.float32
    ) -> StoreGroup | None:
        """The group over the parameters' existing flat buffer, or None when they are not laid out as a store's."""
        storage = None
        offset, entries = 0, []
        for pname, p in named_params:
            data = p.data
            if data.device.type != "cpu" or data.dtype != dtype or not data.is_contiguous():
                return None
            if storage is None:
                storage = data.untyped_storage()
            if data.untyped_storage().data_ptr() != storage.data_ptr() or data.storage_offset() != offset:
                return None
            entries.append(StoreParam(pname, p, offset, p.numel(), p.shape))
            offset += _align(p.numel())
        total = max(offset, 1)
        if storage is None or storage.nbytes() != total * dtype.itemsize:
            return None
        master = torch.empty(0, dtype=dtype).set_(storage, 0, (total,))
        return StoreGroup(name, entries, offset, master)
