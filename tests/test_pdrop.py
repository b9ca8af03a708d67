"""PDrop against an independent numpy reading of the authors' rank & drop, its schedule, and through the engine."""

import math

import numpy as np
import pytest
import torch

import vtprune
from vtprune.methods import REGISTRY, ImageView, LayerProbe, ModelInfo
from vtprune.methods.pdrop import PDrop, last_token_attention, stage_counts

LLAVA_7B, QWEN_7B = ModelInfo("llava", 32), ModelInfo("qwen2_vl", 28)


def authors_rank_drop(query, key, image_index, image_tokens, keep_length, prompt_total_len):
    """Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py, pdrop_rank_drop (inference branch), in numpy:
    the query of row prompt_total_len - 1, q k^T / sqrt(head_dim) plus the causal mask row, softmax over the whole
    row, mean over heads, the image span [image_index, image_index + image_tokens), top keep_length, sorted.
    (query/key [H, L, d] with RoPE already applied, as theirs after apply_rotary_pos_emb.)"""
    heads, length, head_dim = query.shape
    q = query[:, prompt_total_len - 1, :][:, None, :]  # (num_head, 1, d)
    weights = q @ key.transpose(0, 2, 1) / math.sqrt(head_dim)  # (num_head, 1, L)
    mask = np.where(np.arange(length) <= prompt_total_len - 1, 0.0, -np.inf)
    weights = weights + mask
    weights = np.exp(weights - weights.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    average = weights.mean(axis=0)[:, image_index:image_index + image_tokens].mean(axis=0)
    top = np.argsort(-average, kind="stable")[:keep_length] + image_index
    return np.sort(top)


def make_view(rng, rows, cols, before, after, heads=4, head_dim=8, keep=1, stage=0, scale=3.0):
    """A view of a rows x cols image whose tokens sit at rows [before, before + N) of a probe of L rows."""
    n = rows * cols
    length = before + n + after
    query = rng.standard_normal((heads, length, head_dim)) * scale
    key = rng.standard_normal((heads, length, head_dim))
    hidden = rng.standard_normal((length, 16))
    visual = np.arange(before, before + n)
    text = np.concatenate([np.arange(before), np.arange(before + n, length)])
    probe = LayerProbe(asking_query=torch.from_numpy(query), key=torch.from_numpy(key), hidden=torch.from_numpy(hidden),
                       scaling=1 / math.sqrt(head_dim), visual=torch.from_numpy(visual), text=torch.from_numpy(text),
                       last=length - 1)
    view = ImageView.of_grid(torch.from_numpy(hidden[visual]), rows, cols, keep=keep, layer=8, stage=stage,
                             image_index=0, sizes=torch.ones(n), probe=probe)
    return view, query, key


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("grid, before, after", [((8, 8), 5, 12), ((24, 24), 35, 20), ((3, 5), 1, 1)])
def test_the_picks_are_the_authors(seed, grid, before, after):
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    view, query, key = make_view(rng, *grid, before, after)
    for keep in sorted({1, 2, n // 8, n // 4, n // 2, n - 1} & set(range(1, n))):
        view.keep = keep
        ours = PDrop(PDrop.Options()).select(view)
        expected = authors_rank_drop(query, key, before, n, keep, query.shape[1])
        assert ours.tolist() == (expected - before).tolist(), keep  # in original order, as theirs


def test_a_batch_of_views_is_each_view_alone_and_the_authors():
    """select_batch scores probes of one shape and last row together; other shapes, keeps and a probe holding only
    the asking rows' queries (as the engine makes them) are grouped apart. Each pick is its view's alone, and the
    authors'."""
    rng = np.random.default_rng(7)
    cases = [make_view(rng, 8, 8, 5, 12, keep=16) for _ in range(3)] + [make_view(rng, 3, 5, 1, 1, keep=4),
                                                                          make_view(rng, 8, 8, 5, 12, keep=9)]
    view, query, key = make_view(rng, 8, 8, 5, 12, keep=16)
    asking = torch.cat([view.probe.text[:-1], view.probe.text[-1:]])  # text rows, the last row among them
    view.probe.asking, view.probe.asking_query = asking, view.probe.asking_query[:, asking]
    cases.append((view, query, key))
    method = PDrop(PDrop.Options())
    views = [view for view, _, _ in cases]
    for (view, query, key), pick in zip(cases, method.select_batch(views), strict=True):
        assert pick.tolist() == method.select(view).tolist()
        before, n = int(view.probe.visual[0]), view.probe.visual.numel()
        assert pick.tolist() == (authors_rank_drop(query, key, before, n, view.keep, query.shape[1]) - before).tolist()


def test_a_later_stage_ranks_the_tokens_still_present():
    """After a drop the authors' image span is the kept tokens, contiguous in the shortened sequence; the probe's
    rows are the tokens present, so the same reading applies at stage 1 (144 of 288 left of 576)."""
    rng = np.random.default_rng(7)
    view, query, key = make_view(rng, 12, 24, 35, 30, keep=144, stage=1)  # 288 tokens survive stage 0
    ours = PDrop(PDrop.Options()).select(view)
    assert ours.tolist() == (authors_rank_drop(query, key, 35, 288, 144, query.shape[1]) - 35).tolist()


def test_the_softmax_runs_over_every_token_not_the_visual_ones():
    """Two heads: head 0 also attends to a text sink, so its visual weights are small; head 1 has no sink. Token 0
    leads in head 0, token 1 in head 1. Normalised over the whole row (the authors'), head 1 dominates the mean and
    token 1 wins; normalised over the visual tokens alone, token 0 would."""
    d = 2
    query = torch.zeros(2, 4, d)
    key = torch.zeros(2, 4, d)
    query[:, 3, 0] = 1.0  # the last token's query; rows: 0 sink (text), 1-2 visual, 3 last (text)
    key[0, 0, 0], key[0, 1, 0], key[0, 2, 0] = 12.0, 6.0, 0.0  # head 0: sink, visual token 0 leads strongly
    key[1, 0, 0], key[1, 1, 0], key[1, 2, 0] = -9.0, 0.0, 1.5  # head 1: no sink, visual token 1 leads mildly
    probe = LayerProbe(asking_query=query, key=key, hidden=torch.zeros(4, 4), scaling=1.0, visual=torch.tensor([1, 2]),
                       text=torch.tensor([0, 3]), last=3)
    view = ImageView.of_grid(torch.zeros(2, 4), 1, 2, keep=1, layer=8, stage=0, image_index=0, sizes=torch.ones(2),
                             probe=probe)
    assert PDrop(PDrop.Options()).select(view).tolist() == [1]
    logits = torch.einsum("hd,hld->hl", query[:, 3], key[:, 1:3])
    assert int(logits.softmax(-1).mean(0).argmax()) == 0  # what a visual-only softmax would keep


def test_the_token_the_last_query_points_at_is_kept():
    rng = np.random.default_rng(3)
    view, query, key = make_view(rng, 8, 8, 5, 6, keep=3)
    probe = view.probe
    probe.key[:, probe.visual[41]] = probe.queries(torch.tensor([probe.last]))[:, 0] * 4  # aligned with the last query in every head
    assert 41 in PDrop(PDrop.Options()).select(view).tolist()


def test_tied_attention_keeps_torch_topks_pick():
    """The authors call .topk on the mean attention; with every query zero all visual tokens tie, and vtprune keeps
    what torch.topk returns (on the CPU not the lowest indices), in original order."""
    view, _, _ = make_view(np.random.default_rng(1), 8, 8, 5, 11, keep=16)
    view.probe.asking_query = torch.zeros_like(view.probe.asking_query)
    scores = last_token_attention([view.probe])[0, view.probe.visual]
    assert float(scores.max() - scores.min()) == 0
    assert PDrop(PDrop.Options()).select(view).tolist() == torch.topk(scores, 16).indices.sort().values.tolist()


def test_attention_is_scored_in_float32_at_least():
    """vtprune scores in float32 (the authors cast back to fp16): two visual tokens 1e-4 apart in logit, the same
    weight in float16, still rank the larger (the later token) first."""
    query, key = torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)
    query[0, 3, 0] = 1.0
    key[0, 1, 0], key[0, 2, 0] = 0.0, 1e-4
    probe = LayerProbe(asking_query=query, key=key, hidden=torch.zeros(4, 2), scaling=1.0, visual=torch.tensor([1, 2]),
                       text=torch.tensor([0, 3]), last=3)
    view = ImageView.of_grid(torch.zeros(2, 2), 1, 2, keep=1, layer=8, stage=0, image_index=0, sizes=torch.ones(2),
                             probe=probe)
    assert PDrop(PDrop.Options()).select(view).tolist() == [1]


def test_the_authors_schedule():
    pdrop = PDrop(PDrop.Options())
    # The released setting (layer_list [8,16,24], ratios 0.5/0.25/0.125 of 576) is the budget 72.
    assert [(s.layer, s.keep) for s in pdrop.stages(LLAVA_7B, 72, 576)] == [(8, 288), (16, 144), (24, 72)]
    # Other budgets: lambda = (R/N)^(1/3), each stage int(N lambda^s), the last exactly R.
    assert [s.keep for s in pdrop.stages(LLAVA_7B, 64, 576)] == [int(576 * (64 / 576) ** (1 / 3)),
                                                                 int(576 * (64 / 576) ** (2 / 3)), 64] == [276, 133, 64]
    assert [s.keep for s in pdrop.stages(LLAVA_7B, 192, 576)] == [399, 276, 192]
    assert [s.keep for s in pdrop.stages(LLAVA_7B, 128, 576)] == [348, 211, 128]
    assert [s.keep for s in pdrop.stages(LLAVA_7B, 1, 576)] == [69, 8, 1]
    assert [s.keep for s in pdrop.stages(LLAVA_7B, 576, 576)] == [576, 576, 576]
    assert [s.keep for s in pdrop.stages(LLAVA_7B, 2880 // 8, 2880)] == [1440, 720, 360]
    # Where N lambda^s is whole, float error (1000 x 0.729^(2/3) = 809.99...) must not truncate a token away.
    assert stage_counts(729, 1000, 3) == (900, 810, 729)
    assert stage_counts(18, 576, 5) == (288, 144, 72, 36, 18)
    assert [s.layer for s in pdrop.stages(QWEN_7B, 100, 1000)] == [7, 14, 21]
    assert [s.layer for s in pdrop.stages(ModelInfo("llava", 8), 8, 64)] == [2, 4, 6]
    # The authors' ratio list verbatim: int(N x ratio) of the original length, the budget ignored.
    verbatim = PDrop(PDrop.Options(ratios=(0.5, 0.25, 0.125)))
    assert [(s.layer, s.keep) for s in verbatim.stages(LLAVA_7B, 999, 576)] == [(8, 288), (16, 144), (24, 72)]
    assert [s.keep for s in verbatim.stages(LLAVA_7B, 999, 2000)] == [1000, 500, 250]
    custom = PDrop(PDrop.Options(layers=(2, 8, 16, 24), ratios=(0.581, 0.581**2, 0.581**3, 0.581**4)))
    assert [(s.layer, s.keep) for s in custom.stages(LLAVA_7B, 0, 576)] == [(2, 334), (8, 194), (16, 112), (24, 65)]


@pytest.mark.parametrize("n", [2, 7, 64, 576, 2880])
def test_fitted_counts_never_grow_and_end_at_the_budget(n):
    for budget in range(1, n + 1, max(1, n // 37)):
        counts = stage_counts(budget, n, 3)
        assert counts[-1] == budget and list(counts) == sorted(counts, reverse=True) and counts[0] <= n


@pytest.mark.parametrize("options, message", [
    ({"ratios": (0.5, 0.6, 0.1)}, "must not grow"),
    ({"ratios": (0.5, 0.25)}, "one ratio per stage"),
    ({"ratios": (1.5, 0.5, 0.25)}, r"in \(0, 1\]"),
    ({"layers": (0, 4)}, ">= 1"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        PDrop.parse_options(options)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, PDrop.name, PDrop)


def test_through_the_engine_stage_one_is_the_unpruned_models_own_attention(registered):
    """On a tiny 8-layer LLaVA (stages before layers 2/4/6), the first stage keeps the tokens the unpruned eager
    model's layer-2 attention ranks highest from the last prompt token, and the counts follow the schedule."""
    from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

    model = tiny_llava("eager", layers=8)
    inputs = tiny_inputs(model, [SampleLayout(images=1, text_before=3)])
    with torch.no_grad():
        attention = model(**inputs, output_attentions=True).attentions[2][0].mean(0)[-1]
        image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
        expected = image[torch.topk(attention[image], 32).indices].sort().values
        with vtprune.apply(model, "pdrop", 8) as pruner:
            model(**inputs)
    assert pruner.last_stats.visual_tokens_per_layer[0] == [64, 64, 32, 32, 16, 16, 8, 8]
    assert pruner.last_decision.kept[0][0].sort().values.tolist() == expected.tolist()
