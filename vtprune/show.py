"""What `vtprune show` draws: the sample it asks about (an image or a video's frames) and, from the pruner's
decision, the kept-token drawings of each of its grids (`viz.kept_token_maps`)."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from .adapters import adapter_for
from .eval.benchmark_eval import default_frames
from .eval.generation import VIDEO_FAMILIES
from .eval.videos import read_frames
from .viz import (GridDrawing, groups_per_grid, kept_per_frame, per_frame, seen_frames, seen_parts,
                  tokens_per_grid)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
FRAMES_TO_A_ROW = 8


def sample_of(path: str, model, processor, frames: int | None) -> tuple[list, list | None]:
    """(images, videos) of the one sample `show` asks about, as `generate_answers` takes them: the picture at
    `path`, or `frames` frames of its video (None: as `eval` samples them)."""
    if not path.lower().endswith(VIDEO_SUFFIXES):
        if frames:
            raise ValueError(f"--frames samples a video's frames, and {path} is no video ({', '.join(VIDEO_SUFFIXES)})")
        try:
            return [[Image.open(path).convert("RGB")]], None
        except OSError as error:  # not a picture (UnidentifiedImageError), or a truncated or corrupt one
            not_a_picture = isinstance(error, UnidentifiedImageError)
            problem = "not an image PIL can read" if not_a_picture else f"unreadable ({error})"
            raise ValueError(f"{path}: {problem}; give a picture (.png, .jpg, ...) or a video "
                             f"({', '.join(VIDEO_SUFFIXES)})") from None
    if getattr(processor, "video_processor", None) is None:
        raise ValueError(f"{path} is a video, but this checkpoint's processor ({type(processor).__name__}) takes "
                         f"none; give --model a checkpoint of a family that does ({VIDEO_FAMILIES})")
    return [[]], [[read_frames(path, frames or default_frames(model))]]


def drawings_of(model, processor, inputs, decision) -> tuple[list[GridDrawing], int]:
    """(the drawings of the first sample's first visual item under `decision`, the pruner's last; `across` for
    kept_token_maps): an image's grids one under another, a video's frames side by side."""
    adapter = adapter_for(model)
    item = adapter.visual_items(inputs["input_ids"][:1], dict(inputs))[0][0]
    kept = [stage[0].cpu() for stage in decision.kept] if decision else []
    moved = [(s[0][0].cpu(), s[0][1].cpu()) for s in decision.moved] if decision else []
    draw = _video_drawings if item.kind == "video" else _image_drawings
    return draw(adapter, processor, inputs, item, kept, moved)


def _image_drawings(adapter, processor, inputs, item, kept, moved):
    """An image's grids (LLaVA-NeXT's and OneVision's base view, then their tiles stitched and unpadded)."""
    tiles = adapter.tile_grid(inputs["image_sizes"][0]) if len(item.parts) == 2 else None  # anyres
    # resized and cropped: the grids fit these, not the file
    seen = seen_parts(processor, inputs, [(grid.rows, grid.cols) for grid in item.parts], tiles=tiles)
    groups = groups_per_grid(item, moved) if any(len(sources) for sources, _ in moved) else [None] * len(seen)
    labels = ["base view", "tiles, unpadded"] if len(seen) == 2 else ["image"]
    return [GridDrawing(view.image, view.grid, k, g, label) for view, k, g, label
            in zip(seen, tokens_per_grid(item, kept), groups, labels, strict=True)], 0


def _video_drawings(adapter, processor, inputs, item, kept, moved):
    """A video's frames, each under its own tokens."""
    [grid] = item.parts
    seen = seen_frames(processor, inputs, (grid.frames, grid.rows, grid.cols),
                       adapter.model.config.vision_config.patch_size)
    [kept] = tokens_per_grid(item, kept)
    merged = any(len(sources) for sources, _ in moved)
    groups = per_frame(groups_per_grid(item, moved)[0], grid.frames) if merged else [None] * grid.frames
    # a Qwen2-VL token spans a temporal patch of frames
    span = processor.video_processor.temporal_patch_size if "video_grid_thw" in inputs else 1
    labels = [f"frame {t + 1}" if span == 1 else f"frames {t * span + 1}-{t * span + span}" for t in range(grid.frames)]
    return [GridDrawing(view.image, view.grid, k, g, label) for view, k, g, label in
            zip(seen, kept_per_frame(kept, grid.frames, grid.rows * grid.cols), groups, labels, strict=True)], \
        FRAMES_TO_A_ROW
