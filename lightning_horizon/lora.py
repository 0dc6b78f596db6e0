"""LoRA fine-tuning (the recipes' ``peft:`` config group): :class:`PeftSettings`, :func:`apply_peft`, :func:`export_peft`.

With ``peft=lora`` the recipe builds (or loads) the base model in the compute dtype, wraps it with PEFT's LoRA
adapters and trains only those. Under the horizon strategy the frozen base is then held once on the host in BF16 (2
bytes/param, ``EngineConfig.frozen_dtype="compute"``) and streamed like any layer; only the adapters (and
``modules_to_save`` copies) have FP32 masters, gradients and optimizer state. At the end the recipe exports either
the adapter in PEFT's own format (``PeftModel.from_pretrained(base, dir)`` loads it) or the merged model as an
ordinary Hugging Face directory.

The same works without the recipe: wrap the model with ``peft.get_peft_model`` in ``configure_model`` or before
``Trainer.fit``; the strategy streams the causal LM inside the PEFT model.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

PEFT_METHODS = ("none", "lora")
"""``PeftSettings.method`` names."""
EXPORT_FORMATS = ("adapter", "merged")
"""``PeftSettings.export`` names."""


@dataclass
class PeftSettings:
    """Parameter-efficient fine-tuning (the recipe's ``peft:`` group; the YAML keys are these field names)."""

    method: str = "none"
    """``none``: every parameter trains (full fine-tune). ``lora``: low-rank adapters on ``target_modules`` train, the
    base model stays frozen (held in the compute dtype on the host: 2 bytes/param in BF16)."""
    r: int = 16
    """Rank of each adapter (its A is r x in_features, its B out_features x r)."""
    alpha: float = 32.0
    """Scale of the adapters' output: ``alpha / r`` times ``B @ A @ x``."""
    dropout: float = 0.0
    """Dropout on the adapters' input (recomputed layers replay the same masks)."""
    target_modules: str | list[str] = "all-linear"
    """The ``nn.Linear`` modules that get adapters: ``all-linear`` (every linear layer but the output head), or module
    names such as ``[q_proj, k_proj, v_proj, o_proj]`` (PEFT's ``target_modules``)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapters (a trainable copy next to the frozen original), e.g.
    ``[embed_tokens, lm_head]`` after adding tokens."""
    export: str = "adapter"
    """What the run writes to ``hf_export/``: ``adapter`` (PEFT's ``adapter_config.json`` and
    ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, dir)``) or ``merged`` (the base with the adapters
    merged into its weights, as a plain Hugging Face model directory in BF16)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other ``peft.LoraConfig`` arguments, passed as they are (e.g. ``{use_rslora: true}``)."""

    def __post_init__(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ValueError(f"peft.method must be one of {', '.join(PEFT_METHODS)}, got {self.method!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"peft.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"peft.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout!r}")
        if self.export not in EXPORT_FORMATS:
            raise ValueError(f"peft.export must be one of {', '.join(EXPORT_FORMATS)}, got {self.export!r}")
        if not self.target_modules:
            raise ValueError("peft.target_modules must name at least one module (or be all-linear)")
        if not isinstance(self.target_modules, str):
            self.target_modules = [str(m) for m in self.target_modules]
        if self.modules_to_save is not None:
            self.modules_to_save = [str(m) for m in self.modules_to_save]

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("peft.method=lora needs the peft package: pip install peft (or the .[peft] extra)") from None
    return peft


def apply_peft(model: nn.Module, settings: PeftSettings) -> nn.Module:
    """``model`` wrapped with the adapters of ``settings`` (``model`` itself when ``method=none``). The adapters are
    FP32 whatever the base's dtype (PEFT's ``autocast_adapter_dtype``): they get FP32 masters like any trained
    weight. A ``...ForSequenceClassification`` (a reward model) gets PEFT's ``SEQ_CLS`` task, which also trains its
    score head (PEFT adds it to ``modules_to_save``)."""
    if not settings.enabled:
        return model
    from lightning_horizon.engine.adapter import is_sequence_classifier

    peft = _peft()
    try:
        config = peft.LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules,
            modules_to_save=settings.modules_to_save,
            task_type="SEQ_CLS" if is_sequence_classifier(model) else "CAUSAL_LM",
            **settings.extra,
        )
        return peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    except (TypeError, ValueError) as err:  # unknown extra key, no module matched, ...
        raise ValueError(f"peft: {err}") from None


def base_dtype(settings: PeftSettings, frozen_store_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to build or load the base model in: with LoRA and frozen parameters held in the compute dtype, that
    dtype (no FP32 copy of the frozen base is ever made); otherwise FP32 (the masters)."""
    if settings.enabled and frozen_store_dtype is not None:
        return frozen_store_dtype
    return torch.float32


def export_peft(
    model: nn.Module, settings: PeftSettings, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Writes the adapter (``settings.export="adapter"``) or the merged model (``"merged"``; this merges the adapters
    into ``model``'s base weights in place, so call it when training is over) to ``out_dir``, aside then renamed."""
    from lightning_horizon.engine.adapter import is_peft_wrapper
    from lightning_horizon.export import check_out_dir, export_hf
    from lightning_horizon.files import publish, remove_stale, temporary_path

    if not is_peft_wrapper(model):
        raise ValueError(f"export_peft needs a PEFT model, got {type(model).__name__}")
    check_out_dir(out_dir, overwrite)
    if settings.export == "merged":
        merged = model.merge_and_unload(progressbar=False)
        return export_hf(merged, out_dir, "bf16", tokenizer, overwrite=overwrite)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temporary_path(out)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
