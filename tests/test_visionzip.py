"""VisionZip against an independent numpy reading of the authors' CLIPVisionTower_VisionZip.forward; behaviour."""

import numpy as np
import pytest
import torch

from vtprune.methods import Grid, ModelInfo, Selection, Stage, VisionLayer, VisionView
from vtprune.methods.visionzip import VisionZip, split_counts

from .picks import assert_same_pick
from .vision_views import HEADS, anyres, proportional, single, softmax, video


def reference(view, share=10 / 64):
    """Returns {token: (feature, size)} of the kept tokens and, per token, the kept token it went to (-1: dropped)."""
    layer = view.layers[-2]
    q, k = layer.query.double().numpy(), layer.key.double().numpy()
    feats = view.features.double().numpy()
    rows, columns = view.rows.numpy(), view.columns.numpy()
    n = feats.shape[0]
    kept, went = {}, np.full(n, -1)
    row_ids = sorted(set(rows.tolist()))
    budgets = proportional([int((rows == r).sum()) for r in row_ids], view.keep)
    for r, budget in zip(row_ids, budgets):
        idx = np.nonzero(rows == r)[0]
        idx = idx[np.argsort(columns[idx])]
        attn = softmax(q[r] @ k[r].transpose(0, 2, 1) * layer.scaling)  # [H, T, T]
        if layer.cls:
            score = attn[:, 0, :].sum(axis=0)  # [CLS] row, summed over heads
        else:
            score = attn.mean(axis=(0, 1))  # received attention
        score = score[columns[idx]]
        contextual = int(np.floor(budget * share + 0.5))
        dominant = budget - contextual
        cls_slot = int(layer.cls and contextual > 0 and dominant > 0)  # the authors' [CLS] slot, given to a patch
        top = np.argsort(-score, kind="stable")[:dominant - cls_slot]
        mask = np.ones(len(idx), dtype=bool)  # True: not dominant (the authors' mask)
        mask[top] = False
        for t in idx[~mask]:
            kept[int(t)] = (feats[t], 1.0)
            went[t] = t
        if contextual == 0:
            continue
        metric = k[r].mean(axis=0)[columns[idx]][mask]
        hidden_filtered = feats[idx[mask]]
        metric = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
        m = metric.shape[0]
        step = max(1, m // contextual)
        target = np.arange(0, m, step)[:contextual]
        merging = ~np.isin(np.arange(m), target)
        if cls_slot:  # the best candidate that is not an anchor stays as itself
            spare = int(np.flatnonzero(merging)[np.argmax(score[mask][merging])])
            kept[int(idx[mask][spare])] = (feats[idx[mask][spare]], 1.0)
            went[idx[mask][spare]] = idx[mask][spare]
            merging[spare] = False
        similarity = metric[merging] @ metric[target].T
        one_hot = np.zeros((merging.sum(), contextual))
        one_hot[np.arange(merging.sum()), similarity.argmax(axis=1)] = 1
        counts = one_hot.sum(axis=0)
        aggregated = one_hot.T @ hidden_filtered[merging] / np.maximum(counts, 1)[:, None]
        contextual_tokens = hidden_filtered[target] + aggregated
        filtered_ids = idx[mask]
        for j, t in enumerate(filtered_ids[target]):
            kept[int(t)] = (contextual_tokens[j], 1.0 + counts[j])
            went[t] = t
        for i, t in enumerate(filtered_ids[merging]):
            went[t] = filtered_ids[target][similarity[i].argmax()]
    return kept, went


def check(view, share=10 / 64):
    method = VisionZip(VisionZip.Options(contextual_share=share))
    picked = method.select(view)
    kept, went = reference(view, share)
    keep = picked.keep if isinstance(picked, Selection) else picked
    assert keep.numel() == view.keep == len(kept)
    assert sorted(keep.tolist()) == sorted(kept) and keep.tolist() == sorted(keep.tolist())
    if not isinstance(picked, Selection):
        assert all(size == 1 for _, size in kept.values())
        assert ((went == -1) | (went == np.arange(len(went)))).all()
        return
    for slot, token in enumerate(keep.tolist()):
        feature, size = kept[token]
        np.testing.assert_allclose(picked.hidden[slot].double().numpy(), feature, rtol=1e-5, atol=1e-5)
        assert float(picked.sizes[slot]) == size
    destination = picked.destination.numpy()
    assert ((destination == -1) == (went == -1)).all()
    assert (keep.numpy()[destination[went != -1]] == went[went != -1]).all()


@pytest.mark.parametrize("keep", [1, 2, 3, 4, 7, 10, 16, 33, 50, 63])
def test_single_image_matches_the_reference(keep):
    check(single(keep))


@pytest.mark.parametrize("keep", [64, 128, 192, 575])
def test_a_llava_sized_image_matches_the_reference(keep):
    """LLaVA-1.5's 24 x 24 patches, merged features included, at the papers' budgets."""
    check(single(keep, seed=7, side=24))


@pytest.mark.parametrize("keep", [1, 5, 12, 18, 64, 100, 159])
def test_anyres_matches_the_reference(keep):
    check(anyres(keep))


@pytest.mark.parametrize("keep", [1, 4, 9, 20, 40, 63])
def test_video_frames_match_the_reference(keep):
    check(video(keep))


@pytest.mark.parametrize("keep", [1, 6, 20, 63])
def test_a_tower_without_cls_uses_received_attention(keep):
    check(single(keep, seed=3, cls=False))
    check(anyres(keep, seed=4, cls=False))


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_other_shares_match_the_reference(share):
    for keep in (1, 8, 30, 63):
        check(single(keep, seed=5), share)


def test_the_whole_item_is_kept_at_its_size():
    view = anyres(160)
    assert torch.equal(VisionZip(VisionZip.Options()).select(view), torch.arange(160))


# ----------------------------------------------------------------------------- behaviour


def test_the_authors_counts():
    assert [split_counts(k, 10 / 64) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_counts(1, 10 / 64) == (1, 0) and split_counts(4, 10 / 64) == (3, 1)


def test_llava_budget_64_keeps_the_authors_53_patches_and_10_anchors_and_gives_the_cls_slot_to_a_patch():
    view = single(64, seed=6, side=24)
    picked = VisionZip(VisionZip.Options()).select(view)
    layer = view.layers[-2]
    logits = torch.einsum("hd,htd->ht", layer.query[0, :, 0].double(), layer.key[0].double()) * layer.scaling
    cls = logits.softmax(-1).sum(0)[1:]
    dominant = set(torch.topk(cls, 53).indices.tolist())  # the authors' 54 = [CLS] + 53 patches
    assert dominant <= set(picked.keep.tolist())
    rest = [t for t in range(576) if t not in dominant]  # the authors' 523 candidates: step 52, anchors 0, ..., 468
    anchors = {rest[i] for i in range(0, 523, 52)[:10]}
    spare = max((t for t in rest if t not in anchors), key=lambda t: float(cls[t]))  # the [CLS] slot's patch
    assert set(picked.keep.tolist()) == dominant | anchors | {spare}
    assert float(picked.sizes.sum()) == 576
    for slot, token in enumerate(picked.keep.tolist()):
        if token in dominant | {spare}:
            assert float(picked.sizes[slot]) == 1 and torch.equal(picked.hidden[slot], view.features[token])


def hand_view(keys, features, keep):
    """One row: [CLS] then len(keys) patches; every head's [CLS] query is e1, every head sees the same keys."""
    width = keys.shape[0] + 1
    key = torch.zeros(1, HEADS, width, keys.shape[1])
    key[0, :, 1:] = keys
    query = torch.zeros(1, HEADS, width, keys.shape[1])
    query[0, :, 0, 0] = 1.0
    n = keys.shape[0]
    return VisionView(
        features=features, coords=torch.zeros(n, 3, dtype=torch.long), part=torch.zeros(n, dtype=torch.long),
        parts=(Grid(1, n),), rows=torch.zeros(n, dtype=torch.long), columns=torch.arange(1, n + 1),
        layers={-2: VisionLayer(query, key, 1.0, True)}, keep=keep, image_index=0)


def test_the_merge_is_the_anchor_plus_the_mean_of_its_tokens():
    e = torch.eye(4)
    # [CLS] query along e0. Budget 4 at share 0.5: 2 contextual, and the authors' 2 dominant = [CLS] + patch 0.
    # Candidates 1..7: step 3, anchors 1 and 4; the [CLS] slot goes to the best other candidate, 3 (kept as
    # itself); 2, 6 and 7 resemble anchor 1, 5 resembles anchor 4.
    keys = torch.stack([8 * e[0], e[1], e[1] + 0.1 * e[2], 2 * e[0] + e[1], e[2], e[2] + 0.2 * e[3], e[1] - 0.1 * e[3],
                        e[1] + 0.1 * e[3]])
    features = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    picked = VisionZip(VisionZip.Options(contextual_share=0.5)).select(hand_view(keys, features, 4))
    assert picked.keep.tolist() == [0, 1, 3, 4]
    torch.testing.assert_close(picked.hidden[0], features[0])
    torch.testing.assert_close(picked.hidden[1], features[1] + (features[2] + features[6] + features[7]) / 3)
    torch.testing.assert_close(picked.hidden[2], features[3])
    torch.testing.assert_close(picked.hidden[3], features[4] + features[5])
    assert picked.sizes.tolist() == [1, 4, 1, 2]
    assert picked.destination.tolist() == [0, 1, 1, 2, 3, 3, 1, 1]


def test_an_anchor_nothing_joins_keeps_its_feature_and_small_rows_drop_their_rest():
    e = torch.eye(4)
    keys = torch.stack([8 * e[0], e[1], e[1], e[2], e[1], e[1]])
    features = torch.randn(6, 3, dtype=torch.float64)
    # budget 3 at share 0.5: 2 contextual and the [CLS] slot, no dominant patch; candidates 0..5, step 3: anchors
    # 0 and 3 (key e2, alone); the slot goes to 1 (the first of the equal best others); 2, 4 and 5 join anchor 0
    picked = VisionZip(VisionZip.Options(contextual_share=0.5)).select(hand_view(keys, features, 3))
    assert picked.keep.tolist() == [0, 1, 3] and picked.hidden.dtype == torch.float64
    torch.testing.assert_close(picked.hidden[2], features[3])
    torch.testing.assert_close(picked.hidden[1], features[1])
    assert picked.sizes.tolist() == [4, 1, 1]
    # Budget 3 at the default share: no contextual token; only the [CLS]-attention top 3 survive.
    plain = VisionZip(VisionZip.Options()).select(hand_view(keys * torch.tensor([1.0, 0, 0, 0]) + e[0] * torch.arange(
        6.0)[:, None], features, 3))
    assert isinstance(plain, torch.Tensor) and plain.tolist() == [0, 4, 5]


def test_mixed_rows_mark_dropped_tokens_with_minus_one():
    view = anyres(12)  # rows get 5, 5, 2: one contextual token in the first two rows, none in the third
    picked = VisionZip(VisionZip.Options()).select(view)
    third = (view.rows == 2).numpy()
    dropped = picked.destination.numpy() == -1
    assert dropped.sum() == third.sum() - 2 and not dropped[~third].any()
    assert float(picked.sizes.sum()) == 160 - dropped.sum()
    kept = picked.keep.numpy()
    assert (picked.destination.numpy()[kept] == np.arange(12)).all()


def test_half_precision_features_come_back_in_their_dtype():
    view = single(16, seed=7)
    view.features = view.features.half()
    picked = VisionZip(VisionZip.Options()).select(view)
    assert picked.hidden.dtype == torch.float16 and picked.keep.numel() == 16


def test_a_batch_of_views_is_each_view_alone():
    """select_batch stacks items of one shape, dtype, keep and row layout, row by row: single-row images, anyres
    items (a base row and tiles), videos (a row per frame); other budgets, another dtype and a tower without [CLS] are
    grouped apart. Each pick equals its view alone, and the reference's."""
    views = [single(40, seed=s) for s in range(3)] + [anyres(50), single(17, seed=9), video(20), single(40, seed=4),
                                                      single(40, seed=5, cls=False), single(3, seed=6), anyres(50, seed=7),
                                                      video(20, seed=8), anyres(12, seed=10), anyres(12, seed=11)]
    views.append(single(40, seed=8, feature_dtype=torch.float64))
    method = VisionZip(VisionZip.Options())
    for view, pick in zip(views, method.select_batch(views), strict=True):
        assert_same_pick(pick, method.select(view))
        check(view)


def test_interface():
    method = VisionZip(VisionZip.Options())
    assert method.vision_layers(ModelInfo("llava", 32)) == (-2,)
    assert method.vision_layers(ModelInfo("llava_next", 32)) == (-2,)
    assert method.vision_layers(ModelInfo("llava_onevision", 28)) == (-1,)
    assert VisionZip(VisionZip.Options(layer=-3)).vision_layers(ModelInfo("llava", 32)) == (-3,)
    assert method.stages(ModelInfo("llava", 32), 64, 576) == [Stage(0, 64)]
    assert VisionZip.defaults() == {"contextual_share": 10 / 64, "layer": None}
    with pytest.raises(ValueError, match="contextual_share"):
        VisionZip.parse_options({"contextual_share": 1.5})
    with pytest.raises(TypeError):
        VisionZip.parse_options({"dominant": 54})
