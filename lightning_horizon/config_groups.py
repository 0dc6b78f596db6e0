"""Hydra config groups built from code: ``strategy``, whose keys and defaults are the settings of
:class:`~lightning_horizon.engine.EngineConfig` (declared and documented there, once; no YAML copy). Importing
``lightning_horizon`` registers them, so ``python -m recipes.sft`` and Hydra's compose API both find them."""

from __future__ import annotations

from typing import Any

from lightning_horizon.engine import EngineConfig


def strategy_schema() -> type:
    """The ``strategy`` config group: one key per setting of
    :class:`~lightning_horizon.engine.EngineConfig` (where each is documented), with its default, typed."""
    import dataclasses
    from typing import Optional

    types = {"int": int, "bool": bool, "str": str, "int | None": Optional[int], "bool | None": Optional[bool]}  # noqa: UP045
    fields = []
    for f in EngineConfig.settings():
        if f.type not in types:
            raise TypeError(f"EngineConfig.{f.name}: type {f.type} has no config-group type")
        fields.append((f.name, types[f.type], dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass("StrategyGroup", fields)


def engine_config(strategy: Any) -> EngineConfig:
    """The composed ``strategy:`` group as an :class:`EngineConfig` (its keys are the settings' names)."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(strategy, resolve=True) if isinstance(strategy, DictConfig) else dict(strategy)
    run = sorted(set(values) & set(EngineConfig.run_fields()))
    if run:
        raise ValueError(
            f"strategy.{run[0]} is not a strategy setting: the Trainer sets it "
            f"(trainer.{EngineConfig.run_fields()[run[0]]})"
        )
    try:
        return EngineConfig(**values)
    except ValueError as err:
        raise ValueError(f"strategy.{err}") from err
    except TypeError as err:
        raise ValueError(f"strategy: {err}") from err


def register_configs() -> None:
    """Registers the config groups that are built from code (``strategy``) with Hydra's config store."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="strategy", name="default", node=strategy_schema())


register_configs()
