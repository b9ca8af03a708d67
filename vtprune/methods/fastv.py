"""FastV (ECCV'24): after decoder layer K-1, keep the visual tokens the last prompt token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModelInfo, ImageView, Method, Stage
from .primitives import topk_in_order


class FastV(Method):
    name = "fastv"
    summary = "top tokens by last-query attention at layer K-1 (head-averaged, from q/k with RoPE)"
    where = "inside the LLM, before layer K"
    needs_attention = True

    @dataclass(frozen=True)
    class Options:
        layer: int = 2  # K: layers 0..K-1 see every visual token

    @classmethod
    def validate(cls, options: "FastV.Options") -> None:
        if options.layer < 1:
            raise ValueError(f"fastv needs layer >= 1 (it scores with the attention of layer K-1); got {options.layer}")

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        return [Stage(self.options.layer, budget)]

    def select(self, view: ImageView) -> torch.Tensor:
        return topk_in_order(view.attention, view.keep)
