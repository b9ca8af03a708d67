"""Kept-token pictures: the stage map and, for merging methods, where each token went."""

import numpy as np
import torch

import vtprune
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava
from vtprune.viz import dropped_at_stage, kept_token_map, merge_groups


def test_stage_map_marks_when_each_token_was_dropped():
    stages = dropped_at_stage((2, 3), [np.array([0, 1, 2, 4]), np.array([1, 4])])
    assert stages.tolist() == [[2, 0, 2], [1, 0, 1]]


def test_merge_groups_follow_chains_across_stages():
    # stage 1: 3 -> 1, 5 -> 4; stage 2: 4 -> 1 (so 5 ends in 1 too)
    moved = [(np.array([0, 1, 2, 3, 4, 5]), np.array([0, 1, 2, 1, 4, 4])),
             (np.array([0, 1, 2, 4]), np.array([0, 1, 2, 1]))]
    assert merge_groups(6, moved).tolist() == [0, 1, 2, 1, 1, 1]


def test_a_merging_method_records_where_every_dropped_token_went(tmp_path):
    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout()])
    start = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[0])
    with torch.no_grad(), vtprune.apply(model, "clse_m", 8) as pruner:
        model(**inputs)
    decision = pruner.last_decision
    kept = [stage[0].numpy() - start for stage in decision.kept]
    moved = [(s[0][0].numpy() - start, s[0][1].numpy() - start) for s in decision.moved]
    for stage, (sources, targets) in enumerate(moved):
        survivors = np.arange(64) if stage == 0 else kept[stage - 1]
        assert sorted(sources.tolist()) == sorted(survivors.tolist())  # every token there went somewhere
        assert set(targets.tolist()) <= set(kept[stage].tolist())
    groups = merge_groups(64, moved)
    assert set(groups.tolist()) == set(kept[-1].tolist())
    image = np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    from PIL import Image

    path = tmp_path / "kept.png"
    stages = kept_token_map(Image.fromarray(image), (8, 8), kept, path, "clse_m", decision.stage_layers, groups)
    assert path.stat().st_size > 0 and int((stages == 0).sum()) == len(kept[-1])
