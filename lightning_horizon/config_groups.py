"""Hydra config groups built from code: ``strategy``, whose keys and defaults are the settings of
:class:`~lightning_horizon.engine.EngineConfig` (declared and documented there, once; no YAML copy). Importing
``lightning_horizon`` registers them, so ``python -m recipes.sft`` and Hydra's compose API both find them."""

from __future__ import annotations


def strategy_schema() -> type:
    """The ``strategy`` config group: one key per setting of
    :class:`~lightning_horizon.engine.EngineConfig` (where each is documented), with its default, typed."""
    import dataclasses
    from typing import Optional

    from lightning_horizon.engine import EngineConfig

    types = {"int": int, "bool": bool, "int | None": Optional[int], "bool | None": Optional[bool]}  # noqa: UP045
    fields = []
    for f in EngineConfig.settings():
        if f.type not in types:
            raise TypeError(f"EngineConfig.{f.name}: type {f.type} has no config-group type")
        fields.append((f.name, types[f.type], dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass("StrategyGroup", fields)


def register_configs() -> None:
    """Registers the config groups that are built from code (``strategy``) with Hydra's config store."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="strategy", name="default", node=strategy_schema())


register_configs()
