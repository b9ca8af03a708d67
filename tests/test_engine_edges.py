"""Layouts and turns the other engine tests do not reach (found by a mutation audit of the engine: each test here
fails under a bug that every other test let through): a filled sample that starts with its image, a batch with no
padding but fill slots, an index one past the end, a follow-up turn with holes in its mask, a follow-up after
prompt-lookup decoding, a reset cache reused, Qwen's non-square grids, rounding of fractional budgets, a method
pruning at the LLM input and again inside it, OneVision's multi-image samples, a query that may see no key."""

import pytest
import torch

import vtprune
from vtprune.adapters import adapter_for
from vtprune.engine import tokens_for_budget
from vtprune.engine.cache import cache_keyword, output_cache
from vtprune.methods import LLM_INPUT, REGISTRY, Stage
from vtprune.tiny import SampleLayout, tiny_inputs

from .conftest import FAMILIES, greedy
from .test_engine_conversation import LAYOUTS, grown, recomputed_logits
from .test_engine_invariants import PLACEHOLDERS, sample_alone, split_vision
from .test_engine_video import assert_kept_tokens_keep_their_rope


# a left-filled sample that starts with its image
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method, options", [("uniform", {}), ("fastv", {"layer": 2})])
def test_a_filled_sample_starting_with_its_image_equals_itself_alone_at_every_position(family, attn, method, options):
    """Right padding, and the sample that keeps fewer tokens (so is left-filled) starts with its image: fill slots
    must neither be counted as visual tokens (Layout.count) nor land on position 0 (prefill.finish). Every real
    position's logits, pruned ones included (zero states in both), equal the sample's own."""
    model = FAMILIES[family](attn)
    samples = [SampleLayout(images=2, text_before=0), SampleLayout(images=1)]
    inputs = tiny_inputs(model, samples, padding_side="right")
    shares = split_vision(model, inputs, samples)
    with vtprune.apply(model, method, 4, **options) as pruner:
        batch = model(**inputs).logits
        per_image = pruner.last_stats.visual_tokens_per_sample[1]
        assert pruner.last_stats.kept_per_sample == [8, 4]
        assert 0 not in pruner.last_decision.kept[-1][0].tolist()  # position 0: a dropped visual token
        assert per_image > 4
        for b in range(2):
            alone = model(**dict(sample_alone(inputs, b), **shares[b])).logits[0]
            real = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batch[b, real], alone, atol=1e-5, rtol=0)


# no padding, but left-filled layouts
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_an_unpadded_batch_with_different_kept_counts_masks_its_fill_slots(family):
    """Equal lengths (no padding anywhere), but one sample keeps fewer tokens: its fill slots must be masked under
    sdpa too (decoder_mask may return None only where no key is invalid)."""
    model = FAMILIES[family]("sdpa")
    probe = tiny_inputs(model, [SampleLayout(images=1)])
    length = probe["input_ids"].shape[1]
    samples = [SampleLayout(images=1), SampleLayout(images=0, text_before=length - 4, text_after=4)]
    inputs = tiny_inputs(model, samples)
    assert bool(inputs["attention_mask"].all())
    shares = split_vision(model, inputs, samples)
    with vtprune.apply(model, "fastv", 6, layer=2):
        batch = model(**inputs).logits
        for b in range(2):
            alone = model(**dict(sample_alone(inputs, b), **shares[b])).logits[0]
            text = ~torch.isin(inputs["input_ids"][b], PLACEHOLDERS)
            torch.testing.assert_close(batch[b, text], alone[text], atol=1e-5, rtol=0)


# a query that may see no key
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("late", [False, True])
def test_a_query_that_may_see_nothing_sees_itself(implementation, late):
    """Padding and fill queries have no valid key. CPU kernels give such a softmax row zeros, fused CUDA ones may
    give NaN, which a zero attention weight does not cancel in later layers: so no row of the mask may be empty,
    and the row that sees nothing sees exactly its own key. Held on the mask itself, since on the CPU the logits
    cannot tell."""
    from vtprune.engine.layout import decoder_mask

    kv_valid = torch.tensor([[False, False, True, True, False, True],   # left padding, a fill slot
                             [True, True, True, False, False, False]])  # right padding
    queries = 6
    late_rows = late_visible = None
    if late:  # query 3 of sample 1 is a late row that may see only key 5, which it cannot see causally
        late_rows = torch.zeros(2, queries, dtype=torch.bool)
        late_rows[1, 3] = True
        late_visible = torch.tensor([[True] * 6, [False, False, False, False, False, True]])
    mask = decoder_mask(kv_valid, queries, implementation, torch.float32, late_rows, late_visible, all_valid=False)
    allowed = mask if implementation == "sdpa" else mask == 0
    assert allowed.shape == (2, 1, queries, 6)
    assert allowed.any(dim=-1).all()
    causal = torch.arange(6)[None, :] <= torch.arange(6)[:, None]
    sees = causal & kv_valid[:, None, :]
    if late:
        sees[1, 3] &= late_visible[1]
    blind = ~sees.any(dim=-1)  # [2, queries]: sample 0's padding queries 0 and 1, and the late row
    assert blind.sum() == 2 + late
    own = torch.eye(6, dtype=torch.bool)
    for b, q in blind.nonzero().tolist():
        assert torch.equal(allowed[b, 0, q], own[q]), (b, q)
    for b, q in (~blind).nonzero().tolist():
        assert torch.equal(allowed[b, 0, q] & ~own[q], sees[b, q] & ~own[q]), (b, q)


# an index exactly one past the end
def test_an_index_exactly_one_past_the_end_is_caught(monkeypatch):
    from .test_engine_guards import WITHOUT_CHECKPOINT

    model = FAMILIES["llava"]("eager")
    wrong = []

    class Careless(REGISTRY["random"]):
        name = "careless"

        def select_batch(self, views):
            picks = super().select_batch(views)
            view = views[-1]
            bad = torch.arange(view.keep) + view.hidden.shape[0] - view.keep + 1  # its last index == tokens
            wrong.append(f"returned {bad.numel()} indices for a keep of {view.keep} of {view.hidden.shape[0]} tokens")
            return picks[:-1] + [bad]

    monkeypatch.setitem(REGISTRY, Careless.name, Careless)
    with vtprune.apply(model, "careless", 4, **WITHOUT_CHECKPOINT.get("random", {})) as pruner:
        with pytest.raises(RuntimeError) as raised:
            model(**tiny_inputs(model, LAYOUTS))
        assert f"'careless' {wrong[0]} (they must be distinct and in range)" in str(raised.value)
        assert pruner.last_decision is None


# a follow-up turn whose mask holds zeros
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", ["fastv", "pdrop", "clse"])
def test_a_follow_up_padded_inside_its_mask_equals_recomputing(family, method):
    """A batch's next turn padded where its follow-ups differ in length (zeros in the mask after the prompt), fed
    by hand on the pruned cache: every layer, whatever its layout, must mask those slots as the recompute does.
    (Not through generate: it numbers a mask with holes by its cumsum, the plain model's recompute does not.)"""
    from .test_engine_invariants import OPTIONS

    model = FAMILIES[family]("eager")
    inputs = tiny_inputs(model, LAYOUTS)
    keyword = cache_keyword(model.model.language_model)
    with vtprune.apply(model, method, 10, **OPTIONS.get(method, {})) as pruner:
        cache = output_cache(model(**inputs, use_cache=True))  # (a forward of its own: positions by slot, as below)
        decision = pruner.last_decision
        follow_up = torch.randint(3, 96, (2, 4), generator=torch.Generator().manual_seed(1))
        ids = torch.cat([inputs["input_ids"], follow_up], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])], dim=1)
        step = model(input_ids=follow_up, attention_mask=mask, **{keyword: cache}).logits
        with pruner.replaying(decision):
            expected = model(**dict(inputs, input_ids=ids, attention_mask=mask), use_cache=False).logits[:, -4:]
        valid = mask[:, -4:].bool()
        torch.testing.assert_close(step[valid], expected[valid], atol=1e-5, rtol=0)


# a follow-up after prompt-lookup decoding
@pytest.mark.parametrize("method", ["random", "fastv"])
def test_a_follow_up_after_prompt_lookup_decoding_equals_recomputing(method, monkeypatch):
    """Assisted decoding crops rejected candidates; the run must forget their ids too, or a later turn that re-feeds
    the conversation is compared with tokens that were never part of it."""
    from vtprune.engine import decode

    crops = []
    monkeypatch.setattr(decode, "crop", lambda run, tokens, crop=decode.crop: crops.append(tokens) or crop(run, tokens))
    model = FAMILIES["llava"]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    keyword = cache_keyword(model.model.language_model)
    with vtprune.apply(model, method, 6) as pruner:
        looked_up = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                   prompt_lookup_num_tokens=3, return_dict_in_generate=True)
        decision = pruner.last_decision
        assert crops
        follow_up = torch.randint(3, 96, (1, 3), generator=torch.Generator().manual_seed(1))
        conversation = grown(inputs, torch.cat([looked_up.sequences, follow_up], dim=1))
        conversation.pop("pixel_values")
        conversation[keyword] = output_cache(looked_up)
        second = greedy(model, conversation, steps=2)
        start = conversation["input_ids"].shape[1]
        for step, logits in enumerate(second.logits):
            expected = recomputed_logits(model, pruner, decision, inputs, second.sequences[:, : start + step])
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


# a reset cache reused while the pruner is on
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_reset_pruned_cache_serves_a_text_prompt_as_the_plain_model(family):
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, LAYOUTS)
    text = tiny_inputs(model, [SampleLayout(images=0, text_before=5)], seed=3)
    keyword = cache_keyword(model.model.language_model)
    plain = greedy(model, text, steps=3)
    with vtprune.apply(model, "fastv", 10):
        cache = output_cache(greedy(model, inputs, steps=2))
        cache.reset()
        if cache.get_seq_length():
            pytest.skip("this transformers' DynamicCache.reset() zeroes the tensors but keeps their length (5.17)")
        reused = greedy(model, text, steps=3, **{keyword: cache})
    assert torch.equal(reused.sequences, plain.sequences)


# Qwen grids are (rows, cols) as M-RoPE says
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_item_coords_are_the_models_own_mrope_rows_and_cols(family):
    """A non-square image (and a video): each token's (row, col) in its item's grid, which spatial methods read,
    is the (h, w) of its M-RoPE position, as the model itself numbers it."""
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=1, videos=1, qwen_grid=(8, 12), qwen_video=(2, 4, 8))])
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.__setitem__("ids", kwargs["position_ids"]), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    planes = seen["ids"][-3:, 0]  # (t, h, w)
    items = adapter_for(model).visual_items(inputs["input_ids"], inputs)[0]
    assert [item.kind for item in items] == ["image", "video"]
    for item in items:
        _, coords = item.token_layout()
        where = item.positions()
        h, w = planes[1, where], planes[2, where]
        assert torch.equal(coords[:, 1], h - h.min()) and torch.equal(coords[:, 2], w - w.min())


# a fractional budget rounds to nearest
def test_a_fractional_budget_keeps_the_nearest_whole_count():
    assert tokens_for_budget(0.29, 10) == 3
    assert tokens_for_budget(0.3, 64) == 19  # 19.2
    assert tokens_for_budget(0.29, 64) == 19  # 18.56
    assert tokens_for_budget(0.001, 64) == 1
    assert tokens_for_budget(100, 64) == 64 and tokens_for_budget(1.0, 64) == 64  # no image keeps more than it has
    model = FAMILIES["llava"]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with vtprune.apply(model, "random", 0.29) as pruner:
        model(**inputs)
        assert pruner.last_stats.kept_per_sample == [19]
        # printed, a decision gives its counts, not its tensors of positions
        assert repr(pruner.last_decision) == \
            f"Decision(stage_layers=[0], kept_per_sample=[[19]], prompt_length={inputs['input_ids'].shape[1]})"


# an LLM-input stage followed by an in-LLM one
def test_a_method_pruning_at_the_input_and_again_inside_the_llm(monkeypatch):
    """Layouts after an LLM-input stage are taken from the language model's (already narrowed) layout: the kept
    tokens keep their original positions, and cached generation equals recomputing the kept set."""

    class TwoStage(REGISTRY["random"]):
        name = "two_stage"

        def stages(self, model, budget, num_tokens):
            return [Stage(LLM_INPUT, min(num_tokens, 2 * budget)), Stage(2, budget)]

    monkeypatch.setitem(REGISTRY, TwoStage.name, TwoStage)
    model = FAMILIES["llava"]("eager")
    inputs = tiny_inputs(model, LAYOUTS)
    assert_kept_tokens_keep_their_rope(model, inputs, "two_stage", 5)
    with vtprune.apply(model, "two_stage", 5) as pruner:
        out = greedy(model, inputs, steps=3)
        decision = pruner.last_decision
        prompt = inputs["input_ids"].shape[1]
        for step, logits in enumerate(out.logits):
            expected = recomputed_logits(model, pruner, decision, inputs, out.sequences[:, : prompt + step])
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


# LLaVA-OneVision's multi-image prompts
def test_onevision_multi_image_samples_are_base_grids_by_batch_num_images():
    """With batch_num_images (what the processor passes), a sample of several images gets each image's base grid
    and one newline, no anyres tiles, while a sample of one image keeps its tiles: the adapter must lay them out
    as the model packs them, and a batch equals its samples alone."""
    from vtprune.tiny import IMAGE_TOKEN

    model = FAMILIES["llava_onevision"]("sdpa")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 10, 3, 56, 56, generator=generator)
    sizes = torch.tensor([[60, 120], [100, 100], [60, 120]])
    counts = torch.tensor([2, 1])  # sample 0: two images; sample 1: one
    features = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, batch_num_images=counts)
    packed = getattr(features, "pooler_output", features)
    newline = model.model.image_newline
    lengths = [len(f) for f in packed]
    visual = [len(f) - int((f == newline).all(dim=-1).sum()) for f in packed]
    text = lambda n: torch.randint(3, 96, (n,), generator=generator).tolist()  # noqa: E731
    rows = [text(3) + [IMAGE_TOKEN] * lengths[0] + text(2) + [IMAGE_TOKEN] * lengths[1] + text(4),
            text(5) + [IMAGE_TOKEN] * lengths[2] + text(4)]
    width = max(map(len, rows))
    ids, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = torch.tensor(row), 1
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, batch_num_images=counts)
    assert lengths[0] == visual[0] + 1 and lengths[2] > visual[2] + 1  # base + newline; tiles' rows of newlines
    with vtprune.apply(model, "random", 4) as pruner:
        batch = model(**inputs).logits
        assert pruner.last_stats.visual_tokens_per_sample == [visual[0] + visual[1], visual[2]]
        assert pruner.last_stats.kept_per_sample == [8, 4]
        for b, share in enumerate([slice(0, 2), slice(2, 3)]):
            real = mask[b].bool()
            alone = model(input_ids=ids[b:b + 1, real], attention_mask=mask[b:b + 1, real], pixel_values=pixels[share],
                          image_sizes=sizes[share], batch_num_images=counts[b:b + 1]).logits[0]
            torch.testing.assert_close(batch[b, real][-1], alone[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, options", [
    ("visionzip", {}), ("pool", {}), ("prumerge+", {}),
    ("clse_m", {"layers": (2,), "keep": (8,)}), ("sparsevlm", {"layers": (2,), "counts": (6,)})])
def test_merged_states_reach_the_language_model(method, options):
    """The states a merging method writes over its kept tokens are what the LLM reads: the pruned logits equal the
    unmodified model's decoder run from the stage's layer on the kept rows, with the merged rows written in by
    hand. (The invariants compare the engine with itself, which would lose such a write on both sides.) One stage,
    so that the layers before it run on every token, as in the unmodified model."""
    from vtprune.tiny import tiny_llava

    model = tiny_llava(layers=4)
    inputs = tiny_inputs(model, [SampleLayout(text_before=3, text_after=5)])
    layers = model.model.language_model.layers
    with torch.no_grad(), vtprune.apply(model, method, 8, **options) as pruner:
        pruned = model(**inputs).logits[0, -1]
        decision = pruner.last_decision
    (stage_layer,) = decision.stage_layers
    assert sum(positions.numel() for positions, _ in decision.merged[0][0]) > 0, "the method merged nothing here"
    assert repr(decision).endswith(", with merges)")
    captured = []
    handle = layers[stage_layer].register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    with torch.no_grad():
        model(**inputs)  # the unmodified model (the pruner is off): the stage layer's input at full length
    handle.remove()
    positions = decision.positions_at(stage_layer)[0]
    hidden = captured[0][0, positions].clone()
    for merged_positions, values in decision.merged[0][0]:
        rows = torch.searchsorted(positions, merged_positions.to(positions.device))
        assert not torch.allclose(hidden[rows], values.to(hidden.dtype))  # a merge changes what is there
        hidden[rows] = values.to(hidden.dtype)
    lm = model.model.language_model
    position_ids = positions[None]
    position_embeddings = lm.rotary_emb(hidden[None], position_ids)
    mask = torch.full((len(positions), len(positions)), float("-inf")).triu(1)[None, None]
    states = hidden[None]
    with torch.no_grad():
        for layer in layers[stage_layer:]:
            states = layer(states, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
            states = states[0] if isinstance(states, tuple) else states
        expected = model.lm_head(lm.norm(states))[0, -1]
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-5)


def test_a_left_padded_samples_probe_keys_are_its_keys_alone():
    """RoPE in a method's probe counts from each sample's first real token: DART's key norms (RoPE applied) of a
    sample left-padded in a batch equal its own, unpadded, at every visual row."""
    from vtprune.tiny import tiny_llava

    model = tiny_llava(layers=4)
    layouts = [SampleLayout(text_before=2, text_after=3), SampleLayout(text_before=9, text_after=6)]
    inputs = tiny_inputs(model, layouts)
    assert not inputs["attention_mask"][0].all()  # the first sample is the padded one
    keys = []

    def probed_keys(batch):
        with vtprune.apply(model, "dart", 8) as pruner:
            select_batch = pruner.method.select_batch
            pruner.method.select_batch = lambda views: keys.append(
                [view.probe.key[:, view.probe.visual] for view in views]) or select_batch(views)
            model(**batch)
        return keys.pop()

    batched = probed_keys(inputs)
    for b in range(len(layouts)):
        alone = dict(sample_alone(inputs, b), **split_vision(model, inputs, layouts)[b])
        torch.testing.assert_close(batched[b], probed_keys(alone)[0], rtol=1e-5, atol=1e-6)
