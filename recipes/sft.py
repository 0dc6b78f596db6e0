"""Supervised fine-tuning with the horizon strategy: ``python -m recipes.sft [overrides]`` (configs in ``conf/``).

Reads top to bottom: validate the config, load the tokenizer, plan (and stop if the run cannot fit), read the data,
build the model, train, export a Hugging Face directory. Examples::

    python -m recipes.sft                                              # tiny model, bundled data, this machine
    python -m recipes.sft model=qwen2_72b hardware=h200 plan=true      # print the memory/time plan only
    python -m recipes.sft model=qwen2_7b model.path=/models/Qwen2.5-7B-Instruct data.path=/data/sft.jsonl
    python -m recipes.sft -m optim.lr=1e-5,3e-5                        # a sweep: one run directory per point

Mistakes in the settings or the data stop the run before anything large is allocated, with ``error: ...`` on stderr
and exit code 2. Outputs go to the Hydra run directory: ``csv/`` (and ``tensorboard/``) metrics, ``checkpoints/``,
``hf_export/``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig

from lightning_horizon import HorizonStrategy
from lightning_horizon import export as horizon_export
from lightning_horizon.data import DataConfig, SFTDataModule, build_default_tokenizer, load_tokenizer
from lightning_horizon.data.packing import prepare_model_for_packing
from lightning_horizon.hardware import HardwareProfile, load_profile
from lightning_horizon.lightning_module import OptimConfig, SFTModule
from lightning_horizon.models import ModelConfig, build_model, from_mapping, to_plain_dict
from lightning_horizon.planner import PlanError, check_fits, format_plan, plan_from_config, precision_dtype

ROOT_KEYS = ("model", "data", "hardware", "trainer", "optim", "strategy", "plan", "resume", "output_dir")


class StepBoundProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, without the "Epoch N/-2" it shows when only ``max_steps`` bounds the run
    (``max_epochs=-1``; Lightning issue #21925): then the description is "Epoch N"."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The recipe's progress bar: Rich when it is installed (as Lightning's default), else tqdm."""
    return StepBoundProgressBar() if importlib.util.find_spec("rich") is not None else TQDMProgressBar()


@dataclass
class StrategyConfig:
    """The ``strategy:`` group: exactly the arguments of :class:`HorizonStrategy` (see its docstring)."""

    checkpoint_every: int = 1
    num_slots: int = 2
    resident_layers: int | None = None
    keep_activations: int | None = None
    num_grad_slabs: int = 3
    loss_chunk_tokens: int = 2048
    pin_masters: bool = False
    weight_copy: bool | None = None
    offload_checkpoints: bool | None = None
    sparse_experts: bool = True
    compile_layers: bool | None = None


@dataclass
class RunConfig:
    """The composed ``sft.yaml``, validated."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    strategy: StrategyConfig
    trainer: dict[str, Any]
    seed: int
    plan: bool
    resume: str | None
    output_dir: Path


def validate(cfg: DictConfig) -> RunConfig:
    """Every group into its dataclass: unknown keys and impossible values raise ``ValueError`` naming the key."""
    unknown = sorted(set(cfg) - set(ROOT_KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}. Known top-level keys: {', '.join(ROOT_KEYS)}")
    strategy = from_mapping(StrategyConfig, cfg.strategy, prefix="strategy")
    try:
        HorizonStrategy(**dataclasses.asdict(strategy))  # the engine's own checks (e.g. num_slots >= 2)
    except ValueError as err:
        raise ValueError(f"strategy.{err}") from err
    trainer = to_plain_dict(cfg.trainer, prefix="trainer")
    seed = trainer.pop("seed", 0)
    check_known_keys_of_trainer(trainer)
    for key in ("max_steps", "accumulate_grad_batches", "log_every_n_steps"):
        if not isinstance(trainer.get(key, 1), int) or trainer.get(key, 1) < 1:
            raise ValueError(f"trainer.{key} must be a positive integer, got {trainer[key]!r}")
    if trainer.get("devices", 1) not in (1, "1", "auto"):
        raise ValueError(
            f"trainer.devices must be 1: the horizon strategy trains on one device, got {trainer['devices']!r}"
        )
    if (trainer.get("gradient_clip_val") or 0) < 0:
        raise ValueError(f"trainer.gradient_clip_val must be >= 0 or null, got {trainer['gradient_clip_val']}")
    if trainer.get("precision") == "auto":  # BF16 compute on a GPU; FP32 on the CPU, where BF16 matmuls are slow
        trainer["precision"] = "bf16-mixed" if _uses_gpu(trainer) else "32-true"
    precision_dtype(trainer.get("precision", "bf16-mixed"))
    resume = cfg.resume
    if resume is not None and resume != "auto" and not Path(resume).exists():
        raise ValueError(f"resume={resume!r}: no such checkpoint (use null, a checkpoint path or auto)")
    return RunConfig(
        model=ModelConfig.from_dict(cfg.model),
        data=from_mapping(DataConfig, cfg.data, prefix="data"),
        optim=from_mapping(OptimConfig, cfg.optim, prefix="optim"),
        strategy=strategy,
        trainer=trainer,
        seed=seed,
        plan=bool(cfg.plan),
        resume=resume,
        output_dir=Path(cfg.output_dir),
    )


def check_known_keys_of_trainer(trainer: dict[str, Any]) -> None:
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "strategy", "logger", "callbacks"}
    unknown = sorted(set(trainer) - accepted)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join('trainer.' + k for k in unknown)} (not Trainer arguments)")


def _uses_gpu(trainer: dict[str, Any]) -> bool:
    return trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def hardware_profile(cfg: DictConfig, trainer: dict[str, Any]) -> HardwareProfile:
    """``load_profile``, except that a CPU run on a detected machine plans for CPU compute."""
    profile = load_profile(cfg.hardware)
    if cfg.hardware.name == "auto" and not _uses_gpu(trainer) and profile.has_gpu:
        profile = dataclasses.replace(profile, gpu_memory_bytes=0, h2d_bytes_per_s=0.0, d2h_bytes_per_s=0.0)
    return profile


def export_hf(module: SFTModule, tokenizer: Any, out_dir: Path) -> Path:
    """Write ``module.model`` and ``tokenizer`` as a Hugging Face directory (BF16 safetensors, streamed tensor by
    tensor from the host store, written aside and renamed into place)."""
    strategy = module.trainer.strategy if module._trainer is not None else None
    engine = getattr(strategy, "engine", None)
    model = module.model
    use_cache = model.config.use_cache
    model.config.use_cache = True  # packing turned the cache off for training; generation wants it
    try:
        return horizon_export.export_hf(engine if engine is not None else model, out_dir, "bf16", tokenizer)
    finally:
        model.config.use_cache = use_cache


def logged_losses(csv_dir: str) -> list[float]:
    """The ``train/loss`` values of the CSV logger's ``metrics.csv``, in order."""
    path = Path(csv_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def train(cfg: DictConfig) -> None:
    run = validate(cfg)
    # SFTModule counts tokens in on_before_batch_transfer (on the host copy), which Lightning warns about.
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")

    # Tokenizer: the model's own, or the bundled default. Its size is the vocabulary when model.vocab_size is null.
    tokenizer = (
        load_tokenizer(run.model.path, require_chat_template=False) if run.model.path else build_default_tokenizer()
    )

    # Plan before allocating anything: the model is only built on the meta device here.
    hardware = hardware_profile(cfg, run.trainer)
    plan = plan_from_config(cfg, vocab_size=len(tokenizer), hardware=hardware)
    if run.plan:
        print(format_plan(plan))
        return
    check_fits(plan)
    if run.strategy.weight_copy is None:  # auto: what the plan chose from this machine's host memory
        run.strategy.weight_copy = plan.settings.weight_copy
        print(f"strategy.weight_copy: {run.strategy.weight_copy} (chosen from host memory)")

    # Data: read and tokenised now, so that bad data stops the run before the model is built.
    datamodule = SFTDataModule(run.data, tokenizer)
    datamodule.setup("fit")

    L.seed_everything(run.seed, workers=True, verbose=False)
    model = build_model(run.model, vocab_size=len(tokenizer))
    if run.data.pack:
        prepare_model_for_packing(model)
    module = SFTModule(model, run.optim, max_steps=run.trainer["max_steps"])

    run.output_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Any] = [CSVLogger(run.output_dir, name="csv", version="")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(run.output_dir, name="tensorboard", version=""))
    checkpoint_dir = run.output_dir / "checkpoints"
    checkpointing = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="step-{step}", auto_insert_metric_name=False, save_last=True
    )
    trainer = L.Trainer(
        strategy=HorizonStrategy(**dataclasses.asdict(run.strategy)),
        logger=loggers,
        callbacks=[checkpointing, progress_bar()],
        enable_progress_bar=True,
        **run.trainer,
    )
    ckpt_path = run.resume
    if ckpt_path == "auto":
        last = checkpoint_dir / "last.ckpt"
        ckpt_path = str(last) if last.exists() else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    export_dir = export_hf(module, tokenizer, run.output_dir / "hf_export")
    losses = logged_losses(loggers[0].log_dir)
    if losses:
        print(f"train/loss: first logged {losses[0]:.3f}, last logged {losses[-1]:.3f} ({len(losses)} values)")
    print(f"run dir: {run.output_dir}\nHugging Face export: {export_dir}")


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (ValueError, PlanError, ImportError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
