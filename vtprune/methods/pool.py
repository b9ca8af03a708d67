"""pool: average pooling of each visual item's token grid down to the budget, before the projector.

The project's own rule for a plain-downsampling baseline (VTC-Bench, 2025, found downsampling hard
to beat; theirs resizes the image before the encoder, with no token budget). Each window of the grid
becomes one token: its hidden state is the mean of the window's projector inputs
(VisionView.features; the engine projects it), it sits at the window's representative
cell, and its size is the window's cell count. No attention is read (vision_layers is
empty); the method acts in the vision stage only to average projector inputs.

Windows (a deterministic rule that always gives exactly `keep` windows, which tile the grid):
- Parts: an item of several grids (LLaVA-NeXT's base and high-resolution grids) splits its
  budget over them in proportion to their sizes (`split_budget`).
- Images, a grid of h x w cells pooled to k windows: the windows lie in r horizontal bands;
  band i is cut into c_i windows. Bands and the windows of a band are near-equal,
  non-overlapping bins: bin j of n over a length L spans [floor(j L / n), floor((j+1) L / n)).
  * Regular lattice when possible: among the divisors r of k with r <= h and k / r <= w, the
    one whose lattice r x (k / r) has the aspect ratio closest to the grid's (smallest
    |log((r / (k/r)) / (h / w))|; ties: fewer bands), if that is within a factor of 2 of the
    grid's; every band then has c_i = k / r windows (24x24: 64 -> 8x8 windows of 3x3,
    144 -> 12x12 of 2x2, 192 -> 12x16, 128 -> 8x16, 576 -> every cell).
  * Otherwise (k prime, or no factor pair near the grid's shape) r = round(sqrt(k h / w))
    bands, clamped to [ceil(k / w), min(h, k)], and the k windows are split over them as
    evenly as possible: k mod r bands (evenly spaced among the r) get one window more.
- Videos, f frames of h x w (Video-LLaVA: 8 x 16 x 16): pooled per frame, never across frames
  while the budget allows (k >= f): frame i gets floor(k / f) windows, and the k mod f frames
  evenly spaced among them one more, each frame laid out as an image. With k < f, the frames
  are cut into k consecutive near-equal groups (bins as above), each pooled to one token
  (the mean over its frames' cells). Pooling across frames would blur motion, and the tokens
  of a frame keep their frame's place in the sequence.
- Representative cell of a window (the kept token, whose position the pooled token takes):
  its middle cell, the lower middle on even extents: ((start + end - 1) // 2) along each axis.
- A part whose share of the budget is 0 (only when the budget is smaller than the item's
  parts, or a tiny part) is dropped whole: its tokens are averaged nowhere, their destination
  is -1 and the sizes then sum to less than N.

Towers and families: the vision stage's (LLaVA-1.5, LLaVA-NeXT per grid, Video-LLaVA per image or
frame); the engine refuses it where a tower token is not one LLM token (LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL). No attention is read, so the rule itself needs no [CLS].
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .base import Grid, ModelInfo, Selection, VisionMethod, VisionView
from .primitives import evenly_spaced, in_token_order, same_shape, split_budget


def band_counts(height: int, width: int, k: int) -> list[int]:
    """Windows per horizontal band when a height x width grid is pooled to k windows (see the module docstring)."""
    k = min(k, height * width)
    low, high = math.ceil(k / width), min(height, k)
    regular = [r for r in range(low, high + 1) if k % r == 0]
    if regular:
        # exp |log((r / (k / r)) / (h / w))| = the larger of r^2 w and k h over the smaller, exactly
        spread = lambda r: Fraction(max(r * r * width, k * height), min(r * r * width, k * height))  # noqa: E731
        best = min(regular, key=lambda r: (spread(r), r))
        if spread(best) <= 2:
            return [k // best] * best
    bands = min(high, max(low, math.floor(math.sqrt(k * height / width) + 0.5)))
    counts = [k // bands] * bands
    for band in evenly_spaced(bands, k % bands).tolist():
        counts[band] += 1
    return counts


def frame_groups(frames: int, k: int) -> list[tuple[int, int, int]]:
    """(first frame, end frame, windows) of each group of frames pooled together (per frame while k >= frames)."""
    groups = min(frames, k)
    per_group = [k // groups] * groups
    for group in evenly_spaced(groups, k % groups).tolist():
        per_group[group] += 1
    return [(frames * g // groups, frames * (g + 1) // groups, per_group[g]) for g in range(groups)]


def window_layout(grid: Grid, k: int) -> list[tuple[int, int, int, int, int, int]]:
    """The k windows of a grid, each (frame start, frame end, row start, row end, col start, col end), in raster
    order (frame group, then band, then column)."""
    windows = []
    for f0, f1, count in frame_groups(grid.frames, k):
        counts = band_counts(grid.rows, grid.cols, count)
        bands = len(counts)
        for band, columns in enumerate(counts):
            r0, r1 = grid.rows * band // bands, grid.rows * (band + 1) // bands
            for j in range(columns):
                windows.append((f0, f1, r0, r1, grid.cols * j // columns, grid.cols * (j + 1) // columns))
    return windows


@functools.lru_cache(maxsize=64)
def window_of_cells(grid: Grid, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([frames x rows x cols] window index of every cell in raster order, [k] raster index of each window's
    representative cell). Built once per (grid, k): a batch's images share it (read only)."""
    index = torch.empty(grid.frames, grid.rows, grid.cols, dtype=torch.long)
    representative = []
    for w, (f0, f1, r0, r1, c0, c1) in enumerate(window_layout(grid, k)):
        index[f0:f1, r0:r1, c0:c1] = w
        middle = ((f0 + f1 - 1) // 2, (r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2)
        representative.append((middle[0] * grid.rows + middle[1]) * grid.cols + middle[2])
    return index.flatten(), torch.tensor(representative, dtype=torch.long)


@dataclass(frozen=True)
class ItemWindows:
    """The windows of a whole item (its grids' cells in item order) at a budget; read only, shared by a batch."""

    coords: torch.Tensor  # [N, 3] (frame, row, col) of each token in item order
    part: torch.Tensor  # [N]
    window: torch.Tensor  # [N] the item-wide window of each token (-1: a part without budget, dropped)
    keep: torch.Tensor  # [k] each window's representative token
    sizes: torch.Tensor  # [k] tokens per window
    pooled: torch.Tensor  # [M] the tokens in a window (all but those of a part without budget)


@functools.lru_cache(maxsize=64)
def item_windows(parts: tuple[Grid, ...], keep: int, device: torch.device) -> ItemWindows:
    coords, part, window, representatives, offset, start = [], [], [], [], 0, 0
    for index, (grid, count) in enumerate(zip(parts, split_budget([g.size for g in parts], keep))):
        n = torch.arange(grid.size)
        coords.append(torch.stack([n // (grid.rows * grid.cols), n // grid.cols % grid.rows, n % grid.cols], dim=-1))
        part.append(torch.full((grid.size,), index))
        if count == 0:
            window.append(torch.full((grid.size,), -1))
        else:
            of_cell, representative = window_of_cells(grid, count)
            window.append(of_cell + offset)
            representatives.append(representative + start)
            offset += count
        start += grid.size
    window = torch.cat(window)
    pooled = torch.nonzero(window >= 0).flatten()
    sizes = torch.bincount(window[pooled], minlength=offset).float()
    return ItemWindows(*(t.to(device) for t in (torch.cat(coords), torch.cat(part), window, torch.cat(representatives),
                                                sizes, pooled)))


class Pool(VisionMethod):
    name = "pool"
    summary = "average pooling of each grid down to the budget (windows' mean projector inputs; per frame on videos)"
    where = "before the projector (pooled projector inputs); tokens dropped at the LLM input"

    def vision_layers(self, model: ModelInfo) -> tuple[int, ...]:
        return ()  # reads no attention: only the projector inputs

    def select(self, view: VisionView) -> torch.Tensor | Selection:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[VisionView]) -> list[torch.Tensor | Selection]:
        """Items of one shape, grids and keep whose tokens are every cell in item order (what the engine hands over)
        are pooled together: their windows are the same, so one index_add sums them all. Others, item by item.
        Windows are summed in float64: a float32 sum's rounding depends on the batch's size (and the CPU's
        kernels), while a float64 sum of a window's float32 or bfloat16 values is exact (whatever the order) unless
        they span more than ~2^29 in magnitude, so a batch's pick equals its item's alone, bit for bit."""
        picks: list = [None] * len(views)
        keys = [(view.features.shape, view.features.dtype, view.features.device, view.parts, view.keep)
                if view.keep < view.features.shape[0] == sum(grid.size for grid in view.parts) else object()
                for view in views]
        for group in same_shape(keys):
            alike = [views[i] for i in group]
            pooled = self._pool_in_order(alike) if isinstance(keys[group[0]], tuple) else [None] * len(group)
            for i, view, pick in zip(group, alike, pooled):
                picks[i] = pick if pick is not None else self._select_item(view)
        return picks

    def _pool_in_order(self, views: list[VisionView]) -> list[Selection | None]:
        """The Selection of each item whose tokens are its grids' cells in item order, together (None for the
        others; which they are is read from the device once)."""
        first = views[0]
        device = first.features.device
        layout = item_windows(first.parts, first.keep, device)
        coords = torch.stack([view.coords.to(device) for view in views])
        part = torch.stack([view.part.to(device) for view in views])
        in_order = ((coords == layout.coords).all(dim=-1) & (part == layout.part)).all(dim=-1).tolist()
        chosen = [i for i, ok in enumerate(in_order) if ok]
        picks: list = [None] * len(views)
        if not chosen:
            return picks
        features = torch.stack([views[i].features for i in chosen])
        total = features.new_zeros(len(chosen), layout.sizes.numel(), features.shape[-1], dtype=torch.float64)
        total.index_add_(1, layout.window[layout.pooled], features[:, layout.pooled].double())  # [B, windows, D]
        batch = len(chosen)
        keep, hidden, sizes, destination = in_token_order(
            layout.keep.expand(batch, -1), (total / layout.sizes[:, None].double()).to(features.dtype),
            layout.sizes.expand(batch, -1), layout.window.expand(batch, -1))
        for i, parts in zip(chosen, zip(keep, hidden, sizes, destination)):
            picks[i] = Selection(*parts)
        return picks

    def _select_item(self, view: VisionView) -> torch.Tensor | Selection:
        features = view.features
        n, device = features.shape[0], features.device
        if view.keep >= n:
            return torch.arange(n, device=device)
        coords, part = view.coords.to(device), view.part.to(device)
        window = torch.full((n,), -1, dtype=torch.long, device=device)  # item-wide window index of each token
        keep, offset = [], 0
        for index, (grid, count) in enumerate(zip(view.parts, split_budget([g.size for g in view.parts], view.keep))):
            mine = torch.nonzero(part == index).flatten()
            if count == 0 or mine.numel() == 0:
                continue
            cell = (coords[mine, 0] * grid.rows + coords[mine, 1]) * grid.cols + coords[mine, 2]
            if mine.numel() != grid.size or torch.unique(cell).numel() != grid.size:
                raise ValueError(f"pool needs every cell of each grid; part {index} ({grid}) has {mine.numel()} tokens")
            of_cell, representative = window_of_cells(grid, count)
            token_of_cell = torch.empty(grid.size, dtype=torch.long, device=device)
            token_of_cell[cell] = mine
            window[mine] = of_cell.to(device)[cell] + offset
            keep.append(token_of_cell[representative.to(device)])
            offset += count
        keep = torch.cat(keep)
        pooled = window >= 0
        into = window[pooled]
        sizes = torch.zeros(offset, device=device).index_add_(0, into, torch.ones(into.numel(), device=device))
        total = torch.zeros(offset, features.shape[1], dtype=torch.float64, device=device).index_add_(
            0, into, features[pooled].double())
        # windows in item order of their representatives
        return Selection(*in_token_order(keep, (total / sizes[:, None].double()).to(features.dtype), sizes, window))
