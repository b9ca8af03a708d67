"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP grid of (image_size / patch)^2 tokens per image."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, ImageSpan, split_runs


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.grid = (side, side)
        self.tokens_per_image = side * side
        self.image_token_id = config.image_token_id

    def check_supported(self) -> None:
        super().check_supported()
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"LLaVA with vision_feature_select_strategy={strategy!r} is not supported: vtprune expects "
                "'default' (the CLS token dropped, a square patch grid per image), as LLaVA-1.5 uses"
            )

    def image_spans(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[ImageSpan]]:
        spans = []
        for row in input_ids:
            sample = []
            for start, length in split_runs(torch.nonzero(row == self.image_token_id).flatten()):
                if length % self.tokens_per_image:
                    raise ValueError(
                        f"a run of {length} image tokens at position {start} is not a whole number of images "
                        f"({self.tokens_per_image} tokens each)"
                    )
                sample += [
                    ImageSpan(start + offset, self.tokens_per_image, self.grid)
                    for offset in range(0, length, self.tokens_per_image)
                ]
            spans.append(sample)
        return spans
