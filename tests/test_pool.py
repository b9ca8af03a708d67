"""pool: the documented window rule, checked against an independent numpy reading and by hand."""

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from vtprune.methods import Grid, ModelInfo, Selection, VisionView
from vtprune.methods.pool import Pool, band_counts

from .picks import assert_same_pick

FEATURES = 6


# ---------------------------------------------------------------- an independent reading, in numpy

def spread_out(total: int, extra: int) -> list[int]:
    """Which of `total` equal bins get one more: `extra` of them, at the centres of `extra` equal stretches."""
    return [int(np.floor((i + 0.5) * total / extra)) for i in range(extra)]


def bands_by_rule(h: int, w: int, k: int) -> list[int]:
    pairs = [(r, k // r) for r in range(1, k + 1) if k % r == 0 and r <= h and k // r <= w]
    if pairs:
        # aspect distance as a ratio >= 1 between r/c and h/w, compared exactly
        r, c = min(pairs, key=lambda p: (max(Fraction(p[0] * w, p[1] * h), Fraction(p[1] * h, p[0] * w)), p[0]))
        if max(Fraction(r * w, c * h), Fraction(c * h, r * w)) <= 2:
            return [c] * r
    r = int(np.floor(np.sqrt(k * h / w) + 0.5))
    r = max(-(-k // w), min(r, h, k))
    counts = [k // r] * r
    for i in spread_out(r, k % r) if k % r else []:
        counts[i] += 1
    return counts


def edges(length: int, pieces: int) -> list[tuple[int, int]]:
    return [((j * length) // pieces, ((j + 1) * length) // pieces) for j in range(pieces)]


def windows_by_rule(grid: Grid, k: int) -> list[tuple[range, range, range]]:
    groups = min(grid.frames, k)
    per_group = [k // groups] * groups
    for i in spread_out(groups, k % groups) if k % groups else []:
        per_group[i] += 1
    out = []
    for (f0, f1), count in zip(edges(grid.frames, groups), per_group):
        counts = bands_by_rule(grid.rows, grid.cols, count)
        for (r0, r1), c in zip(edges(grid.rows, len(counts)), counts):
            for c0, c1 in edges(grid.cols, c):
                out.append((range(f0, f1), range(r0, r1), range(c0, c1)))
    return out


def largest_remainder(sizes, k):
    exact = [k * s / sum(sizes) for s in sizes]
    out = [int(np.floor(e)) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: -(exact[i] - out[i]))[: k - sum(out)]:
        out[i] += 1
    return out


def reference(view: VisionView):
    x = view.features.double().numpy()
    coords, part = view.coords.numpy(), view.part.numpy()
    where = {(int(p), *map(int, c)): i for i, (p, c) in enumerate(zip(part, coords))}
    keep, hidden, sizes = [], [], []
    destination = np.full(x.shape[0], -1)
    for index, (grid, count) in enumerate(zip(view.parts, largest_remainder([g.size for g in view.parts], view.keep))):
        if count == 0:
            continue
        for frames, rows, cols in windows_by_rule(grid, count):
            members = [where[(index, f, r, c)] for f in frames for r in rows for c in cols]
            middle = (frames[(len(frames) - 1) // 2], rows[(len(rows) - 1) // 2], cols[(len(cols) - 1) // 2])
            keep.append(where[(index, *middle)])
            hidden.append(x[members].mean(axis=0))
            sizes.append(len(members))
            destination[members] = len(keep) - 1
    order = np.argsort(keep)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    destination = np.where(destination >= 0, rank[np.maximum(destination, 0)], -1)
    return np.array(keep)[order], np.array(hidden)[order], np.array(sizes, dtype=float)[order], destination


# ---------------------------------------------------------------- hand-built views

def item_view(parts: tuple[Grid, ...], keep: int, seed: int = 0, shuffle: bool = False) -> VisionView:
    """Every cell of every part, parts one after another in raster order (or shuffled: the method must read
    the coordinates, not the order)."""
    coords, part = [], []
    for index, grid in enumerate(parts):
        for f, r, c in itertools.product(range(grid.frames), range(grid.rows), range(grid.cols)):
            coords.append((f, r, c)), part.append(index)
    coords, part = torch.tensor(coords), torch.tensor(part)
    n = coords.shape[0]
    generator = torch.Generator().manual_seed(seed)
    if shuffle:
        order = torch.randperm(n, generator=generator)
        coords, part = coords[order], part[order]
    return VisionView(
        features=torch.randn(n, FEATURES, generator=generator), coords=coords, part=part, parts=parts,
        rows=torch.zeros(n, dtype=torch.long), columns=torch.arange(n) + 1, layers={}, keep=keep, image_index=0,
        kind="video" if any(g.frames > 1 for g in parts) else "image",
    )


def check_against_reference(view: VisionView):
    picked = Pool(Pool.Options()).select(view)
    keep, hidden, sizes, destination = reference(view)
    assert isinstance(picked, Selection)
    np.testing.assert_array_equal(picked.keep.numpy(), keep)
    np.testing.assert_allclose(picked.hidden.double().numpy(), hidden, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(picked.sizes.numpy(), sizes)
    np.testing.assert_array_equal(picked.destination.numpy(), destination)
    return picked


# ---------------------------------------------------------------- fidelity to the documented rule

@pytest.mark.parametrize("keep", [1, 2, 3, 7, 16, 24, 31, 48, 63])
@pytest.mark.parametrize("grid", [Grid(8, 8), Grid(6, 10), Grid(7, 5)])
def test_images_match_the_reference(grid, keep):
    if keep < grid.size:
        check_against_reference(item_view((grid,), keep, seed=keep))


@pytest.mark.parametrize("keep", [1, 36, 61, 64, 128, 144, 192, 575])
def test_llava_grid_matches_the_reference(keep):
    check_against_reference(item_view((Grid(24, 24),), keep))


@pytest.mark.parametrize("keep", [1, 2, 3, 5, 12, 13, 47])
def test_videos_match_the_reference(keep):
    check_against_reference(item_view((Grid(4, 4, 3),), keep, seed=keep))


@pytest.mark.parametrize("keep", [1, 2, 40, 159])
def test_anyres_items_match_the_reference(keep):
    check_against_reference(item_view((Grid(8, 8), Grid(8, 12)), keep))


def test_a_batch_of_views_is_each_view_alone():
    """select_batch pools items of one shape, grids and keep whose tokens are in item order with one matmul; a
    shuffled item beside them, an anyres item and a video are pooled item by item. Each pick equals its view
    alone, and the reference."""
    views = [item_view((Grid(8, 8),), 9, seed=s) for s in range(3)] + [item_view((Grid(8, 8),), 9, shuffle=True),
                                                                      item_view((Grid(8, 8), Grid(8, 12)), 33),
                                                                      item_view((Grid(4, 4, 3),), 10), item_view((Grid(8, 8),), 16)]
    method = Pool(Pool.Options())
    for view, pick in zip(views, method.select_batch(views), strict=True):
        assert_same_pick(pick, method.select(view))
        check_against_reference(view)


def test_token_order_does_not_matter():
    check_against_reference(item_view((Grid(8, 8), Grid(8, 12)), 33, shuffle=True))
    check_against_reference(item_view((Grid(4, 4, 3),), 10, shuffle=True))


# ---------------------------------------------------------------- by hand

def test_llava_64_is_three_by_three_blocks():
    view = item_view((Grid(24, 24),), 64)
    picked = Pool(Pool.Options()).select(view)
    blocks = view.features.view(8, 3, 8, 3, FEATURES).mean(dim=(1, 3)).reshape(64, FEATURES)
    assert torch.allclose(picked.hidden, blocks, atol=1e-6)
    centres = torch.tensor([(3 * i + 1) * 24 + 3 * j + 1 for i in range(8) for j in range(8)])
    assert torch.equal(picked.keep, centres) and bool((picked.sizes == 9).all())


def test_llava_192_is_a_twelve_by_sixteen_lattice():
    picked = Pool(Pool.Options()).select(item_view((Grid(24, 24),), 192))
    assert band_counts(24, 24, 192) == [16] * 12
    assert sorted(set(picked.sizes.tolist())) == [2.0, 4.0]  # 2 rows x (1 or 2) columns: 24 / 16 = 1.5
    assert float(picked.sizes.sum()) == 576


def test_keep_one_is_the_mean_at_the_centre():
    view = item_view((Grid(24, 24),), 1)
    picked = Pool(Pool.Options()).select(view)
    assert picked.keep.tolist() == [11 * 24 + 11]
    assert torch.allclose(picked.hidden[0], view.features.mean(dim=0), atol=1e-6)
    assert bool((picked.destination == 0).all())


def test_keep_all_but_one_merges_one_pair():
    picked = Pool(Pool.Options()).select(item_view((Grid(8, 8),), 63))
    assert sorted(picked.sizes.tolist()) == [1.0] * 62 + [2.0]


@pytest.mark.parametrize("h, w", [(24, 24), (8, 8), (6, 10), (7, 5), (1, 9), (9, 1), (27, 27), (16, 16)])
def test_every_budget_gives_exactly_that_many_tiling_windows(h, w):
    for k in range(1, h * w + 1):
        counts = band_counts(h, w, k)
        assert sum(counts) == k and len(counts) <= h and max(counts) <= w and min(counts) >= 1
        assert max(counts) - min(counts) <= 1


def test_a_video_is_pooled_per_frame_while_the_budget_allows():
    view = item_view((Grid(4, 4, 3),), 12)
    picked = Pool(Pool.Options()).select(view)
    frame = view.coords[:, 0]
    assert torch.equal(frame[picked.keep], torch.tensor([0] * 4 + [1] * 4 + [2] * 4))
    assert bool((frame[picked.keep][picked.destination] == frame).all())  # nothing crosses frames
    # fewer tokens than frames: consecutive frames pooled together (frames 0 | 1-2)
    picked = Pool(Pool.Options()).select(item_view((Grid(4, 4, 3),), 2))
    assert picked.sizes.tolist() == [16.0, 32.0]


def test_parts_share_the_budget_by_size():
    view = item_view((Grid(8, 8), Grid(8, 12)), 40)
    picked = Pool(Pool.Options()).select(view)
    assert torch.bincount(view.part[picked.keep]).tolist() == [16, 24]
    for slot in range(40):
        members = picked.destination == slot
        assert torch.allclose(picked.hidden[slot], view.features[members].mean(dim=0), atol=1e-6)
        assert int(members.sum()) == int(picked.sizes[slot])


def test_a_part_without_budget_is_dropped_whole():
    view = item_view((Grid(8, 8), Grid(8, 12)), 1)
    picked = Pool(Pool.Options()).select(view)
    assert bool((picked.destination[view.part == 0] == -1).all())
    assert bool((picked.destination[view.part == 1] == 0).all()) and picked.sizes.tolist() == [96.0]


def test_keep_all_returns_every_token():
    assert torch.equal(Pool(Pool.Options()).select(item_view((Grid(4, 4),), 16)), torch.arange(16))


def test_a_view_missing_cells_is_refused():
    view = item_view((Grid(4, 4),), 4)
    view.coords[3] = view.coords[2]
    with pytest.raises(ValueError, match="pool needs every cell"):
        Pool(Pool.Options()).select(view)


def test_interface():
    method = Pool(Pool.Options())
    assert method.acts_in_vision and method.name == "pool"
    assert method.vision_layers(ModelInfo("llava", 32)) == ()
    assert [(s.layer, s.keep) for s in method.stages(ModelInfo("llava", 32), 64, 576)] == [(0, 64)]
