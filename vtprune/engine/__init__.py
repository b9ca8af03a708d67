from .pruner import Decision, Pruner, check_budget, tokens_for_budget
from .stats import PruneStats

__all__ = ["Decision", "PruneStats", "Pruner", "check_budget", "tokens_for_budget"]
