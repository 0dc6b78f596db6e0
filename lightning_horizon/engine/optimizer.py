"""The CPU optimizer, stepped group by group on a worker thread.

``step(optimizer)`` does not update anything itself. It snapshots the hyper-parameters of every param group (the
LR scheduler changes them as soon as ``step`` returns), takes the clipping decision made on the complete gradients,
bumps every group's version and queues one update per store group, in the order the next forward pass needs them.
The streamer uploads a group only after its update has been applied, so the next step's forward overlaps the
optimizer: layer ``i`` is updated while layers ``< i`` already compute.

Each update runs the user's own optimizer class on a *shadow* instance that holds only that group's parameters:
shadow parameters share storage with the masters, their ``.grad`` are the store's FP32 gradient views, and their
state dicts are the very dict objects of the user's optimizer (``optimizer.state[p]``), so ``state_dict()``,
checkpoints and LR schedulers see one ordinary optimizer. Any optimizer whose update is independent per parameter
(AdamW, Adam, SGD, DeepSpeedCPUAdam, ...) therefore gives exactly the result of one ``optimizer.step()`` after the
full backward. Parameters that received no gradient in the step are skipped, as PyTorch skips ``grad=None``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .store import HostStore, StoreGroup, StoreParam
from .workers import Worker

_HP_SKIP = ("params",)


def _shadow_class(cls: type) -> type:
    # A subclass whose destructor does nothing: some optimizers (DeepSpeedCPUAdam) free native state in __del__.
    return type(f"_Shadow{cls.__name__}", (cls,), {"__del__": lambda self: None})


class LayerOptimizer:
    """Applies ``optimizer.step()`` group by group on a CPU worker thread.

    Args:
        store: The host store whose masters the optimizer updates.
        device: Compute device (worker threads bind to it).
    """

    def __init__(self, store: HostStore, device: torch.device) -> None:
        self.store = store
        self.worker = Worker("optimizer", device)
        self._shadows: dict[int, tuple[torch.optim.Optimizer, dict[int, torch.nn.Parameter]]] = {}
        self.clip_coef: torch.Tensor | None = None
        """Set by clipping by norm; applied to every gradient by the next step (then cleared)."""
        self.clip_value: float | None = None
        self.num_steps = 0

    # --------------------------------------------------------------------------------------------- main thread
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Schedules one step of ``optimizer`` over every store group; returns at once."""
        self.worker.check()
        shadow, shadow_params = self._shadow(optimizer)
        hyper = [{k: _snapshot(v) for k, v in g.items() if k not in _HP_SKIP} for g in optimizer.param_groups]
        group_of_param = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            if id(p) not in self.store.by_param:
                raise ValueError(
                    "the optimizer holds a parameter that is not part of the streamed model's host store "
                    f"(shape {tuple(p.shape)}); the horizon engine steps only the streamed model's parameters"
                )
        clip_coef, clip_value = self.clip_coef, self.clip_value
        self.clip_coef = self.clip_value = None
        for group in self.store.groups:
            entries = [
                (sp, group_of_param[id(sp.param)])
                for sp in group.params
                if id(sp.param) in group_of_param and not sp.fresh
            ]
            for sp in group.params:
                sp.param.grad = None
                sp.fresh = True
            with self.store.cond:
                group.version += 1
                version = group.version
            self.worker.submit(
                lambda g=group, e=entries, v=version: self._update(
                    g, e, v, optimizer, shadow, shadow_params, hyper, clip_coef, clip_value
                )
            )
        self.num_steps += 1
        optimizer._opt_called = True  # what an LR scheduler's wrapper of optimizer.step() records  # type: ignore[attr-defined]

    def wait(self) -> None:
        """Blocks until every scheduled update has been applied."""
        self.worker.drain()

    def close(self) -> None:
        self.worker.close()

    # ------------------------------------------------------------------------------------------------- worker
    def _update(
        self,
        group: StoreGroup,
        entries: list[tuple[StoreParam, int]],
        version: int,
        optimizer: torch.optim.Optimizer,
        shadow: torch.optim.Optimizer,
        shadow_params: dict[int, torch.nn.Parameter],
        hyper: list[dict],
        clip_coef: torch.Tensor | None,
        clip_value: float | None,
    ) -> None:
        try:
            if not entries:
                return
            by_pg: dict[int, list[torch.nn.Parameter]] = {}
            shadow.state = {}
            for sp, pg in entries:
                grad = group.grad_view(sp)
                if clip_coef is not None:
                    grad.mul_(clip_coef)
                if clip_value is not None:
                    grad.clamp_(-clip_value, clip_value)
                sh = shadow_params[id(sp.param)]
                sh.grad = grad
                shadow.state[sh] = optimizer.state[sp.param]  # the user's state dict object, updated in place
                by_pg.setdefault(pg, []).append(sh)
            shadow.param_groups = [dict(hyper[pg], params=params) for pg, params in by_pg.items()]
            shadow.step()
            for sh in (sh for params in by_pg.values() for sh in params):
                sh.grad = None
        finally:
            self.store.mark_updated(group, version)

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
    if math.isinf(norm_type):
        total = torch.stack(norms).max()
    else:
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, coef
