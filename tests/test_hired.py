"""HiRED against an independent numpy reading of the authors' `HiRED_token_selection` / `HiRED_sub_img_budgets`."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

import vtprune
from vtprune.methods import Grid, ModelInfo, VisionLayer, VisionView
from vtprune.methods.hired import HiRED, tile_shares
from vtprune.tiny import SampleLayout, tiny_inputs

from .conftest import FAMILIES, VISION_STAGE_FAMILIES
from .vision_views import softmax

HEADS, HEAD_DIM, SIDE, DIM = 4, 8, 8, 16
WIDTH, T, P = HEADS * HEAD_DIM, 1 + SIDE * SIDE, SIDE * SIDE


# ------------------------------------------------------------------------------ the reference, in numpy


def vit_attn(q, k):
    """The released ViT_Attn_Hook.get_attn: k_proj / q_proj outputs [R, T, C] as heads, softmax(q k^T / sqrt d)."""
    r = q.shape[0]
    qh = q.reshape(r, T, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    kh = k.reshape(r, T, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    return softmax(qh @ kh.transpose(0, 1, 3, 2) * HEAD_DIM ** -0.5)  # [R, H, T, T]


def cls_scores(q, k):
    """[R, P] class-token attention over the patches (the last P columns), summed over heads."""
    return vit_attn(q, k)[:, :, 0, -P:].sum(axis=1)


def top(scores, count):
    return set(np.argsort(-scores, kind="stable")[:count].tolist())


def reference_shares(counts, total, capacity):
    """The released float32 truncation, then the documented handing-out of what is left."""
    counts = np.asarray(counts, dtype=np.int64)
    weights = counts if counts.sum() > 0 else np.asarray(capacity, dtype=np.int64)
    ratio = (weights / weights.sum()).astype(np.float32)
    share = ratio * np.float32(total)
    given = [min(int(s), c) for s, c in zip(share, capacity)]
    while sum(given) < min(total, sum(capacity)):
        room = [t for t in range(len(given)) if given[t] < capacity[t]]
        remainder = {t: float(share[t]) - given[t] for t in room}
        best = max(room, key=lambda t: (remainder[t], -t))
        given[best] += 1
    return given


def reference_anyres(early, late, layout, present, keep, alpha=0.5, regions="released", content=None):
    """Selections per row ({row: set of patch indices}) for base row 0 and tiles 1.. of a (high, wide) layout.

    early, late: [rows, patches] [CLS] attention of the square patch grid of every tower row (base and tiles alike);
    present[t]: the tile's patch indices the LLM receives; content: (top, left, h, w) of the unpadded grid on the
    padded canvas, for the spatial regions."""
    high, wide = layout
    tiles = high * wide
    patches = early.shape[1]
    side = int(round(patches ** 0.5))
    full = min(int(keep * alpha), patches)
    capacity = [len(present[t]) for t in range(tiles)]
    sub = min(keep - full, sum(capacity))
    full = keep - sub
    chosen = {0: top(late[0], full)}
    marks = np.zeros(patches, dtype=bool)
    marks[list(top(early[0], int(patches * (1 - alpha))))] = True
    if regions == "released" and patches % tiles == 0:
        counts = marks.reshape(high, wide, -1).sum(axis=-1).reshape(-1)
    elif regions == "released":  # the generalisation: chunk t starts at ceil(t P / tiles)
        starts = [int(np.ceil(t * patches / tiles)) for t in range(1, tiles)]
        counts = np.bincount(np.searchsorted(starts, np.nonzero(marks)[0], side="right"), minlength=tiles)
    else:
        top_pad, left_pad, h, w = content
        counts = np.zeros(tiles, dtype=np.int64)
        for p in np.nonzero(marks)[0]:
            r, c = divmod(p, side)
            y = min(h - 1, int(np.floor((r + 0.5) * h / side))) + top_pad
            x = min(w - 1, int(np.floor((c + 0.5) * w / side))) + left_pad
            counts[(y // side) * wide + x // side] += 1
    shares = reference_shares(counts, sub, capacity) if sub > 0 else [0] * tiles
    for t in range(tiles):
        scores = np.full(patches, -np.inf)
        scores[present[t]] = late[1 + t, present[t]]
        chosen[1 + t] = top(scores, shares[t])
    return chosen


# ----------------------------------------------------------------------------------------- building views
def layer_of(q, k, cls=True):
    def split(x):
        return torch.tensor(x, dtype=torch.float32).view(x.shape[0], T, HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    return VisionLayer(query=split(q), key=split(k), scaling=HEAD_DIM ** -0.5, cls=cls)


def anyres_case(seed, layout, content, hot_band=None):
    view, early, late, present = _anyres_case(seed, layout, content, hot_band)
    return dataclasses.replace(view), early, late, present


@functools.lru_cache(maxsize=None)
def _anyres_case(seed, layout, content, hot_band):
    """An anyres item: base 8x8 (row 0), tiles of 8x8 in a (high, wide) layout whose padded canvas is cropped to the
    content (top, left, h, w) as LLaVA-NeXT unpads. Returns the view pieces and, per tile, the patches present."""
    rng = np.random.default_rng(seed)
    high, wide = layout
    rows_total = 1 + high * wide
    q_early, k_early = rng.standard_normal((2, rows_total, T, WIDTH))
    q_late, k_late = rng.standard_normal((2, rows_total, T, WIDTH))
    if hot_band is not None:  # base patches of these raster rows get large early-layer [CLS] attention
        for r in hot_band:
            for c in range(SIDE):
                k_early[0, 1 + r * SIDE + c] += 8 * q_early[0, 0] / np.linalg.norm(q_early[0, 0])
    top_pad, left_pad, h, w = content
    rows = [0] * P
    columns = list(range(1, T))
    coords = [(0, r, c) for r in range(SIDE) for c in range(SIDE)]
    part = [0] * P
    present = {t: [] for t in range(high * wide)}
    for y in range(h):
        for x in range(w):
            yy, xx = y + top_pad, x + left_pad
            tile = (yy // SIDE) * wide + xx // SIDE
            patch = (yy % SIDE) * SIDE + xx % SIDE
            rows.append(1 + tile)
            columns.append(1 + patch)
            coords.append((0, y, x))
            part.append(1)
            present[tile].append(patch)
    features = torch.randn(len(rows), DIM, generator=torch.Generator().manual_seed(seed))
    layers = {0: layer_of(q_early, k_early), -2: layer_of(q_late, k_late)}
    view = VisionView(
        features=features, coords=torch.tensor(coords), part=torch.tensor(part), parts=(Grid(SIDE, SIDE), Grid(h, w)),
        rows=torch.tensor(rows), columns=torch.tensor(columns), layers=layers, keep=0, image_index=0)
    early, late = cls_scores(q_early, k_early), cls_scores(q_late, k_late)
    return view, early, late, present


def as_sets(view, picked):
    chosen = {}
    for i in picked.tolist():
        chosen.setdefault(int(view.rows[i]), set()).add(int(view.columns[i]) - 1)
    return chosen


LAYOUTS = {
    "2x2 whole": ((2, 2), (0, 0, 16, 16)),
    "2x2 cropped sideways": ((2, 2), (0, 3, 16, 10)),
    "3x1 cropped": ((3, 1), (5, 0, 14, 8)),
    "1x2 whole": ((1, 2), (0, 0, 8, 16)),
    "2x2 bottom tiles empty": ((2, 2), (0, 0, 8, 16)),  # a tile of no tokens: the item is selected on its own
}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("regions", ["released", "spatial"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("keep", [1, 2, 7, 33, 64, 100, 150])
def test_anyres_matches_the_reference(name, keep, regions, seed):
    layout, content = LAYOUTS[name]
    view, early, late, present = anyres_case(seed, layout, content)
    n = view.features.shape[0]
    keep = min(keep, n - 1)
    view.keep = keep
    picked = HiRED(HiRED.Options(regions=regions)).select(view)
    assert picked.numel() == keep == picked.unique().numel()
    assert picked.tolist() == sorted(picked.tolist())
    expected = reference_anyres(early, late, layout, present, keep, regions=regions, content=content)
    got = as_sets(view, picked)
    assert {r: s for r, s in got.items() if s} == {r: s for r, s in expected.items() if s}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_alpha_moves_the_budget_between_base_and_tiles(alpha):
    layout, content = LAYOUTS["2x2 cropped sideways"]
    view, early, late, present = anyres_case(4, layout, content)
    view.keep = 90
    picked = HiRED(HiRED.Options(alpha=alpha)).select(view)
    got = as_sets(view, picked)
    assert len(got.get(0, ())) == min(int(90 * alpha), P)
    expected = reference_anyres(early, late, layout, present, 90, alpha=alpha)
    assert {r: s for r, s in got.items() if s} == {r: s for r, s in expected.items() if s}


@pytest.mark.parametrize("keep", [33, 64, 100])
@pytest.mark.parametrize("regions", ["released", "spatial"])
@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_alpha_on_an_item_with_an_empty_tile_is_the_references(alpha, regions, keep):
    """An item with a tile of no tokens is selected on its own (not batched): alpha moves its budget there too."""
    layout, content = LAYOUTS["2x2 bottom tiles empty"]
    view, early, late, present = anyres_case(3, layout, content)
    view.keep = keep
    got = as_sets(view, HiRED(HiRED.Options(alpha=alpha, regions=regions)).select(view))
    expected = reference_anyres(early, late, layout, present, keep, alpha=alpha, regions=regions, content=content)
    assert {r: s for r, s in got.items() if s} == {r: s for r, s in expected.items() if s}


def test_the_base_image_takes_what_the_tiles_cannot_hold():
    """alpha 0 gives every token to the tiles, but they hold 256 of the 310 kept: vtprune's exact budget (a
    documented deviation) has the base image take the rest, 54, so exactly keep tokens are kept."""
    layout, content = LAYOUTS["2x2 whole"]
    view, early, late, present = anyres_case(4, layout, content)
    view.keep = 310
    picked = HiRED(HiRED.Options(alpha=0.0)).select(view)
    assert picked.numel() == 310 == picked.unique().numel()
    got = as_sets(view, picked)
    assert len(got[0]) == 54
    expected = reference_anyres(early, late, layout, present, 310, alpha=0.0)
    assert {r: s for r, s in got.items() if s} == {r: s for r, s in expected.items() if s}


def test_released_regions_are_raster_bands_and_spatial_regions_follow_the_image():
    """Marks concentrated in the base image's top rows: the released chunks give them to tiles 0 and 1 on a
    2x2 layout (bands of 2 base rows each: rows 0-1 -> tile 0, rows 2-3 -> tile 1), the spatial regions to the
    top tiles 0 and 1 evenly (the top half of the image)."""
    layout, content = LAYOUTS["2x2 whole"]
    view, early, late, present = anyres_case(5, layout, content, hot_band=(0, 1))
    view.keep = 64
    released = as_sets(view, HiRED(HiRED.Options(alpha=0.75)).select(view))
    spatial = as_sets(view, HiRED(HiRED.Options(alpha=0.75, regions="spatial")).select(view))
    # 16 marked base patches (8 x 8 x 0.25) are the 16 of rows 0-1: all in the first released chunk
    assert len(released.get(1, ())) == 16 and not released.get(2) and not released.get(3) and not released.get(4)
    assert len(spatial.get(1, ())) == 8 and len(spatial.get(2, ())) == 8 and not spatial.get(3) and not spatial.get(4)


def test_tile_shares_truncate_as_released_and_hand_out_the_rest():
    # whole shares: exactly the released numbers
    assert tile_shares(torch.tensor([10, 30, 0, 20]), 60, [64] * 4) == [10, 30, 0, 20]
    # shares 12.2 / 24.4 / 0 / 24.4 truncate to 60: the one left goes to the first of the largest remainders
    assert tile_shares(torch.tensor([2, 4, 0, 4]), 61, [64] * 4) == [12, 25, 0, 24]
    # a capped tile's overflow goes to the others by remaining share
    assert tile_shares(torch.tensor([9, 1]), 50, [10, 64]) == [10, 40]
    # no marks at all (alpha = 1): by capacity
    assert tile_shares(torch.tensor([0, 0]), 30, [20, 40]) == [10, 20]
    cases = [([3, 1, 2], 17, [5, 64, 64]), ([0, 0, 7], 9, [3, 3, 3]), ([1, 1, 1], 100, [40, 40, 40])]
    for counts, total, capacity in cases:
        got = tile_shares(torch.tensor(counts), total, capacity)
        assert got == reference_shares(counts, total, capacity)
        assert sum(got) == min(total, sum(capacity)) and all(g <= c for g, c in zip(got, capacity))


def one_image(seed, keep):
    """A LLaVA-1.5-like image (one tower row), with the late layer's full-width q and k it was made from."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, T, WIDTH))
    index = torch.arange(P)
    view = VisionView(
        features=torch.randn(P, DIM), coords=torch.stack([index * 0, index // SIDE, index % SIDE], 1),
        part=index * 0, parts=(Grid(SIDE, SIDE),), rows=index * 0, columns=index + 1,
        layers={0: layer_of(*rng.standard_normal((2, 1, T, WIDTH))), -2: layer_of(q, k)},
        keep=keep, image_index=0)
    return view, q, k


@pytest.mark.parametrize("keep", [1, 13, 32, 63])
def test_one_image_is_top_k_by_late_attention(keep):
    view, q, k = one_image(11, keep)
    picked = HiRED(HiRED.Options()).select(view)
    # the released LLaVA-1.5 branch: topk(min(P, int(P x rate))) of the summed class attention at layer 22
    assert set(picked.tolist()) == top(cls_scores(q, k)[0], keep)


def test_a_batch_of_views_is_each_view_alone():
    """select_batch takes the top-k of single-row items of one shape and keep together, and selects anyres items of
    one layout together (their tiles' shares differing); another keep is selected apart. Each pick equals its view
    alone (and the released top-k for the single images)."""
    cases = [one_image(seed, 13) for seed in range(3)] + [one_image(3, 32)]
    anyres_views = []
    for seed, hot_band in ((0, None), (1, (0, 1)), (2, (6, 7))):  # one layout; hot rows move the tiles' shares
        layout, content = LAYOUTS["2x2 cropped sideways"]
        view, *_ = anyres_case(seed, layout, content, hot_band)
        view.keep = 20
        anyres_views.append(view)
    views = [view for view, _, _ in cases] + anyres_views
    method = HiRED(HiRED.Options())
    for view, pick in zip(views, method.select_batch(views), strict=True):
        assert pick.tolist() == method.select(view).tolist()
    picks = method.select_batch(views)
    for (view, q, k), pick in zip(cases, picks):
        assert set(pick.tolist()) == top(cls_scores(q, k)[0], view.keep)
    assert len({tuple(pick.tolist()) for pick in picks[-3:]}) == 3


def test_video_frames_are_one_pool():
    rng = np.random.default_rng(12)
    q, k = rng.standard_normal((2, 4, T, WIDTH))
    q[2, 0] *= 3  # one frame with a sharper [CLS] attention gets more of the budget
    n = 4 * P
    index = torch.arange(n)
    view = VisionView(
        features=torch.randn(n, DIM), coords=torch.stack([index // P, index % P // SIDE, index % SIDE], 1),
        part=index * 0, parts=(Grid(SIDE, SIDE, 4),), rows=index // P, columns=index % P + 1,
        layers={0: layer_of(q, k), -2: layer_of(q, k)}, keep=40, image_index=0, kind="video")
    picked = HiRED(HiRED.Options()).select(view)
    assert set(picked.tolist()) == top(cls_scores(q, k).reshape(-1), 40)
    assert int((view.rows[picked] == 2).sum()) > 10


def test_a_tower_without_cls_is_refused():
    layout, content = LAYOUTS["2x2 whole"]
    view, *_ = anyres_case(0, layout, content)
    view.keep = 10
    view.layers = {key: VisionLayer(layer.query, layer.key, layer.scaling, cls=False)
                   for key, layer in view.layers.items()}
    with pytest.raises(ValueError, match="hired.*\\[CLS\\]"):
        HiRED(HiRED.Options()).select(view)


def test_interface():
    method = HiRED(HiRED.parse_options({}))
    llava = ModelInfo("llava_next", 32)
    assert method.vision_layers(llava) == (0, -2)
    assert [(s.layer, s.keep) for s in method.stages(llava, 576, 2880)] == [(0, 576)]
    assert HiRED(HiRED.Options(early_layer=-2)).vision_layers(llava) == (-2,)
    with pytest.raises(ValueError, match="alpha"):
        HiRED.parse_options({"alpha": 1.5})
    with pytest.raises(ValueError, match="regions"):
        HiRED.parse_options({"regions": "quadrants"})


# -------------------------------------------------------------------- through the engine, on the tiny models
# HiRED through vtprune.apply on each family with the vision-encoder stage, against the reference above fed the
# [CLS] attention the tower itself returns (eager, output_attentions) at the authors' layers: encoder layer 0
# (their `vit_top_layer`) and the layer before the last (their `vit_bottom_layer`, 22 of 24). Each kept
# prompt position is mapped to its (tower row, patch) by the model's own feature packing, not by the engine.

ENGINE_LAYOUTS = {
    "llava": [SampleLayout(images=2), SampleLayout(images=1, text_before=6)],
    # 1x2 tiles; 2x2 tiles; 2x2 tiles unpadded to 8 x 5 patches (a 90 x 60 image on the 112 x 112 canvas)
    "llava_next": [SampleLayout(images=2), SampleLayout(images=2, text_before=6, next_sizes=((90, 60), (60, 120)))],
    "video_llava": [SampleLayout(images=1, videos=1), SampleLayout(images=0, videos=1, text_before=5)],
}


def tower_cls_attention(tower, pixels, layer):
    """[rows, patches] the eager tower's own [CLS] attention over the patches at `layer`, summed over heads."""
    attention = tower(pixels, output_attentions=True).attentions[layer]  # [rows, heads, T, T]
    return attention[:, :, 0, 1:].sum(dim=1).double().numpy()


def llava_next_places(model, size, rows):
    """(row, patch) of each of a LLaVA-NeXT image's placeholders in order, (-1, -1) for its newlines: the
    model's own pack_image_features run on markers instead of features."""
    patches = model.config.vision_config.image_size // model.config.vision_config.patch_size
    markers = torch.arange(rows * patches * patches, dtype=torch.float64).view(rows, patches * patches, 1)
    packed, _ = model.model.pack_image_features([markers], torch.tensor([size]), "default",
                                              image_newline=torch.full((1,), -1.0, dtype=torch.float64))
    flat = packed[0][:, 0].long()
    per_row = patches * patches
    return [(-1, -1) if i < 0 else (i // per_row, i % per_row) for i in flat.tolist()]


def expected_hired(model, family, inputs, keep, regions):
    """Per sample, in sequence order: (positions of the item's tokens [n], their (row, patch) [n], the reference's
    {row: set of patches}), the towers run by the test."""
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches)

    config = model.config
    image_tower = model.model.image_tower if family == "video_llava" else model.model.vision_tower
    pixels = inputs.get("pixel_values", inputs.get("pixel_values_images"))
    items = {"image": [], "video": []}  # in batch order: (places of the placeholders, the reference's choice)
    for i in range(0 if pixels is None else pixels.shape[0]):
        if family == "llava_next":
            size = inputs["image_sizes"][i].tolist()
            rows = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            tiles = pixels[i, :rows]
            early, late = (tower_cls_attention(image_tower, tiles, layer) for layer in (0, -2))
            layout = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
            places = llava_next_places(model, size, rows)
            side = int(round(early.shape[1] ** 0.5))
            present = {t: sorted(p for r, p in places if r == 1 + t) for t in range(rows - 1)}
            canvas = [((r - 1) // layout[1] * side + p // side, (r - 1) % layout[1] * side + p % side)
                      for r, p in places if r >= 1]
            ys, xs = zip(*canvas)
            content = (min(ys), min(xs), max(ys) - min(ys) + 1, max(xs) - min(xs) + 1)
            chosen = reference_anyres(early, late, layout, present, min(keep, len(canvas) + early.shape[1]),
                                      regions=regions, content=content)
        else:  # one tower row: the released LLaVA-1.5 branch, top-k by the late layer
            late = tower_cls_attention(image_tower, pixels[i][None], -2)
            places = [(0, p) for p in range(late.shape[1])]
            chosen = {0: top(late[0], min(keep, late.shape[1]))}  # (a budget above the item keeps it whole)
        items["image"].append((places, chosen))
    videos = inputs.get("pixel_values_videos")
    for video in [] if videos is None else videos:  # Video-LLaVA: each frame a row, its [CLS] feature first
        late = tower_cls_attention(model.model.video_tower, video, -2)
        frames, patches = late.shape
        places = [(f, p - 1) if p else (-1, -1) for f in range(frames) for p in range(patches + 1)]
        picked = top(late.reshape(-1), min(keep, late.size))  # one pool over all frames
        items["video"].append((places, {f: {i % patches for i in picked if i // patches == f} for f in range(frames)}))
    placeholders = {"image": config.image_token_id, "video": getattr(config, "video_token_id", None)}
    per_sample, taken = [], {"image": 0, "video": 0}
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        sample, at = [], 0
        ids = ids.tolist()
        while at < len(ids):
            kind = next((k for k, token in placeholders.items() if token is not None and ids[at] == token), None)
            if kind is None or not mask[at]:
                at += 1
                continue
            places, chosen = items[kind][taken[kind]]
            taken[kind] += 1
            positions = torch.arange(at, at + len(places))
            assert all(token == placeholders[kind] for token in ids[at:at + len(places)])
            tokens = torch.tensor([r >= 0 for r, _ in places])
            sample.append((positions[tokens], [place for place in places if place[0] >= 0], chosen))
            at += len(places)
        per_sample.append(sample)
    assert taken == {kind: len(found) for kind, found in items.items()}  # every item found in the prompts
    return per_sample


@pytest.mark.parametrize("family, regions", [(family, "released") for family in sorted(VISION_STAGE_FAMILIES)]
                         + [("llava_next", "spatial")])  # (the regions only matter for anyres tiles)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("keep", [5, 13, 22])
def test_through_the_engine_the_kept_tokens_are_the_reference_on_the_towers_own_attention(family, regions, attn,
                                                                                           keep):
    """Through vtprune.apply, each item's kept tokens are the reference's choice on the attention its tower
    returns: LLaVA-NeXT's tiles shared by layer 0's marks, every pick by layer -2; the one-row images and
    Video-LLaVA's video (one pool over its frames) by layer -2. Budgets below and above Video-LLaVA's 16-token
    images (kept whole)."""
    model = FAMILIES[family](attn)
    inputs = tiny_inputs(model, ENGINE_LAYOUTS[family])
    with vtprune.apply(model, "hired", keep, regions=regions) as pruner:
        model(**inputs)
        decision = pruner.last_decision
    assert decision.stage_layers == [0]
    expected = expected_hired(FAMILIES[family]("eager"), family, inputs, keep, regions)
    for b, items in enumerate(expected):
        kept = decision.kept[0][b]
        assert kept.numel() == sum(min(keep, len(positions)) for positions, _, _ in items)
        for positions, places, chosen in items:
            mine = torch.isin(positions, kept)
            assert int(mine.sum()) == min(keep, len(positions))
            got = {}
            for index in torch.nonzero(mine).flatten().tolist():
                row, patch = places[index]
                got.setdefault(row, set()).add(patch)
            assert got == {row: patches for row, patches in chosen.items() if patches}, (b, positions[0])
