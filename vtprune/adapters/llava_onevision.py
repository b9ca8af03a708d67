"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres images and pooled videos.

An image is laid out as LLaVA-NeXT's (a base grid, then the unpadded high-resolution
grid with a newline token closing each row), except that the high-resolution grid may
be shrunk to at most `anyres_max_N` tiles' worth, and that in a multi-image prompt
(`batch_num_images` > 1) each image is its base grid and one newline. A video is its
frames' 2x2-pooled grids, one (frames, rows, cols) grid, and one newline after it.
Every shape is read off the model's own packing (`pack_image_features`,
`apply_pooling`) run on one-channel stand-ins, so the adapter follows the model
whatever its arithmetic; newline tokens are never pruned nor counted.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, VisualItem, place_in_runs, split_runs
from .llava_next import anyres_tiles, packed_item, with_span


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    feature_strategy = "full"  # SigLIP has no CLS token
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        self.image_token_id, self.video_token_id = config.image_token_id, config.video_token_id
        self.tile = config.vision_config.image_size
        self.side = config.vision_config.image_size // config.vision_config.patch_size

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def tile_grid(self, image_size) -> tuple[int, int]:
        """(tiles high, tiles wide) a single image of image_size is cut into."""
        return anyres_tiles(image_size, self.model.config.image_grid_pinpoints, self.tile)

    def image_newlines(self, sizes: torch.Tensor, batch_num_images, aspect_ratio: str) -> list[torch.Tensor]:
        """Per image, which of its packed features are newline tokens, from the model's own packing."""
        # (transformers' modeling modules take seconds to import: here, not when vtprune is imported)
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        patches = [
            image_size_to_num_patches(image_size=size, grid_pinpoints=self.model.config.image_grid_pinpoints,
                                      patch_size=self.tile) if alone else 1
            for size, alone in zip(sizes.tolist(), _single_image_flags(batch_num_images, len(sizes)))
        ]
        stand_ins = [torch.zeros(n, self.side * self.side, 1) for n in patches]
        packed, _ = self.model.model.pack_image_features(
            stand_ins, sizes.cpu(), image_newline=torch.ones(1), vision_aspect_ratio=aspect_ratio)
        return [features[:, 0] == 1 for features in packed]

    def pooled_side(self) -> tuple[int, int]:
        """(rows, cols) of a video frame after the model's pooling."""
        pooled = self.model.model.apply_pooling(torch.zeros(1, self.side * self.side, 1))
        rows = int(round(pooled.shape[1] ** 0.5))
        return rows, pooled.shape[1] // rows

    def visual_items(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[VisualItem]]:
        encoded = model_kwargs.get("mm_encoder_outputs") or {}
        images = [split_runs(torch.nonzero(row == self.image_token_id).flatten()) for row in input_ids]
        videos = [split_runs(torch.nonzero(row == self.video_token_id).flatten()) for row in input_ids]
        items = [[] for _ in input_ids]
        if any(images):
            sizes = model_kwargs.get("image_sizes")
            if sizes is not None:
                aspect = model_kwargs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
                newlines = self.image_newlines(sizes, model_kwargs.get("batch_num_images"), aspect)
            elif encoded.get("image") is not None:
                newline = self.model.model.image_newline
                newlines = [(f == newline.to(f.device, f.dtype)).all(dim=-1) for f in encoded["image"].pooler_output]
            else:
                raise ValueError("LLaVA-OneVision image tokens came without image_sizes to lay out their anyres grids")
            layouts = [lambda start, n=n: with_span(packed_item(start, n, self.side)) for n in newlines]
            for sample, found in zip(items, place_in_runs(images, layouts, "image")):
                sample.extend(found)
        if any(videos):
            rows, cols = self.pooled_side()
            frames = model_kwargs.get("pixel_values_videos")
            for sample, runs in zip(items, videos):
                for start, length in runs:  # each video: its frames' pooled grids, then one newline
                    count = frames.shape[1] if frames is not None else (length - 1) // (rows * cols)
                    span = count * rows * cols + 1
                    if length % span:
                        raise ValueError(f"a run of {length} video tokens at position {start} is not a whole number "
                                         f"of {count}-frame videos ({rows}x{cols} tokens a frame, then a newline)")
                    sample += [VisualItem.grid(video, rows, cols, count, "video") for video in range(start, start + length, span)]
        return [sorted(sample, key=lambda item: item.runs[0][0]) for sample in items]


def _single_image_flags(batch_num_images, images: int) -> list[bool]:
    """Whether each image gets anyres tiles: all of them, unless a sample holds several (the model's own rule)."""
    if batch_num_images is None:
        return [True] * images
    return [count == 1 for count in batch_num_images.tolist() for _ in range(count)]
