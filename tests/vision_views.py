"""VisionViews of seeded random tensors and numpy helpers, shared by the vision methods' fidelity tests."""

from fractions import Fraction

import numpy as np
import torch

from vtprune.methods import Grid, VisionLayer, VisionView

HEADS, HEAD_DIM, DIM = 4, 8, 16


def make_view(placements, rows_total, width, parts, keep, seed, cls=True, kind="image", features=None,
              feature_dtype=torch.float32):
    """A VisionView of random q/k/features; placements: (tower row, column) of each item token, in item order."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows_total, HEADS, width, HEAD_DIM, generator=g)
    key = torch.randn(rows_total, HEADS, width, HEAD_DIM, generator=g)
    n = len(placements)
    if features is None:
        features = torch.randn(n, DIM, generator=g, dtype=feature_dtype)
    return VisionView(
        features=features, coords=torch.zeros(n, 3, dtype=torch.long), part=torch.zeros(n, dtype=torch.long),
        parts=parts, rows=torch.tensor([r for r, _ in placements]), columns=torch.tensor([c for _, c in placements]),
        layers={-2: VisionLayer(query, key, HEAD_DIM**-0.5, cls)}, keep=keep, image_index=0, kind=kind,
    )


def single(keep, seed=0, side=8, cls=True, **view):
    first = 1 if cls else 0
    return make_view([(0, first + i) for i in range(side * side)], 1, first + side * side, (Grid(side, side),), keep,
                     seed, cls, **view)


def anyres(keep, seed=1, cls=True, **view):
    """A LLaVA-NeXT-like item: an 8x8 base row, then an 8x12 high-res grid over two 8x8 tiles (the second
    tile's last 4 columns are padding, never the item's): the grid's raster order interleaves the tiles."""
    first = 1 if cls else 0
    base = [(0, first + i) for i in range(64)]
    high = [(1 + c // 8, first + r * 8 + c % 8) for r in range(8) for c in range(12)]
    return make_view(base + high, 3, first + 64, (Grid(8, 8), Grid(8, 12)), keep, seed, cls, **view)


def video(keep, seed=2, **view):
    placements = [(f, 1 + i) for f in range(4) for i in range(16)]
    return make_view(placements, 4, 17, (Grid(4, 4, frames=4),), keep, seed, kind="video", **view)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def proportional(counts, keep):
    """Largest remainders, earlier rows first on ties (the documented per-item split)."""
    total = sum(counts)
    shares = [Fraction(keep * c, total) for c in counts]
    base = [int(s) for s in shares]
    for i in sorted(range(len(counts)), key=lambda i: (-(shares[i] - base[i]), i))[: keep - sum(base)]:
        base[i] += 1
    return base
