"""Supervised fine-tuning with the horizon strategy: ``python -m recipes.sft [overrides]`` (configs in ``conf/``).

Reads top to bottom: validate the config, load the tokenizer, plan (and stop if the run cannot fit), decide the run
directory and what it resumes, read the data, build the model, train, export a Hugging Face directory. Examples::

    python -m recipes.sft                                              # tiny model, bundled data, this machine
    python -m recipes.sft model=qwen2_72b hardware=h200 plan=true      # print the memory/time plan only
    python -m recipes.sft model=qwen2_7b model.path=/models/Qwen2.5-7B-Instruct data.path=/data/sft.jsonl
    python -m recipes.sft -m optim.lr=1e-5,3e-5                        # a sweep: one run directory per point
    python -m recipes.sft resume=auto                                  # continue the newest run of this config

Mistakes in the settings or the data stop the run before anything large is allocated, with ``error: ...`` on stderr
and exit code 2. Outputs go to the run directory (:mod:`recipes.runs`): ``sft.log``, ``csv/`` (and ``tensorboard/``)
metrics, ``checkpoints/``, ``hf_export/``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from lightning_horizon import EngineConfig, HorizonStrategy
from lightning_horizon import export as horizon_export
from lightning_horizon.checkpoint_callback import HorizonModelCheckpoint
from lightning_horizon.config_groups import engine_config
from lightning_horizon.data import DataConfig, SFTDataModule, build_default_tokenizer, load_tokenizer
from lightning_horizon.data.packing import prepare_model_for_packing
from lightning_horizon.data.tokenizer import as_exported
from lightning_horizon.engine.adapter import describe
from lightning_horizon.engine.data_parallel import local_topology
from lightning_horizon.files import remove_stale_temporaries
from lightning_horizon.hardware import HardwareProfile, load_profile
from lightning_horizon.lightning_module import OptimConfig, SFTModule
from lightning_horizon.loading import check_model_dir
from lightning_horizon.lora import PeftSettings, apply_peft, base_dtype, export_peft
from lightning_horizon.models import (
    ModelConfig,
    build_hf_config,
    build_model,
    check_max_seq_len,
    fill_special_tokens,
    from_mapping,
    to_plain_dict,
)
from lightning_horizon.plan_report import PlanError, check_fits, format_plan
from lightning_horizon.planner import plan_from_config, precision_dtype
from recipes import config_dir
from recipes.runs import (
    CHECKPOINTS,
    ENGINE_CONFIG,
    EXPORT,
    ResumeHint,
    RunCSVLogger,
    StepBoundProgressBar,
    also_log_to,
    check_export_dir,
    log_error,
    logged_losses,
    plan_run,
    quiet_and_logged,
)

log = logging.getLogger("recipes.sft")
ROOT_KEYS = ("model", "data", "hardware", "trainer", "optim", "peft", "strategy", "plan", "resume", "output_dir")


@dataclass(frozen=True)
class Workload:
    """What a recipe trains, on top of the steps every recipe shares (:func:`train`): SFT here, DPO in
    :mod:`recipes.dpo`."""

    name: str
    """The recipe's module is ``recipes.<name>``; its log file ``<name>.log``."""
    datamodule: Callable[[DictConfig, DataConfig, Any], L.LightningDataModule]
    """``(cfg, data settings, tokenizer)`` -> the DataModule."""
    module: Callable[[DictConfig, Any, Any, Any], L.LightningModule]
    """``(cfg, validated RunConfig, model, datamodule)`` -> the LightningModule."""
    num_labels: int | None = None
    """Build a ``...ForSequenceClassification`` with this many outputs instead of a causal LM (reward models)."""
    extra_keys: tuple[str, ...] = ()
    """Top-level config keys of this recipe beyond ``ROOT_KEYS``."""
    summary: tuple[str, ...] = ("train/loss",)
    """Logged metrics whose first and last values the end of the run reports."""
    rows_per_example: int = 1
    """Rows of a batch per example of ``data.batch_size`` (2 for preference pairs), for the plan."""


SFT = Workload(
    name="sft",
    datamodule=lambda cfg, data, tokenizer: SFTDataModule(data, tokenizer),
    module=lambda cfg, run, model, datamodule: SFTModule(model, run.optim, max_steps=run.trainer["max_steps"]),
)


class SaveEngineConfig(L.Callback):
    """Writes the engine's effective settings (every automatic value as decided for this run) to ``path`` once the
    strategy has built its engine (they are also in the log)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        config = trainer.strategy.engine.config
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        plain = {
            k: v if v is None or isinstance(v, bool | int) else str(v).removeprefix("torch.") for k, v in values.items()
        }
        self.path.write_text(json.dumps(plain, indent=1) + "\n")


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The recipe's progress bar: Rich when it is installed (as Lightning's default), else tqdm."""
    return StepBoundProgressBar() if importlib.util.find_spec("rich") is not None else TQDMProgressBar()


@dataclass
class RunConfig:
    """The composed ``sft.yaml``, validated."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    peft: PeftSettings
    strategy: EngineConfig
    trainer: dict[str, Any]
    seed: int
    plan: bool
    resume: str | None
    output_dir: Path


def validate(cfg: DictConfig, workload: Workload = SFT) -> RunConfig:
    """Every group into its dataclass: unknown keys and impossible values raise ``ValueError`` naming the key."""
    known = (*ROOT_KEYS, *workload.extra_keys)
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}. Known top-level keys: {', '.join(known)}")
    strategy = engine_config(cfg.strategy)  # the engine's own checks (e.g. num_slots >= 2)
    trainer = to_plain_dict(cfg.trainer, prefix="trainer")
    seed = trainer.pop("seed", 0)
    check_known_keys_of_trainer(trainer)
    for key in ("max_steps", "accumulate_grad_batches", "log_every_n_steps"):
        if not isinstance(trainer.get(key, 1), int) or trainer.get(key, 1) < 1:
            raise ValueError(f"trainer.{key} must be a positive integer, got {trainer[key]!r}")
    for key in ("devices", "num_nodes"):
        value = trainer.get(key, 1)
        if not (value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
            raise ValueError(f"trainer.{key} must be a positive integer (or auto), got {value!r}")
    if (trainer.get("gradient_clip_val") or 0) < 0:
        raise ValueError(f"trainer.gradient_clip_val must be >= 0 or null, got {trainer['gradient_clip_val']}")
    if trainer.get("precision") == "auto":  # BF16 compute on a GPU; FP32 on the CPU, where BF16 matmuls are slow
        trainer["precision"] = "bf16-mixed" if _uses_gpu(trainer) else "32-true"
    precision_dtype(trainer.get("precision", "bf16-mixed"))
    resume = cfg.resume
    if resume is not None and resume != "auto" and not Path(resume).exists():
        raise ValueError(f"resume={resume!r}: no such checkpoint (use null, a checkpoint path or auto)")
    model = ModelConfig.from_dict(cfg.model)
    if model.path is not None:
        try:
            check_model_dir(model.path)
        except ValueError as err:
            raise ValueError(f"model.path: {err}") from None
    return RunConfig(
        model=model,
        data=from_mapping(DataConfig, cfg.data, prefix="data"),
        optim=from_mapping(OptimConfig, cfg.optim, prefix="optim"),
        peft=from_mapping(PeftSettings, cfg.peft, prefix="peft") if "peft" in cfg else PeftSettings(),
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


def export_hf(
    module: L.LightningModule, tokenizer: Any, out_dir: Path, overwrite: bool = False, peft: PeftSettings | None = None
) -> Path:
    """Write ``module.model`` and ``tokenizer`` as a Hugging Face directory (BF16 safetensors, streamed tensor by
    tensor from the host store, written aside and renamed into place); with LoRA, the adapter or the merged model
    (``peft.export``)."""
    strategy = module.trainer.strategy if module._trainer is not None else None
    engine = getattr(strategy, "engine", None)
    model = module.model
    use_cache = model.config.use_cache
    model.config.use_cache = True  # packing turned the cache off for training; generation wants it
    try:
        if peft is not None and peft.enabled:
            if engine is not None:
                engine.synchronize()
            return export_peft(model, peft, out_dir, tokenizer, overwrite=overwrite)
        target = engine if engine is not None else model
        return horizon_export.export_hf(target, out_dir, "bf16", tokenizer, overwrite=overwrite)
    finally:
        model.config.use_cache = use_cache


def final_checkpoint(trainer: L.Trainer, checkpointing: HorizonModelCheckpoint, directory: Path) -> Path:
    """The checkpoint of the trained weights (every process calls it): ``last`` when it holds the final step, else
    one saved now (collective) as ``step-<N>.ckpt``."""
    from lightning_horizon.checkpoint_reader import CheckpointReader

    last = Path(checkpointing.last_model_path) if checkpointing.last_model_path else None
    if (
        last is not None
        and last.is_dir()
        and CheckpointReader(last, verify=False).meta.get("global_step") == trainer.global_step
    ):
        return last
    path = directory / f"step-{trainer.global_step}.ckpt"
    trainer.save_checkpoint(path)
    return path


def training_tokenizer(model: ModelConfig, hf_config: Any) -> Any:
    """The model's own tokenizer (``model.path``) or the bundled default, as the exported model directory will load
    it (same class and pre-tokenizer: the ids in training are the ids after export)."""
    tokenizer = load_tokenizer(model.path, require_chat_template=False) if model.path else build_default_tokenizer()
    return tokenizer if hf_config is None else as_exported(tokenizer, hf_config)


def _run_dir_fixed() -> bool:
    """Whether the user chose the run directory (``hydra.run.dir=...``, or a multirun's sweep directory)."""
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN or any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)


def train(cfg: DictConfig, workload: Workload = SFT) -> None:
    quiet_and_logged()
    log = logging.getLogger(f"recipes.{workload.name}")
    run = validate(cfg, workload)

    # Tokenizer: the model's own, or the bundled default; its size is the vocabulary when model.vocab_size is null.
    tokenizer = training_tokenizer(run.model, None)
    hf_config = build_hf_config(run.model, vocab_size=len(tokenizer))
    check_max_seq_len(hf_config, run.data.max_seq_len, run.model.name)
    tokenizer = training_tokenizer(run.model, hf_config)

    # Plan before allocating anything: the model is only built on the meta device here.
    hardware = hardware_profile(cfg, run.trainer)
    plan = plan_from_config(
        cfg, vocab_size=len(tokenizer), hardware=hardware, rows_per_example=workload.rows_per_example
    )
    if run.plan:
        print(format_plan(plan))
        return
    check_fits(plan)
    several = plan.settings.devices * plan.settings.num_nodes > 1  # data parallel: the engine turns the copy off
    if several and workload.name != "sft":
        raise ValueError(
            f"recipes.{workload.name} trains on one GPU (trainer.devices=1, trainer.num_nodes=1); several processes "
            "run recipes.sft, or your own script with Trainer(strategy='horizon', devices=N)"
        )
    # A sharded node store: each node holds only its layers, so the export at the end reads the last checkpoint
    sharded_nodes = run.strategy.node_store == "sharded" and plan.settings.num_nodes > 1
    if sharded_nodes and run.peft.enabled:
        raise ValueError(
            "strategy.node_store=sharded with several nodes and peft: the adapter export reads the model, whose "
            "layers are spread over the nodes. Use strategy.node_store=replicated (a LoRA run's frozen base is held "
            "in the compute dtype: 2 B/param per node)"
        )
    if run.strategy.weight_copy is None and not several:  # the engine's rule, applied by the plan to this machine
        run.strategy = dataclasses.replace(run.strategy, weight_copy=plan.settings.engine.weight_copy)

    # The run directory: a fresh one, or the run a checkpoint continues.
    overrides = list(HydraConfig.get().overrides.task)
    check_export_dir(run.output_dir)
    where = plan_run(cfg, run.resume, run.output_dir, _run_dir_fixed())
    run_dir = where.run_dir
    if run_dir != run.output_dir:
        check_export_dir(run_dir)
        also_log_to(run_dir / f"{workload.name}.log")
        log.info("continuing run %s (this invocation's Hydra directory: %s)", run_dir, run.output_dir)
    if where.checkpoint is not None:
        log.info("resuming from %s (step %s)", where.checkpoint, where.step)
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    remove_stale_temporaries(run_dir)  # exports of killed runs (the checkpoint callback sweeps checkpoints/)

    # Data: read and tokenised now, so that bad data stops the run before the model is built.
    datamodule = workload.datamodule(cfg, run.data, tokenizer)
    datamodule.setup("fit")

    L.seed_everything(run.seed, workers=True, verbose=False)
    # With LoRA the base is built (or loaded) straight in the dtype the engine holds it in: no FP32 copy of it.
    frozen_dtype = dataclasses.replace(
        run.strategy, compute_dtype=precision_dtype(run.trainer.get("precision", "bf16-mixed"))
    ).frozen_store_dtype()
    # The Trainer first: Lightning's cluster environment says which node this process is on
    run_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Any] = [RunCSVLogger(run_dir, resume_step=where.step)]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    checkpointing = HorizonModelCheckpoint(
        dirpath=run_dir / CHECKPOINTS, filename="step-{step}", auto_insert_metric_name=False
    )
    # The model line below says what Lightning's summary table would (without its "FLOPs 0"); both can be overridden.
    trainer_args = {"enable_model_summary": False, "enable_progress_bar": True, **run.trainer}
    trainer_args["use_distributed_sampler"] = False  # the data module shards each global batch over the processes
    callbacks = [
        checkpointing,
        ResumeHint(run_dir, overrides, f"recipes.{workload.name}"),
        SaveEngineConfig(run_dir / ENGINE_CONFIG),
    ]
    if trainer_args["enable_progress_bar"]:
        callbacks.append(progress_bar())
    trainer = L.Trainer(
        strategy=HorizonStrategy(run.strategy),
        logger=loggers,
        callbacks=callbacks,
        **trainer_args,
    )
    # With several processes per node only local rank 0 fills the node's host store from its model: the others build
    # theirs on the meta device (no weights read, no memory; HorizonEngine gives it storage that the store replaces).
    # With a sharded node store, local rank 0 reads only its node's layers of a pretrained model.
    node = (trainer.node_rank, trainer.num_nodes) if sharded_nodes else None
    model = build_model(
        run.model,
        dtype=base_dtype(run.peft, frozen_dtype),
        vocab_size=len(tokenizer),
        num_labels=workload.num_labels,
        device="meta" if local_topology()[0] > 0 else "cpu",
        node=node,
    )
    if node is not None and run.model.path is not None and local_topology()[0] == 0:
        layers = describe(model).layers
        held = sum(1 for layer in layers if not next(layer.parameters()).is_meta)
        log.info("node %d of %d: read %d of %d layers of %s", *node, held, len(layers), run.model.path)
    model.train()  # from_pretrained (model.path) returns eval mode: train with the dropout the model config sets
    # generation stops at the end of a reply (a reward model has no generation config)
    fill_special_tokens(model.config, getattr(model, "generation_config", None) or {}, tokenizer)
    if run.data.pack:
        prepare_model_for_packing(model)
    model = apply_peft(model, run.peft)
    module = workload.module(cfg, run, model, datamodule)
    log.info(
        "model %s: %s, %.4g M parameters (%.4g M trained), %d layers, vocabulary %d; plan: %.3g GB of host memory, "
        "%.3g s/step predicted (%s)",
        run.model.name,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        model.config.num_hidden_layers,
        model.config.vocab_size,
        plan.host_total_bytes / 1e9,
        plan.step_time_s,
        plan.bottleneck,
    )

    trainer.fit(module, datamodule=datamodule, ckpt_path=where.checkpoint)
    final = final_checkpoint(trainer, checkpointing, run_dir / CHECKPOINTS) if sharded_nodes else None
    if not trainer.is_global_zero:  # with several processes, global rank 0 exports and reports (the weights are equal)
        return

    overwrite = (run_dir / EXPORT).exists()
    if final is None:
        export_dir = export_hf(module, tokenizer, run_dir / EXPORT, overwrite=overwrite, peft=run.peft)
    else:  # (every node wrote its layers into it)
        export_dir = horizon_export.export_checkpoint(final, run_dir / EXPORT, "bf16", tokenizer, overwrite=overwrite)
    for metric in workload.summary:
        values = logged_losses(run_dir, metric)
        if values:
            log.info("%s: first logged %.3f, last logged %.3f (%d values)", metric, values[0], values[-1], len(values))
    log.info("run dir: %s\nHugging Face export: %s", run_dir, export_dir)


@hydra.main(config_path=config_dir(), config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (ValueError, PlanError, ImportError, MemoryError) as err:  # DataError, CheckpointError: ValueErrors
        log_error(str(err))
        sys.exit(2)


if __name__ == "__main__":
    main()
