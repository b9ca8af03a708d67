from .budget import check_budget, tokens_for_budget
from .compat import TESTED_TRANSFORMERS, EngineError, UnsupportedUseError
from .hooks import SUPPORTED_ATTENTION, Pruner, check_attention
from .run import Decision
from .stats import PruneStats

__all__ = [
    "SUPPORTED_ATTENTION", "TESTED_TRANSFORMERS", "Decision", "EngineError", "PruneStats", "Pruner",
    "UnsupportedUseError", "check_attention", "check_budget", "tokens_for_budget",
]
