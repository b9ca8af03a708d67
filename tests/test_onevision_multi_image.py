"""LLaVA-OneVision's multi-image mode: with batch_num_images (what its processor passes), a sample of several
images gets each image's base grid and one newline, no anyres tiles. The engine's invariants there, for every
method that runs on OneVision (the other tests build OneVision prompts without it: every image anyres)."""

import pytest

from vtprune.methods import REGISTRY
from vtprune.tiny import tiny_inputs

from .conftest import FAMILIES
from .test_engine_conversation import assert_a_follow_up_turn_equals_recomputing
from .test_engine_invariants import (
    MIXED, assert_a_batch_equals_its_samples_alone, assert_cached_generation_equals_recomputing,
    assert_eager_and_sdpa_keep_the_same_tokens, assert_keeping_every_token_changes_nothing, assert_remove_restores)

METHODS = sorted(name for name, method in REGISTRY.items() if not method.acts_in_vision)  # the rest refuse OneVision


@pytest.fixture
def model(attn):
    return FAMILIES["llava_onevision"](attn)


def multi_image(model, layouts=MIXED[:2], **kwargs):
    inputs = tiny_inputs(model, layouts, batch_num_images=True, **kwargs)
    assert inputs["batch_num_images"].tolist() == [layout.images for layout in layouts if layout.images]
    return inputs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [10_000, 1.0])
def test_keeping_every_token_changes_nothing(model, method, budget):
    assert_keeping_every_token_changes_nothing(model, method, budget, multi_image(model))


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_and_a_follow_up_turn_equal_recomputing(model, method):
    assert_cached_generation_equals_recomputing(model, method, multi_image(model))
    assert_a_follow_up_turn_equals_recomputing(model, method, multi_image(model))


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_equals_its_samples_run_alone(model, method):
    assert_a_batch_equals_its_samples_alone(model, method, multi_image(model, MIXED), MIXED, generate=True)


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_model_exactly(model, method):
    assert_remove_restores(model, multi_image(model), method)


@pytest.mark.parametrize("method", METHODS)
def test_eager_and_sdpa_keep_the_same_tokens(method):
    assert_eager_and_sdpa_keep_the_same_tokens(
        "llava_onevision", method, multi_image(FAMILIES["llava_onevision"]("eager"), MIXED))
