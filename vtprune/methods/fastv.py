"""FastV (ECCV'24): after decoder layer K-1, keep the visual tokens the last prompt token attends to most.

As the authors' released code (pkunlp-icler/FastV): the last token's row of layer K-1's attention, averaged over
heads; the top `budget` visual tokens kept in their order, at their original positions; layers before K keep every
token (and their full KV cache). Deviations: the kept set is decided once, at prefill, as in the authors' KV-cache
variants (llava-hf, lmms-eval); their original code runs without a cache and ranks again at every generated token.
Scores are float32 (theirs: the model's dtype, fp16, where more scores tie).
"""

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
