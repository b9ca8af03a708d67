"""Pictures of what a method kept: each patch of the image shaded by the stage at which it was dropped.

The patches are those of the image the model saw (resized, cropped), rebuilt from the
processor's output by `seen_image`; the file on disk seldom has that size or framing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SeenImage:
    """The picture a model's vision tower was fed, and the grid of its visual tokens over it.

    grid is (rows, cols) in the raster order the tokens take in the prompt; each cell covers
    image.height / rows by image.width / cols pixels.
    """

    image: Image.Image
    grid: tuple[int, int]


def seen_image(processor, inputs, index: int = 0) -> SeenImage:
    """What image `index` of a processor call looked like to the model, rebuilt from its pixel_values.

    processor: a LlavaProcessor, or a Qwen2-VL processor or image processor; inputs: what it
    returned. Reading the pixels back (rather than redoing the resize and crop) gives exactly
    the model's view whatever the processor's settings and backend.
    """
    image_processor = getattr(processor, "image_processor", processor)
    if "image_grid_thw" in inputs:
        return _seen_by_qwen2_vl(image_processor, inputs["pixel_values"], inputs["image_grid_thw"], index)
    patch = getattr(processor, "patch_size", None)
    if patch is None:
        raise ValueError("the processor does not say its patch size (LlavaProcessor.patch_size); "
                         "cannot lay the token grid over the image")
    # Video-LLaVA's processor names an image's pixels pixel_values_images (transformers < 5.23's default)
    pixels = inputs["pixel_values"] if "pixel_values" in inputs else inputs["pixel_values_images"]
    channels_first = _numpy(pixels[index])
    height, width = channels_first.shape[-2:]
    return SeenImage(_denormalise(channels_first, image_processor), (height // patch, width // patch))


def _seen_by_qwen2_vl(image_processor, pixel_values, image_grid_thw, index: int, frame: int = 0) -> SeenImage:
    """Undo Qwen2-VL's patch flattening: rows of merge x merge blocks of patches, each a temporal patch of frames.
    Image or video `index`, at its temporal patch `frame`, whose first frame is shown (a still image is its own
    frame repeated over the temporal patch)."""
    grids = _numpy(image_grid_thw).astype(np.int64)
    frames, rows, cols = (int(n) for n in grids[index])
    first = int(grids[:index].prod(axis=1).sum())  # images (videos) are concatenated patch-wise
    patch, merge = image_processor.patch_size, image_processor.merge_size
    temporal = image_processor.temporal_patch_size
    patches = _numpy(pixel_values[first:first + frames * rows * cols])
    blocks = patches.reshape(frames, rows // merge, cols // merge, merge, merge, -1, temporal, patch, patch)
    still = blocks[frame, :, :, :, :, :, 0]  # (block row, block col, row in block, col in block, channel, y, x)
    channels_first = still.transpose(4, 0, 2, 5, 1, 3, 6).reshape(-1, rows * patch, cols * patch)
    return SeenImage(_denormalise(channels_first, image_processor), (rows // merge, cols // merge))


def seen_parts(processor, inputs, grids: list[tuple[int, int]], index: int = 0,
               tiles: tuple[int, int] | None = None) -> list[SeenImage]:
    """What the model saw under each token grid of image `index` (grids: their (rows, cols), in the order its
    tokens fill them, as the model's adapter lays them out). One grid: `seen_image`. An anyres image (LLaVA-NeXT,
    OneVision; tiles: its (tiles high, tiles wide), the adapter's `tile_grid`): the base view, the whole image
    squashed into one tile, then the tiles stitched and cropped to the patches the model keeps when it unpads them
    (OneVision may then shrink that grid: each token covers a few patches)."""
    from vtprune.adapters.llava_next import unpadded_grid

    if tiles is None:
        seen = seen_image(processor, inputs, index)
        if [seen.grid] != [tuple(grid) for grid in grids]:
            raise ValueError(f"the picture's token grid {seen.grid} is not the model's {grids}: cannot draw it")
        return [seen]
    views = _numpy(inputs["pixel_values"][index])  # [views, 3, tile, tile]: the base, then the tiles row by row
    side, (high, wide) = grids[0][0], tiles  # the base grid is one tile's patches
    patch = views.shape[-1] // side
    # the patches a tile's side holds: SigLIP's 27 of 14 pixels leave the last 6 of a 384-pixel tile unseen
    tile = side * patch
    views = views[..., :tile, :tile]
    stitched = views[1:1 + high * wide].reshape(high, wide, 3, tile, tile).transpose(2, 0, 3, 1, 4)
    stitched = stitched.reshape(3, high * tile, wide * tile)
    rows, cols = unpadded_grid(high * side, wide * side, inputs["image_sizes"][index])
    top, left = (high * side - rows) // 2 * patch, (wide * side - cols) // 2 * patch  # unpadding crops evenly
    high_resolution = stitched[:, top:top + rows * patch, left:left + cols * patch]
    return [SeenImage(_denormalise(views[0], processor.image_processor), tuple(grids[0])),
            SeenImage(_denormalise(high_resolution, processor.image_processor), tuple(grids[1]))]


def seen_frames(processor, inputs, grid: tuple[int, int, int], patch: int, index: int = 0) -> list[SeenImage]:
    """What the model saw of each frame of video `index`, under the frame's tokens; grid: the video's (frames, rows,
    cols) of tokens as its adapter lays them out. A Qwen2-VL token spans a temporal patch of frames (its grid's
    frames count those): the first frame of each is shown. The LLaVA families' frames are cut to the patches
    their tower reads (patch: its patch side in pixels; SigLIP's 27 of 14 leave 6 of a 384-pixel frame unread),
    and the token grid laid over them (OneVision pools each frame's patches into fewer tokens)."""
    frames, rows, cols = grid
    video_processor = processor.video_processor
    if "video_grid_thw" in inputs:
        seen = [_seen_by_qwen2_vl(video_processor, inputs["pixel_values_videos"], inputs["video_grid_thw"], index, t)
                for t in range(int(inputs["video_grid_thw"][index][0]))]
    else:
        pixels = _numpy(inputs["pixel_values_videos"][index])  # [frames, 3, height, width]
        height, width = (side // patch * patch for side in pixels.shape[-2:])
        if rows > height // patch or cols > width // patch:  # pooling shrinks a grid, nothing grows it
            raise ValueError(f"a video's {rows}x{cols} tokens a frame cannot come from {height // patch}x"
                             f"{width // patch} patches: cannot draw them")
        seen = [SeenImage(_denormalise(frame[:, :height, :width], video_processor), (rows, cols)) for frame in pixels]
    if len(seen) != frames or any(view.grid != (rows, cols) for view in seen):
        raise ValueError(f"the video's pictures ({len(seen)} frames of {seen[0].grid} tokens) are not the model's "
                         f"{frames} frames of {(rows, cols)}: cannot draw them")
    return seen


def per_frame(values: np.ndarray, frames: int) -> list[np.ndarray]:
    """A video grid's per-cell values [frames * cells] (raster order: frame, row, col), frame by frame."""
    return list(np.asarray(values).reshape(frames, -1))


def kept_per_frame(kept_per_stage: list[np.ndarray], frames: int, cells: int) -> list[list[np.ndarray]]:
    """A video grid's kept raster indices per stage, split into each frame's (indices within the frame)."""
    return [[np.asarray(kept)[np.asarray(kept) // cells == f] % cells for kept in kept_per_stage]
            for f in range(frames)]


def item_tokens(item, positions) -> np.ndarray:
    """Each sequence position's index among a visual item's tokens (adapters.VisualItem: its grids' tokens in
    order), -1 for a position that is none of them (LLaVA-NeXT's newline tokens, text)."""
    order = np.concatenate([np.arange(start, start + length) for start, length in item.runs])  # ascending
    positions = np.asarray(positions, dtype=np.int64)
    found = np.minimum(np.searchsorted(order, positions), len(order) - 1)
    return np.where(order[found] == positions, found, -1)


def tokens_per_grid(item, positions_per_stage: list) -> list[list[np.ndarray]]:
    """For each grid of a visual item, each stage's positions that lie in it, as raster indices within the grid."""
    offsets = np.cumsum([0] + [grid.size for grid in item.parts])
    per_grid = [[] for _ in item.parts]
    for positions in positions_per_stage:
        token = item_tokens(item, positions)
        for g in range(len(item.parts)):
            per_grid[g].append(token[(token >= offsets[g]) & (token < offsets[g + 1])] - offsets[g])
    return per_grid


def groups_per_grid(item, moved_per_stage: list) -> list[np.ndarray]:
    """For each grid of a visual item, `merge_groups` of its cells over the whole item (a merge may cross grids):
    moved_per_stage[s] = (positions merged at stage s, the positions they went to)."""
    moved = [(item_tokens(item, sources), item_tokens(item, targets)) for sources, targets in moved_per_stage]
    groups = merge_groups(item.length, [(s[(s >= 0) & (t >= 0)], t[(s >= 0) & (t >= 0)]) for s, t in moved])
    offsets = np.cumsum([0] + [grid.size for grid in item.parts])
    return [groups[offsets[g]:offsets[g + 1]] for g in range(len(item.parts))]


def _numpy(values) -> np.ndarray:
    """float32 numpy from a tensor of any dtype and device, or from a list."""
    return values.detach().float().cpu().numpy() if hasattr(values, "detach") else np.asarray(values, np.float32)


def _denormalise(channels_first: np.ndarray, image_processor) -> Image.Image:
    """Invert the processor's rescale and normalize steps back to 8-bit RGB."""
    values = channels_first.astype(np.float32)
    if getattr(image_processor, "do_normalize", False):
        mean = np.asarray(image_processor.image_mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(image_processor.image_std, np.float32).reshape(-1, 1, 1)
        values = values * std + mean
    if getattr(image_processor, "do_rescale", False):
        values = values / image_processor.rescale_factor
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def cell_index(length: int, cells: int) -> np.ndarray:
    """For each pixel along a side of `length` pixels, the cell of `cells` it lies in.

    Exact when cells divides length (the model's own view); any other size still gives
    every pixel the cell covering it in proportion, instead of failing.
    """
    return np.arange(length) * cells // length


def cells_to_pixels(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Blow a [rows, cols, ...] per-cell array up to [height, width, ...] pixels."""
    rows, cols = values.shape[:2]
    return values[cell_index(height, rows)][:, cell_index(width, cols)]


def dropped_at_stage(grid: tuple[int, int], kept_per_stage: list[np.ndarray]) -> np.ndarray:
    """[rows, cols] int map: 0 for tokens kept to the end, s for tokens dropped at stage s (1-based).

    kept_per_stage[s] holds the raster indices of the image's tokens that survive stage s.
    """
    rows, cols = grid
    dropped = np.zeros(rows * cols, dtype=np.int64)
    alive = np.ones(rows * cols, dtype=bool)
    for stage, kept in enumerate(kept_per_stage, start=1):
        kept = np.asarray(kept, dtype=np.int64)
        if kept.size and (kept.min() < 0 or kept.max() >= rows * cols):
            # Negative indices would silently wrap: a grid that disagrees with the prompt's tokens.
            raise ValueError(f"kept token indices span {kept.min()}..{kept.max()}, "
                             f"outside the {rows}x{cols} token grid")
        survivors = np.zeros(rows * cols, dtype=bool)
        survivors[kept] = True
        dropped[alive & ~survivors] = stage
        alive &= survivors
    return dropped.reshape(rows, cols)


def merge_groups(count: int, moved_per_stage: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[count] raster index of the token each token's content ended up in, following merges stage by stage.

    moved_per_stage[s] = (tokens, the tokens they went to) at stage s; a token a merging
    method kept maps to itself there, so chains (a into b, later b into c) end at c.
    """
    group = np.arange(count)
    for sources, targets in moved_per_stage:
        step = np.arange(count)
        step[np.asarray(sources, dtype=np.int64)] = np.asarray(targets, dtype=np.int64)
        group = step[group]
    return group


def shade_dropped(pixels: np.ndarray, stages: np.ndarray, count: int) -> np.ndarray:
    """Darken each dropped token's cell of [height, width, 3] pixels in 0..1; earlier drops darker."""
    shade = np.zeros(stages.shape, dtype=np.float32)
    for stage in range(1, count + 1):  # earlier drops darker: they were gone for more layers
        shade[stages == stage] = 0.85 - 0.45 * (stage - 1) / max(count - 1, 1)
    return pixels * (1 - cells_to_pixels(shade, *pixels.shape[:2])[..., None])


@dataclass(frozen=True)
class GridDrawing:
    """One token grid's part of a kept-token picture."""

    image: Image.Image  # what the model saw under the grid
    grid: tuple[int, int]
    kept_per_stage: list[np.ndarray]  # raster indices kept after each stage
    groups: np.ndarray | None = None  # per cell, the kept token (any id, shared across grids) it was merged into
    label: str = "image"


def kept_token_map(image, grid: tuple[int, int], kept_per_stage: list[np.ndarray], path: str | Path, title: str,
                   stage_layers: list[int] | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    """Save the image beside a copy whose dropped patches are shaded by stage; returns the stage map.

    With `groups` (from `merge_groups`), a third panel colours every patch by the kept token
    it was merged into: which tokens went where.
    """
    return kept_token_maps([GridDrawing(image, grid, kept_per_stage, groups)], path, title, stage_layers)[0]


def kept_token_maps(drawings: list[GridDrawing], path: str | Path, title: str,
                    stage_layers: list[int] | None = None, across: int = 0) -> list[np.ndarray]:
    """kept_token_map for an image of several grids (LLaVA-NeXT's base view and its tiles), one row of panels each;
    or, with `across`, for a video's frames: side by side, at most `across` to a row, each frame's panels one above
    the other. Returns each grid's stage map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    count = len(drawings[0].kept_per_stage)
    merged = any(d.groups is not None for d in drawings)
    panels = 3 if merged else 2
    aspects = [d.image.height / d.image.width for d in drawings]
    if across:
        blocks = -(-len(drawings) // across)
        columns = -(-len(drawings) // blocks)  # rows as even as they can be: 10 frames as 5 and 5
        figure, axes = plt.subplots(blocks * panels, columns, squeeze=False, layout="constrained",
                                    figsize=(2.4 * columns, 2.4 * max(aspects) * blocks * panels + 1.2))
        places = [[axes[i // columns * panels + p][i % columns] for p in range(panels)] for i in range(len(drawings))]
        for i in range(len(drawings), blocks * columns):  # the last row's empty places
            for p in range(panels):
                axes[i // columns * panels + p][i % columns].axis("off")
    else:  # rows as tall as their images, at one width, and room for titles and the legend
        figure, axes = plt.subplots(len(drawings), panels, squeeze=False, gridspec_kw={"height_ratios": aspects},
                                    layout="constrained",
                                    figsize=(5 * panels, 5 * sum(aspects) + 0.4 + 0.6 * len(drawings)))
        places = list(axes)
    # Each kept token a random hue, the same in every grid (a merge may cross grids)
    ids = max((int(np.max(d.groups)) + 1 for d in drawings if d.groups is not None and d.groups.size), default=1)
    hues = np.random.default_rng(0).random((ids, 3)) * 0.8 + 0.2
    small = {"fontsize": 8} if across else {}  # a video's many small panels: short titles, thin outlines
    maps = []
    for drawing, place in zip(drawings, places):
        stages = dropped_at_stage(drawing.grid, drawing.kept_per_stage)
        maps.append(stages)
        pixels = np.asarray(drawing.image.convert("RGB"), dtype=np.float32) / 255.0
        height, width = pixels.shape[:2]
        name = "image" if len(drawings) == 1 else drawing.label
        place[0].imshow(pixels)
        place[0].set_title(f"{name}{'' if across else ' as the model saw it'} ({width}x{height})", **small)
        place[1].imshow(shade_dropped(pixels, stages, count))
        cell_h, cell_w = height / drawing.grid[0], width / drawing.grid[1]
        survivors = list(zip(*np.nonzero(stages == 0)))
        for r, c in survivors:  # outline what survives every stage
            place[1].add_patch(Rectangle((c * cell_w - 0.5, r * cell_h - 0.5), cell_w, cell_h, fill=False,
                                         edgecolor="#ff2a6d", linewidth=0.8 if across else 1.2))
        place[1].set_title(f"kept {len(survivors)} of {stages.size}{'' if across else ' tokens'}", **small)
        if merged:
            if drawing.groups is not None:  # every patch painted with the hue of the token it went into
                colours = hues[np.asarray(drawing.groups)].reshape(*drawing.grid, 3)
                place[2].imshow(0.35 * pixels + 0.65 * cells_to_pixels(colours, height, width))
                for r, c in survivors:
                    place[2].add_patch(Rectangle((c * cell_w - 0.5, r * cell_h - 0.5), cell_w, cell_h, fill=False,
                                                 edgecolor="white", linewidth=1.0))
            place[2].set_title(f"merged into{'' if across else ' (colour = kept token)'}", **small)
        for axis in place:
            axis.set_xticks([])
            axis.set_yticks([])
    if count > 1 or stage_layers:
        # (a stage at layer 0 is the language model's input, where a vision-encoder method's choice takes effect)
        labels = [f"dropped before LLM layer {layer}" if layer else "dropped before the LLM" for layer in stage_layers] \
            if stage_layers else [f"dropped at stage {stage}" for stage in range(1, count + 1)]
        handles = [Patch(color=str(1 - (0.85 - 0.45 * s / max(count - 1, 1))), label=label) for s, label in enumerate(labels)]
        handles.append(Patch(facecolor="none", edgecolor="#ff2a6d", label="kept to the end"))
        figure.legend(handles=handles, loc="outside lower center", ncol=count + 1, fontsize=8)
    figure.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return maps
