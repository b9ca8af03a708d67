"""What one pruned prefill did, in numbers a person compares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PruneStats:
    visual_tokens_per_layer: list[list[int]]  # [sample][decoder layer]: visual tokens entering that layer
    images_per_sample: list[int]
    visual_tokens_per_sample: list[int]  # before pruning
    nominal_budget: int | float  # as given to apply(): tokens kept per image, or the fraction kept

    @property
    def equivalent_budget(self) -> float:
        """Visual tokens per image averaged over decoder layers and images: what a single-stage
        method that prunes before the LLM would have to keep to cost the same."""
        per_image = [
            sum(layers) / len(layers) / images
            for layers, images in zip(self.visual_tokens_per_layer, self.images_per_sample)
            if images
        ]
        return sum(per_image) / len(per_image) if per_image else 0.0

    @property
    def kept_per_sample(self) -> list[int]:
        """Visual tokens entering the last decoder layer, per sample."""
        return [layers[-1] if layers else 0 for layers in self.visual_tokens_per_layer]

    def as_dict(self) -> dict:
        return {
            "nominal_budget": self.nominal_budget,
            "equivalent_budget": self.equivalent_budget,
            "images_per_sample": self.images_per_sample,
            "visual_tokens_per_sample": self.visual_tokens_per_sample,
            "kept_per_sample": self.kept_per_sample,
            "visual_tokens_per_layer": self.visual_tokens_per_layer,
        }


def counts_per_layer(layer_counts: list[torch.Tensor]) -> list[list[int]]:
    """[layer] of [B] counts -> [sample][layer] lists of ints."""
    return torch.stack(layer_counts, dim=1).tolist()
