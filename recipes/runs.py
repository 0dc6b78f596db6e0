"""Run directories of the recipes: which run a ``resume`` continues, what a fresh run may not overwrite, metrics that
survive a resume, the progress bar, the resume command printed on Ctrl-C, and a log that records the run.

A run directory (Hydra's ``hydra.run.dir``, by default ``outputs/DATE/TIME``) holds ``.hydra/``, ``sft.log`` (``dpo.log``),
``csv/metrics.csv``, ``tensorboard/``, ``checkpoints/`` and ``hf_export/``.
"""

from __future__ import annotations

import csv
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from lightning_horizon.checkpoint_callback import checkpoint_step, find_resume_checkpoint
from lightning_horizon.export import is_hf_export

log = logging.getLogger("recipes")
CHECKPOINTS = "checkpoints"
EXPORT = "hf_export"
ENGINE_CONFIG = "engine.json"
"""The engine's effective settings of the run (every automatic value as decided)."""
METRICS = Path("csv") / "metrics.csv"
# Warnings that every run would print and that say nothing about the run.
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning 2.6's _pytree on torch >= 2.9
    r".*_pytree.*is deprecated.*",
    r".*overridden `on_before_batch_transfer`.*",  # SFTModule counts tokens on the host copy, on purpose
)


@dataclass
class RunPlan:
    """Where a run writes and what it resumes from."""

    run_dir: Path
    """The run directory written to (the Hydra one, or the earlier run that is continued)."""
    checkpoint: Path | None
    """The checkpoint to resume from; None = a fresh run."""
    step: int | None = None
    """The checkpoint's global step."""


# ------------------------------------------------------------------------------------------------ run directories
def plan_run(cfg: DictConfig, resume: str | None, output_dir: Path, run_dir_fixed: bool) -> RunPlan:
    """Decides the run directory and the checkpoint of ``resume`` (None, a path or ``auto``).

    ``auto``: the newest checkpoint under ``output_dir/checkpoints``; when there is none and the run directory is
    Hydra's default (a new timestamped one, ``run_dir_fixed`` False), the newest checkpoint of an earlier run of the
    same model and data under the same parent (``outputs/``), whose run directory is then continued. A checkpoint path
    inside an earlier run's ``checkpoints/`` continues that run too (unless ``hydra.run.dir`` is set). A fresh run is
    refused in a directory that already holds a run.
    """
    if resume is None:
        _refuse_used_dir(output_dir)
        return RunPlan(output_dir, None)
    if resume != "auto":
        checkpoint = Path(resume).expanduser().absolute()
        run_dir = output_dir
        earlier = checkpoint.parent.parent
        if not run_dir_fixed and checkpoint.parent.name == CHECKPOINTS and (earlier / ".hydra").is_dir():
            run_dir = earlier
        return RunPlan(run_dir, checkpoint, checkpoint_step(checkpoint))
    checkpoint = find_resume_checkpoint(output_dir / CHECKPOINTS)
    if checkpoint is not None:
        return RunPlan(output_dir, checkpoint, checkpoint_step(checkpoint))
    if not run_dir_fixed:
        found = _newest_run_of(cfg, output_dir.parent.parent, exclude=output_dir)
        if found is not None:
            return RunPlan(found.parent.parent, found, checkpoint_step(found))
    log.info("resume=auto: no checkpoint of this model and data to resume (looked in %s); starting fresh", output_dir)
    _refuse_used_dir(output_dir)
    return RunPlan(output_dir, None)


def _newest_run_of(cfg: DictConfig, root: Path, exclude: Path) -> Path | None:
    """The newest checkpoint of the run directories ``root/*/*`` whose saved config has the same model and data."""
    want = {key: OmegaConf.to_container(cfg[key], resolve=False) for key in ("model", "data")}
    best: tuple[float, Path] | None = None
    for config_file in root.glob("*/*/.hydra/config.yaml"):
        run_dir = config_file.parent.parent
        if run_dir.resolve() == exclude.resolve():
            continue
        try:
            saved = OmegaConf.load(config_file)
            same = all(OmegaConf.to_container(saved[key], resolve=False) == value for key, value in want.items())
        except Exception:  # noqa: BLE001 - an unreadable or foreign config is not a candidate
            continue
        checkpoint = find_resume_checkpoint(run_dir / CHECKPOINTS) if same else None
        if checkpoint is not None:
            mtime = (checkpoint / "horizon.json").stat().st_mtime if checkpoint.is_dir() else checkpoint.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, checkpoint)
    return best[1] if best is not None else None


def _refuse_used_dir(run_dir: Path) -> None:
    used = [
        str(p.relative_to(run_dir))
        for p in (run_dir / CHECKPOINTS, run_dir / METRICS, run_dir / EXPORT)
        if p.exists() and (not p.is_dir() or any(p.iterdir()))
    ]
    if used:
        raise ValueError(
            f"run directory {run_dir} already holds a run ({', '.join(used)}): continue it with resume=auto, or "
            "start a new one in another hydra.run.dir (nothing was changed)"
        )


def check_export_dir(run_dir: Path) -> None:
    """Refuses, before training, a run whose end-of-run export would replace something that is not an earlier
    export of this run (the export itself never replaces a checkpoint or a non-empty directory silently)."""
    export = run_dir / EXPORT
    if export.exists() and (not export.is_dir() or any(export.iterdir())) and not is_hf_export(export):
        raise ValueError(
            f"{export} exists and is not an earlier Hugging Face export of this run: the end-of-run export would "
            "replace it. Move it away or choose another hydra.run.dir"
        )


def resume_command(run_dir: Path, overrides: Sequence[str], recipe: str = "recipes.sft") -> str:
    """The command that continues the run in ``run_dir`` (the same overrides, ``resume=auto``, that directory)."""
    kept = [o for o in overrides if not o.startswith(("resume=", "hydra.run.dir=", "plan="))]
    return shlex.join(["python", "-m", recipe, *kept, "resume=auto", f"hydra.run.dir={run_dir}"])


# --------------------------------------------------------------------------------------------------- metrics
class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of deleted."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.resume_step is None or not os.path.isfile(self.metrics_file_path):
            return super()._check_log_dir_exists()
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [row for row in reader if _logged_before(row, self.resume_step)]
        with open(self.metrics_file_path, "w", newline="") as f:  # rows a killed run logged past the checkpoint go
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(keys)


def _logged_before(row: dict[str, str], step: int) -> bool:
    """Whether a metrics row belongs to the run up to a checkpoint at ``step`` (training rows carry the index of their
    batch, 0-based; validation rows the number of steps done)."""
    try:
        logged = int(float(row.get("step") or 0))
    except ValueError:
        return True
    training = any(value for key, value in row.items() if key.startswith("train/"))
    return logged < step or (logged == step and not training)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<run>/csv/metrics.csv``; a resumed run (``resume_step``) keeps the rows logged up to its
    checkpoint and appends to them, so the file holds the whole run once."""

    def __init__(self, save_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        super().__init__(save_dir, name="csv", version="")
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.resume_step)
        return self._experiment


def logged_losses(run_dir: Path, metric: str = "train/loss") -> list[float]:
    """The ``metric`` values of the run's ``metrics.csv``, in order."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    with path.open() as f:
        return [float(row[metric]) for row in csv.DictReader(f) if row.get(metric)]


# ------------------------------------------------------------------------------------------ progress and Ctrl-C
class StepBoundProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, without the "Epoch N/-2" it shows when only ``max_steps`` bounds the run
    (``max_epochs=-1``; Lightning issue #21925), and with a total that counts the batches a resumed run already did
    in its epoch (Lightning's is the steps left, so a run resumed at step 21 of 40 showed "40/19")."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this epoch's batches before this start
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(trainer.num_training_batches, done + left)
        return super().total_train_batches


class ResumeHint(Callback):
    """On Ctrl-C, prints how far the run got and the command that continues it."""

    def __init__(self, run_dir: Path, overrides: Sequence[str], recipe: str = "recipes.sft") -> None:
        self.run_dir, self.overrides, self.recipe = run_dir, list(overrides), recipe

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        checkpoint = find_resume_checkpoint(self.run_dir / CHECKPOINTS)
        if checkpoint is None:
            message = f"interrupted at step {trainer.global_step}, before the first checkpoint: nothing to resume"
        else:
            message = (
                f"interrupted at step {trainer.global_step}; the newest checkpoint is {checkpoint} (step "
                f"{checkpoint_step(checkpoint)}). Resume with:\n  {resume_command(self.run_dir, self.overrides, self.recipe)}"
            )
        log.warning(message)


# ------------------------------------------------------------------------------------------------------ logging
def quiet_and_logged() -> None:
    """Routes Lightning's messages and Python warnings through the root logger that Hydra configured (console and
    ``sft.log``, once each), and drops messages that every run would print and that say nothing about it
    (Lightning's litlogger tip, the ``_pytree`` deprecation)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics", "transformers"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_tips)
    logging.captureWarnings(True)
    warnings.formatwarning = _format_warning
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def also_log_to(path: Path) -> None:
    """Adds ``path`` (a continued run's own ``sft.log``) to the files the root logger writes."""
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    handler = logging.FileHandler(path)
    handler.setFormatter(formatter or logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)


def _drop_tips(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def _format_warning(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    return f"{category.__name__}: {message}"


def log_error(message: str) -> None:
    """``error: ...`` on stderr, and into the run's log files (not on the console a second time)."""
    print(f"error: {message}", file=sys.stderr)
    record = logging.LogRecord("recipes", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
