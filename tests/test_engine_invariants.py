"""The engine's correctness invariants, on tiny LLaVA-1.5 and Qwen2-VL models, eager and sdpa."""

import pytest
import torch

import vtprune
import vtprune.engine.block_merge
import vtprune.engine.vision
from vtprune.methods import REGISTRY, WITHOUT_CHECKPOINT
from vtprune.tiny import SampleLayout, tiny_inputs

from .conftest import FAMILIES, greedy, skip_block_merging_on

METHODS = sorted(REGISTRY)  # every registered method, on every family that supports it (conftest)
OPTIONS = WITHOUT_CHECKPOINT  # the tiny models have no tokenizer
PLACEHOLDERS = torch.tensor([100, 101])  # LLaVA's and Qwen2-VL's image token in the tiny vocabulary


def packing(inputs) -> dict:
    """The inputs by which an anyres model packs its images' features (sizes; OneVision's images per sample)."""
    return {name: inputs[name] for name in ("image_sizes", "batch_num_images") if name in inputs}


def image_counts(model, inputs) -> list[list[int]]:
    """Per sample, each image's visual tokens, from what the model itself encodes (LLaVA-NeXT's
    row-closing newlines are image placeholders but not visual tokens)."""
    key = next((key for key in ("pixel_values", "pixel_values_images") if key in inputs), None)
    if key is None:
        return [[] for _ in inputs["input_ids"]]
    if "image_grid_thw" in inputs:
        placeholders = visual = [int(h * w) // 4 for _, h, w in inputs["image_grid_thw"].tolist()]
    else:
        encoded = model.model.get_image_features(inputs[key], **packing(inputs))
        features = list(getattr(encoded, "pooler_output", encoded))
        placeholders = [len(f) for f in features]
        newline = getattr(model.model, "image_newline", None)
        visual = [len(f) - (0 if newline is None else int((f == newline).all(dim=-1).sum())) for f in features]
    held = torch.isin(inputs["input_ids"], PLACEHOLDERS).sum(dim=1).tolist()
    counts, image = [], 0
    for total in held:
        mine = []
        while total > 0:
            mine.append(visual[image])
            total -= placeholders[image]
            image += 1
        counts.append(mine)
    return counts


def visual_mask(model, inputs) -> torch.Tensor:
    """[B, L] the placeholders that are visual tokens: LLaVA-NeXT's newline placeholders excluded, found
    where the features the model packs equal its newline vector."""
    placeholders = torch.isin(inputs["input_ids"], PLACEHOLDERS)
    newline = getattr(model.model, "image_newline", None)
    if newline is None or "pixel_values" not in inputs:
        return placeholders
    encoded = model.model.get_image_features(pixel_values=inputs["pixel_values"], **packing(inputs))
    rows = torch.cat(list(getattr(encoded, "pooler_output", encoded)))
    mask = placeholders.clone()
    mask[placeholders] = ~(rows == newline).all(dim=-1)  # placeholders in batch order take the features in order
    return mask


def visual_tokens(model, inputs):
    return [sum(counts) for counts in image_counts(model, inputs)]


# the second sample's image, on the anyres families, is so wide that its high-resolution grid has no rows
MIXED = [SampleLayout(images=2), SampleLayout(images=1, text_before=7, text_after=2, next_sizes=((20, 200),)),
         SampleLayout(images=0, text_after=9)]


def sample_alone(inputs, b):
    """Sample b of a batch built by tiny_inputs, without its padding."""
    keep = inputs["attention_mask"][b].bool()
    alone = {"input_ids": inputs["input_ids"][b : b + 1, keep], "attention_mask": inputs["attention_mask"][b : b + 1, keep]}
    if "mm_token_type_ids" in inputs:
        alone["mm_token_type_ids"] = inputs["mm_token_type_ids"][b : b + 1, keep]
    return alone


def split_vision(model, inputs, layouts):
    """Per sample, its share of the batch's pixel_values (and image_grid_thw)."""
    shares, start = [], 0
    for layout in layouts:
        count = layout.images
        if "image_grid_thw" in inputs:
            grids = inputs["image_grid_thw"][start : start + count]
            patches = int(grids.prod(dim=1).sum())
            offset = int(inputs["image_grid_thw"][:start].prod(dim=1).sum())
            share = {"pixel_values": inputs["pixel_values"][offset : offset + patches], "image_grid_thw": grids} if count else {}
        else:
            key = next(key for key in ("pixel_values", "pixel_values_images") if key in inputs) if count else None
            share = {key: inputs[key][start : start + count]} if count else {}
            if count and "image_sizes" in inputs:
                share["image_sizes"] = inputs["image_sizes"][start : start + count]
            if count and "batch_num_images" in inputs:
                share["batch_num_images"] = torch.tensor([count])
        shares.append(share)
        start += count
    return shares


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [10_000, 1.0])
def test_keeping_every_token_changes_nothing(model, method, budget):
    assert_keeping_every_token_changes_nothing(model, method, budget, tiny_inputs(model, MIXED[:2]))


def assert_keeping_every_token_changes_nothing(model, method, budget, inputs):
    reference_logits = model(**inputs).logits
    reference = greedy(model, inputs)
    with vtprune.apply(model, method, budget, **OPTIONS.get(method, {})) as pruner:
        assert torch.equal(model(**inputs).logits, reference_logits)
        pruned = greedy(model, inputs)
        assert pruner.last_stats.kept_per_sample == visual_tokens(model, inputs)
    assert torch.equal(pruned.sequences, reference.sequences)
    for a, b in zip(pruned.logits, reference.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_recomputing_the_kept_set(model, method):
    assert_cached_generation_equals_recomputing(model, method, tiny_inputs(model, MIXED[:2]))


def assert_cached_generation_equals_recomputing(model, method, inputs):
    with vtprune.apply(model, method, 10, **OPTIONS.get(method, {})) as pruner:
        out = greedy(model, inputs, steps=4)
        decision = pruner.last_decision
        prompt = inputs["input_ids"].shape[1]
        for step, step_logits in enumerate(out.logits):
            ids = out.sequences[:, : prompt + step]
            grown = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
            grown["attention_mask"][:, :prompt] = inputs["attention_mask"]
            if "mm_token_type_ids" in inputs:
                grown["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, step))
            with pruner.replaying(decision):
                recomputed = model(**grown, use_cache=False).logits[:, -1]
            torch.testing.assert_close(recomputed, step_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", [name for name in METHODS if REGISTRY[name].acts_in_vision])
def test_a_replay_does_none_of_the_methods_work(model, family, method, monkeypatch):
    """A replayed decision (the bench's schedule oracle) runs the vision tower as the model's own: no q/k read for
    scoring, no merge inside it, no selection; its logits are the method's."""
    skip_block_merging_on(method, family, videos=False)
    inputs = tiny_inputs(model, MIXED[:2])
    with vtprune.apply(model, method, 10, **OPTIONS.get(method, {})) as pruner:
        pruned = model(**inputs).logits
        work = []
        for module in (vtprune.engine.vision, vtprune.engine.block_merge):
            read = module.tower_attention_inputs
            monkeypatch.setattr(module, "tower_attention_inputs", lambda *a, read=read: work.append("q/k") or read(*a))
        monkeypatch.setattr(pruner.method, "select_batch", lambda views: work.append("select"))
        monkeypatch.setattr(pruner.method, "merge", lambda *a: work.append("merge"), raising=False)
        with pruner.replaying(pruner.last_decision):
            replayed = model(**inputs).logits
    assert work == []
    assert torch.equal(replayed, pruned)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_batch_equals_its_samples_run_alone(model, method, padding_side):
    assert_a_batch_equals_its_samples_alone(model, method, tiny_inputs(model, MIXED, padding_side=padding_side),
                                            MIXED, generate=padding_side == "left")


def assert_a_batch_equals_its_samples_alone(model, method, inputs, layouts, generate):
    """generate: greedy tokens too (generate wants left padding)."""
    shares = split_vision(model, inputs, layouts)
    with vtprune.apply(model, method, 12, **OPTIONS.get(method, {})) as pruner:
        batch_logits = model(**inputs).logits
        batch_stats = pruner.last_stats
        for b in range(len(layouts)):
            alone = dict(sample_alone(inputs, b), **shares[b])
            alone_logits = model(**alone).logits[0]
            real = inputs["attention_mask"][b].bool()
            # Positions that survive pruning must agree; pruned ones are zero in both.
            torch.testing.assert_close(batch_logits[b, real][-1], alone_logits[-1], atol=1e-5, rtol=0)
            text = ~torch.isin(inputs["input_ids"][b, real], PLACEHOLDERS)
            torch.testing.assert_close(batch_logits[b, real][text], alone_logits[text], atol=1e-5, rtol=0)
            assert pruner.last_stats.visual_tokens_per_layer[0] == batch_stats.visual_tokens_per_layer[b]
        if generate:
            batch_out = greedy(model, inputs).sequences[:, inputs["input_ids"].shape[1] :]
            for b in range(len(layouts)):
                alone = dict(sample_alone(inputs, b), **shares[b])
                alone_out = greedy(model, alone).sequences[:, alone["input_ids"].shape[1] :]
                assert torch.equal(batch_out[b], alone_out[0])


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_model_exactly(model, method):
    assert_remove_restores(model, tiny_inputs(model, MIXED[:2]), method,
                           while_pruned=lambda model, inputs: greedy(model, inputs, steps=2))


def assert_remove_restores(model, inputs, method, while_pruned=lambda model, inputs: None):
    """apply() changes the logits; remove(), after while_pruned ran, gives them back bit for bit, with the state,
    the hooks and generate as they were, and the model can carry a pruner again."""
    before = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()]
    pruner = vtprune.apply(model, method, 8, **OPTIONS.get(method, {}))
    assert not torch.equal(model(**inputs).logits, before)
    while_pruned(model, inputs)
    pruner.remove()
    assert torch.equal(model(**inputs).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hooks == [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()]
    assert not hasattr(model, "_vtprune_pruner") and "generate" not in model.__dict__
    vtprune.apply(model, method, 8, **OPTIONS.get(method, {})).remove()  # and it can carry a pruner again


@pytest.mark.parametrize("method", METHODS)
def test_eager_and_sdpa_keep_the_same_tokens(family, method):
    assert_eager_and_sdpa_keep_the_same_tokens(family, method, tiny_inputs(FAMILIES[family]("eager"), MIXED))


def assert_eager_and_sdpa_keep_the_same_tokens(family, method, inputs):
    decisions = []
    for attn in ("eager", "sdpa"):
        model = FAMILIES[family](attn)
        with vtprune.apply(model, method, 9, **OPTIONS.get(method, {})) as pruner:
            model(**inputs)
            decisions.append(pruner.last_decision)
    assert decisions[0].stage_layers == decisions[1].stage_layers
    for eager_stage, sdpa_stage in zip(decisions[0].kept, decisions[1].kept):
        for a, b in zip(eager_stage, sdpa_stage):
            assert torch.equal(a.sort().values, b.sort().values)


@pytest.mark.parametrize("method", METHODS)
def test_a_prefill_with_or_without_a_cache_keeps_the_same_tokens(model, method):
    """With a cache the engine reads the keys a layer cached (last-query attention); without one it computes them."""
    inputs = tiny_inputs(model, MIXED)
    decisions = []
    with vtprune.apply(model, method, 9, **OPTIONS.get(method, {})) as pruner:
        for use_cache in (True, False):
            model(**inputs, use_cache=use_cache)
            decisions.append(pruner.last_decision)
    for cached_stage, uncached_stage in zip(*(decision.kept for decision in decisions), strict=True):
        for a, b in zip(cached_stage, uncached_stage, strict=True):
            assert torch.equal(a, b)


def test_stats_add_up(model):
    inputs = tiny_inputs(model, MIXED)
    counts = image_counts(model, inputs)
    layers = len(model.model.language_model.layers)
    with vtprune.apply(model, "fastv", 10, layer=2) as pruner:
        model(**inputs)
        stats = pruner.last_stats
    assert stats.images_per_sample == [len(c) for c in counts] == [2, 1, 0]
    assert stats.visual_tokens_per_sample == [sum(c) for c in counts]
    for images, per_layer in zip(counts, stats.visual_tokens_per_layer):
        assert per_layer == [sum(images)] * 2 + [len(images) * 10] * (layers - 2)
    assert stats.kept_per_sample == [20, 10, 0]
    per_image = [(2 * sum(c) + (layers - 2) * 10 * len(c)) / layers / len(c) for c in counts if c]
    assert stats.equivalent_budget == pytest.approx(sum(per_image) / len(per_image))
    with vtprune.apply(model, "random", 0.25) as pruner:
        model(**inputs)
        kept = [[round(n / 4) for n in c] for c in counts]
        assert pruner.last_stats.kept_per_sample == [sum(k) for k in kept]
        per_image = [sum(k) / len(k) for k in kept if k]
        assert pruner.last_stats.equivalent_budget == pytest.approx(sum(per_image) / len(per_image))


def test_text_only_batches_pass_untouched(model):
    inputs = tiny_inputs(model, [SampleLayout(images=0), SampleLayout(images=0, text_before=6)])
    reference = model(**inputs).logits
    with vtprune.apply(model, "fastv", 4) as pruner:
        assert torch.equal(model(**inputs).logits, reference)
        assert pruner.last_stats.kept_per_sample == [0, 0]


def test_kept_tokens_keep_their_original_positions(model):
    """The position embeddings a layer past K receives are the unpruned ones at the kept positions."""
    inputs = tiny_inputs(model, MIXED[:2])
    layers = model.model.language_model.layers
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen[name] = (kwargs["position_embeddings"], args[0] if args else kwargs["hidden_states"])
        return hook

    handle = layers[3].register_forward_pre_hook(record("full"), with_kwargs=True)
    model(**inputs)
    handle.remove()
    with vtprune.apply(model, "fastv", 6, layer=2) as pruner:
        handle = layers[3].register_forward_pre_hook(record("pruned"), with_kwargs=True)  # runs after the pruner's
        model(**inputs)
        handle.remove()
        kept = pruner.last_decision.kept[0]
    (cos, sin), _ = seen["full"]
    (pruned_cos, pruned_sin), hidden = seen["pruned"]
    visual = visual_mask(model, inputs)
    for b in range(2):
        held = torch.cat([torch.nonzero(~visual[b]).flatten(), kept[b]]).sort().values
        tail = slice(hidden.shape[1] - held.numel(), None)  # fill slots come first
        assert torch.equal(pruned_cos[b, tail], cos.expand(2, -1, -1)[b, held])
        assert torch.equal(pruned_sin[b, tail], sin.expand(2, -1, -1)[b, held])


def test_per_layer_outputs_map_back_to_prompt_positions(family):
    """output_attentions under pruning has each layer's pruned length; the decision names its rows."""
    model = FAMILIES[family]("eager")
    inputs = tiny_inputs(model, MIXED[:2])
    with vtprune.apply(model, "fastv", 6, layer=2) as pruner:
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        decision = pruner.last_decision
    visual = visual_mask(model, inputs)
    for layer, attention in enumerate(out.attentions):
        positions = decision.positions_at(layer)
        assert attention.shape[-1] == attention.shape[-2] == positions.shape[1]
        assert out.hidden_states[layer + 1].shape[1] == positions.shape[1] or layer == len(out.attentions) - 1
        for b in range(2):
            held = positions[b][positions[b] >= 0]
            expected = torch.arange(visual.shape[1]) if layer < 2 else \
                torch.cat([torch.nonzero(~visual[b]).flatten(), decision.kept[0][b]]).sort().values
            assert torch.equal(held, expected)


@pytest.mark.parametrize("method", METHODS)
def test_anyres_newline_tokens_are_never_dropped(method):
    skip_block_merging_on(method, "llava_next", videos=False)
    model = FAMILIES["llava_next"]("sdpa")
    inputs = tiny_inputs(model, MIXED)
    newlines = torch.isin(inputs["input_ids"], PLACEHOLDERS) & ~visual_mask(model, inputs)
    assert newlines.any()
    with vtprune.apply(model, method, 6, **OPTIONS.get(method, {})) as pruner:
        model(**inputs)
        decision = pruner.last_decision
    for layer in range(len(model.model.language_model.layers)):
        held = decision.positions_at(layer)
        for b in range(len(MIXED)):
            assert set(torch.nonzero(newlines[b]).flatten().tolist()) <= set(held[b].tolist())


@pytest.mark.parametrize("method", METHODS)
def test_llava_next_pixel_values_4d_and_5d_are_pruned_alike(method):
    """transformers takes LLaVA-NeXT's patches 5-D (images x patches) or 4-D (every image's patches in one run),
    cutting both by image_sizes: the same layout, the same kept tokens, the same logits."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    skip_block_merging_on(method, "llava_next", videos=False)
    model = FAMILIES["llava_next"]("sdpa")
    inputs = tiny_inputs(model, MIXED[:2])
    patches = [image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
               for size in inputs["image_sizes"].tolist()]
    flat = dict(inputs, pixel_values=torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], patches)]))
    results = []
    for given in (inputs, flat):
        with vtprune.apply(model, method, 9, **OPTIONS.get(method, {})) as pruner:
            results.append((model(**given).logits, pruner.last_decision))
    (logits_5d, decision_5d), (logits_4d, decision_4d) = results
    torch.testing.assert_close(logits_4d, logits_5d, atol=1e-5, rtol=0)
    assert decision_5d.stage_layers == decision_4d.stage_layers
    for a, b in zip(decision_5d.kept, decision_4d.kept):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
