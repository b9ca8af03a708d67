"""uniform: tokens evenly spaced on each image's token grid, before the LLM (a reference floor)."""

from __future__ import annotations

import torch

from .base import ModelInfo, LLM_INPUT, ImageView, Method, Stage
from .primitives import grid_lattice


class UniformGrid(Method):
    name = "uniform"
    summary = "an even 2-D lattice of each image's token grid"
    where = "LLM input"

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        return [Stage(LLM_INPUT, budget)]

    def select(self, view: ImageView) -> torch.Tensor:
        rows, cols = view.grid
        device = view.hidden.device
        raster = view.coords[:, 0] * cols + view.coords[:, 1]
        wanted = grid_lattice(rows, cols, view.keep, device)
        return torch.nonzero(torch.isin(raster, wanted)).flatten()
