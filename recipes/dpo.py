"""Direct preference optimisation with the horizon strategy: ``python -m recipes.dpo [overrides]`` (``conf/dpo.yaml``).

The same steps, groups and run directories as :mod:`recipes.sft` (model, data, hardware, trainer, optim, peft,
strategy; plan, resume, export), with preference pairs for data and a ``dpo:`` group for the loss
(:class:`~lightning_horizon.preference.DPOSettings`). Examples::

    python -m recipes.dpo                                          # tiny model, bundled preference pairs, this machine
    python -m recipes.dpo model=qwen2_7b model.path=/runs/sft/hf_export data.path=/data/pairs.jsonl dpo.beta=0.1
    python -m recipes.dpo model=qwen2_72b model.path=/models/Qwen2.5-72B-Instruct peft=lora hardware=h200

Records are ``{"prompt", "chosen", "rejected"}`` (strings, or message lists) or two conversations ``{"chosen",
"rejected"}`` that differ in their last assistant reply (:mod:`lightning_horizon.data.preference`). The reference is
the model as loaded: its log-probabilities of every pair are computed once before the first step and kept in the
checkpoints. The run directory holds ``dpo.log``, ``csv/`` (and ``tensorboard/``), ``checkpoints/`` and ``hf_export/``
(the trained policy).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lightning_horizon.data.preference import PreferenceDataModule
from lightning_horizon.models import from_mapping
from lightning_horizon.plan_report import PlanError
from lightning_horizon.preference import DPOModule, DPOSettings
from recipes import config_dir
from recipes.runs import log_error
from recipes.sft import Workload, train

DPO = Workload(
    name="dpo",
    datamodule=lambda cfg, data, tokenizer: PreferenceDataModule(data, tokenizer),
    module=lambda cfg, run, model, datamodule: DPOModule(
        model, from_mapping(DPOSettings, cfg.dpo, prefix="dpo"), run.optim, max_steps=run.trainer["max_steps"]
    ),
    extra_keys=("dpo",),
    rows_per_example=2,
    summary=("train/loss", "train/reward_margin", "train/reward_accuracy"),
)


@hydra.main(config_path=config_dir(), config_name="dpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        from_mapping(DPOSettings, cfg.dpo, prefix="dpo")  # a bad dpo.* value stops the run before anything is built
        train(cfg, DPO)
    except (ValueError, PlanError, ImportError, MemoryError) as err:
        log_error(str(err))
        sys.exit(2)


if __name__ == "__main__":
    main()
