from .budget import check_budget, tokens_for_budget
from .pruner import Decision, Pruner
from .stats import PruneStats

__all__ = ["Decision", "PruneStats", "Pruner", "check_budget", "tokens_for_budget"]
