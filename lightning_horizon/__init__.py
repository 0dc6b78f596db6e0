"""lightning_horizon: train language models far larger than GPU memory on one GPU.

Importing the package registers ``Trainer(strategy="horizon")``.
"""

from lightning_horizon.engine import EngineConfig, HorizonEngine, WorkerError

__version__ = "0.1.0"
__all__ = ["EngineConfig", "HorizonEngine", "WorkerError", "__version__"]
