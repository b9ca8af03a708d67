"""uniform: tokens evenly spaced on each image's token grid, before the LLM (a reference floor).

An item of several parts (an anyres image's base and high-resolution grids) splits the
budget between them by size; a video's grid gets an even 3-D lattice.
"""

from __future__ import annotations

import torch

from .base import ModelInfo, LLM_INPUT, ImageView, Method, Stage
from .primitives import split_budget, volume_lattice


class UniformGrid(Method):
    name = "uniform"
    summary = "an even lattice of each image's token grid (3-D for a video)"
    where = "LLM input"

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        return [Stage(LLM_INPUT, budget)]

    def select_batch(self, views: list[ImageView]) -> list[torch.Tensor]:
        """A whole item's lattice depends only on its grids and keep: computed once for a batch's alike images."""
        lattices, picks = {}, []
        for view in views:
            if not view.whole:
                picks.append(self.select(view))
                continue
            key = (view.parts, view.keep, view.hidden.device)
            if key not in lattices:
                lattices[key] = self.select(view)
            picks.append(lattices[key].clone())
        return picks

    def select(self, view: ImageView) -> torch.Tensor:
        device = view.hidden.device
        chosen = []
        counts = split_budget([grid.size for grid in view.parts], view.keep)
        for index, (grid, count) in enumerate(zip(view.parts, counts)):
            mine = torch.nonzero(view.part == index).flatten()
            frame, row, col = view.coords[mine].unbind(dim=-1)
            raster = (frame * grid.rows + row) * grid.cols + col
            wanted = volume_lattice(grid.frames, grid.rows, grid.cols, count, device)
            chosen.append(mine[torch.isin(raster, wanted)])
        return torch.cat(chosen)
