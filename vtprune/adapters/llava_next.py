"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images, a base grid plus a high-resolution grid.

Each image's placeholders hold, in order, the base image's grid (the tower's
side x side) and the high-resolution tiles stitched into one grid, unpadded to the
image's aspect ratio, with an `image_newline` token closing each of its rows. The
image is one visual item of two grids; the newline tokens are in neither, so they are
never pruned nor counted. The grids' shapes come from transformers' own anyres
helpers, given each image's `image_sizes`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..methods.base import Grid
from .base import CHUNKED_PREFILL, Adapter, EncodedPlace, VisualItem, place_in_runs, single_row_place, split_runs


class LlavaNextAdapter(Adapter):
    family = "llava_next"
    feature_strategy = "default"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        self.image_token_id = config.image_token_id
        self.tile = config.vision_config.image_size
        self.side = config.vision_config.image_size // config.vision_config.patch_size

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id,)

    def tile_grid(self, image_size) -> tuple[int, int]:
        """(tiles high, tiles wide) an image of image_size is cut into."""
        return anyres_tiles(image_size, self.model.config.image_grid_pinpoints, self.tile)

    def high_resolution_grid(self, image_size) -> tuple[int, int]:
        """(rows, cols) of an image's stitched, unpadded high-resolution grid, as the model packs it."""
        tiles_high, tiles_wide = self.tile_grid(image_size)
        return unpadded_grid(tiles_high * self.side, tiles_wide * self.side, image_size)

    def image_item(self, start: int, image_size) -> VisualItem:
        """The item of one image whose placeholders begin at start: its base grid and its tiles' grid, whether
        pixel_values come 5-D (images x patches) or 4-D (every image's patches in one run), as the model
        cuts both by image_sizes."""
        return self._item(start, self.high_resolution_grid(image_size))

    def encoded_item(self, start: int, features: torch.Tensor) -> VisualItem:
        """The item of one image from the features generate() packed ahead (it drops image_sizes then):
        the model's own newline vector marks where each high-resolution row ends."""
        newline = self.model.model.image_newline.to(features.device, features.dtype)
        return packed_item(start, (features == newline).all(dim=-1), self.side)

    def _item(self, start: int, high_resolution: tuple[int, int] | None) -> VisualItem:
        return anyres_item(start, self.side, high_resolution)

    def vision_encoders(self):
        return [("image", self.model.model.vision_tower.encoder.layers)]

    def encoded_place(self, item: VisualItem, projected: torch.Tensor, received: torch.Tensor) -> EncodedPlace | None:
        """The base image is the item's first row, its tiles the next ones. Which tile grid the image was cut
        into (image_sizes may be gone: generate() drops them once it has encoded the images) is the one of
        the pinpoints whose tiles, stitched and unpadded as the model does, give the features received."""
        base = self.side * self.side
        found = single_row_place(projected, received[:base])
        if found is None or len(item.parts) == 1:
            return found
        rows, cols = item.parts[1].rows, item.parts[1].cols
        shapes = {(high // self.tile, wide // self.tile) for high, wide in self.model.config.image_grid_pinpoints}
        for tiles_high, tiles_wide in sorted(shapes):
            top, left = tiles_high * self.side - rows, tiles_wide * self.side - cols
            if top < 0 or left < 0 or projected.shape[0] < 1 + tiles_high * tiles_wide:
                continue
            y = torch.arange(rows, device=received.device)[:, None] + top // 2  # unpadding crops evenly
            x = torch.arange(cols, device=received.device)[None, :] + left // 2
            tile = 1 + (y // self.side * tiles_wide + x // self.side).flatten()
            within = (y % self.side * self.side + x % self.side).flatten()
            if torch.equal(projected[tile, within], received[base:]):
                return EncodedPlace(1 + tiles_high * tiles_wide, torch.cat([found.rows, tile]),
                                    torch.cat([found.columns, within + 1]), torch.cat([found.feature_columns, within]))
        return None

    def visual_items(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[VisualItem]]:
        runs = [split_runs(torch.nonzero(row == self.image_token_id).flatten()) for row in input_ids]
        if not any(runs):
            return [[] for _ in runs]
        sizes = model_kwargs.get("image_sizes")
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if sizes is not None:
            place, sources = self.image_item, sizes.tolist()
        elif encoded is not None:
            place, sources = self.encoded_item, encoded.pooler_output
        else:
            raise ValueError("LLaVA-NeXT image tokens came without image_sizes to lay out their anyres grids")
        layouts = [lambda start, source=source: with_span(place(start, source)) for source in sources]
        return place_in_runs(runs, layouts, "image")


def anyres_tiles(image_size, grid_pinpoints, tile: int) -> tuple[int, int]:
    """(tiles high, tiles wide) an anyres model (LLaVA-NeXT, OneVision: the same helper) cuts an image into."""
    # (transformers' modeling modules take seconds to import: here, not when vtprune is imported)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    high, wide = get_anyres_image_grid_shape([int(v) for v in image_size], grid_pinpoints, tile)
    return int(high), int(wide)


def unpadded_grid(rows: int, cols: int, image_size) -> tuple[int, int]:
    """(rows, cols) that the model keeps of a stitched rows x cols grid of patches for an image of image_size."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    kept = unpad_image(torch.empty(1, rows, cols), torch.as_tensor(image_size)).shape[1:]
    return int(kept[0]), int(kept[1])


def anyres_item(start: int, side: int, high_resolution: tuple[int, int] | None) -> VisualItem:
    """An anyres image from start: the side x side base grid, then (rows, cols) of high resolution with a
    newline after each row (None: the base alone, one newline after it)."""
    base = side * side
    if high_resolution is None:
        return VisualItem(((start, base),), (Grid(side, side),))
    rows, cols = high_resolution
    runs = [(start, base)] + [(start + base + row * (cols + 1), cols) for row in range(rows)]
    return VisualItem(tuple(runs), (Grid(side, side), Grid(rows, cols)))


def packed_item(start: int, newlines: torch.Tensor, side: int) -> VisualItem:
    """The anyres item whose packed features have newline rows where `newlines` [n] is True."""
    ends = torch.nonzero(newlines).flatten().tolist()
    base, rows = side * side, len(ends)
    cols = (newlines.shape[0] - base) // max(rows, 1) - 1
    if rows == 1 and ends == [base]:
        return anyres_item(start, side, None)
    if not rows and newlines.shape[0] == base:  # so wide or tall an image that its high resolution has no rows
        return anyres_item(start, side, (0, 0))
    if not rows or ends != [base + (row + 1) * (cols + 1) - 1 for row in range(rows)]:
        raise ValueError(f"cannot lay out the anyres grid of the {newlines.shape[0]} image features at position {start} "
                         f"({CHUNKED_PREFILL})")
    return anyres_item(start, side, (rows, cols))


def with_span(item: VisualItem) -> tuple[VisualItem, int]:
    return item, _span(item)


def _span(item: VisualItem) -> int:
    """Placeholder positions an image takes: its grids' tokens and a newline after each high-resolution row
    (or after the base image when it has no tiles)."""
    newlines = item.parts[1].rows if len(item.parts) > 1 else 1
    return item.length + newlines
