"""Pictures of what a method kept: each patch of the image shaded by the stage at which it was dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def dropped_at_stage(grid: tuple[int, int], kept_per_stage: list[np.ndarray]) -> np.ndarray:
    """[rows, cols] int map: 0 for tokens kept to the end, s for tokens dropped at stage s (1-based).

    kept_per_stage[s] holds the raster indices of the image's tokens that survive stage s.
    """
    rows, cols = grid
    dropped = np.zeros(rows * cols, dtype=np.int64)
    alive = np.ones(rows * cols, dtype=bool)
    for stage, kept in enumerate(kept_per_stage, start=1):
        survivors = np.zeros(rows * cols, dtype=bool)
        survivors[np.asarray(kept, dtype=np.int64)] = True
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


def kept_token_map(image, grid: tuple[int, int], kept_per_stage: list[np.ndarray], path: str | Path, title: str,
                   stage_layers: list[int] | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    """Save the image beside a copy whose dropped patches are shaded by stage; returns the stage map.

    With `groups` (from `merge_groups`), a third panel colours every patch by the kept token
    it was merged into: which tokens went where.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    stages = dropped_at_stage(grid, kept_per_stage)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    height, width = pixels.shape[:2]
    shade = np.zeros(stages.shape, dtype=np.float32)
    count = len(kept_per_stage)
    for stage in range(1, count + 1):  # earlier drops darker: they were gone for more layers
        shade[stages == stage] = 0.85 - 0.45 * (stage - 1) / max(count - 1, 1)
    shade_px = np.kron(shade, np.ones((height // grid[0], width // grid[1]), dtype=np.float32))
    shaded = pixels * (1 - shade_px[..., None])

    panels = 2 if groups is None else 3
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 5.4))
    axes[0].imshow(pixels)
    axes[0].set_title("image")
    axes[1].imshow(shaded)
    cell_h, cell_w = height / grid[0], width / grid[1]
    for row, col in zip(*np.nonzero(stages == 0)):  # outline what survives every stage
        axes[1].add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h, fill=False,
                                    edgecolor="#ff2a6d", linewidth=1.2))
    kept = int((stages == 0).sum())
    axes[1].set_title(f"kept {kept} of {stages.size} tokens")
    if groups is not None:
        # Each kept token a random hue; every patch painted with the hue of the token it went into.
        hues = np.random.default_rng(0).random((stages.size, 3)) * 0.8 + 0.2
        colours = hues[np.asarray(groups)].reshape(*grid, 3)
        colours_px = np.kron(colours, np.ones((height // grid[0], width // grid[1], 1), dtype=np.float32))
        axes[2].imshow(0.35 * pixels + 0.65 * colours_px)
        for row, col in zip(*np.nonzero(stages == 0)):
            axes[2].add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h, fill=False,
                                        edgecolor="white", linewidth=1.0))
        axes[2].set_title("merged into (colour = kept token)")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    if count > 1 or stage_layers:
        labels = [f"dropped before layer {layer}" for layer in (stage_layers or range(1, count + 1))]
        handles = [Patch(color=str(1 - (0.85 - 0.45 * s / max(count - 1, 1))), label=label) for s, label in enumerate(labels)]
        handles.append(Patch(facecolor="none", edgecolor="#ff2a6d", label="kept to the end"))
        axes[1].legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.16), ncol=count + 1, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return stages
