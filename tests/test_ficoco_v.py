"""FiCoCo-V against an independent numpy reading of kawhiiiileo/FiCoCo's Filter / Correlate / Compress (with the
documented repairs of the release: [CLS] kept first, kept tokens as targets, each token's own 2x2 window), on a
block of random tensors and on a whole tower run that shortens the sequence at each block."""

import numpy as np
import pytest
import torch

import vtprune
from vtprune.methods import BlockInput
from vtprune.methods.ficoco_v import FiCoCoV, penalise_window_minima
from vtprune.tiny import tiny_llava, tiny_video_llava

from .shortened_tower import assert_pruner_matches
from .vision_views import softmax

BETA = 0.35


def ficoco_block(x, query, key, scaling, size, columns, r, grid):
    """One row: (x', size', groups, order) as in shortened_tower."""
    logits = (query @ key.transpose(0, 2, 1) * scaling).mean(0)
    cls = logits[0, 1:] / np.linalg.norm(logits[0, 1:])
    similarity = logits[1:, 1:].mean(1)
    similarity = similarity / np.linalg.norm(similarity)
    score = BETA * cls - (1 - BETA) * similarity
    lowest = {}  # 2x2 window -> the patch (index into score) of lowest score, the first on ties
    for i, column in enumerate(columns[1:]):
        window = ((column - 1) // grid[1] // 2, (column - 1) % grid[1] // 2)
        if window not in lowest or score[i] < score[lowest[window]]:
            lowest[window] = i
    for i in lowest.values():
        score[i] = score[i] / 2 if score[i] > 0 else score[i] * 2
    ranked = np.argsort(score, kind="stable") + 1
    dropped, kept = ranked[:r], np.sort(np.concatenate([[0], ranked[r:]]))
    width = max(int((logits[i] > np.quantile(logits[i], 0.998)).sum()) for i in dropped)
    width = min(max(width, 1), len(kept))
    attention = softmax(logits)
    total = {u: x[u].copy() for u in kept}
    mass = {u: 1.0 for u in kept}
    groups = np.empty(len(x), dtype=int)
    slot = {u: j for j, u in enumerate(kept)}
    for u in kept:
        groups[u] = slot[u]
    for i in dropped:
        towards = attention[i, kept]
        top = np.argsort(-towards, kind="stable")[:width]
        weights = towards[top] / towards[top].sum()
        for t, w in zip(top, weights):
            total[kept[t]] = total[kept[t]] + w * x[i]
            mass[kept[t]] += w
        groups[i] = top[0]
    merged = np.stack([total[u] / mass[u] for u in kept])
    new_size = np.zeros(len(kept))
    np.add.at(new_size, groups, size)
    return merged, new_size, groups, kept


@pytest.mark.parametrize("grid, r, tolerance", [
    ((6, 6), 11, {"rtol": 1e-10}), ((5, 7), 11, {"rtol": 1e-10}),  # odd sides: the last, narrower windows count too
    # rows of 577 tokens: the 0.998 quantile leaves 2 logits above it, so each dropped token spreads over 2 targets
    # by softmax weights (vtprune's softmax in float32), which the logits' scaling changes
    ((24, 24), 42, {"rtol": 1e-5, "atol": 1e-6}),
])
def test_block_equals_the_reading_on_random_rows(grid, r, tolerance):
    g = torch.Generator().manual_seed(3)
    rows, heads, width = 2, 4, 8
    n = 1 + grid[0] * grid[1]
    hidden = torch.randn(rows, n, width, generator=g, dtype=torch.float64)
    query = torch.randn(rows, heads, n, 5, generator=g, dtype=torch.float64)
    key = torch.randn(rows, heads, n, 5, generator=g, dtype=torch.float64)
    columns = torch.arange(n).expand(rows, n)
    block = BlockInput(hidden, query, key, 0.4, torch.ones(rows, n, dtype=torch.float64), True, columns, grid)
    merge = FiCoCoV(FiCoCoV.Options()).merge(block, r=r)
    for row in range(rows):
        merged, size, groups, kept = ficoco_block(hidden[row].numpy(), query[row].numpy(), key[row].numpy(), 0.4,
                                                  np.ones(n), np.arange(n), r, grid)
        np.testing.assert_array_equal(merge.order[row].numpy(), kept)
        np.testing.assert_array_equal(merge.into[row].numpy(), groups)
        np.testing.assert_allclose(merge.hidden[row].numpy(), merged, **tolerance)
        np.testing.assert_array_equal(merge.size[row].numpy(), size)


def test_each_image_merges_over_its_own_number_of_targets():
    """k is read per image: an image whose logits tie (k = 1) merges as it does alone when batched with one of
    577 distinct tokens (k = 2), not over the other's k."""
    g = torch.Generator().manual_seed(0)
    n, r = 577, 42
    hidden, query, key = (torch.randn(2, *shape, generator=g) for shape in ((n, 16), (4, n, 8), (4, n, 8)))
    query[0, :, 1:] = 0.0  # every patch's logits are 0: no logit is above its row's quantile

    def merged(rows):
        block = BlockInput(hidden[rows], query[rows], key[rows], 0.3, torch.ones(len(rows), n), True,
                           torch.arange(n).expand(len(rows), n), (24, 24))
        return FiCoCoV(FiCoCoV.Options()).merge(block, r)

    alone, batched = merged([0]), merged([0, 1])
    assert torch.equal(alone.order[0], batched.order[0])
    torch.testing.assert_close(alone.hidden[0], batched.hidden[0])
    torch.testing.assert_close(merged([1]).hidden[0], batched.hidden[1])


def test_local_penalty_pushes_down_each_windows_lowest_live_patch():
    # a 2x4 grid: windows {1, 2, 5, 6} and {3, 4, 7, 8} by column (1 + raster index); column 6 is merged away
    columns = torch.tensor([[1, 2, 3, 4, 5, 7, 8]])
    score = torch.tensor([[0.3, -0.2, 0.5, 0.1, 0.4, 0.05, 0.05]])
    penalised = penalise_window_minima(score, columns, (2, 4))
    # -0.2 doubled; of the tied 0.05s the first (column 7) halved
    assert torch.equal(penalised, torch.tensor([[0.3, -0.4, 0.5, 0.1, 0.4, 0.025, 0.05]]))


@pytest.mark.parametrize("make", [tiny_llava, tiny_video_llava])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("keep", [10, 2])
def test_tower_keeps_and_merges_as_the_reading(make, attn, keep):
    model = make(attn)
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    layers = vision.num_hidden_layers  # the authors' layers 12..22 of 24 are 3..4 of this 6-layer tower
    blocks = list(range(round(12 * layers / 24), layers - 1))
    remove = side * side - keep
    schedule = {layer: remove // len(blocks) + (i < remove % len(blocks)) for i, layer in enumerate(blocks)}

    def merge(x, query, key, scaling, size, columns, r):
        return ficoco_block(x, query, key, scaling, size, columns, r, (side, side))

    assert_pruner_matches(model, make("eager"), "ficoco_v", keep, schedule, merge, proportional=False)


def test_options_are_checked():
    with pytest.raises(ValueError, match="beta"):
        vtprune.apply(tiny_llava(), "ficoco_v", 8, beta=1.5)
    with pytest.raises(ValueError, match="first_layer must lie in 0..4"):
        vtprune.apply(tiny_llava(), "ficoco_v", 8, first_layer=5)


@pytest.mark.parametrize("seed", range(40))
def test_the_upper_quantile_is_torchs_bit_for_bit(seed):
    from vtprune.methods.ficoco_v import upper_quantile

    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 1200, (), generator=generator))
    rows = torch.randn(3, 5, n, generator=generator) * 4
    if seed % 2:
        rows = rows.round()  # ties
    for q in (0.998, 0.5, 1.0, 0.0):
        assert torch.equal(upper_quantile(rows, q), torch.quantile(rows, q, dim=-1, keepdim=True))


@pytest.mark.parametrize("seed", range(40))
def test_the_host_bound_holds_every_width_the_data_gives(seed):
    """The merge takes the top `correlation_bound(n)` logits and weighs those beyond k at nothing, so that k stays on
    the device; the bound must hold every k, ties included."""
    from vtprune.methods.ficoco_v import correlation_bound, correlation_width

    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 1200, (), generator=generator))
    rows = torch.randn(3, 5, n, generator=generator) * 4
    if seed % 2:
        rows = rows.round()  # ties
    assert int(correlation_width(rows).max()) <= correlation_bound(n, rows.dtype)
    distinct = torch.randperm(n, generator=generator).float()[None, None]  # no ties: k is the bound
    assert int(correlation_width(distinct)) == correlation_bound(n, torch.float32)


def test_the_merge_reads_nothing_from_the_device():
    """k (how many kept tokens a dropped one merges into) comes from the data; a GPU would stall at every merging
    block to read it. Only the quantile's rank, a host number, is read."""
    import inspect

    from vtprune.bench.ops import stage_reads
    from vtprune.methods.ficoco_v import quantile_rank
    from vtprune.tiny import SampleLayout, tiny_inputs

    model = tiny_llava()
    source, first = inspect.getsourcelines(quantile_rank)
    host_lines = range(first, first + len(source))
    with vtprune.apply(model, "ficoco_v", 4), torch.no_grad(), stage_reads(methods=True) as reads:
        model(**tiny_inputs(model, [SampleLayout(), SampleLayout(images=2)]))
    assert reads, "no merging block ran"
    for site in reads:
        path, line = site.split()[0].rsplit(":", 1)
        assert path == "methods/ficoco_v.py" and int(line) in host_lines, dict(reads)


def test_head_mean_logits_are_the_per_head_logits_averaged():
    from vtprune.methods.ficoco_v import HeadMeanLogits

    query, key = torch.randn(2, 3, 2, 10, 4).unbind(0)
    expected = (query @ key.transpose(-1, -2) * 0.5).mean(dim=1)  # [3, 10, 10]
    logits = HeadMeanLogits(query, key, 0.5)
    index = torch.tensor([[4, 0, 9], [1, 1, 2], [7, 3, 5]])
    torch.testing.assert_close(logits.rows(index), expected.gather(1, index[..., None].expand(-1, -1, 10)),
                               atol=1e-6, rtol=1e-6)
    cls = torch.nn.functional.normalize(expected[:, 0, 1:], dim=-1)
    similar = torch.nn.functional.normalize(expected[:, 1:, 1:].mean(dim=-1), dim=-1)
    torch.testing.assert_close(logits.redundancy(0.35), 0.35 * cls - 0.65 * similar, atol=1e-6, rtol=1e-6)


def test_the_removal_is_spread_over_the_blocks_by_hand():
    """LLaVA-1.5's tower (24 layers, the projector reading layer 22) at 64 of 576: blocks 12-22 (the authors'
    first reducing layer, 12 of 24) remove 512 patches, 46 each and the remainder of 6 one more in the first six
    blocks; a 7-layer tower starts at round(12 x 7 / 24) = round(3.5) = 4 (half to even)."""
    from vtprune.methods import ModelInfo

    method = FiCoCoV(FiCoCoV.Options())
    assert method.merge_schedule(ModelInfo("llava", 32), 24, 576, 64) == {
        **{layer: 47 for layer in range(12, 18)}, **{layer: 46 for layer in range(18, 23)}}
    assert min(method.merge_schedule(ModelInfo("llava", 32), 7, 64, 16)) == 4
