"""The Lightning-free streaming engine."""

from .adapter import DecoderParts, describe, find_causal_lm
from .runtime import EngineConfig, HorizonEngine
from .workers import WorkerError

__all__ = ["DecoderParts", "EngineConfig", "HorizonEngine", "WorkerError", "describe", "find_causal_lm"]
