"""DART against an independent numpy reading of the authors' get_retained_image_token, and its schedule."""

import math

import numpy as np
import pytest
import torch

from vtprune.methods import ImageView, LayerProbe, ModelInfo
from vtprune.methods.dart import DART, pivots

LLAVA_7B = ModelInfo("llava", 32)


def stable_top(values, k):
    return np.argsort(-values, kind="stable")[:k]


def torch_top(values, k):
    """The authors' own .topk, whose order on ties is torch's (on the CPU not the lowest indices first)."""
    return torch.topk(torch.from_numpy(values), k).indices.numpy()


def authors_dart(any_states, last_layer_state, start, length, counts, pivot_image=4, pivot_text=4, top_k=stable_top):
    """ZichenWen1/DART (as vendored in Chenfei-Liao/VTC-Bench external/DART), modeling_llama_self.py,
    DART.get_retained_image_token, in numpy. any_states [H, L, d] = layer K-1's keys (RoPE applied),
    last_layer_state [L, D] = the final norm of layer K-1's output. The one documented deviation: pivot j of the
    visit order takes counts[j] tokens instead of the same TOKEN_TOPK for all. top_k(values, k) stands for their
    .topk: a stable argsort where nothing ties."""
    states = any_states.transpose(1, 0, 2).reshape(any_states.shape[1], -1)  # permute(0,2,1,3).reshape: [L, H*d]
    image_norm = np.abs(states[start:start + length]).sum(-1)
    query_norm = np.abs(states[start + length:]).sum(-1)
    image_indices = (top_k(image_norm, pivot_image) + start).tolist()
    query_indices = (top_k(query_norm, pivot_text) + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_list = sorted(valid_indices)
    for j, item in enumerate(list(indices_set)):
        vectors = last_layer_state[valid_list]
        pivot = last_layer_state[item]
        cos = -(vectors @ pivot) / (np.linalg.norm(vectors, axis=-1) * np.linalg.norm(pivot))
        top = top_k(cos, counts[j])
        real = [valid_list[i] for i in top]
        indices_set.update(real)
        valid_indices.difference_update(real)
        valid_list = sorted(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def make_view(rng, rows, cols, before, after, keep, heads=4, head_dim=8, width=16):
    """A view of a rows x cols image at rows [before, before + N) of a probe of before + N + after rows."""
    n = rows * cols
    length = before + n + after
    key = rng.standard_normal((heads, length, head_dim))
    normed = rng.standard_normal((length, width))
    visual = np.arange(before, before + n)
    text = np.concatenate([np.arange(before), np.arange(before + n, length)])
    probe = LayerProbe(asking_query=torch.from_numpy(rng.standard_normal((heads, length, head_dim))),
                       key=torch.from_numpy(key), hidden=torch.from_numpy(rng.standard_normal((length, width))),
                       scaling=1 / math.sqrt(head_dim), visual=torch.from_numpy(visual), text=torch.from_numpy(text),
                       last=length - 1)
    probe.normed = torch.from_numpy(normed)  # the field DART asks the engine for
    view = ImageView.of_grid(torch.from_numpy(normed[visual]), rows, cols, keep=keep, layer=2, stage=0,
                             image_index=0, sizes=torch.ones(n), probe=probe)
    return view, key, normed


def shares(keep, pivot_image=4, pivots_total=8):
    base, extra = divmod(keep - min(pivot_image, keep), pivots_total)
    return [base + (j < extra) for j in range(pivots_total)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("grid, before, after", [((8, 8), 5, 12), ((24, 24), 35, 23), ((4, 6), 2, 9)])
def test_the_picks_are_the_authors(seed, grid, before, after):
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    view, key, normed = make_view(rng, *grid, before, after, keep=1)
    keeps = {5, 12, 4 + 8 * (n // 16), n // 2 + 3, n - 1}
    if n >= 576:
        keeps |= {132, 196, 68}  # the authors' "128", "192", "64": 4 + 8 x 16, 24, 8 with every share equal
    for keep in sorted(keeps):
        view.keep = keep
        ours = DART(DART.Options()).select(view)
        assert ours.numel() == keep == ours.unique().numel()
        expected = authors_dart(key, normed, before, n, shares(keep))
        assert sorted((ours + before).tolist()) == expected, keep


def test_a_batch_of_views_is_each_view_alone_and_the_authors():
    """select_batch finds the pivots of probes of one shape together and reads their rows once; views with as many
    pivots take their tokens in one loop. Other grids, keeps and a view with no text after its image (every text
    row a candidate) are grouped apart. Each pick equals its view alone, and the authors'."""
    rng = np.random.default_rng(11)
    cases = [make_view(rng, 8, 8, 5, 12, keep=20) for _ in range(3)]
    cases += [make_view(rng, 4, 6, 2, 9, keep=7), make_view(rng, 8, 8, 5, 12, keep=37)]
    last_text, _, _ = make_view(rng, 8, 8, 5, 0, keep=20)
    method = DART(DART.Options())
    views = [view for view, _, _ in cases] + [last_text]
    picks = method.select_batch(views)
    for view, pick in zip(views, picks, strict=True):
        assert pick.tolist() == method.select(view).tolist()
    for (view, key, normed), pick in zip(cases, picks):
        start, n = int(view.probe.visual[0]), view.probe.visual.numel()
        assert sorted((pick + start).tolist()) == authors_dart(key, normed, start, n, shares(view.keep))


def test_with_equal_shares_it_is_the_authors_code_unchanged():
    """keep = 4 + 8 x TOKEN_TOPK: every pivot takes TOKEN_TOPK, as in the released code."""
    rng = np.random.default_rng(11)
    view, key, normed = make_view(rng, 24, 24, 35, 40, keep=132)
    expected = authors_dart(key, normed, 35, 576, [128 // 8] * 8)
    assert sorted((DART(DART.Options()).select(view) + 35).tolist()) == expected


def test_fewer_than_the_pivots():
    """keep below the image pivots: the top-keep tokens by key norm, nothing else."""
    rng = np.random.default_rng(5)
    view, key, _ = make_view(rng, 8, 8, 5, 12, keep=1)
    norms = np.abs(key[:, 5:69]).sum(axis=(0, 2))
    for keep in (1, 2, 3, 4):
        view.keep = keep
        assert sorted(DART(DART.Options()).select(view).tolist()) == sorted(np.argsort(-norms)[:keep].tolist())


def test_text_pivots_come_after_the_image_only():
    """A system-prompt token before the image with the largest key of all is never a pivot (the authors slice the
    keys after the image span); the item's pivots are its own largest keys."""
    rng = np.random.default_rng(2)
    view, key, _ = make_view(rng, 8, 8, 5, 12, keep=20)
    view.probe.key[:, 1] *= 50
    image, text, present = pivots([view.probe], 20, 4, 4)
    image, text = image[0], text[0]
    assert bool(present.all()) and text.numel() == 4 and bool((text >= 69).all()) and 1 not in text.tolist()
    norms = view.probe.key.abs().sum(dim=(0, 2))
    assert image.tolist() == torch.topk(norms[5:69], 4).indices.tolist()
    assert text.tolist() == (69 + torch.topk(norms[69:], 4).indices).tolist()


def test_without_text_after_the_image_every_text_row_is_a_candidate_pivot():
    """No text follows the image (the authors' top-k over an empty slice would fail): vtprune's documented rule takes
    the text pivots from all the text rows, here the 5 before the image, by key L1 norm."""
    rng = np.random.default_rng(11)
    view, _, _ = make_view(rng, 8, 8, 5, 0, keep=20)
    image, text, present = pivots([view.probe], 20, 4, 4)
    norms = view.probe.key.abs().sum(dim=(0, 2))
    assert bool(present.all()) and text[0].tolist() == torch.topk(norms[:5], 4).indices.tolist()


def test_tied_image_keys_give_the_pivots_the_authors_topk_gives():
    """Every visual token with the same key: the image pivots are whichever torch.topk returns on the tied norms (the
    authors call .topk on the same image span), and the tokens they take are then the authors'."""
    rng = np.random.default_rng(4)
    view, key, normed = make_view(rng, 8, 8, 5, 12, keep=20)
    view.probe.key[:, 5:69] = view.probe.key[:, 5:6].clone()  # key is the same memory
    norms = view.probe.key.abs().sum(dim=(0, 2))[5:69]
    assert norms.unique().numel() == 1 and sorted(torch.topk(norms, 4).indices.tolist()) != [0, 1, 2, 3]
    expected = authors_dart(key, normed, 5, 64, shares(20), top_k=torch_top)
    assert sorted((DART(DART.Options()).select(view) + 5).tolist()) == expected


def test_each_pivot_takes_the_tokens_least_like_it():
    """One image pivot, no text pivots: after the pivot (the largest key), the tokens whose final-normed states point
    furthest from the pivot's are kept, whatever their norm."""
    n = 6
    key = torch.ones(1, n + 1, 2)
    key[0, 2] = 5.0  # token 2 is the pivot
    normed = torch.tensor([[1.0, 0.1], [-3.0, 0.2], [1.0, 0.0], [0.9, 0.4], [-0.1, -1.0], [0.5, 0.5], [0.0, 1.0]])
    probe = LayerProbe(asking_query=key.clone(), key=key, hidden=normed, scaling=1.0, visual=torch.arange(n),
                       text=torch.tensor([n]), last=n)
    probe.normed = normed
    view = ImageView.of_grid(normed[:n], 2, 3, keep=3, layer=2, stage=0, image_index=0, sizes=torch.ones(n),
                             probe=probe)
    picked = DART(DART.Options(pivot_image=1, pivot_text=0)).select(view)
    assert picked.tolist() == [2, 1, 4]  # cos to (1, 0): token 1 is -0.998, token 4 is -0.0995


def test_it_needs_the_normed_states():
    rng = np.random.default_rng(0)
    view, _, _ = make_view(rng, 4, 4, 2, 3, keep=5)
    del view.probe.normed
    with pytest.raises(RuntimeError, match="normed"):
        DART(DART.Options()).select(view)


def test_the_schedule():
    dart = DART(DART.Options())
    assert [(s.layer, s.keep) for s in dart.stages(LLAVA_7B, 128, 576)] == [(2, 128)]
    assert [(s.layer, s.keep) for s in dart.stages(LLAVA_7B, 900, 576)] == [(2, 576)]
    authors = DART(DART.Options(authors_count=True))
    assert [s.keep for s in authors.stages(LLAVA_7B, 128, 576)] == [132]  # "128 keeps 132"
    assert [s.keep for s in authors.stages(LLAVA_7B, 192, 576)] == [196]
    assert [s.keep for s in authors.stages(LLAVA_7B, 64, 576)] == [68]
    assert [s.keep for s in authors.stages(LLAVA_7B, 70, 576)] == [68]
    assert [s.keep for s in authors.stages(LLAVA_7B, 3, 576)] == [4]
    assert [s.keep for s in authors.stages(LLAVA_7B, 2, 3)] == [3]
    assert [s.layer for s in DART(DART.Options(layer=3)).stages(LLAVA_7B, 64, 576)] == [3]


@pytest.mark.parametrize("options, message", [
    ({"layer": 0}, ">= 1"), ({"pivot_image": 0, "pivot_text": 0}, "at least one pivot"), ({"pivot_text": -1}, ">= 0"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        DART.parse_options(options)


def test_through_the_engine_the_probe_is_layer_k_minus_1s_keys_and_the_final_norm_of_layer_k_input(monkeypatch):
    """On a tiny LLaVA: probe.key is layer K-1's keys as the unpruned model caches them (the authors' any_states =
    layer_outputs[-2] of layer K-1), probe.normed the decoder's final norm applied to what enters layer K unpruned,
    and the kept tokens are the authors' selection from those keys and states."""
    import vtprune
    from vtprune.engine.cache import output_cache
    from vtprune.methods import REGISTRY
    from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

    monkeypatch.setitem(REGISTRY, DART.name, DART)
    model = tiny_llava("eager")
    inputs = tiny_inputs(model, [SampleLayout(images=1, text_before=3)])
    language_model = model.model.language_model
    captured, probes = {}, []
    hook = language_model.layers[2].register_forward_pre_hook(
        lambda module, args, kwargs: captured.__setitem__("hidden", kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    with torch.no_grad():
        cached = output_cache(model(**inputs, use_cache=True)).layers[1].keys[0]  # [kv heads, L, d]
        normed = language_model.norm(captured["hidden"])[0]
    hook.remove()
    select_batch = DART.select_batch
    monkeypatch.setattr(DART, "select_batch",
                        lambda self, views: probes.extend(v.probe for v in views) or select_batch(self, views))
    with torch.no_grad(), vtprune.apply(model, "dart", 13) as pruner:
        model(**inputs)
    probe = probes[0]
    groups = probe.key.shape[0] // cached.shape[0]
    torch.testing.assert_close(probe.key.float(), cached.repeat_interleave(groups, dim=0).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(probe.normed, normed, rtol=1e-5, atol=1e-6)
    start = int(probe.visual[0])
    expected = authors_dart(probe.key.double().numpy(), normed.double().numpy(), start, 64, shares(13))
    assert sorted(pruner.last_decision.kept[0][0].tolist()) == expected


def test_fewer_text_rows_after_the_image_than_text_pivots():
    """Two text rows follow the image: they are the only text pivots (no row before the image fills the other two
    slots), and the picks are the authors' with pivot_text=2, the remaining tokens shared over 6 pivots."""
    rng = np.random.default_rng(7)
    view, key, normed = make_view(rng, 8, 8, 5, 2, keep=30)
    _, text, present = pivots([view.probe], 30, 4, 4)
    assert present.tolist() == [[True, True, False, False]]
    assert sorted(text[0, :2].tolist()) == [69, 70]
    expected = authors_dart(key, normed, 5, 64, shares(30, pivots_total=6), pivot_text=2)
    assert sorted((DART(DART.Options()).select(view) + 5).tolist()) == expected
