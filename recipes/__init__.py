"""Ready-to-run recipes: ``python -m recipes.sft``, ``python -m recipes.bench`` (configs: :func:`config_dir`)."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The Hydra configuration directory: ``conf/`` next to ``recipes/`` in a clone, or the copy an installed wheel
    ships inside the package (``recipes/conf``)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if (packaged / "sft.yaml").is_file() else here.parent / "conf")
