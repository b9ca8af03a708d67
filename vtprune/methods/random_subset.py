"""random: a seeded random subset of each image's tokens, before the LLM (a reference floor)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModelInfo, LLM_INPUT, ImageView, Method, Stage
from .primitives import on_device


class RandomSubset(Method):
    name = "random"
    summary = "seeded random subset of each image's visual tokens"
    where = "LLM input"

    @dataclass(frozen=True)
    class Options:
        seed: int = 0

    @classmethod
    def validate(cls, options: "RandomSubset.Options") -> None:
        if not 0 <= options.seed < 2**32:  # seed * 1_000_003 + rank must fit torch's 64-bit seed
            raise ValueError(f"random's seed must lie in [0, 2**32); got {options.seed}")

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        return [Stage(LLM_INPUT, budget)]

    def select(self, view: ImageView) -> torch.Tensor:
        # Seeded by the image's rank in its sample, not by a running generator, so that
        # a sample draws the same subset alone or inside any batch.
        generator = torch.Generator().manual_seed(self.options.seed * 1_000_003 + view.image_index)
        order = torch.randperm(view.hidden.shape[0], generator=generator)
        return on_device(order[: view.keep], view.hidden.device)
