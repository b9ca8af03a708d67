"""ToMe against an independent reading of facebookresearch/ToMe: its merge step on random tensors, and a
whole tower run that shortens the sequence as ToMe does, compared with what vtprune's masked tower keeps."""

import numpy as np
import pytest
import torch

import vtprune
from vtprune.methods import BlockInput
from vtprune.methods.tome import ToMe, even_schedule
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava, tiny_video_llava

from .shortened_tower import assert_pruner_matches

# ----------------------------------------------------------------------------- the independent reading


def tome_merge(x, key_mean, size, r):
    """One row of ToMe's bipartite_soft_matching + merge_wavg with a class token: (x', size', groups, order),
    groups[i] the output token old token i went into, order[j] the old token output token j continues."""
    metric = key_mean / np.linalg.norm(key_mean, axis=-1, keepdims=True)
    a, b = metric[0::2], metric[1::2]
    scores = a @ b.T
    scores[0, :] = -np.inf  # the class token never merges
    node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)
    edges = np.argsort(-node_max, kind="stable")
    src, unm = edges[:r], np.sort(edges[r:])
    out_x = [x[2 * i] * size[2 * i] for i in unm] + [x[2 * j + 1] * size[2 * j + 1] for j in range(len(b))]
    out_size = [size[2 * i] for i in unm] + [size[2 * j + 1] for j in range(len(b))]
    groups = np.empty(len(x), dtype=int)
    for slot, i in enumerate(unm):
        groups[2 * i] = slot
    for j in range(len(b)):
        groups[2 * j + 1] = len(unm) + j
    for i in src:
        dst = len(unm) + node_idx[i]
        out_x[dst] = out_x[dst] + x[2 * i] * size[2 * i]
        out_size[dst] = out_size[dst] + size[2 * i]
        groups[2 * i] = dst
    out_size = np.array(out_size)
    order = np.concatenate([2 * unm, 2 * np.arange(len(b)) + 1])
    return np.stack(out_x) / out_size[:, None], out_size, groups, order


# ----------------------------------------------------------------------------- the comparison


def test_merge_step_equals_tomes_on_random_rows():
    g = torch.Generator().manual_seed(0)
    rows, n, heads, width = 3, 21, 4, 8
    hidden = torch.randn(rows, n, width, generator=g, dtype=torch.float64)
    key = torch.randn(rows, heads, n, 6, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (rows, n), generator=g).double()
    block = BlockInput(hidden, key.clone(), key, 0.5, size, cls=True, columns=torch.arange(n).expand(rows, n), grid=(4, 5))
    merge = ToMe(ToMe.Options()).merge(block, r=7)
    for row in range(rows):
        expected_x, expected_size, groups, order = tome_merge(hidden[row].numpy(), key[row].mean(0).numpy(), size[row].numpy(), 7)
        assert merge.order.shape == (rows, n - 7)
        np.testing.assert_allclose(merge.hidden[row].numpy(), expected_x, rtol=1e-12)
        np.testing.assert_array_equal(merge.size[row].numpy(), expected_size)
        np.testing.assert_array_equal(merge.into[row].numpy(), groups)
        np.testing.assert_array_equal(merge.order[row].numpy(), order)
        assert order[0] == 0  # the class token stays first


@pytest.mark.parametrize("patches, keep, blocks", [(64, 10, 5), (64, 2, 5), (576, 64, 23), (576, 192, 23), (64, 40, 1)])
def test_schedule_reaches_the_budget_within_tomes_limit(patches, keep, blocks):
    schedule = even_schedule(list(range(blocks)), patches + 1, 1, patches - keep)
    tokens = patches + 1
    for r in schedule.values():
        assert 0 <= r <= (tokens - 1) // 2
        tokens -= r
    assert tokens == keep + 1
    rs = list(schedule.values())
    if keep >= patches // 2:  # where the limit never binds the spread is even
        assert max(rs) - min(rs) <= 1


@pytest.mark.parametrize("blocks, patches, keep, expected", [
    (5, 64, 10, [11, 11, 11, 11, 10]),  # 54 to remove: evenly, the first blocks one more
    (5, 64, 16, [10, 10, 10, 9, 9]),
    (5, 64, 32, [7, 7, 6, 6, 6]),
    (3, 576, 72, [288, 144, 72]),  # the least three blocks keep: each merges half
    # 448: 150 first (ceil of a third); then 149 would leave the last block 149 to merge from 278 tokens, over its
    # limit of 138, so block 1 takes 170, the least that leaves the last block within its limit (128 of 257)
    (3, 576, 128, [150, 170, 128]),
])
def test_schedule_worked_by_hand(blocks, patches, keep, expected):
    assert list(even_schedule(list(range(blocks)), patches + 1, 1, patches - keep).values()) == expected


def test_schedule_refuses_a_budget_the_blocks_cannot_reach():
    with pytest.raises(ValueError, match="keep at least 32; use a budget of 32 or more"):
        even_schedule([0], 65, 1, 60)


@pytest.mark.parametrize("make", [tiny_llava, tiny_video_llava])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("keep", [10, 3])
def test_tower_keeps_and_merges_as_tome_does(make, attn, keep):
    model = make(attn)
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    schedule = even_schedule(list(range(vision.num_hidden_layers - 1)), patches + 1, 1, patches - keep)  # to layer -2

    def merge(x, query, key, scaling, size, columns, r):
        return tome_merge(x, key.mean(0), size, r)

    assert_pruner_matches(model, make("eager"), "tome", keep, schedule, merge, proportional=True)


@pytest.mark.parametrize("method", ["tome", "ficoco_v"])
def test_block_merging_refuses_tiled_images_and_videos(method):
    from vtprune.tiny import tiny_llava_next

    with pytest.raises(ValueError, match="one tower row per image"):
        vtprune.apply(tiny_llava_next(), method, 8)
    model = tiny_video_llava()
    with torch.no_grad(), vtprune.apply(model, method, 8), pytest.raises(ValueError, match="does not support videos"):
        model(**tiny_inputs(model, [SampleLayout(images=0, videos=1)]))


@pytest.mark.parametrize("method", ["tome", "ficoco_v"])
def test_the_harnesses_leave_out_a_block_merging_method_on_videos_before_any_sample(method):
    """`vtprune eval` on a video task and `vtprune bench` on a video preset list it as not run (it stopped the run
    at its first video, the finished configs' work lost, or the bench after minutes)."""
    from types import SimpleNamespace

    from vtprune.api import refusal
    from vtprune.cli import runnable_configs
    from vtprune.cli_args import MethodSpec

    model = tiny_video_llava()
    assert refusal(model, method, 8) is None and refusal(model, "random", 8, videos=True) is None
    assert "does not support videos" in refusal(model, method, 8, videos=True)
    specs = [MethodSpec(name, name) for name in (method, "random")]
    configs, refused = runnable_configs(model, specs, [8], {}, SimpleNamespace(main=True), videos=True)
    assert [c.name for c in configs] == ["unpruned", "random@8"] and list(refused) == [f"{method}@8"]


def test_the_survivors_of_a_batch_are_each_items_alone():
    """BlockMergingMethod.select_batch reads each item's survivors (tokens merged into themselves), destinations
    and sizes off merged_into, for items of one size together; -1 marks a token whose slot was the [CLS] token's."""
    from vtprune.methods import Grid, VisionView

    from .picks import assert_same_pick

    def view(into, keep):
        n = len(into)
        return VisionView(features=torch.zeros(n, 2), coords=torch.zeros(n, 3, dtype=torch.long),
                          part=torch.zeros(n, dtype=torch.long), parts=(Grid(1, n),), rows=torch.zeros(n, dtype=torch.long),
                          columns=torch.arange(1, n + 1), layers={}, keep=keep, image_index=0,
                          merged_into=torch.tensor(into))

    views = [view([0, 0, 2, 2, -1, 5], 3), view([1, 1, 1, 3, 3, 5], 3), view([0, 1, 2, 0], 3), view([0, 0, 0, 3, 4, 4], 3)]
    method = ToMe(ToMe.Options())
    picks = method.select_batch(views)
    for one, pick in zip(views, picks, strict=True):
        assert_same_pick(pick, method.select(one))
    assert picks[0].keep.tolist() == [0, 2, 5] and picks[0].destination.tolist() == [0, 0, 1, 1, -1, 2]
    assert picks[0].sizes.tolist() == [2, 2, 1]
    assert picks[1].keep.tolist() == [1, 3, 5] and picks[1].sizes.tolist() == [3, 2, 1]
    assert picks[2].keep.tolist() == [0, 1, 2] and picks[2].destination.tolist() == [0, 1, 2, 0]
