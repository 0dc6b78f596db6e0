"""``SFTModule``: the LightningModule of the SFT recipe, usable on its own with any Trainer.

It wraps a Hugging Face causal LM (``self.model(**batch).loss``), logs ``train/loss``, ``train/tokens_per_s`` (real,
non-padding tokens, see :func:`~lightning_horizon.data.count_real_tokens`) and ``val/loss``, and builds the optimizer
of an :class:`OptimConfig` (the recipe's ``optim:`` group): AdamW (torch, fused on the CPU; or DeepSpeedCPUAdam),
no weight decay on norms and biases, linear warm-up then cosine decay to ``min_lr_ratio * lr``, stepped every step::

    import lightning as L
    import lightning_horizon
    from lightning_horizon.lightning_module import OptimConfig, SFTModule

    module = SFTModule(model, OptimConfig(lr=2e-5), max_steps=1000)
    L.Trainer(strategy="horizon", precision="bf16-mixed", max_steps=1000).fit(module, datamodule)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_horizon.data import count_real_tokens
from lightning_horizon.engine.loss import IGNORE_INDEX, shift_labels

OPTIMIZER_NAMES = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")
IMPLEMENTATIONS = ("torch", "deepspeed")


@dataclass
class OptimConfig:
    """The optimizer and its schedule (the recipe's ``optim:`` group; the YAML keys are these field names)."""

    name: str = "adamw"
    """``adamw`` (decoupled weight decay), ``adam`` (L2 weight decay) or ``sgd`` (plain, no momentum)."""
    lr: float = 2e-5
    """Peak learning rate, reached at the end of the warm-up."""
    weight_decay: float = 0.1
    """Weight decay of the matrices (norms and biases get none with ``no_decay_norms_and_biases``)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's moment decay rates."""
    eps: float = 1e-8
    """Adam's denominator epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from ``lr / warmup_steps`` to ``lr``."""
    schedule: str = "cosine"
    """After the warm-up: ``cosine`` decay to ``min_lr_ratio * lr`` at ``max_steps``, or ``constant``."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""
    no_decay_norms_and_biases: bool = True
    """Put every 1-D parameter (norm weights, biases) in a parameter group with ``weight_decay=0``."""
    implementation: str = "torch"
    """``torch`` (``torch.optim``, fused on the CPU when supported) or ``deepspeed`` (``DeepSpeedCPUAdam``)."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZER_NAMES)}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"optim.implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {self.implementation!r}"
            )
        if self.implementation == "deepspeed" and self.name == "sgd":
            raise ValueError("optim.implementation=deepspeed provides Adam/AdamW only, not optim.name=sgd")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr must be a positive number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be positive, got {self.eps!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then cosine or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float, no_decay_norms_and_biases: bool) -> list[dict]:
    """Trainable parameters in one group, or two: matrices with ``weight_decay``, 1-D tensors without."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_decay_norms_and_biases:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``model``'s trainable parameters (see :class:`OptimConfig`)."""
    groups = parameter_groups(model, cfg.weight_decay, cfg.no_decay_norms_and_biases)
    if cfg.implementation == "deepspeed":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        except ImportError as err:
            raise ImportError(
                "optim.implementation=deepspeed needs DeepSpeed: pip install 'lightning-horizon[deepspeed]' "
                "(its CPU Adam op is compiled on first use, ~1 minute), or use optim.implementation=torch"
            ) from err
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=cfg.name == "adamw")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    if on_cpu:
        try:  # fused CPU kernels: ~2-5x faster than the default foreach path (torch >= 2.4)
            return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class SFTModule(pl.LightningModule):
    """Supervised fine-tuning of a Hugging Face causal LM (batches from :class:`~lightning_horizon.data.SFTDataModule`).

    Args:
        model: A ``...ForCausalLM`` built on the CPU (the horizon strategy keeps its masters in host memory).
        optim: Optimizer and schedule settings.
        max_steps: Optimizer steps of the run: where the cosine schedule ends.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig | None = None, max_steps: int = 1000) -> None:
        super().__init__()
        self.model = model
        self.optim = optim if optim is not None else OptimConfig()
        self.max_steps = max_steps
        self._batch_tokens = 0
        self._window_tokens = 0
        self._window_start: float | None = None

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Counted on the host copy of the batch: no device sync.
        if self.trainer.training:
            self._batch_tokens = count_real_tokens(batch)
        return batch

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        world = self.trainer.world_size
        if world == 1:
            loss = self.model(**batch).loss
        else:
            # Data parallel: each process divides its summed token losses by the global micro-batch's label tokens
            # (/ processes), so the average over the processes is the mean over every label token of the global
            # batch, as one process with the global batch computes it (a mean of per-process means is not, when
            # the processes' rows hold different numbers of label tokens)
            local = (shift_labels(batch["labels"]) != IGNORE_INDEX).sum().to(torch.float32)
            tokens = self.trainer.strategy.reduce(local, reduce_op="sum")
            loss = self.model(**batch, num_items_in_batch=tokens / world).loss
        self.log("train/loss", loss, prog_bar=True, sync_dist=world > 1)
        self._log_throughput()
        return loss

    def _log_throughput(self) -> None:
        now = time.perf_counter()
        if self._window_start is None:  # the first step (compilation, warm-up) is not timed
            self._window_start = now
            return
        self._window_tokens += self._batch_tokens
        seconds = now - self._window_start
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0 and seconds > 0:
            self.log("train/tokens_per_s", self._window_tokens / seconds)
            self._window_tokens, self._window_start = 0, now

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True)
        return loss

    @classmethod
    @override
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's ``load_from_checkpoint``, which also opens the horizon strategy's checkpoint directories."""
        from lightning_horizon.checkpoint import is_horizon_checkpoint, load_from_checkpoint

        if is_horizon_checkpoint(checkpoint_path):
            return load_from_checkpoint(cls, checkpoint_path, strict=strict, **kwargs)
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, **kwargs)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim
        optimizer = build_optimizer(self.model, cfg)

        def factor(step: int) -> float:
            return lr_factor(step, cfg.warmup_steps, self.max_steps, cfg.schedule, cfg.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
