"""PruMerge+ against an independent numpy reading of the authors' `token_prune_merge_advanced_plus`."""

import numpy as np
import pytest
import torch

from vtprune.methods import Grid, ModelInfo, Selection, VisionLayer, VisionView
from vtprune.methods.prumerge_plus import PruMergePlus

from .picks import assert_same_pick
from .vision_views import softmax

HEADS, HEAD_DIM, SIDE, DIM = 4, 8, 8, 16
WIDTH = HEADS * HEAD_DIM
T = 1 + SIDE * SIDE


# ----------------------------------------------------------------------------------------- building views
def projections(rng, rows, planted=(), side=SIDE):
    """Full-width q/k as k_proj / q_proj output them ([R, T, H x d]); planted: (row, patch, strength) whose key
    is pulled towards the row's [CLS] query, so the row has a few clear [CLS]-attention outliers."""
    q = rng.standard_normal((rows, 1 + side * side, WIDTH))
    k = rng.standard_normal((rows, 1 + side * side, WIDTH))
    for row, patch, strength in planted:
        k[row, 1 + patch] += strength * q[row, 0] / np.linalg.norm(q[row, 0])
    return q, k


def layer_of(q, k, cls=True):
    """The engine's VisionLayer: heads split as the tower's attention views k_proj's output."""
    def split(x):
        r, t = x.shape[:2]
        return torch.tensor(x, dtype=torch.float32).view(r, t, HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    return VisionLayer(query=split(q), key=split(k), scaling=HEAD_DIM ** -0.5, cls=cls)


def view_of(q, k, features, rows, columns, keep, kind="image", cls=True, side=SIDE):
    n = len(rows)
    index = torch.arange(n)
    return VisionView(
        features=torch.tensor(features, dtype=torch.float32),
        coords=torch.stack([index * 0, index // side, index % side], 1),
        part=torch.zeros(n, dtype=torch.long), parts=(Grid(n // side, side),), rows=torch.tensor(rows),
        columns=torch.tensor(columns), layers={-1: layer_of(q, k, cls)}, keep=keep, image_index=0, kind=kind)


# ------------------------------------------------------------------------------ the reference, in numpy


def authors_attention(q, k, columns):
    """cls_attn of the released code for one row: one head of the full width, scaled by C^-0.5, [CLS] row."""
    attention = softmax(q @ k.T * q.shape[1] ** -0.5)
    return attention[0, columns]


def authors_idx(cls_attn):
    """The released adaptive selection: (outlier indices by decreasing attention, the new spatial samples)."""
    n = len(cls_attn)
    values = cls_attn.astype(np.float32)
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / n
    idx = list(np.argsort(-cls_attn, kind="stable")[: int(n * ratio)])
    step = int(1 / ratio)
    sequence = np.arange(0, n - 1, int(step / 3))  # arange(0, 575, ...) at n = 576
    return idx, [x for x in sequence if x not in idx]


def budgeted_idx(cls_attn, keep):
    """vtprune's fixed-budget rule (documented in the module), written from its description."""
    n = len(cls_attn)
    idx, _ = authors_idx(cls_attn)
    count = len(idx)
    chosen = idx[:keep]
    needed = keep - len(chosen)
    if needed == 0:
        return chosen
    stride = max(1, (n // count) // 3) if count else n - 1
    candidates = []
    for s in range(stride, 0, -1):
        candidates = [x for x in range(0, n - 1, s) if x not in chosen]
        if len(candidates) >= needed:
            break
    if len(candidates) < needed:
        candidates = [x for x in range(n) if x not in chosen]
    picks = [candidates[int(np.floor((i + 0.5) * len(candidates) / needed))] for i in range(needed)]
    return chosen + picks


def authors_merge(kept, features, keys, cls_attn, neighbours=32):
    """The released loop: each kept token adds its `neighbours` most key-similar other tokens, attention-weighted."""
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    merged, absorbed = {}, {}
    for i in kept:
        rest = [j for j in range(len(features)) if j != i]
        cosine = unit[rest] @ unit[i]
        cluster = [rest[j] for j in np.argsort(-cosine, kind="stable")[: min(neighbours, len(rest))]]
        merged[i] = features[i] + sum((cls_attn[j] * features[j] for j in cluster), np.zeros(features.shape[1]))
        absorbed[i] = set(cluster)
    return merged, absorbed


def reference(q, k, features, rows, columns, keep, neighbours=32):
    """Per tower row, in the row's raster (column) order, with the budget split by largest remainders."""
    rows, columns = np.asarray(rows), np.asarray(columns)
    row_ids = sorted(set(rows.tolist()))
    sizes = [int((rows == r).sum()) for r in row_ids]
    shares = [keep * s / sum(sizes) for s in sizes]
    budgets = [int(np.floor(x)) for x in shares]
    for r in sorted(range(len(sizes)), key=lambda r: (budgets[r] - shares[r], r))[: keep - sum(budgets)]:
        budgets[r] += 1
    merged, absorbed, attention = {}, {}, np.zeros(len(rows))
    for r, budget in zip(row_ids, budgets):
        tokens = np.nonzero(rows == r)[0]
        tokens = tokens[np.argsort(columns[tokens])]
        cls_attn = authors_attention(q[r], k[r], columns[tokens])
        attention[tokens] = cls_attn
        if budget == 0:
            continue
        local = budgeted_idx(cls_attn, budget)
        m, a = authors_merge(local, features[tokens], k[r, columns[tokens]], cls_attn, neighbours)
        merged.update({tokens[i]: v for i, v in m.items()})
        absorbed.update({tokens[i]: {tokens[j] for j in s} for i, s in a.items()})
    keep_sorted = sorted(merged)
    keys = k[rows, columns]
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    destination = []
    for j in range(len(rows)):
        if j in merged:
            destination.append(keep_sorted.index(j))
            continue
        absorbers = [i for i in keep_sorted if j in absorbed[i]] or keep_sorted
        destination.append(keep_sorted.index(max(absorbers, key=lambda i: unit[i] @ unit[j])))
    return keep_sorted, np.stack([merged[i] for i in keep_sorted]), np.array(destination)


def check(view, q, k, features, rows, columns, neighbours=32):
    method = PruMergePlus(PruMergePlus.Options(neighbours=neighbours))
    picked = method.select(view)
    assert isinstance(picked, Selection)
    keep, hidden, destination = reference(q, k, features, rows, columns, view.keep, neighbours)
    assert picked.keep.tolist() == keep
    np.testing.assert_allclose(picked.hidden.numpy(), hidden, rtol=1e-4, atol=1e-5)
    assert picked.destination.tolist() == destination.tolist()
    assert picked.sizes.tolist() == np.bincount(destination, minlength=len(keep)).tolist()
    assert float(picked.sizes.sum()) == len(rows)
    return picked


# ------------------------------------------------------------------------------------------------ tests
def single_image(seed, planted=((0, 9, 6.0), (0, 40, 5.0), (0, 41, 5.5)), side=SIDE):
    rng = np.random.default_rng(seed)
    q, k = projections(rng, 1, planted, side)
    features = rng.standard_normal((side * side, DIM))
    rows, columns = [0] * (side * side), list(range(1, 1 + side * side))
    return q, k, features, rows, columns


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep", [1, 2, 5, 16, 24, 40, 63])
def test_one_image_matches_the_reference(seed, keep):
    q, k, features, rows, columns = single_image(seed)
    check(view_of(q, k, features, rows, columns, keep), q, k, features, rows, columns)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_at_the_authors_own_count_the_kept_set_is_theirs(seed):
    q, k, features, rows, columns = single_image(seed)
    idx, samples = authors_idx(authors_attention(q[0], k[0], columns))
    assert len(idx) >= 3  # the planted outliers at least
    picked = PruMergePlus(PruMergePlus.Options()).select(
        view_of(q, k, features, rows, columns, len(idx) + len(samples)))
    assert sorted(picked.keep.tolist()) == sorted(int(x) for x in idx + samples)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("keep", [64, 128, 192, 575])
def test_a_llava_sized_image_matches_the_reference(seed, keep):
    """LLaVA-1.5's 24 x 24 patches: the released sampling runs over arange(0, 575, ...), the merge over 575 others."""
    case = single_image(seed, side=24)
    check(view_of(*case, keep, side=24), *case)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_at_llava_size_and_the_authors_own_count_the_kept_set_is_theirs(seed):
    q, k, features, rows, columns = single_image(seed, side=24)
    idx, samples = authors_idx(authors_attention(q[0], k[0], columns))
    picked = PruMergePlus(PruMergePlus.Options()).select(
        view_of(q, k, features, rows, columns, len(idx) + len(samples), side=24))
    assert sorted(picked.keep.tolist()) == sorted(int(x) for x in idx + samples)


def test_planted_outliers_are_kept_and_merges_are_the_released_sums():
    q, k, features, rows, columns = single_image(5)
    picked = PruMergePlus(PruMergePlus.Options()).select(view_of(q, k, features, rows, columns, 12))
    assert {9, 40, 41} <= set(picked.keep.tolist())
    # neighbours = 0: nothing is added, a kept token is its own feature
    alone = PruMergePlus(PruMergePlus.Options(neighbours=0)).select(view_of(q, k, features, rows, columns, 12))
    assert alone.keep.tolist() == picked.keep.tolist()
    assert torch.equal(alone.hidden, torch.tensor(features, dtype=torch.float32)[alone.keep])
    # the released merge is x_i + sum a_j x_j (no normalisation): more neighbours, larger deviation from x_i
    delta = (picked.hidden - alone.hidden).norm(dim=-1)
    assert bool((delta > 0).all())
    one = PruMergePlus(PruMergePlus.Options(neighbours=1)).select(view_of(q, k, features, rows, columns, 12))
    attention = authors_attention(q[0], k[0], columns)
    keys = k[0, 1:] / np.linalg.norm(k[0, 1:], axis=1, keepdims=True)
    for slot, i in enumerate(one.keep.tolist()):
        cosine = keys @ keys[i]
        cosine[i] = -np.inf
        j = int(np.argmax(cosine))
        np.testing.assert_allclose(one.hidden[slot].numpy(), features[i] + attention[j] * features[j], rtol=1e-5)


def anyres(seed, present=40):
    """Base image (row 0), a whole tile (row 1), a tile whose padding patches are not in the view (row 2)."""
    rng = np.random.default_rng(seed)
    q, k = projections(rng, 3, [(0, 3, 6.0), (1, 20, 6.0), (2, 50, 6.0), (2, 51, 4.0)])
    rows = [0] * 64 + [1] * 64 + [2] * present
    columns = list(range(1, T)) * 2 + sorted(rng.choice(np.arange(1, T), present, replace=False).tolist())
    # item order mixes the tiles' tokens (as an unpadded high-resolution grid does)
    order = np.concatenate([np.arange(64), 64 + rng.permutation(64 + present)])
    rows, columns = [rows[i] for i in order], [columns[i] for i in order]
    features = rng.standard_normal((len(rows), DIM))
    return q, k, features, rows, columns


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("keep", [1, 2, 3, 17, 60, 100, 167])
def test_anyres_rows_match_the_reference(seed, keep):
    q, k, features, rows, columns = anyres(seed)
    view = view_of(q, k, features, rows, columns, keep)
    view.parts, view.part = (Grid(8, 8), Grid(13, 8)), torch.tensor([0] * 64 + [1] * (len(rows) - 64))
    picked = check(view, q, k, features, rows, columns)
    # every kept token absorbed tokens of its own row only
    assert len(picked.keep) == keep


@pytest.mark.parametrize("keep", [4, 30, 200, 255])
def test_video_frames_match_the_reference(keep):
    rng = np.random.default_rng(7)
    q, k = projections(rng, 4, [(f, 10 * f + 3, 6.0) for f in range(4)])
    rows = [f for f in range(4) for _ in range(64)]
    columns = list(range(1, T)) * 4
    features = rng.standard_normal((256, DIM))
    view = view_of(q, k, features, rows, columns, keep, kind="video")
    view.parts, view.coords = (Grid(8, 8, 4),), torch.stack(
        [torch.arange(256) // 64, torch.arange(256) % 64 // 8, torch.arange(256) % 8], 1)
    check(view, q, k, features, rows, columns)


def test_a_batch_of_views_is_each_view_alone():
    """select_batch stacks single-row items of one shape and keep, whose outlier counts (and so strides and
    samples) differ, and anyres items whose rows hold as many tokens (row by row); other keeps are grouped apart.
    Each pick equals its view alone and the reference."""
    cases = [single_image(seed, planted) for seed, planted in
             [(0, ()), (1, ((0, 9, 6.0),)), (2, ((0, 9, 6.0), (0, 40, 5.0), (0, 41, 5.5))), (3, ((0, 2, 9.0),) * 1)]]
    views = [view_of(*case, keep) for case in cases for keep in (5, 24, 40, 63)]
    for seed in (0, 1, 2):  # anyres items whose rows hold as many tokens, at other places: stacked row by row
        q, k, features, rows, columns = anyres(seed)
        views.append(view_of(q, k, features, rows, columns, 60))
        views[-1].parts, views[-1].part = (Grid(8, 8), Grid(13, 8)), torch.tensor([0] * 64 + [1] * (len(rows) - 64))
        cases.append((q, k, features, rows, columns))
    method = PruMergePlus(PruMergePlus.Options())
    for view, pick in zip(views, method.select_batch(views), strict=True):
        assert_same_pick(pick, method.select(view))
    for index, case in enumerate(cases[:4]):
        check(views[4 * index + 1], *case)
    for view, case in zip(views[-3:], cases[4:]):
        check(view, *case)


def test_a_tower_without_cls_is_refused():
    q, k, features, rows, columns = single_image(0)
    with pytest.raises(ValueError, match="prumerge\\+.*\\[CLS\\]"):
        PruMergePlus(PruMergePlus.Options()).select(view_of(q, k, features, rows, columns, 8, cls=False))


def test_interface():
    method = PruMergePlus(PruMergePlus.parse_options({}))
    llava = ModelInfo("llava", 32)
    assert method.vision_layers(llava) == (-1,)
    assert [(s.layer, s.keep) for s in method.stages(llava, 144, 576)] == [(0, 144)]
    with pytest.raises(ValueError, match="neighbours"):
        PruMergePlus.parse_options({"neighbours": -1})
