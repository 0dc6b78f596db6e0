"""lightning_horizon: train language models far larger than GPU memory on one GPU.

Importing the package registers ``Trainer(strategy="horizon")``.
"""

from lightning_horizon.engine import EngineConfig, HorizonEngine, WorkerError

__version__ = "0.1.0"
__all__ = ["EngineConfig", "HorizonEngine", "WorkerError", "__version__"]

from lightning_horizon import config_groups  # noqa: E402, F401  (registers the strategy config group)
from lightning_horizon.checkpoint import load_from_checkpoint  # noqa: E402
from lightning_horizon.precision import HorizonPrecision  # noqa: E402
from lightning_horizon.strategy import HorizonStrategy  # noqa: E402  (registers "horizon")

__all__ += ["HorizonPrecision", "HorizonStrategy", "load_from_checkpoint"]
