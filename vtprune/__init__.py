"""vtprune: training-free visual-token pruning for multimodal LLMs on stock transformers models."""

from .api import MethodInfo, apply, methods
from .engine import Decision, EngineError, Pruner, PruneStats

__version__ = "0.1.0"
__all__ = ["Decision", "EngineError", "MethodInfo", "PruneStats", "Pruner", "apply", "methods"]
