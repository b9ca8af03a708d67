"""FastV (ECCV'24): after decoder layer K-1, keep the visual tokens the last prompt token attends to most.

As the authors' released code (pkunlp-icler/FastV): the last token's row of layer K-1's attention, averaged over
heads; the top `budget` visual tokens kept in their order, at their original positions; layers before K keep every
token (and their full KV cache). Deviations: the kept set is decided once, at prefill, as in the authors' KV-cache
variants (llava-hf, lmms-eval); their attention-mask variant ranks again at every generated token, with or without a
cache. Scores are float32 (theirs: the model's dtype, fp16, where more scores tie). The image's tokens are found in the
input ids (the authors hard-code where the image starts: 36 in their evaluation scripts' `--fast-v-sys-length`, 35 in
their lmms-eval port; on LLaVA-1.5's prompt, whose image starts at 35, the former keeps the first image token
unranked and ranks the first text token after the image as if it were visual).
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
