"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): per-image grids after the 2x2 merger."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, VisualItem, split_runs


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        self.image_token_id = model.config.image_token_id
        self.merge = model.config.vision_config.spatial_merge_size

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id,)

    def visual_items(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[VisualItem]]:
        runs = [split_runs(torch.nonzero(row == self.image_token_id).flatten()) for row in input_ids]
        if not any(runs):
            return [[] for _ in runs]
        grid_thw = model_kwargs.get("image_grid_thw")
        if grid_thw is not None:
            return self._spans_from_grid_thw(runs, grid_thw)
        position_ids = model_kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() == 3:
            # generate() may encode the images ahead and drop image_grid_thw; the M-RoPE
            # positions it passes instead hold each image token's (row, col).
            return self._spans_from_positions(runs, position_ids)
        raise ValueError("Qwen2-VL image tokens came without image_grid_thw or 3-D position_ids to place them on a grid")

    def _spans_from_grid_thw(self, runs, grid_thw: torch.Tensor) -> list[list[VisualItem]]:
        images = iter([(int(h) // self.merge, int(w) // self.merge) for _, h, w in grid_thw.tolist()])
        spans = []
        for sample_runs in runs:
            sample = []
            for start, length in sample_runs:
                end = start + length
                while start < end:
                    grid = next(images, None)
                    if grid is None:
                        raise ValueError("input_ids hold more image tokens than image_grid_thw describes")
                    size = grid[0] * grid[1]
                    if start + size > end:
                        raise ValueError(f"image tokens at position {start} do not match image_grid_thw")
                    sample.append(VisualItem.grid(start, *grid))
                    start += size
            spans.append(sample)
        if next(images, None) is not None:
            raise ValueError("image_grid_thw describes more images than input_ids hold image tokens")
        return spans

    @staticmethod
    def _spans_from_positions(runs, position_ids: torch.Tensor) -> list[list[VisualItem]]:
        rows_cols = position_ids[-2:]  # (row, col) planes; a 4-plane tensor leads with text positions
        spans = []
        for b, sample_runs in enumerate(runs):
            sample = []
            for start, length in sample_runs:
                planes = rows_cols[:, b, start : start + length]
                extent = (planes.amax(dim=1) - planes.amin(dim=1) + 1).tolist()
                if extent[0] * extent[1] != length:
                    raise ValueError(
                        f"the image tokens at position {start} do not form one image grid in their M-RoPE positions; "
                        "pass the processor's mm_token_type_ids to forward/generate, which Qwen2-VL needs to place images"
                    )
                sample.append(VisualItem.grid(start, extent[0], extent[1]))
            spans.append(sample)
        return spans
