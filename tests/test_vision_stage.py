"""The vision-encoder stage: methods that pick (and merge) before the projector, on every family that has it.

A test-local method keeps the top tokens by [CLS] attention at a vision layer (and may merge
the rest into them); its choices are checked against attention the tower itself returns
(eager, output_attentions) and tokens mapped to rows by the model's own packing.
"""

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import vtprune
from vtprune.adapters import adapter_for
from vtprune.engine.compat import EngineError
from vtprune.methods import REGISTRY, BlockMergingMethod, Selection, VisionMethod
from vtprune.methods.primitives import cls_attention, merge_into_nearest, topk_in_order
from vtprune.tiny import SampleLayout, tiny_inputs

from .conftest import BLOCK_MERGING_FAMILIES, FAMILIES, VISION_STAGE_FAMILIES, greedy
from .picks import assert_same_values
from .test_engine_video import sample_alone, shares

VISION_FAMILIES = sorted(VISION_STAGE_FAMILIES)


class ClsTop(VisionMethod):
    name = "test_cls_top"
    summary = "test only"

    @dataclass(frozen=True)
    class Options:
        merge: bool = False
        layer: int = -2

    def vision_layers(self, model):
        return (self.options.layer,)

    def select(self, view):
        keep = topk_in_order(cls_attention(view.layers[self.options.layer], view.rows, view.columns).sum(0), view.keep)
        if not self.options.merge:
            return keep
        hidden, sizes, destination = merge_into_nearest(view.features, torch.ones(len(view.rows)), keep)
        return Selection(keep, hidden, sizes, destination)


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, ClsTop.name, ClsTop)


def layouts_for(family):
    if family == "video_llava":
        return [SampleLayout(images=1, videos=1), SampleLayout(videos=1, text_before=5), SampleLayout(images=1)]
    return [SampleLayout(images=2), SampleLayout(images=1, text_before=6)]


def reference_cls_attention(model, family, inputs, layer):
    """Per sample, per item in sequence order: [N] head-summed [CLS] attention of its tokens, from the eager
    tower's own output_attentions, laid out by the model's own feature packing."""
    towers = {"image": model.model.image_tower, "video": model.model.video_tower} if family == "video_llava" \
        else {"image": model.model.vision_tower}
    per_kind = {}
    for kind, tower in towers.items():
        # (Video-LLaVA's images were pixel_values_images before transformers 5.23)
        pixels = inputs.get("pixel_values_videos") if kind == "video" else \
            inputs.get("pixel_values", inputs.get("pixel_values_images"))
        if pixels is None:
            continue
        if kind == "video":
            frames = pixels.shape[1]
            pixels = pixels.flatten(0, 1)
        elif family == "llava_next":
            pixels = torch.cat([p[:n] for p, n in zip(pixels, tile_counts(model, inputs))])
        attention = tower(pixels, output_attentions=True).attentions[layer][:, :, 0].sum(1)  # [R, T]
        if kind == "video":  # each frame's patches (its [CLS] column is not a video token)
            per_kind[kind] = list(attention[:, 1:].reshape(-1, frames * (attention.shape[1] - 1)))
        elif family == "llava_next":
            per_kind[kind] = next_items(model, inputs, attention[:, 1:])
        else:
            per_kind[kind] = list(attention[:, 1:])
    return per_kind


def tile_counts(model, inputs):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
            for size in inputs["image_sizes"].tolist()]


def next_items(model, inputs, per_tile):
    """Each image's token values packed as LLaVA-NeXT packs its features (base, unpadded tiles; newlines dropped)."""
    values = torch.split(per_tile[..., None], tile_counts(model, inputs))
    packed, _ = model.model.pack_image_features(list(values), inputs["image_sizes"], "default",
                                              image_newline=torch.full((1,), -1.0))
    return [p[p[:, 0] != -1, 0] for p in packed]


@pytest.mark.parametrize("family", VISION_FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kept_tokens_are_the_top_cls_attention_of_each_item(family, attn):
    model = FAMILIES[family](attn)
    inputs = tiny_inputs(model, layouts_for(family))
    reference_model = FAMILIES[family]("eager")
    expected = reference_cls_attention(reference_model, family, inputs, layer=-2)
    with vtprune.apply(model, ClsTop.name, budget=5) as pruner:
        model(**inputs)
        kept = pruner.last_decision.kept[0]
    counters = {"image": 0, "video": 0}
    for b, sample in enumerate(adapter_for(model).visual_items(inputs["input_ids"], inputs)):
        for item in sample:
            scores = expected[item.kind][counters[item.kind]]
            counters[item.kind] += 1
            positions = item.positions()
            mine = kept[b][torch.isin(kept[b], positions)]
            chosen = torch.searchsorted(positions, mine)
            assert torch.equal(chosen.sort().values, topk_in_order(scores, 5)), (b, item.kind)


def test_merged_tokens_reach_the_llm_as_projected_means():
    model = FAMILIES["llava"]("eager")
    inputs = tiny_inputs(model, layouts_for("llava"))
    seen = {}

    def keep_embeds(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    def keep_features(module, args):
        seen.setdefault("features", args[0])

    with vtprune.apply(model, ClsTop.name, budget=3, merge=True) as pruner:
        # registered after the pruner's, so they see what it made of the inputs
        hooks = [model.model.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True),
                 model.model.multi_modal_projector.register_forward_pre_hook(keep_features)]
        model(**inputs)
        decision = pruner.last_decision
        for hook in hooks:
            hook.remove()
    rows = decision.positions_at(0)  # the prompt position of each row the LLM ran on
    assert seen["embeds"].shape[1] == rows.shape[1] < inputs["input_ids"].shape[1]
    image = 0
    for b, sample in enumerate(adapter_for(model).visual_items(inputs["input_ids"], inputs)):
        sources, targets = decision.moved[0][b]
        for item in sample:
            positions = item.positions()
            mine = torch.isin(sources, positions)
            groups = targets[mine]
            assert mine.sum() == item.length and torch.unique(groups).numel() == 3
            for target in torch.unique(groups):
                members = torch.searchsorted(positions, sources[mine][groups == target])
                expected = model.model.multi_modal_projector(seen["features"][image, members].mean(0, keepdim=True))[0]
                row = int(torch.nonzero(rows[b] == target))
                torch.testing.assert_close(seen["embeds"][b, row], expected, rtol=1e-5, atol=1e-5)
            image += 1


@pytest.mark.parametrize("family", VISION_FAMILIES)
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_vision_stage_batch_equals_samples_alone_and_cache_equals_recompute(family, merge, padding_side):
    model = FAMILIES[family]("sdpa")
    layouts = layouts_for(family)
    inputs = tiny_inputs(model, layouts, padding_side=padding_side)
    with vtprune.apply(model, ClsTop.name, budget=4, merge=merge) as pruner:
        out = greedy(model, inputs, steps=3)
        decision = pruner.last_decision
        prompt = inputs["input_ids"].shape[1]
        if padding_side == "left":  # generation appends after right padding only in the recompute's eyes
            for step, logits in enumerate(out.logits):
                grown = dict(inputs, input_ids=out.sequences[:, : prompt + step],
                             attention_mask=torch.nn.functional.pad(inputs["attention_mask"], (0, step), value=1))
                with pruner.replaying(decision):
                    recomputed = model(**grown, use_cache=False).logits[:, -1]
                torch.testing.assert_close(recomputed, logits, atol=1e-5, rtol=0)
        first = model(**inputs).logits
        for b, share in enumerate(shares(inputs, layouts)):
            alone = dict(sample_alone(inputs, b), **share)
            alone_logits = model(**alone).logits[0]
            mask = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(first[b, mask], alone_logits, atol=1e-4, rtol=1e-4)
            if padding_side == "left":
                alone_out = greedy(model, alone, steps=3).sequences[0, alone["input_ids"].shape[1]:]
                assert torch.equal(out.sequences[b, prompt:], alone_out)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_keeping_every_token_and_remove_change_nothing(family):
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, layouts_for(family))
    before = model(**inputs).logits
    with vtprune.apply(model, ClsTop.name, budget=1.0, merge=True):
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)
    with vtprune.apply(model, ClsTop.name, budget=2, merge=True):
        assert not torch.allclose(model(**inputs).logits, before)
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)


# `refused`, not `method`: conftest skips the pairs a family refuses, and this test is where they are run
@pytest.mark.parametrize("refused", [ClsTop.name] + sorted(name for name, m in REGISTRY.items() if m.acts_in_vision))
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(VISION_FAMILIES)))
def test_families_without_the_vision_stage_refuse_clearly(family, refused):
    model = FAMILIES[family]("sdpa")
    with pytest.raises(ValueError, match="acting in the vision encoder are not supported on"):
        vtprune.apply(model, refused, budget=4)
    assert not hasattr(model, "_vtprune_pruner")


def test_a_vision_layer_the_tower_lacks_is_refused_before_any_hook():
    model = FAMILIES["llava"]("sdpa")  # a 6-layer tower
    with pytest.raises(ValueError, match=r"reads vision layers \[7\], but the image tower has 6 layers"):
        vtprune.apply(model, ClsTop.name, budget=4, layer=7)
    assert not hasattr(model, "_vtprune_pruner") and not any(
        m._forward_pre_hooks for m in model.model.vision_tower.encoder.layers)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_a_tower_run_no_prefill_consumed_does_not_leak_into_the_next_prompt(family):
    """Also into generate's, which may encode its images before its first forward (transformers >= 5.23)."""
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, layouts_for(family))
    with vtprune.apply(model, ClsTop.name, budget=4) as pruner:
        expected = greedy(model, inputs).sequences
        kept = pruner.last_stats.kept_per_sample
        for run in (lambda: model(**inputs), lambda: greedy(model, inputs)):
            other = tiny_inputs(model, [SampleLayout(images=3)])
            pixels = other.get("pixel_values", other.get("pixel_values_images"))
            model.model.get_image_features(pixels, *[other[key] for key in ("image_sizes",) if key in other])
            output = run()
            assert pruner.last_stats.kept_per_sample == kept
        assert torch.equal(output.sequences, expected)


@pytest.mark.parametrize("family", VISION_FAMILIES)
@pytest.mark.parametrize("method", sorted(name for name, cls in REGISTRY.items() if cls.acts_in_vision))
def test_beams_repeat_each_samples_decision(family, method):
    """generate encodes a batch's images once, then repeats each sample per beam and returned sequence: every
    repeat finds its sample's image and keeps (and merges) what the sample alone keeps."""
    if method in ("tome", "ficoco_v") and family not in BLOCK_MERGING_FAMILIES:
        pytest.skip(f"{method} merges inside the tower's blocks: one tower row per image only")
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=1), SampleLayout(images=1, text_before=4)])
    with vtprune.apply(model, method, 6) as pruner:
        model(**inputs)
        alone = pruner.last_decision
        model.generate(**inputs, num_beams=2, num_return_sequences=2, max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
        repeated = pruner.last_decision
    for stage_alone, stage_repeated in zip(alone.kept, repeated.kept, strict=True):
        assert len(stage_repeated) == 4
        for row, kept in enumerate(stage_repeated):
            assert torch.equal(kept, stage_alone[row // 2])
    assert_same_values(repeated.merged, [[stage[row // 2] for row in range(4)] for stage in alone.merged])


@pytest.mark.parametrize("family", ["llava", "video_llava"])
def test_tower_rows_that_are_not_the_items_received_are_reported_when_the_prefill_ends(family, monkeypatch):
    """Where the family's layout alone places an item in the tower's rows, the comparison with what the language
    model received is made on the device and read when the prefill ends: a place that is wrong is an error, not
    tokens scored at the wrong rows."""
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, layouts_for(family))
    adapter = adapter_for(model)
    known = type(adapter).known_place

    def one_column_off(self, item, device):
        place = known(self, item, device)
        return dataclasses.replace(place, feature_columns=place.feature_columns.roll(1))

    with vtprune.apply(model, ClsTop.name, budget=4) as pruner:
        model(**inputs)  # the place the family knows is right
        monkeypatch.setattr(type(pruner.adapter), "known_place", one_column_off)
        with pytest.raises(EngineError, match="rows are not the features the language model received"):
            model(**inputs)


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "hired", "prumerge+", "pool", "tome", "ficoco_v"])
def test_a_tower_run_of_the_callers_own_is_the_pruned_models(method):
    """get_image_features while a pruner is applied (README, Semantics: the vision tower): the tower's own output,
    bit for bit, under the methods that only read it; merged under those that merge inside its blocks."""
    model = FAMILIES["llava"]("sdpa")
    pixels = tiny_inputs(model, [SampleLayout(images=1)])["pixel_values"]

    def features():
        out = model.model.get_image_features(pixel_values=pixels)
        return torch.cat(list(getattr(out, "pooler_output", out)))

    with torch.no_grad():
        own = features()
        with vtprune.apply(model, method, 16):
            applied = features()
    merges = issubclass(REGISTRY[method], BlockMergingMethod)
    assert merges == (method in ("tome", "ficoco_v"))
    assert torch.equal(applied, own) != merges
