"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): per-image grids after the 2x2 merger, and videos.

An image is its (h/2, w/2) grid; a video its (t, h/2, w/2) grid, t its temporal
patches (`video_grid_thw`). Tokens keep their 3-D M-RoPE positions, frames their
temporal one.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import CHUNKED_PREFILL, Adapter, VisualItem, place_in_runs, split_runs


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        self.merge = config.vision_config.spatial_merge_size
        # (kind, placeholder id, the kwarg holding each item's (t, h, w) in patches)
        self.modalities = [("image", config.image_token_id, "image_grid_thw")]
        if getattr(config, "video_token_id", None) is not None:
            self.modalities.append(("video", config.video_token_id, "video_grid_thw"))

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return tuple(token for _, token, _ in self.modalities)

    def visual_items(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[VisualItem]]:
        items = [[] for _ in input_ids]
        for kind, token, grid_key in self.modalities:
            runs = [split_runs(torch.nonzero(row == token).flatten()) for row in input_ids]
            if not any(runs):
                continue
            grid_thw = model_kwargs.get(grid_key)
            position_ids = model_kwargs.get("position_ids")
            if grid_thw is not None:
                found = self._items_from_grid_thw(runs, grid_thw, kind)
            elif position_ids is not None and position_ids.dim() == 3:
                # generate() may encode the images ahead and drop the grids; the M-RoPE
                # positions it passes instead hold each token's (t, row, col).
                found = self._items_from_positions(runs, position_ids, kind)
            else:
                raise ValueError(f"Qwen2-VL {kind} tokens came without {grid_key} or 3-D position_ids to lay them out")
            for sample, more in zip(items, found):
                sample.extend(more)
        return [sorted(sample, key=lambda item: item.runs[0][0]) for sample in items]

    def relative_rope(self, hidden, position_ids, valid):
        return None  # M-RoPE positions already count from each sample's first token

    def _items_from_grid_thw(self, runs, grid_thw: torch.Tensor, kind: str) -> list[list[VisualItem]]:
        grids = [(int(t), int(h) // self.merge, int(w) // self.merge) for t, h, w in grid_thw.tolist()]
        layouts = [lambda start, g=grid: (VisualItem.grid(start, g[1], g[2], g[0], kind), g[0] * g[1] * g[2])
                   for grid in grids]
        return place_in_runs(runs, layouts, kind)

    @staticmethod
    def _items_from_positions(runs, position_ids: torch.Tensor, kind: str) -> list[list[VisualItem]]:
        planes = position_ids[-3:]  # (t, row, col) planes; a 4-plane tensor leads with text positions
        items = []
        for b, sample_runs in enumerate(runs):
            sample = []
            for start, length in sample_runs:
                t, row, col = planes[:, b, start : start + length]
                rows, cols = (int(p.amax() - p.amin()) + 1 for p in (row, col))
                # Frames are whole rows x cols rasters; at a low frame rate several share a temporal position.
                frames = length // (rows * cols)
                raster = torch.arange(rows * cols, device=row.device).repeat(max(frames, 1))
                if frames * rows * cols != length or not torch.equal(row - row.amin(), raster // cols) \
                        or not torch.equal(col - col.amin(), raster % cols) or bool((t.diff() < 0).any()):
                    raise ValueError(
                        f"the {kind} tokens at position {start} do not form one grid in their M-RoPE positions; "
                        "pass the processor's mm_token_type_ids to forward/generate, which Qwen2-VL needs to place them "
                        f"(and {CHUNKED_PREFILL})"
                    )
                sample.append(VisualItem.grid(start, rows, cols, frames, kind))
            items.append(sample)
        return items
