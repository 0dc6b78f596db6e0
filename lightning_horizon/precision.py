"""``HorizonPrecision``: FP32 masters on the host, compute in the dtype the precision flag names.

``"bf16-mixed"`` means FP32 master weights, gradients accumulated in FP32 and optimizer state in FP32 on the host,
with the streamed weights and the activations in BF16 on the compute device. ``"32-true"`` computes in FP32 (used to
check numerics on the CPU). Anything else is refused: ``"bf16-true"`` would make the masters BF16 and ``"16-mixed"``
needs loss scaling that the engine does not implement.

There is no autocast: the streamed weights already are in the compute dtype, and the loss upcasts logits to FP32
exactly as Hugging Face does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch.optim import Optimizer
from typing_extensions import override

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_horizon.engine import HorizonEngine

SUPPORTED = {"bf16-mixed": torch.bfloat16, "32-true": torch.float32}
_ALIASES = {"bf16": "bf16-mixed", "32": "32-true", 32: "32-true", "bf16-mixed": "bf16-mixed", "32-true": "32-true"}


def normalize_precision(value: Any) -> str:
    key = _ALIASES.get(value, _ALIASES.get(str(value)))
    if key is None:
        hint = ""
        if str(value) in ("bf16-true", "16-true"):
            hint = " (it would make the master weights half precision; the horizon strategy keeps FP32 masters)"
        elif str(value) in ("16-mixed", "16"):
            hint = " (float16 compute needs loss scaling, which the horizon strategy does not implement; use bf16)"
        raise ValueError(
            f"Trainer(strategy='horizon') does not support precision={value!r}{hint}; use 'bf16-mixed' "
            "(FP32 masters, BF16 compute) or '32-true' (FP32 compute)"
        )
    return key


class HorizonPrecision(Precision):
    """Precision plugin of the horizon strategy.

    Args:
        precision: ``"bf16-mixed"`` (default) or ``"32-true"``.
    """

    def __init__(self, precision: str = "bf16-mixed") -> None:
        self.precision = normalize_precision(precision)  # type: ignore[assignment]
        self._engine: Callable[[], HorizonEngine | None] = lambda: None

    @property
    def compute_dtype(self) -> torch.dtype:
        return SUPPORTED[self.precision]

    def _require_engine(self) -> HorizonEngine:
        engine = self._engine()
        if engine is None:
            raise RuntimeError("HorizonPrecision is used before the horizon strategy built its engine")
        return engine

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module  # masters stay FP32

    @override
    @contextlib.contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        yield

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        yield

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Optimizer, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        engine = self._require_engine()
        if _nothing_between_backward_and_step(model):
            engine.begin_step(optimizer)  # each group's update starts as soon as its gradients are on the host
        closure_result = self._wrap_closure(model, optimizer, closure)
        if closure_result is None and model.automatic_optimization:
            return None  # training_step returned None: Lightning skips the step, so do we
        if kwargs:
            raise ValueError(f"optimizer.step() arguments {sorted(kwargs)} are not supported by the horizon strategy")
        engine.step(optimizer)
        return closure_result

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        self._require_engine().clip_grad_norm_(float(clip_val), optimizer=optimizer)

    @override
    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        self._require_engine().clip_grad_value_(float(clip_val), optimizer=optimizer)


def _nothing_between_backward_and_step(model: pl.LightningModule) -> bool:
    """True when no clipping and no hook may read or change the gradients between the backward and the step."""
    from lightning.pytorch import Callback, LightningModule
    from lightning.pytorch.utilities.model_helpers import is_overridden

    trainer = model.trainer
    if trainer.gradient_clip_val:
        return False
    callback_hooks = ("on_before_optimizer_step", "on_after_backward")
    module_hooks = (*callback_hooks, "configure_gradient_clipping")
    if any(is_overridden(h, model, parent=LightningModule) for h in module_hooks):
        return False
    return not any(is_overridden(h, cb, parent=Callback) for cb in trainer.callbacks for h in callback_hooks)
