"""The CPU optimizer, stepped group by group on a worker thread.

A step has three moments. ``begin(optimizer)`` snapshots the hyper-parameters of every param group (the LR scheduler
changes them as soon as the step returns). ``schedule(groups)`` queues the update of groups whose gradients are
complete: the engine calls it from the gradient worker during the backward when nothing (clipping) needs the whole
gradient first, so updates overlap the rest of the backward. ``step(optimizer)`` schedules every group not yet
scheduled, in the order the next forward needs them, applying the clipping decided on the complete gradients. Each
scheduled group's version is bumped; the streamer uploads a group only once its update has been applied, so the next
forward overlaps whatever is still running.

Each update runs the user's own optimizer class on a *shadow* instance that holds only that group's parameters:
shadow parameters share storage with the masters, their ``.grad`` are FP32 views of the store's gradients (upcast in
bounded chunks when the gradients were kept in the compute dtype), and their state dicts are the very dict objects of
the user's optimizer (``optimizer.state[p]``), so ``state_dict()``, checkpoints and LR schedulers see one ordinary
optimizer. Any optimizer whose update is independent per parameter (AdamW, Adam, SGD, DeepSpeedCPUAdam, ...) gives
exactly the result of one ``optimizer.step()`` after the full backward. Parameters that received no gradient in the
step are skipped, as PyTorch skips ``grad=None``. After the update the group's compute-dtype copy is refreshed.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import STATE_DTYPE_NAMES
from .host_kernels import (
    AdamwUpdate,
    adamw_group_scalars,
    adamw_state,
    convert_adamw_state,
    fused_adamw_many_,
    host_kernels_available,
    stored_moments_dtype,
)
from .store import GradState, HostStore, StoreGroup, StoreParam
from .workers import WorkerGroup

_SCRATCH_MIN = 128 * 2**20  # elements of the FP32 upcast buffer (0.5 GiB), at least the largest parameter


def _shadow_class(cls: type) -> type:
    # A subclass whose destructor does nothing: some optimizers (DeepSpeedCPUAdam) free native state in __del__.
    return type(f"_Shadow{cls.__name__}", (cls,), {"__del__": lambda self: None})


@dataclass
class _StepPlan:
    optimizer: torch.optim.Optimizer
    shadow: torch.optim.Optimizer
    shadow_params: dict[int, torch.nn.Parameter]
    hyper: list[dict]
    group_of_param: dict[int, int]
    index: int


@dataclass
class _Entry:
    """One parameter's update in a scheduled group update: its gradient's state when the update was scheduled."""

    sp: StoreParam
    param_group: int
    """Index of the optimizer's param group holding it."""
    in_lp: bool
    """The gradient is in the compute-dtype buffer (``grad_lp``), not the FP32 one."""
    clip_coef: torch.Tensor | None
    clip_value: float | None


class LayerOptimizer:
    """Applies ``optimizer.step()`` group by group on a CPU worker thread.

    Args:
        store: The host store whose masters the optimizer updates.
        workers: The engine's workers (the optimizer worker joins them).
        use_fused: Step plain ``torch.optim.AdamW`` groups with the one-pass kernel of :mod:`.host_kernels` when it
            is available (``EngineConfig.host_kernels``).
        threads: Threads of the one-pass kernel (None: ``torch.get_num_threads()``).
        state_dtype: Storage of AdamW's moments (``EngineConfig.optimizer_state_dtype``): FP32, or BF16 or
            ``torch.int8`` (blockwise codes), which only the one-pass AdamW (kernel, else its PyTorch fallback)
            steps; a state stored otherwise (a resumed checkpoint) is converted at its first update, with a warning
            when it changes values.
        on_consumed: Called on the worker with each group whose update has read its gradients, before the group
            counts as updated (the gradient sink then gives a pooled gradient buffer back).
        owns: Whether this process updates a group (data parallel: another process of the node updates the shared
            masters of the groups it owns; here their gradients are consumed without an update). None: every group.
    """

    def __init__(
        self,
        store: HostStore,
        workers: WorkerGroup,
        use_fused: bool = False,
        threads: int | None = None,
        state_dtype: torch.dtype = torch.float32,
        on_consumed: Callable[[StoreGroup], None] | None = None,
        owns: Callable[[StoreGroup], bool] | None = None,
    ):
        self.store = store
        self.on_consumed = on_consumed
        self.owns = owns
        self.use_fused, self.threads, self.state_dtype = use_fused, threads, state_dtype
        # Prioritized by forward order: when several groups are ready (the end of a backward), the ones the next
        # forward needs first (embedding, first layers) are updated first, so that forward can start sooner.
        self.worker = workers.worker("optimizer", prioritized=True)
        self._priority = {id(g): i for i, g in enumerate(store.groups)}
        self._shadows: dict[int, tuple[torch.optim.Optimizer, dict[int, torch.nn.Parameter]]] = {}
        self._plan: _StepPlan | None = None
        self._lock = threading.Lock()
        self.num_steps = 0
        self.kernel_s = 0.0
        """Seconds inside the one-pass AdamW kernel (its own clock, GIL released): ``worker.busy_s - kernel_s`` is
        the Python around it, the waits to take the GIL back and the other optimizers' steps."""
        largest = max((sp.numel for g in store.groups for sp in g.params), default=1)
        biggest_group = max((g.master.numel() for g in store.groups), default=1)
        self._scratch_numel = min(biggest_group, max(largest, _SCRATCH_MIN))
        self._scratch: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ step API
    def begin(self, optimizer: torch.optim.Optimizer) -> None:
        """Snapshots the hyper-parameters of the step about to be computed (idempotent within a step)."""
        self.worker.check()
        with self._lock:
            if self._plan is not None:
                if self._plan.optimizer is not optimizer:
                    raise ValueError("the horizon engine steps one optimizer; a second one was passed")
                return
            check_state_dtype(optimizer, self.state_dtype)
            shadow, shadow_params = self._shadow(optimizer)
            hyper = [{k: _snapshot(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            group_of_param = {}
            for i, g in enumerate(optimizer.param_groups):
                for p in g["params"]:
                    if id(p) not in self.store.by_param:
                        raise ValueError(
                            "the optimizer holds a parameter that is not part of the streamed model's host store "
                            f"(shape {tuple(p.shape)}); the horizon engine steps only the streamed model's parameters"
                        )
                    group_of_param[id(p)] = i
            self._plan = _StepPlan(optimizer, shadow, shadow_params, hyper, group_of_param, self.num_steps)

    def schedule(self, groups: list[StoreGroup]) -> None:
        """Queues the updates of ``groups`` in the current step (no-op for groups already queued in it). The update
        consumes the gradients of the optimizer's parameters in the group; the others' stay."""
        with self._lock:
            plan = self._plan
            if plan is None:
                return
            for group in groups:
                if group.scheduled_step == plan.index:
                    continue
                group.scheduled_step = plan.index
                entries = [
                    _Entry(
                        sp,
                        plan.group_of_param[id(sp.param)],
                        sp.grad_state is GradState.COMPUTE,
                        sp.clip_coef,
                        sp.clip_value,
                    )
                    for sp in group.params
                    if id(sp.param) in plan.group_of_param and sp.has_grad
                ]
                if not entries:
                    continue  # nothing of this optimizer's to update: the masters (and their version) stay
                for e in entries:
                    e.sp.param.grad = None
                    e.sp.discard()
                if self.owns is not None and not self.owns(group):
                    continue  # its owner updates the shared masters (and holds the group's optimizer state)
                with self.store.cond:
                    group.version += 1
                    version = group.version
                self.worker.submit(
                    lambda g=group, e=entries, v=version, p=plan: self._update(g, e, v, p),
                    priority=self._priority[id(group)],
                )

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Schedules every remaining group of this step (in forward order) and closes the step; returns at once."""
        self.begin(optimizer)
        assert self._plan is not None
        self.schedule(self.store.groups)
        with self._lock:
            self._plan = None
            self.num_steps += 1
        optimizer._opt_called = True  # what an LR scheduler's wrapper of optimizer.step() records  # type: ignore[attr-defined]

    def wait(self) -> None:
        """Blocks until every scheduled update has been applied."""
        self.worker.drain()

    def close(self) -> None:
        self.worker.close()

    # ------------------------------------------------------------------------------------------------- worker
    def _update(self, group: StoreGroup, entries: list[_Entry], version: int, plan: _StepPlan):
        try:
            if group.copy is None and group.h2d_event is not None:
                # cast_on_gpu: no upload still reads the masters about to change
                self.worker.wait_event(group.h2d_event)
            copy_stale = bool(entries)
            if (self.use_fused or self.state_dtype != torch.float32) and entries:
                entries, copy_stale = self._update_fused(group, entries, plan)
            chunk: list[_Entry] = []
            used = 0
            for entry in entries:
                if entry.in_lp and used + entry.sp.numel > self._scratch_numel:
                    self._apply(group, chunk, plan)
                    chunk, used = [], 0
                chunk.append(entry)
                used += entry.sp.numel if entry.in_lp else 0
            self._apply(group, chunk, plan)
            if self.on_consumed is not None:
                self.on_consumed(group)  # nothing reads this update's gradients any more
            if group.copy is not None and (entries or copy_stale):
                if group.h2d_event is not None:
                    self.worker.wait_event(group.h2d_event)  # no upload still reads the old copy
                group.copy.copy_(group.master)
        finally:
            self.store.mark_updated(group, version)

    def _apply(self, group: StoreGroup, chunk: list[_Entry], plan: _StepPlan) -> None:
        if not chunk:
            return
        shadow = plan.shadow
        by_pg: dict[int, list[torch.nn.Parameter]] = {}
        shadow.state = {}
        offset = 0
        for entry in chunk:
            sp, pg = entry.sp, entry.param_group
            if entry.in_lp:
                if self._scratch is None:
                    with torch.inference_mode(False):
                        self._scratch = torch.empty(self._scratch_numel, dtype=torch.float32)
                grad = self._scratch[offset : offset + sp.numel].view(sp.shape)
                grad.copy_(group.lp_grad_view(sp))
                offset += sp.numel
            else:
                grad = group.grad_view(sp)
            if entry.clip_coef is not None:
                grad.mul_(entry.clip_coef)
            if entry.clip_value is not None:
                grad.clamp_(-entry.clip_value, entry.clip_value)
            sh = plan.shadow_params[id(sp.param)]
            sh.grad = grad
            shadow.state[sh] = plan.optimizer.state[sp.param]  # the user's state dict object, updated in place
            by_pg.setdefault(pg, []).append(sh)
        shadow.param_groups = [dict(plan.hyper[pg], params=params) for pg, params in by_pg.items()]
        shadow.step()
        for params in by_pg.values():
            for sh in params:
                sh.grad = None

    # ----------------------------------------------------------------------------- one-pass AdamW (host_kernels.py)
    def _update_fused(self, group: StoreGroup, entries: list[_Entry], plan: _StepPlan) -> tuple[list[_Entry], bool]:
        """Steps the entries of a plain ``torch.optim.AdamW`` with CPU state (FP32, BF16 or int8 moments) in one
        pass each: gradient read straight from ``grad_lp``/``grad`` (no upcast), BF16 copy written in the same pass.
        Returns the entries left to the shadow optimizer and whether the group's copy still needs a refresh for those
        it stepped."""
        compact = self.state_dtype != torch.float32  # only this path steps compact moments (fallback if no kernel)
        if type(plan.optimizer) is not torch.optim.AdamW or not (compact or host_kernels_available()):
            return entries, bool(entries)
        copy = group.copy if group.copy is not None and group.copy.dtype == torch.bfloat16 else None
        scalars: dict[int, dict[str, float] | None] = {}
        rest, updates, steps = [], [], []
        for entry in entries:
            sp, pg, in_lp = entry.sp, entry.param_group, entry.in_lp
            if pg not in scalars:
                scalars[pg] = adamw_group_scalars(plan.optimizer, plan.hyper[pg])
            hyper = scalars[pg]
            state = None
            if hyper is not None:
                state = adamw_state(plan.optimizer.state[sp.param], sp.param, plan.hyper[pg], self.state_dtype)
            if state is None:
                if compact:
                    raise RuntimeError(f"{sp.name}: its AdamW state cannot be stepped with {self.state_dtype} moments")
                rest.append(entry)
                continue
            step, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale = state
            step_value = step.item() + 1  # torch's AdamW counts the step before its update (written below)
            steps.append(step)
            span = slice(sp.offset, sp.offset + sp.numel)
            grad = group.grad_lp if in_lp else group.grad
            assert grad is not None
            updates.append(
                AdamwUpdate(
                    group.master[span],
                    grad[span],
                    exp_avg.view(-1),
                    exp_avg_sq.view(-1),
                    None if copy is None else copy[span],
                    step=step_value,
                    clip_coef=None if entry.clip_coef is None else float(entry.clip_coef),
                    clip_value=entry.clip_value,
                    seed=int(step_value) * 1_000_003 + sp.offset,  # stochastic rounding of compact moments
                    exp_avg_scale=exp_avg_scale,
                    exp_avg_sq_scale=exp_avg_sq_scale,
                    **hyper,
                )
            )
        if updates:
            if copy is not None and group.h2d_event is not None:
                self.worker.wait_event(group.h2d_event)  # no upload still reads the old copy
            # the group's parameters in one call: the worker takes the GIL back once, not once per parameter
            self.kernel_s += fused_adamw_many_(
                updates, num_threads=self.threads, use_extension=None if self.use_fused else False
            )
            for step in steps:  # after the updates: an update refused leaves every state as it was
                step.add_(1)
        return rest, bool(updates) and group.copy is not None and copy is None

    def _shadow(self, optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, dict[int, torch.nn.Parameter]]:
        key = id(optimizer)
        if key not in self._shadows:
            shadow = object.__new__(_shadow_class(type(optimizer)))
            # Data attributes only: instance-level callables (an LR scheduler's `step` wrapper, for one) would call
            # back into the user's optimizer.
            shadow.__dict__.update({k: v for k, v in optimizer.__dict__.items() if not callable(v)})
            shadow.state = {}
            shadow.param_groups = []
            for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
                if hasattr(shadow, hooks):
                    setattr(shadow, hooks, OrderedDict())
            params = {}
            for g in optimizer.param_groups:
                for p in g["params"]:
                    params[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
            self._shadows[key] = (shadow, params)
        return self._shadows[key]


def check_state_dtype(optimizer: torch.optim.Optimizer, state_dtype: torch.dtype) -> None:
    """Refuses an optimizer whose state the engine cannot keep in ``state_dtype`` (compact moments are stepped by the
    one-pass AdamW only: a plain ``torch.optim.AdamW`` without amsgrad/maximize, scalar hyper-parameters)."""
    if state_dtype == torch.float32:
        return
    name = STATE_DTYPE_NAMES.get(state_dtype, str(state_dtype))
    if type(optimizer) is not torch.optim.AdamW or any(
        adamw_group_scalars(optimizer, g) is None for g in optimizer.param_groups
    ):
        raise ValueError(
            f"optimizer_state_dtype={name} keeps AdamW's moments compact in the engine's one-pass AdamW: it steps a "
            f"plain torch.optim.AdamW (no amsgrad, maximize or tensor hyper-parameters), got "
            f"{type(optimizer).__name__}; use optimizer_state_dtype=fp32 for other optimizers"
        )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict, state_dtype: torch.dtype) -> None:
    """``optimizer.load_state_dict(state_dict)`` with AdamW's moments going straight into ``state_dtype`` (PyTorch's
    own load casts every state tensor to the parameter's FP32 first: with compact moments, several times their
    memory at once, and int8 codes would become numbers without their block scales)."""
    quantized = any(stored_moments_dtype(s) == torch.int8 for s in state_dict["state"].values())
    if state_dtype == torch.float32 and not quantized:
        optimizer.load_state_dict(state_dict)
        return
    check_state_dtype(optimizer, state_dtype)
    if quantized and type(optimizer) is not torch.optim.AdamW:
        raise ValueError(
            f"this checkpoint holds int8 AdamW moments (optimizer_state_dtype=int8); the resumed optimizer is a "
            f"{type(optimizer).__name__}: resume with torch.optim.AdamW"
        )
    optimizer.load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, params))
    for pid, saved in state_dict["state"].items():
        state = optimizer.state[by_id[pid]]
        state.update(saved)
        convert_adamw_state(state, state_dtype)


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def clip_coefficient(
    norms: list[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total norm and clip coefficient exactly as ``torch.nn.utils.clip_grad_norm_`` computes them."""
    if not norms:
        return torch.tensor(0.0), torch.tensor(1.0)
    on_device = [i for i, n in enumerate(norms) if n.device.type != "cpu"]
    if on_device:  # one transfer for every norm computed on the GPU
        moved = torch.stack([norms[i] for i in on_device]).to("cpu", torch.float32)
        norms = list(norms)
        for j, i in enumerate(on_device):
            norms[i] = moved[j]
    if math.isinf(norm_type):
        total = torch.stack(norms).max()
    else:
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, coef


class ZeroGradWatch:
    """``optimizer.zero_grad`` replaced by one that first calls ``discard(optimizer)`` (the engine forgets its host
    gradients of the optimizer's parameters); :meth:`restore` gives the optimizer its own ``zero_grad`` back."""

    def __init__(self, discard, optimizer: torch.optim.Optimizer) -> None:
        self.discard = weakref.WeakMethod(discard)
        self.optimizer = weakref.ref(optimizer)
        self.own = optimizer.__dict__.get("zero_grad")  # an instance attribute to give back, if there was one
        self.original = optimizer.zero_grad
        optimizer.zero_grad = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        discard, optimizer = self.discard(), self.optimizer()
        if discard is not None and optimizer is not None:
            discard(optimizer)
        return self.original(*args, **kwargs)

    def restore(self) -> None:
        optimizer = self.optimizer()
        if optimizer is None or optimizer.__dict__.get("zero_grad") is not self:
            return
        if self.own is None:
            del optimizer.zero_grad
        else:
            optimizer.zero_grad = self.own
