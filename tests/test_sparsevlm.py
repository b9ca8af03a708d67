"""SparseVLM against an independent numpy reading of the authors' v1.5 code, its schedule, and its behaviour."""

import numpy as np
import pytest
import torch

from vtprune.methods import ImageView, LayerProbe, ModelInfo, Selection, Stage
from vtprune.methods.sparsevlm import (SparseVLM, choose_raters, density_peak_clusters, pairwise_distance, split_keep,
                                       tokens_after)

from .picks import assert_same_pick

LLAVA_7B = ModelInfo("llava", 32)


# ------------------------------------------------------- the authors' code, in numpy (Gumpest/SparseVLMs @ v1.5)

def softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def authors_raters(embeds, v_start, v_num):
    """LlamaDynamicvitModel.forward: m_v_t = v_t @ t_t^T, softmax(2).mean(1), t_token_idx = where(m > m.mean()),
    on the LLM's input embeddings; t_t = every token after the image. Returns offsets from the text start."""
    v_t, t_t = embeds[v_start:v_start + v_num], embeds[v_start + v_num:]
    m = softmax(v_t @ t_t.T, axis=1).mean(axis=0)
    return np.nonzero(m > m.mean())[0]


def authors_cluster_and_merge(x, cluster_num):
    """utils.cluster_and_merge (DPC-kNN) without its 1e-6 noise, with the plain mean (its 1e-6 in the
    denominator vanishes in fp16): the documented deviations. Returns (merged [c, C], index_down, idx_cluster)."""
    n, c = x.shape
    dist = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1) / c ** 0.5
    dist_nearest = np.sort(dist, axis=-1)[:, :cluster_num]
    density = np.exp(-(dist_nearest ** 2).mean(axis=-1))
    mask = (density[None, :] > density[:, None]).astype(x.dtype)
    dist_max = dist.max()
    parent = (dist * mask + dist_max * (1 - mask)).min(axis=-1)
    score = parent * density
    index_down = np.argsort(-score, kind="stable")[:cluster_num]
    idx_cluster = dist[index_down].argmin(axis=0)
    idx_cluster[index_down] = np.arange(cluster_num)
    counts = np.bincount(idx_cluster, minlength=cluster_num).astype(x.dtype)
    merged = np.zeros((cluster_num, c))
    np.add.at(merged, idx_cluster, x / counts[idx_cluster][:, None])
    return merged, index_down, idx_cluster


def authors_sparse_layer(query, key, scaling, v_start, v_num, t_idx, count, visual_out):
    """One sparse layer: attn_postprocess_topk on the layer's own (causal, head-averaged) attention, then the
    recycling of LlamaDynamicvitModel.forward on the layer's output. Returns (kept view indices, clusters as
    (member view indices, merged value, centre view index))."""
    length = query.shape[1]
    logits = np.einsum("hqd,hkd->hqk", query, key) * scaling
    logits = np.where(np.triu(np.ones((length, length), bool), 1)[None], -np.inf, logits)
    attention = softmax(logits, axis=-1).mean(axis=0)  # self_attn_weights.mean(1)
    text_start = v_start + v_num
    return authors_stage(attention, np.arange(v_start, v_start + v_num), t_idx + text_start, count, visual_out)


def authors_stage(attention, visual, raters, count, visual_out):
    """The sparse layer's choice from its head-averaged attention [L, L]: rows `visual` the image's tokens (in
    order), rows `raters` the raters; visual_out [v_num, C] the layer's output at the image's tokens."""
    v_num = len(visual)
    relation = attention[raters][:, visual].mean(axis=0)
    top = np.argsort(-relation, kind="stable")[:min(count, v_num - 1)]
    mask = np.zeros(v_num, bool)
    mask[top] = True
    dropped = np.nonzero(~mask)[0]  # where(pred_score_vis == 0): ascending
    merge_num = int(dropped.shape[0] * 0.3) + 1
    stage2 = dropped[np.argsort(-relation[dropped], kind="stable")[:merge_num]]  # topk order
    cluster_num = int(stage2.shape[0] / 10) + 1
    merged, index_down, idx_cluster = authors_cluster_and_merge(visual_out[stage2], cluster_num)
    clusters = [(set(stage2[idx_cluster == j].tolist()), merged[j], int(stage2[index_down[j]]))
                for j in range(cluster_num)]
    return np.nonzero(mask)[0], clusters, relation


# ---------------------------------------------------------------- hand-built views

def make_case(seed, pre=5, n0=48, n=48, text=9, heads=4, head_dim=8, width=16, embed_width=12):
    """A sample [pre-prompt | n visual | text] at a probed layer, its LLM-input embeddings (the image's
    original n0 tokens, then pre-prompt and text), and the stage layer's input hidden states of the n tokens."""
    rng = np.random.default_rng(seed)
    length = pre + n + text
    case = dict(
        query=rng.standard_normal((heads, length, head_dim)).astype(np.float32),
        key=rng.standard_normal((heads, length, head_dim)).astype(np.float32),
        scaling=head_dim ** -0.5,
        visual_out=rng.standard_normal((n, width)).astype(np.float32),
        item_embeds=rng.standard_normal((n0, embed_width)).astype(np.float32),
        pre_embeds=rng.standard_normal((pre, embed_width)).astype(np.float32),
        text_embeds=rng.standard_normal((text, embed_width)).astype(np.float32),
        pre=pre, n=n, text=text,
    )
    return case


def make_view(case, keep, stage=0, layer=3):
    pre, n, text = case["pre"], case["n"], case["text"]
    length = pre + n + text
    probe = LayerProbe(
        asking_query=torch.from_numpy(case["query"]), key=torch.from_numpy(case["key"]),
        hidden=torch.zeros(length, 4), scaling=case["scaling"],
        visual=torch.arange(pre, pre + n), text=torch.cat([torch.arange(pre), torch.arange(pre + n, length)]),
        last=length - 1,
    )
    view = ImageView.of_grid(torch.from_numpy(case["visual_out"]), 1, n, keep=keep, layer=layer, stage=stage,
                             image_index=0, sizes=torch.ones(n), probe=probe)
    if stage:  # not a whole grid any more: survivors, arbitrary coordinates
        view.coords = torch.stack([torch.zeros(n), torch.zeros(n), torch.arange(n)], -1).long()
    # The LLM-input embeddings the raters are chosen from (fields the engine is asked to add to ImageView).
    view.item_reference = torch.from_numpy(case["item_embeds"])
    view.text_reference = torch.from_numpy(np.concatenate([case["pre_embeds"], case["text_embeds"]]))
    return view


def authors_on(case, count):
    """The authors' stage on the same tensors: raters from [image's original tokens | text after it] (their
    sequence at the LLM input), attention of the probed layer, recycling on the stage layer's input."""
    embeds0 = np.concatenate([case["item_embeds"], case["text_embeds"]])
    t_idx = authors_raters(embeds0, 0, case["item_embeds"].shape[0])
    return authors_sparse_layer(case["query"], case["key"], case["scaling"], case["pre"], case["n"], t_idx, count,
                                case["visual_out"])


def check_against_authors(selection, case, count):
    kept, clusters, _ = authors_on(case, count)
    n = case["n"]
    assert isinstance(selection, Selection)
    keep = selection.keep.tolist()
    assert len(set(keep)) == len(keep) == count + len(clusters)
    centres = {centre for _, _, centre in clusters}
    assert set(keep) == set(kept.tolist()) | centres
    destination = selection.destination
    for i in kept.tolist():  # kept tokens carry on unchanged, in their own slot
        slot = keep.index(i)
        assert destination[i] == slot
        torch.testing.assert_close(selection.hidden[slot], torch.from_numpy(case["visual_out"][i]))
        assert float(selection.sizes[slot]) == 1.0
    recycled = set()
    for members, merged, centre in clusters:
        slot = keep.index(centre)  # a cluster token sits at its DPC centre (the documented representative)
        assert set(torch.nonzero(destination == slot).flatten().tolist()) == members
        np.testing.assert_allclose(selection.hidden[slot].numpy(), merged, rtol=1e-5, atol=1e-6)
        assert float(selection.sizes[slot]) == len(members)
        recycled |= members
    discarded = set(range(n)) - set(kept.tolist()) - recycled
    assert set(torch.nonzero(destination == -1).flatten().tolist()) == discarded
    assert len(recycled) == int((n - count) * 0.3) + 1


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n, count", [(48, 1), (48, 16), (48, 24), (48, 40), (48, 46), (40, 20), (120, 30),
                                      (120, 66), (13, 6)])
def test_a_stage_is_the_authors(seed, n, count):
    case = make_case(seed * 100 + n, n0=n, n=n)
    keep = tokens_after(n, count, 0.3, 10)
    view = make_view(case, keep)
    assert split_keep(n, keep, 0.3, 10) == (count, keep - count)
    check_against_authors(SparseVLM(SparseVLM.Options()).select(view), case, count)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_later_stage_rates_with_the_raters_of_the_original_image(seed):
    """At stage 1 the view holds survivors (and cluster tokens) but the raters are still those chosen from the
    image's 64 original tokens at the LLM input, found by their offset from the text's start."""
    case = make_case(seed + 7, n0=64, n=30, pre=3, text=11)
    for count in (1, 10, 20, 28):
        view = make_view(case, tokens_after(30, count, 0.3, 10), stage=1, layer=7)
        check_against_authors(SparseVLM(SparseVLM.Options()).select(view), case, count)


@pytest.mark.parametrize("recycle", [True, False])
def test_a_batch_of_views_is_each_view_alone(recycle):
    """select_batch stacks the views of one size and keep (each with its own raters); a view of another size,
    a view kept whole and a view too small to recycle are grouped apart. Each pick equals its view alone."""
    method = SparseVLM(SparseVLM.Options(recycle=recycle))
    cases = [make_case(40 + s, n0=48, n=48, text=7 + s) for s in range(3)] + [make_case(50, n0=30, n=30)]
    views = [make_view(case, tokens_after(case["n"], 16, 0.3, 10)) for case in cases]
    views += [make_view(make_case(51), 48), make_view(make_case(52), 1)]
    low = make_view(make_case(53, n0=48, n=48, text=7), tokens_after(48, 16, 0.3, 10))
    low.hidden = low.hidden.to(torch.bfloat16)  # one shape, another dtype: not stacked with the float32 views
    views.append(low)
    for view, pick in zip(views, method.select_batch(views), strict=True):
        assert_same_pick(pick, method.select(view))
    if recycle:
        for case, pick in zip(cases, method.select_batch(views)):
            check_against_authors(pick, case, 16)


def test_the_score_is_the_raters_attention():
    case = make_case(11)
    view = make_view(case, 20)
    _, _, relation = authors_on(case, 10)
    np.testing.assert_allclose(SparseVLM(SparseVLM.Options()).score(view).numpy(), relation, rtol=1e-5, atol=1e-7)


def test_keep_n_minus_one_recycles_one_token_and_discards_one():
    case = make_case(3, n0=40, n=40)
    view = make_view(case, 39)
    assert split_keep(40, 39, 0.3, 10) == (38, 1)  # 2 dropped: int(0.6) + 1 = 1 recycled into 1 cluster
    selection = SparseVLM(SparseVLM.Options()).select(view)
    check_against_authors(selection, case, 38)
    assert int((selection.destination == -1).sum()) == 1


def test_equal_scores_go_to_the_lower_index():
    """Zero queries: every rater attends uniformly, so the visual tokens' scores are equal (summed in float64,
    they stay exactly equal) and the first ones are kept."""
    case = make_case(6)
    case["query"][:] = 0
    picked = SparseVLM(SparseVLM.Options(recycle=False)).select(make_view(case, 16))
    assert picked.tolist() == list(range(16))


def test_a_view_kept_whole_needs_no_probe():
    case = make_case(7)
    view = make_view(case, 48)
    view.probe = view.item_reference = view.text_reference = None
    assert SparseVLM(SparseVLM.Options()).select(view).tolist() == list(range(48))


def test_keep_one_is_plain_top_one():
    """Below 1 + clusters(N - 1) the authors' recycling cannot fit: the documented fallback keeps the top tokens."""
    case = make_case(4)
    _, _, relation = authors_on(case, 10)
    method = SparseVLM(SparseVLM.Options())
    assert split_keep(48, 1, 0.3, 10) == (1, 0)
    assert method.select(make_view(case, 1)).tolist() == [int(np.argmax(relation))]
    picked = method.select(make_view(case, 48))
    assert picked.tolist() == list(range(48))


def test_without_recycling_it_is_plain_top_k():
    case = make_case(5)
    _, _, relation = authors_on(case, 10)
    method = SparseVLM(SparseVLM.Options(recycle=False))
    assert method.select(make_view(case, 12)).tolist() == sorted(np.argsort(-relation)[:12].tolist())
    assert [s.keep for s in method.stages(LLAVA_7B, 192, 576)] == [300, 200, 110]


# ---------------------------------------------------------------- the schedule

def authors_token_counts(counts, n=576):
    """The visual tokens after each sparse layer in the authors' loop: v_token_num = kept + cluster_num."""
    out = []
    for count in counts:
        k = min(count, n - 1)
        merge_num = int((n - k) * 0.3) + 1
        n = k + int(merge_num / 10) + 1
        out.append(n)
    return out


@pytest.mark.parametrize("budget, counts", [(192, (300, 200, 110)), (128, (303, 110, 36)), (64, (66, 30, 17))])
def test_the_authors_schedule(budget, counts):
    method = SparseVLM(SparseVLM.Options())
    stages = method.stages(LLAVA_7B, budget, 576)
    assert [s.layer for s in stages] == [3, 7, 16]  # after the sparse layers 2, 6, 15
    assert [s.keep for s in stages] == authors_token_counts(counts)
    n = 576
    for stage, count in zip(stages, counts):  # select splits each keep back into the authors' count + clusters
        assert split_keep(n, stage.keep, 0.3, 10)[0] == count
        n = stage.keep


def llava_of_576_tokens(layers=32):
    """A tiny LLaVA-1.5 with LLaVA-1.5's 24 x 24 visual tokens and 32 decoder layers, and a prompt of one image."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vtprune.tiny import IMAGE_TOKEN

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=168, patch_size=7),
        text_config=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                pad_token_id=0),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        attn_implementation="sdpa")
    model = LlavaForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 6, 7] + [IMAGE_TOKEN] * 576 + [8, 9, 10, 11]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 168, 168)}
    return model, inputs


def test_schedule_numbers_and_equivalent_budgets():
    method = SparseVLM(SparseVLM.Options())
    keeps = {b: [s.keep for s in method.stages(LLAVA_7B, b, 576)] for b in (192, 128, 64)}
    assert keeps == {192: [309, 204, 113], 128: [312, 117, 39], 64: [82, 32, 18]}
    # Through the engine on a 32-layer LLaVA of 576 visual tokens: layers 0-2 run on 576, 3-6 on K1, 7-15 on K2,
    # 16-31 on K3, and the stats' equivalent budget is their mean (the module docstring's numbers).
    import vtprune

    model, inputs = llava_of_576_tokens()
    documented = {192: 206.5, 128: 145.40625, 64: 82.25}
    for budget, (k1, k2, k3) in keeps.items():
        with torch.no_grad(), vtprune.apply(model, "sparsevlm", budget) as pruner:
            model(**inputs)
            stats = pruner.last_stats
        assert stats.visual_tokens_per_layer == [[576] * 3 + [k1] * 4 + [k2] * 9 + [k3] * 16]
        assert stats.equivalent_budget == documented[budget]
        # The authors' printed "equal token num" counts each sparse layer (2, 6, 15) with its pruned count: the
        # same layers' counts one layer earlier, within a token of their retained_tokens label.
        layers = stats.visual_tokens_per_layer[0]
        theirs = sum(layers[1:] + layers[-1:]) / len(layers)
        assert round(theirs, 1) == {192: 192.0, 128: 128.6, 64: 64.8}[budget] and abs(theirs - budget) < 1


def test_other_budgets_and_sizes():
    method = SparseVLM(SparseVLM.Options())
    counts = lambda budget, n: [split_keep(prev, s.keep, 0.3, 10)[0]  # noqa: E731
                                for prev, s in zip([n] + [s.keep for s in method.stages(LLAVA_7B, budget, n)],
                                                   method.stages(LLAVA_7B, budget, n))]
    assert counts(384, 1152) == [600, 400, 220]  # the 192 point's retain ratio: the schedule x 2
    assert counts(64, 576) == [66, 30, 17]
    # Between the points, linear in the retain ratio: 100 is 36/64 of the way from 64 to 128.
    assert counts(100, 576) == [round(66 + 36 / 64 * 237), round(30 + 36 / 64 * 80), round(17 + 36 / 64 * 19)]
    assert counts(40, 576) == [41, 19, 11]  # below 64/576: proportional (5/8 of 66/30/17: 41.25, 18.75, 10.6)
    assert counts(288, 576) == [450, 300, 165]  # above 192/576: proportional to the 192 point
    stages = method.stages(LLAVA_7B, 1, 576)
    assert all(s.keep >= 1 for s in stages)
    assert method.stages(LLAVA_7B, 1, 2) == [Stage(3, 2), Stage(7, 2), Stage(16, 2)]  # 1 dropped, 1 recycled: a no-op
    assert [s.layer for s in method.stages(ModelInfo("qwen2_vl", 28), 100, 576)] == [3, 6, 14]
    assert [s.layer for s in method.stages(ModelInfo("llava", 4), 10, 64)] == [1, 2, 3]
    custom = SparseVLM(SparseVLM.Options(layers=(2, 5), counts=(40, 10)))
    assert custom.stages(LLAVA_7B, 64, 64) == [Stage(2, 40 + 1), Stage(5, 10 + 2)]  # 24 -> 8 -> 1; 31 -> 10 -> 2


def test_split_keep_inverts_tokens_after():
    for n in range(2, 80):
        for count in range(1, n):
            keep = tokens_after(n, count, 0.3, 10)
            found, clusters = split_keep(n, keep, 0.3, 10)
            if keep >= n:  # dropping one token and recycling it: nothing to do
                assert (found, clusters) == (n, 0)
                continue
            assert found + clusters == keep and found >= count
            assert tokens_after(n, found, 0.3, 10) == keep
            assert found == count or tokens_after(n, count + 1, 0.3, 10) == keep  # only on a flat step


@pytest.mark.parametrize("options, message", [
    ({"layers": (3, 7), "counts": (10,)}, "one count per stage"),
    ({"counts": (0, 1, 1)}, ">= 1"),
    ({"recycle_ratio": 1.0}, "recycle_ratio"),
    ({"cluster_divisor": 1}, "cluster_divisor"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        SparseVLM.parse_options(options)


# ---------------------------------------------------------------- behaviour

def test_raters_are_the_text_tokens_close_to_the_image():
    rng = np.random.default_rng(0)
    visual = rng.standard_normal((30, 8)) * 0.1 + np.eye(8)[0] * 2
    text = rng.standard_normal((6, 8)) * 0.1
    text[[1, 4]] += np.eye(8)[0] * 2  # two text tokens point where the image does
    raters = choose_raters(torch.from_numpy(visual), torch.from_numpy(text))
    assert raters.tolist() == [False, True, False, False, True, False]
    embeds = np.concatenate([visual, text])
    assert authors_raters(embeds, 0, 30).tolist() == [1, 4]
    flat = choose_raters(torch.from_numpy(visual), torch.zeros(3, 8))  # no token above the mean: all rate
    assert flat.tolist() == [True, True, True]


def test_only_raters_after_the_image_move_the_score():
    case = make_case(21)
    method = SparseVLM(SparseVLM.Options())
    view = make_view(case, 20)
    base = method.score(view)
    pre, n = case["pre"], case["n"]
    embeds0 = np.concatenate([case["item_embeds"], case["text_embeds"]])
    raters = authors_raters(embeds0, 0, n) + pre + n
    others = sorted(set(range(pre + n, pre + n + case["text"])) - set(raters.tolist()))
    assert raters.size and others
    moved = dict(case, query=case["query"].copy(), pre_embeds=case["pre_embeds"] * 5)
    moved["query"][:, others] *= -3  # non-raters' queries, and the system prompt's embeddings and queries
    moved["query"][:, :pre] *= -3
    torch.testing.assert_close(method.score(make_view(moved, 20)), base)
    moved["query"][:, raters[0]] *= -3
    assert not torch.allclose(method.score(make_view(moved, 20)), base)


def test_with_no_text_after_the_item_all_text_rates():
    case = make_case(22, text=0, pre=6)
    view = make_view(case, 20)
    embeds0 = np.concatenate([case["item_embeds"], case["pre_embeds"]])
    t_idx = authors_raters(embeds0, 0, case["n"])  # the prompt's text is all before the image
    length = case["pre"] + case["n"]
    logits = np.einsum("hqd,hkd->hqk", case["query"], case["key"]) * case["scaling"]
    logits = np.where(np.triu(np.ones((length, length), bool), 1)[None], -np.inf, logits)
    attention = softmax(logits, -1).mean(0)[t_idx][:, case["pre"]:].mean(0)  # causal: they see no visual token
    np.testing.assert_allclose(SparseVLM(SparseVLM.Options()).score(view).numpy(), attention, atol=1e-7)


def test_density_peaks_find_separate_blobs():
    rng = np.random.default_rng(1)
    blobs = np.concatenate([rng.standard_normal((7, 5)) * 0.01 + 3, rng.standard_normal((5, 5)) * 0.01 - 3])
    centres, assignment = density_peak_clusters(torch.from_numpy(blobs).float(), 3)
    assert {int(c) < 7 for c in centres} == {True, False}  # a centre in each blob
    first = set(assignment[:7].tolist())
    assert first.isdisjoint(assignment[7:].tolist())  # no cluster spans both
    _, index_down, idx_cluster = authors_cluster_and_merge(blobs, 3)
    assert centres.tolist() == index_down.tolist() and assignment.tolist() == idx_cluster.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_density_peaks_on_scattered_tokens_are_the_authors(seed):
    """Tokens with no clear blobs, many clusters: the densities (exp of minus the mean squared distance to the
    nearest) spread out, so which tokens become centres depends on every step of the rule."""
    rng = np.random.default_rng(seed)
    members, clusters = int(rng.integers(60, 121)), int(rng.integers(4, 13))
    x = rng.standard_normal((members, 16)) * rng.uniform(0.5, 2.0, size=(members, 1))
    centres, assignment = density_peak_clusters(torch.from_numpy(x), clusters)
    _, index_down, idx_cluster = authors_cluster_and_merge(x, clusters)
    assert centres.tolist() == index_down.tolist() and assignment.tolist() == idx_cluster.tolist()


def test_density_ties_are_kept_as_the_authors_fp16_keeps_them():
    """With 2 clusters a token's density uses itself and its nearest neighbour, so mutual nearest neighbours tie
    exactly; neither is 'denser', and both can be centres even inside one blob (the authors' 1e-6 noise does
    not survive fp16 densities near 1). The numpy reading without noise agrees."""
    rng = np.random.default_rng(1)
    blobs = np.concatenate([rng.standard_normal((7, 5)) * 0.01 + 3, rng.standard_normal((5, 5)) * 0.01 - 3])
    centres, assignment = density_peak_clusters(torch.from_numpy(blobs).float(), 2)
    _, index_down, idx_cluster = authors_cluster_and_merge(blobs, 2)
    assert centres.tolist() == index_down.tolist() and assignment.tolist() == idx_cluster.tolist()
    one, everything = density_peak_clusters(torch.from_numpy(blobs).float(), 1)
    assert one.tolist() == [0] and everything.tolist() == [0] * 12  # all densities 1: the first (top-scored)


def test_selection_bookkeeping():
    """Slots in ascending token order; every slot is some token's destination; a slot's value is the plain mean
    of the tokens sent to it and its size their sizes' sum (sizes are bookkeeping, not merge weights)."""
    case = make_case(23, n0=20, n=20)
    view = make_view(case, tokens_after(20, 5, 0.3, 10))
    view.sizes = torch.arange(1, 21).float()
    selection = SparseVLM(SparseVLM.Options()).select(view)
    assert selection.keep.tolist() == sorted(selection.keep.tolist())
    assert set(selection.destination[selection.destination >= 0].tolist()) == set(range(selection.keep.numel()))
    for slot in range(selection.keep.numel()):
        members = torch.nonzero(selection.destination == slot).flatten()
        assert int(selection.keep[slot]) in members.tolist()
        assert float(selection.sizes[slot]) == float(view.sizes[members].sum())
        torch.testing.assert_close(selection.hidden[slot], view.hidden[members].mean(dim=0))


def test_low_precision_hidden_states():
    case = make_case(24)
    view = make_view(case, tokens_after(48, 20, 0.3, 10))
    view.hidden = view.hidden.to(torch.bfloat16)
    selection = SparseVLM(SparseVLM.Options()).select(view)
    assert selection.hidden.dtype == torch.bfloat16 and selection.keep.numel() == view.keep


def test_it_says_what_it_needs():
    case = make_case(25)
    view = make_view(case, 20)
    del view.item_reference
    with pytest.raises(ValueError, match="item_reference"):
        SparseVLM(SparseVLM.Options()).select(view)
    assert SparseVLM.probe_layer == "previous" and SparseVLM.needs_reference
    assert SparseVLM(SparseVLM.Options()).reference_layer(LLAVA_7B, "image") == 0
    assert not SparseVLM(SparseVLM.Options()).slices_kv_cache


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_through_the_engine_each_layer_runs_on_the_scheduled_tokens(family, monkeypatch):
    import vtprune
    from vtprune.methods import REGISTRY
    from vtprune.tiny import SampleLayout, tiny_inputs

    from .conftest import FAMILIES, SUPPRESS

    monkeypatch.setitem(REGISTRY, SparseVLM.name, SparseVLM)
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(images=1, text_before=5)])
    with torch.no_grad(), vtprune.apply(model, "sparsevlm", 20) as pruner:
        model(**inputs)
        stats, decision = pruner.last_stats, pruner.last_decision
        model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)
    layers = len(model.model.language_model.layers)
    for counts in stats.visual_tokens_per_layer:
        assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0]
    if family == "llava":  # 64 tokens an image: layer 0 runs on all, each later layer on its stage's count
        per_image = [64] + [s.keep for s in SparseVLM(SparseVLM.Options()).stages(ModelInfo(family, layers), 20, 64)]
        assert decision.stage_layers == [1, 2, 3]
        assert stats.visual_tokens_per_layer == [[2 * k for k in per_image], per_image]


# A prompt's items and text, read from its ids and the LLM's input embeddings alone (not from the engine).
# Top-k counts of the 3 stages (the authors' score.py knob), for items of 24 to 80 tokens: at each stage count + 1
# gives more tokens than count (where both give the same, vtprune runs count + 1: a documented deviation).
ENGINE_COUNTS = (15, 8, 4)


def prompt_items(model, inputs, embeds):
    """Per sample: (its items' positions, each a run of visual placeholders in order, LLaVA-NeXT's newlines left
    out; its text positions: neither a placeholder nor padding)."""
    config = model.config
    placeholders = torch.tensor([t for t in (config.image_token_id, getattr(config, "video_token_id", None))
                                 if t is not None])
    newline = getattr(model.model, "image_newline", None)
    per_sample = []
    for b, (ids, mask) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"].bool())):
        visual = (torch.isin(ids, placeholders) & mask).tolist()
        items, at = [], 0
        while at < len(visual):
            if not visual[at]:
                at += 1
                continue
            end = at
            while end < len(visual) and visual[end]:
                end += 1
            run = torch.arange(at, end)
            if newline is not None:  # a newline's LLM input is the model's image_newline itself
                run = run[~(embeds[b, run] == newline.to(embeds.dtype)).all(dim=-1)]
            items.append(run)
            at = end
        text = torch.nonzero(mask & ~torch.isin(ids, placeholders)).flatten()
        per_sample.append((items, text))
    return per_sample


def reference_raters(embeds, item, text):
    """Positions of the item's raters: the authors' choice among the text after the item (all the text if none
    follows; all candidates if the relevance is flat), on the LLM's input embeddings [L, D] of the sample."""
    after = text[text > item.max()]
    candidates = after if after.numel() else text
    chosen = authors_raters(np.concatenate([embeds[item], embeds[candidates]]), 0, item.numel())
    return candidates[chosen] if chosen.size else candidates


def reference_stage_at(attention, rows, item, raters, count, hidden):
    """The authors' stage on one sample's layer tensors: attention [H, L, L] over the rows (their prompt
    positions `rows` [L]), hidden [L, D] the stage layer's input; item / raters: prompt positions. Returns (the
    item's positions after the stage: kept and cluster centres; {centre: set of member positions})."""
    where = {int(p): i for i, p in enumerate(rows.tolist())}
    visual = np.array([where[int(p)] for p in item])
    rater_rows = np.array([where[int(p)] for p in raters])
    kept, clusters, _ = authors_stage(attention.double().mean(dim=0).numpy(), visual, rater_rows, count,
                                      hidden[visual].double().numpy())
    item = item.numpy()
    merged = {int(item[centre]): {int(item[m]) for m in members} for members, _, centre in clusters}
    return set(item[kept].tolist()) | set(merged), merged


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_through_the_engine_each_stage_is_the_authors_on_the_models_own_tensors(family, attn, padding_side):
    """Through vtprune.apply (two images in one sample: each rates with the text after it), every item's tokens
    after the first stage, and the tokens merged into each cluster, equal the authors' stage fed the unpruned
    eager model's own tensors: the raters from the LLM's input embeddings, the scores from the attention the layer
    before the stage returns (output_attentions), the clusters on that layer's output. On eager, the later stages
    likewise on the attention and hidden states the pruned model's own layers return."""
    import vtprune
    from vtprune.tiny import SampleLayout, tiny_inputs

    from .conftest import FAMILIES

    model = FAMILIES[family](attn)
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(images=1, text_before=5, text_after=6)],
                         padding_side=padding_side)
    with torch.no_grad(), vtprune.apply(model, "sparsevlm", 20, counts=ENGINE_COUNTS) as pruner:
        pruned = model(**inputs, output_attentions=attn == "eager", output_hidden_states=attn == "eager")
        decision = pruner.last_decision
    with torch.no_grad():
        plain = FAMILIES[family]("eager")(**inputs, output_attentions=True, output_hidden_states=True)
    embeds = plain.hidden_states[0]
    stages = decision.stage_layers
    assert stages == [1, 2, 3]  # after the authors' sparse layers 2/6/15 of 32, scaled to the 4-layer decoders
    for b, (items, text) in enumerate(prompt_items(model, inputs, embeds)):
        assert len(items) == (2 if b == 0 else 1) and text.numel()
        rows = torch.nonzero(inputs["attention_mask"][b]).flatten()
        attention = plain.attentions[stages[0] - 1][b][:, rows][:, :, rows]
        hidden = plain.hidden_states[stages[0]][b, rows]
        raters = [reference_raters(embeds[b].double().numpy(), item, text) for item in items]  # once per prompt
        before = items
        for s, (layer, count) in enumerate(zip(stages, ENGINE_COUNTS)):
            if s:  # the pruned run's own tensors at the rows its layers ran on (fill slots left out)
                if attn != "eager":
                    break
                rows = decision.positions_at(layer - 1)[b]
                attention = pruned.attentions[layer - 1][b][:, rows >= 0][:, :, rows >= 0]
                hidden = pruned.hidden_states[layer][b, rows >= 0]
                rows = rows[rows >= 0]
            kept = decision.kept[s][b]
            sources, targets = decision.moved[s][b]
            after = []
            for item, its_raters in zip(before, raters):
                expected, merged = reference_stage_at(attention, rows, item, its_raters, count, hidden)
                mine = kept[torch.isin(kept, item)]
                assert set(mine.tolist()) == expected, (s, b, int(item[0]))
                assert len(expected) < item.numel()
                for centre, members in merged.items():
                    assert set(sources[targets == centre].tolist()) == members, (s, b, centre)
                after.append(mine.sort().values)
            assert kept.numel() == sum(item.numel() for item in after)
            before = after


def test_ties_go_to_the_lower_index():
    case = make_case(26)
    case["query"][:] = 0  # every rater attends uniformly: every visual token scores the same
    plain = SparseVLM(SparseVLM.Options(recycle=False)).select(make_view(case, 5))
    assert plain.tolist() == [0, 1, 2, 3, 4]
    selection = SparseVLM(SparseVLM.Options()).select(make_view(case, tokens_after(48, 10, 0.3, 10)))
    assert (selection.destination[:10] == torch.arange(10)).all()  # the first ten kept, in their own slots
    recycled = torch.nonzero(selection.destination[10:] >= 0).flatten() + 10
    assert recycled.tolist() == list(range(10, 10 + int(38 * 0.3) + 1))  # then the next by index are recycled


def test_pairwise_distances_are_exact_to_float32_rounding():
    """The Gram route (float64) against every pair subtracted in float64, on states far from the origin (where a
    float32 Gram matrix loses most digits): within float32 rounding, exactly symmetric, zero on the diagonal."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 60, 256, generator=generator) * 3 + torch.randn(256, generator=generator) * 30
    exact = (x.double()[:, :, None] - x.double()[:, None]).norm(dim=-1)
    distance = pairwise_distance(x)
    assert distance.dtype == torch.float32
    assert torch.equal(distance, distance.transpose(1, 2))
    assert not distance.diagonal(dim1=1, dim2=2).any()
    off = ~torch.eye(60, dtype=torch.bool)
    assert float(((distance.double() - exact).abs() / exact)[:, off].max()) <= 2 ** -24
