"""What one pruned prefill did, in numbers a person compares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PruneStats:
    """The visual tokens of one prefill, per sample: entering each decoder layer, and before pruning
    (`pruner.last_stats`; a beam search or num_return_sequences gives one row per repeat)."""

    visual_tokens_per_layer: list[list[int]]  # [sample][decoder layer]: visual tokens entering that layer
    images_per_sample: list[int]
    visual_tokens_per_sample: list[int]  # before pruning
    nominal_budget: int | float  # as given to apply() (options that fix each stage's count, e.g. clse's keep, override it)

    def sample_equivalent_budget(self, sample: int) -> float | None:
        """One sample's visual tokens per image, averaged over decoder layers (None without images)."""
        layers, images = self.visual_tokens_per_layer[sample], self.images_per_sample[sample]
        return sum(layers) / len(layers) / images if images else None

    @property
    def equivalent_budget(self) -> float:
        """Visual tokens per image averaged over decoder layers and samples: what a single-stage
        method that prunes before the LLM would have to keep to cost the same."""
        per_sample = [self.sample_equivalent_budget(b) for b in range(len(self.images_per_sample))]
        per_sample = [value for value in per_sample if value is not None]
        return sum(per_sample) / len(per_sample) if per_sample else 0.0

    @property
    def kept_per_sample(self) -> list[int]:
        """Visual tokens entering the last decoder layer, per sample."""
        return [layers[-1] if layers else 0 for layers in self.visual_tokens_per_layer]


def counts_per_layer(layer_counts: list[torch.Tensor]) -> list[list[int]]:
    """[layer] of [B] counts -> [sample][layer] lists of ints."""
    return torch.stack(layer_counts, dim=1).tolist()
