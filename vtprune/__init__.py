"""vtprune: training-free visual-token pruning for multimodal LLMs on stock transformers models."""

from .api import MethodInfo, apply, methods
from .engine import Decision, EngineError, Pruner, PruneStats, UnsupportedUseError
from .engine.compiled import CompiledPrefill, compile_prefill

__version__ = "0.1.0"
__all__ = ["CompiledPrefill", "Decision", "EngineError", "MethodInfo", "PruneStats", "Pruner", "UnsupportedUseError",
           "apply", "compile_prefill", "methods"]
