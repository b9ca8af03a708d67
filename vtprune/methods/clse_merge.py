"""CLSE-M: CLSE's selection, with every dropped token merged into its most similar kept token.

Named in the CLSE README but in no released code: the merge is this project's design
(cosine similarity on the hidden states entering the stage layer, size-weighted averages,
sizes carried across stages; merged tokens keep their own position ids). No proportional
attention: unlike ToMe, the LLM's attention does not add log(size) for a merged token.
"""

from __future__ import annotations

import torch

from .base import ImageView, Selection
from .clse import CLSE
from .primitives import merge_into_nearest


class CLSEMerge(CLSE):
    name = "clse_m"
    summary = "CLSE's selection; dropped tokens merged into their most similar kept token (our design)"

    def chosen(self, views: list[ImageView], keep: torch.Tensor) -> list[Selection]:
        hidden, sizes = torch.stack([view.hidden for view in views]), torch.stack([view.sizes for view in views])
        return [Selection(*parts) for parts in zip(keep, *merge_into_nearest(hidden, sizes, keep))]
