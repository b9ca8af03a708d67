"""VisPruner against an independent numpy reading of the authors' encode_images, and its behaviour."""

from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.methods import Grid, ModelInfo, Stage
from vtprune.methods import vispruner
from vtprune.methods.vispruner import VisPruner, deduplicate, survivors

from . import vision_views as views
from .vision_views import proportional, softmax

# float64 features: the deduplication loop is chaotic under rounding
single, anyres, video = (partial(build, feature_dtype=torch.float64) for build in (views.single, views.anyres, views.video))


def reference(view, ratio=0.5, per_round=8):
    """The kept token indices: per row, important by head-averaged [CLS] attention, then the matching-and-pruning
    loop on the normalised features (with the documented fix for odd residuals)."""
    layer = view.layers[-2]
    q, k = layer.query.double().numpy(), layer.key.double().numpy()
    features = view.features.double().numpy()
    normalized = features / np.linalg.norm(features, axis=-1, keepdims=True)
    rows, columns = view.rows.numpy(), view.columns.numpy()
    if view.keep >= len(rows):
        return list(range(len(rows)))
    selected = []
    row_ids = sorted(set(rows.tolist()))
    for r, budget in zip(row_ids, proportional([int((rows == r).sum()) for r in row_ids], view.keep)):
        idx = np.nonzero(rows == r)[0]
        idx = idx[np.argsort(columns[idx])]
        attention = softmax(q[r] @ k[r].transpose(0, 2, 1) * layer.scaling)
        attention = attention[:, 0, :].mean(axis=0) if layer.cls else attention.mean(axis=(0, 1))
        important_num = int(budget * ratio)
        diverse_num = budget - important_num
        token_indices = idx[np.argsort(-attention[columns[idx]], kind="stable")]
        important, residual = token_indices[:important_num], token_indices[important_num:]
        while diverse_num > 0:
            size = len(residual)
            r_ = min(per_round, size - diverse_num)
            if r_ <= 0:
                break
            a, b = residual[::2], residual[1::2]
            scores = (normalized[a] @ normalized[b].T).max(axis=-1)
            distinct = np.argsort(-scores, kind="stable")[min(r_, len(a)):]
            residual = np.concatenate([a[distinct], b])
        selected += important.tolist() + (residual.tolist() if diverse_num > 0 else [])
    return sorted(selected)


def check(view, ratio=0.5, per_round=8):
    picked = VisPruner(VisPruner.Options(important_ratio=ratio, per_round=per_round)).select(view)
    assert picked.tolist() == reference(view, ratio, per_round)
    assert picked.numel() == min(view.keep, view.features.shape[0]) == picked.unique().numel()


@pytest.mark.parametrize("keep", [1, 2, 3, 10, 16, 32, 50, 63, 64])
def test_single_image_matches_the_reference(keep):
    check(single(keep))


@pytest.mark.parametrize("keep", [1, 5, 12, 33, 64, 100, 159])
def test_anyres_matches_the_reference(keep):
    check(anyres(keep))


@pytest.mark.parametrize("keep", [1, 4, 9, 20, 40, 63])
def test_video_frames_match_the_reference(keep):
    check(video(keep))


@pytest.mark.parametrize("keep", [1, 7, 20, 63])
def test_a_tower_without_cls_uses_received_attention(keep):
    check(single(keep, seed=3, cls=False))
    check(anyres(keep, seed=4, cls=False))


@pytest.mark.parametrize("ratio, per_round", [(0.0, 8), (0.25, 8), (0.75, 8), (1.0, 8), (0.5, 1), (0.5, 3)])
def test_other_settings_match_the_reference(ratio, per_round):
    for keep in (1, 9, 30, 63):
        check(single(keep, seed=5), ratio, per_round)


def test_llava_sizes_match_the_reference():
    check(single(64, seed=6, side=24))
    check(single(128, seed=6, side=24), ratio=0.75)
    check(single(192, seed=6, side=24))


# ----------------------------------------------------------------------------- behaviour


def cls_ranking(view):
    layer = view.layers[-2]
    logits = torch.einsum("hd,htd->ht", layer.query[0, :, 0].double(), layer.key[0].double()) * layer.scaling
    return logits.softmax(-1).mean(0)[1:]


def test_important_tokens_are_the_top_cls_attention_ones():
    view = single(48, seed=7, side=24)
    top = set(torch.topk(cls_ranking(view), 48).indices.tolist())
    assert set(VisPruner(VisPruner.Options(important_ratio=1.0)).select(view).tolist()) == top
    half = set(VisPruner(VisPruner.Options()).select(view).tolist())
    assert set(torch.topk(cls_ranking(view), 24).indices.tolist()) <= half and not top <= half


def test_tied_cls_attention_keeps_the_earlier_tokens():
    """vtprune ranks by a stable descending sort (documented; the authors' argsort is unstable): with a zero [CLS]
    query every token gets the same attention, and the important tokens are the first ones."""
    view = single(20, seed=0)
    view.layers[-2].query[:, :, 0] = 0
    assert VisPruner(VisPruner.Options(important_ratio=1.0)).select(view).tolist() == list(range(20))


def test_a_round_drops_the_even_tokens_most_similar_to_the_odd_ones():
    e = torch.eye(6, dtype=torch.float64)
    # residual order 0..5: a = 0, 2, 4 and b = 1, 3, 5; token 4 duplicates 1, token 0 is close to 3
    unit = torch.stack([e[0] + 0.5 * e[3], e[1], e[2], e[3], e[1], e[5]])
    unit = torch.nn.functional.normalize(unit, dim=-1)
    residual = torch.arange(6)
    assert deduplicate(unit, residual, 5, 8).tolist() == [0, 2, 1, 3, 5]  # 4 dropped; survivors a by score, then b
    assert deduplicate(unit, residual, 4, 8).tolist() == [2, 1, 3, 5]
    # two rounds of one: the first leaves [0, 2, 1, 3, 5], so the second splits a = 0, 1, 5 against b = 2, 3
    assert deduplicate(unit, residual, 4, 1).tolist() == [1, 5, 2, 3]


def test_an_odd_residual_and_a_short_one_do_not_break_the_loop():
    unit = torch.nn.functional.normalize(torch.randn(7, 4, generator=torch.Generator().manual_seed(8)), dim=-1)
    for count in range(1, 7):
        out = deduplicate(unit, torch.arange(7), count, 8)
        assert out.numel() == count and out.unique().numel() == count


def test_the_whole_item_is_kept_at_its_size():
    assert torch.equal(VisPruner(VisPruner.Options()).select(anyres(160)), torch.arange(160))


def test_interface():
    method = VisPruner(VisPruner.Options())
    assert method.vision_layers(ModelInfo("llava", 32)) == (-2,)
    assert method.vision_layers(ModelInfo("video_llava", 32)) == (-2,)
    assert method.vision_layers(ModelInfo("llava_onevision", 28)) == (-1,)
    assert VisPruner(VisPruner.Options(layer=-4)).vision_layers(ModelInfo("llava", 32)) == (-4,)
    assert method.stages(ModelInfo("llava", 32), 128, 576) == [Stage(0, 128)]
    assert VisPruner.defaults() == {"important_ratio": 0.5, "per_round": 8, "layer": None}
    with pytest.raises(ValueError, match="important_ratio"):
        VisPruner.parse_options({"important_ratio": -0.1})
    with pytest.raises(ValueError, match="per_round"):
        VisPruner.parse_options({"per_round": 0})


def test_a_batch_of_views_is_selected_as_each_alone():
    """select_batch ranks items of one shape and row layout together, row by row (single-row images, anyres items,
    videos), and deduplicates residuals of one length in lockstep; other budgets fall into groups of their own.
    Each answer is the one-view answer, and the authors'."""
    views = [single(40, seed=s) for s in range(4)] + [anyres(50), single(17, seed=9), video(20), single(40, seed=4),
                                                      anyres(50, seed=5), video(20, seed=6)]
    method = VisPruner(VisPruner.Options())
    for view, picked in zip(views, method.select_batch(views), strict=True):
        assert picked.tolist() == method.select(view).tolist() == reference(view)


def test_items_of_one_shape_whose_tokens_sit_differently_in_the_rows_are_ranked_apart():
    """Two anyres items of 64 + 96 tokens over the same tower rows: in the second, the high-res grid's first 4
    columns sit in one tile and the other 8 in the next (the first: 8 and 4). Ranked as one group, one item's
    [CLS] attention would be read at the other's places."""
    first = 1  # [CLS]
    base = [(0, first + i) for i in range(64)]
    high = [(1 + (c >= 4), first + r * 8 + (c if c < 4 else c - 4)) for r in range(8) for c in range(12)]
    other = views.make_view(base + high, 3, first + 64, (Grid(8, 8), Grid(8, 12)), 50, seed=7)
    items = [views.anyres(50, seed=7), other]
    for view, picked in zip(items, VisPruner(VisPruner.Options()).select_batch(items), strict=True):
        assert picked.tolist() == reference(view)


def test_residuals_deduplicated_in_chunks_as_each_alone(monkeypatch):
    """Residuals whose similarity matrices exceed the held entries run in chunks; each answer is unchanged."""
    generator = torch.Generator().manual_seed(3)
    unit = torch.nn.functional.normalize(torch.randn(3, 30, 8, generator=generator, dtype=torch.float64), dim=-1)
    residual = torch.stack([torch.randperm(30, generator=generator)[:20] for _ in range(5)])
    owner = torch.tensor([0, 1, 2, 1, 0])
    alone = [deduplicate(unit[o], r, 6, 3).tolist() for o, r in zip(owner, residual)]
    monkeypatch.setattr(vispruner, "DISTANCE_MATRIX_ENTRIES", 2 * 20 * 20)  # two residuals at a time
    assert deduplicate(unit, residual, 6, 3, owner).tolist() == alone


def rounds_along_rows(similarity, count, per_round):
    """The rounds as the authors read them: each a token's largest entry along its row, at the b columns."""
    out = []
    for matrix in similarity:
        position = torch.arange(matrix.shape[0])
        while position.numel() - count > 0:
            a, b = position[0::2], position[1::2]
            score = matrix[a][:, b].amax(dim=1)
            drop = min(per_round, position.numel() - count, a.numel())
            position = torch.cat([a[torch.sort(score, descending=True, stable=True).indices[drop:]], b])
        out.append(position)
    return torch.stack(out)


@settings(max_examples=60, deadline=None)
@given(jobs=st.integers(1, 3), size=st.integers(2, 90), data=st.data())
def test_rounds_read_down_columns_as_the_authors_read_along_rows(jobs, size, data):
    """survivors reads a token's score down its column and cuts its matrix down as the residual shrinks: on a
    symmetric matrix that is the authors' row-wise reading, ties included (coarse values tie often)."""
    count = data.draw(st.integers(1, size - 1))
    per_round = data.draw(st.integers(1, 9))
    levels = data.draw(st.sampled_from([3, 1000]))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    values = torch.randint(0, levels, (jobs, size, size), generator=generator).double()
    similarity = values + values.transpose(1, 2)
    assert torch.equal(survivors(similarity, count, per_round), rounds_along_rows(similarity, count, per_round))
