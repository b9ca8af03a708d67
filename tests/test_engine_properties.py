"""Property test of the engine invariants over batch sizes, budgets, prompt layouts and paddings."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.engine import tokens_for_budget
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl

from .test_engine_invariants import OPTIONS, sample_alone, split_vision, visual_tokens

MODELS = {"llava": tiny_llava("sdpa"), "qwen2_vl": tiny_qwen2_vl("eager"), "qwen2_5_vl": tiny_qwen2_5_vl("sdpa")}

layouts = st.builds(
    SampleLayout,
    images=st.integers(0, 2),
    text_before=st.integers(0, 5),
    text_between=st.integers(0, 3),
    text_after=st.integers(1, 5),
    qwen_grid=st.sampled_from([(8, 12), (6, 6), (10, 4)]),
)
budgets = st.one_of(st.integers(1, 80), st.floats(0.01, 1.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(sorted(MODELS)),
    method=st.sampled_from(["clasp", "clse", "clse_m", "fastv", "random", "uniform"]),
    samples=st.lists(layouts, min_size=1, max_size=3),
    budget=budgets,
    padding_side=st.sampled_from(["left", "right"]),
)
def test_batch_equals_singles_and_counts_add_up(family, method, samples, budget, padding_side):
    model = MODELS[family]
    inputs = tiny_inputs(model, samples, padding_side=padding_side)
    per_sample_tokens = visual_tokens(model, inputs)
    with torch.no_grad(), vtprune.apply(model, method, budget, **OPTIONS.get(method, {})) as pruner:
        batch_logits = model(**inputs).logits
        stats = pruner.last_stats
        assert stats.images_per_sample == [s.images for s in samples]
        assert stats.visual_tokens_per_sample == per_sample_tokens
        for b, (layout, share) in enumerate(zip(samples, split_vision(model, inputs, samples))):
            per_image = per_sample_tokens[b] // layout.images if layout.images else 0
            nominal = tokens_for_budget(budget, per_image)
            stages = pruner.method.stages(pruner.adapter.model_info, nominal, per_image) if nominal < per_image else []
            assert stats.kept_per_sample[b] == layout.images * min([per_image] + [s.keep for s in stages])
            assert all(count <= per_sample_tokens[b] for count in stats.visual_tokens_per_layer[b])
            alone_logits = model(**sample_alone(inputs, b), **share).logits[0]
            real = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batch_logits[b, real][-1], alone_logits[-1], atol=2e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 6)), min_size=1, max_size=8))
def test_an_items_positions_are_its_runs_in_order(gaps_and_lengths):
    """VisualItem.positions (computed in a few ops, not one per run) lists every run's positions, run after run."""
    from vtprune.adapters.base import VisualItem
    from vtprune.methods import Grid

    runs, position = [], 0
    for gap, length in gaps_and_lengths:
        position += gap
        runs.append((position, length))
        position += length
    total = sum(length for _, length in runs)
    item = VisualItem(tuple(runs), (Grid(1, total),))
    assert item.positions().tolist() == [p for start, length in runs for p in range(start, start + length)]
