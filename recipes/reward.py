"""Reward-model training with the horizon strategy: ``python -m recipes.reward [overrides]`` (``conf/reward.yaml``).

The same steps, groups and run directories as :mod:`recipes.sft`, on the preference pairs of :mod:`recipes.dpo`: the
model is built (or loaded from ``model.path``, a causal LM's or a reward model's checkpoint) as a
``...ForSequenceClassification`` with one output, and trained with the Bradley-Terry loss
(:class:`~lightning_horizon.preference.RewardModule`). Examples::

    python -m recipes.reward                                      # tiny model, bundled preference pairs, this machine
    python -m recipes.reward model=qwen2_7b model.path=/runs/sft/hf_export data.path=/data/pairs.jsonl

``hf_export/`` is loadable with ``AutoModelForSequenceClassification.from_pretrained`` (its config's
``pad_token_id`` is the padding id the training used, so Hugging Face's pooling finds each row's last token).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lightning_horizon.data.preference import PreferenceDataModule
from lightning_horizon.models import from_mapping
from lightning_horizon.plan_report import PlanError
from lightning_horizon.preference import RewardModule, RewardSettings
from recipes import config_dir
from recipes.runs import log_error
from recipes.sft import Workload, train


def _module(cfg: DictConfig, run, model, datamodule) -> RewardModule:
    model.config.pad_token_id = datamodule.pad_id  # Hugging Face's pooling of the exported model reads it
    settings = from_mapping(RewardSettings, cfg.reward, prefix="reward")
    return RewardModule(model, run.optim, max_steps=run.trainer["max_steps"], margin=settings.margin)


REWARD = Workload(
    name="reward",
    datamodule=lambda cfg, data, tokenizer: PreferenceDataModule(data, tokenizer),
    module=_module,
    num_labels=1,
    extra_keys=("reward",),
    rows_per_example=2,
    summary=("train/loss", "train/accuracy", "train/margin"),
)


@hydra.main(config_path=config_dir(), config_name="reward", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        from_mapping(RewardSettings, cfg.reward, prefix="reward")  # a bad reward.* value stops the run at once
        train(cfg, REWARD)
    except (ValueError, PlanError, ImportError, MemoryError) as err:
        log_error(str(err))
        sys.exit(2)


if __name__ == "__main__":
    main()
