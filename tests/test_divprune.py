"""DivPrune against an independent numpy reading of the authors' selection, and through the engine."""

import numpy as np
import pytest
import torch

import vtprune
from vtprune.methods import LLM_INPUT, REGISTRY, ImageView, ModelInfo, Stage
from vtprune.methods.divprune import DivPrune, max_min_diversity

from .conftest import FAMILIES


def authors_divprune(features: np.ndarray, k: int) -> list[int]:
    """The authors' loop (vbdi/divprune, LLaVA/llava/model/llava_arch.py, DivPrune), in numpy: a distance
    matrix of 1 - cosine similarity; first pick = the largest second-smallest entry of a column; then the
    largest minimum over the rows already picked; argmax's first maximum on ties; picked tokens not masked."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = np.sort(distance, axis=0)[1, :]
        else:
            scores = distance[picks, :].min(axis=0)
        picks.append(int(np.argmax(scores)))
    return picks


@pytest.mark.parametrize("n, d", [(2, 3), (5, 4), (16, 8), (64, 32), (150, 7), (576, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_picks_are_the_authors(n, d, seed):
    features = np.random.default_rng(seed * 1000 + n).standard_normal((n, d))
    authors = authors_divprune(features, n - 1)  # their loop is greedy: k only sets its length
    for k in sorted({1, 2, n // 3, n // 2, n - 1} & set(range(1, n))):
        ours = max_min_diversity(torch.from_numpy(features), k)
        assert ours.tolist() == authors[:k], (n, d, k)  # the same tokens in the same order
    assert authors_divprune(features, 1) == authors[:1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_features_are_compared_in_float32(dtype):
    features = torch.randn(100, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours = max_min_diversity(features, 30)
    assert ours.tolist() == authors_divprune(features.double().numpy(), 30)
    assert max_min_diversity(features, 30).tolist() == ours.tolist()


def test_large_items_are_handled_in_blocks(monkeypatch):
    """The first pick's nearest-neighbour distances come in column blocks; the result does not depend on them."""
    from vtprune.methods import divprune

    features = torch.randn(300, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    whole = max_min_diversity(features, 40)
    monkeypatch.setattr(divprune, "_BLOCK", 300 * 7)  # blocks of 7 columns, the last one short
    assert max_min_diversity(features, 40).tolist() == whole.tolist() == authors_divprune(features.numpy(), 40)


def test_duplicates_are_where_the_authors_repeat_a_pick():
    """The one deviation: the authors' loop can pick a token twice once every unpicked token duplicates a picked
    one; vtprune keeps k distinct tokens, taking the lowest-index unpicked one there. (One-hot directions keep
    every distance exactly 0 or 1, so the ties are exact in any precision.)"""
    e = np.eye(3)
    features = np.stack([e[0], 2 * e[0], e[1], e[2], 3 * e[1]])  # tokens 0/1 and 2/4 point the same way
    assert authors_divprune(features, 4) == [3, 0, 2, 0]  # token 0 again
    assert max_min_diversity(torch.from_numpy(features), 4).tolist() == [3, 0, 2, 1]
    assert max_min_diversity(torch.from_numpy(features), 5).tolist() == [3, 0, 2, 1, 4]
    # Before the first repeat the picks agree.
    assert max_min_diversity(torch.from_numpy(features), 3).tolist() == authors_divprune(features, 3)


def test_exact_ties_go_to_the_lowest_index():
    square = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # every nearest neighbour at distance 1
    assert authors_divprune(square, 2) == [0, 2]
    assert max_min_diversity(torch.from_numpy(square), 2).tolist() == [0, 2]


def test_a_zero_vector_is_at_distance_one_from_everything():
    features = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.9, 0.1]])
    assert max_min_diversity(features, 3).sort().values.tolist() == [0, 1, 2]
    assert max_min_diversity(features, 1).tolist() == [1]  # its nearest neighbour is at 1, the others closer


def test_the_method_acts_at_the_llm_input_and_returns_sorted_distinct_indices():
    method = DivPrune(DivPrune.Options())
    assert REGISTRY["divprune"] is DivPrune
    for model in (ModelInfo("llava", 32), ModelInfo("qwen2_vl", 28)):
        assert method.stages(model, 64, 576) == [Stage(LLM_INPUT, 64)]
    hidden = torch.randn(36, 8, generator=torch.Generator().manual_seed(5))
    view = ImageView.of_grid(hidden, 6, 6, keep=9, layer=0, stage=0, image_index=0, sizes=torch.ones(36))
    kept = method.select(view)
    assert kept.tolist() == sorted(authors_divprune(hidden.double().numpy(), 9))
    assert kept.unique().numel() == 9


def test_through_the_engine_it_keeps_the_authors_tokens_of_each_image():
    """On a tiny LLaVA, each image keeps the authors' picks over its projected features (the LM's input)."""
    from vtprune.tiny import SampleLayout, tiny_inputs

    model = FAMILIES["llava"]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(images=1, text_before=5)])
    embeds = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.__setitem__("x", kwargs["inputs_embeds"]), with_kwargs=True)
    model(**inputs)
    hook.remove()
    with vtprune.apply(model, "divprune", 7) as pruner:
        model(**inputs)
        decision, stats = pruner.last_decision, pruner.last_stats
    assert decision.stage_layers == [LLM_INPUT]
    layers = len(model.model.language_model.layers)
    assert stats.visual_tokens_per_layer == [[14] * layers, [7] * layers]
    for b in range(2):
        placeholders = torch.nonzero(inputs["input_ids"][b] == 100).flatten()
        images = placeholders.reshape(-1, placeholders.numel() // (2 - b))  # tiny LLaVA: equal images
        expected = []
        for image in images:
            features = embeds["x"][b, image].double().numpy()
            expected += image[authors_divprune(features, 7)].tolist()
        assert sorted(decision.kept[0][b].tolist()) == sorted(expected)



@pytest.mark.parametrize("block", [None, 2 * 64 * 64, 64 * 64 - 1])
def test_a_batch_of_items_is_selected_as_each_alone(block, monkeypatch):
    """select_batch runs the greedy loop once over items of one shape (as many at a time as their distance
    matrices fit, or pick by pick when one does not); other shapes in groups of their own."""
    if block is not None:
        from vtprune.methods import divprune

        monkeypatch.setattr(divprune, "_BLOCK", block)
    g = torch.Generator().manual_seed(3)
    shapes = [(64, 16, 20)] * 4 + [(48, 16, 20), (64, 16, 9), (64, 16, 20)]
    views = [ImageView.of_grid(torch.randn(n, d, generator=g), 1, n, keep=k, layer=LLM_INPUT, stage=0, image_index=0,
                               sizes=torch.ones(n)) for n, d, k in shapes]
    method = DivPrune(DivPrune.Options())
    for view, picked in zip(views, method.select_batch(views), strict=True):
        assert picked.tolist() == method.select(view).tolist() == sorted(authors_divprune(view.hidden.numpy(), view.keep))
