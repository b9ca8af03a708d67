"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): images as LLaVA-1.5's grids, and videos of frames.

An image is its side x side grid (its CLS token dropped). A video's placeholders hold,
frame after frame, the frame's CLS token and its side x side patches: the video is one
(frames, side, side) grid of its patches; the per-frame CLS tokens are in no grid, so
they are never pruned nor counted (a deviation: the CLSE authors' video code slides a
fixed 8 x 256 window over 8 x 257 tokens, one token off per frame).
"""

from __future__ import annotations

from typing import Any

import torch

from ..methods.base import Grid
from .base import Adapter, EncodedPlace, VisualItem, single_row, split_runs, whole_images


class VideoLlavaAdapter(Adapter):
    family = "video_llava"
    feature_strategy = "default"
    model_classes = ("VideoLlavaForConditionalGeneration",)
    one_row_per_image = True

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        self.image_token_id, self.video_token_id = config.image_token_id, config.video_token_id
        self.side = config.vision_config.image_size // config.vision_config.patch_size

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def visual_items(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[VisualItem]]:
        per_image, per_frame = self.side * self.side, self.side * self.side + 1
        videos = model_kwargs.get("pixel_values_videos")
        frames = videos.shape[1] if videos is not None else None
        items = []
        for row in input_ids:
            sample = whole_images(row, self.image_token_id, self.side, self.side)
            for start, length in split_runs(torch.nonzero(row == self.video_token_id).flatten()):
                count = frames or length // per_frame  # without the pixels, a run is one video
                if length % (count * per_frame):
                    raise ValueError(f"a run of {length} video tokens at position {start} is not a whole number of "
                                     f"{count}-frame videos ({per_frame} tokens a frame, its CLS token first)")
                for video in range(start, start + length, count * per_frame):
                    runs = tuple((video + frame * per_frame + 1, per_image) for frame in range(count))
                    sample.append(VisualItem(runs, (Grid(self.side, self.side, count),), "video"))
            items.append(sorted(sample, key=lambda item: item.runs[0][0]))
        return items

    def vision_encoders(self):
        return [("image", self.model.model.image_tower.encoder.layers),
                ("video", self.model.model.video_tower.encoder.layers)]

    def known_place(self, item: VisualItem, device) -> EncodedPlace:
        if item.kind == "image":
            return single_row(item.length, device)
        # A video is one row per frame, each its [CLS] token (kept by the projector, not in the item) and patches.
        grid = item.parts[0]
        n = torch.arange(grid.size, device=device)
        rows, columns = n // (grid.rows * grid.cols), n % (grid.rows * grid.cols) + 1
        return EncodedPlace(grid.frames, rows, columns, columns)
