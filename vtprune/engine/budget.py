"""What a nominal budget means for one image, and which budgets apply() accepts."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch


def tokens_for_budget(budget: int | float, num_tokens: int) -> int:
    """Visual tokens one image of num_tokens keeps at a nominal budget (an int count or a fraction)."""
    if isinstance(budget, float):
        return min(num_tokens, max(1, round(budget * num_tokens)))
    return min(budget, num_tokens)


def keeps_whole(budget: int | float, num_tokens: int) -> bool:
    """Whether a budget keeps all of an item's num_tokens. Such an item is left as the model computes it: no
    stages (even for schedules like CLSE's whose early stages keep more than the budget), no fusion."""
    return tokens_for_budget(budget, num_tokens) >= num_tokens


def check_budget(budget: Any) -> int | float:
    """The budget as apply() accepts it (any integral or real number, numpy and 0-d tensors
    included), or a ValueError that says what is allowed."""
    if isinstance(budget, (torch.Tensor, np.ndarray)) and budget.ndim == 0:
        budget = budget.item()  # a bool comes out a bool, refused next
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (numbers.Integral, numbers.Real)):
        raise ValueError(f"budget must be an int (visual tokens kept per image) or a float in (0, 1]; got {budget!r}")
    if not isinstance(budget, numbers.Integral):
        budget = float(budget)
        if math.isnan(budget) or not 0.0 < budget <= 1.0:
            raise ValueError(
                f"a float budget is the fraction of visual tokens kept and must lie in (0, 1]; got {budget!r} "
                "(pass an int to keep a number of tokens)"
            )
        return budget
    if budget < 1:
        raise ValueError(f"budget must keep at least 1 visual token per image; got {budget}")
    return int(budget)
