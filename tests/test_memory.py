"""What a pruned model keeps alive between requests: what a stock model would let go (the request's images, the
tower's outputs and states, a failed prefill's KV cache) goes once the forward returns, and a removed pruner lets
its model go as soon as the last reference does, without waiting for the cycle collector."""

import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

import vtprune
from vtprune.engine.cache import cache_keyword
from vtprune.engine.compat import UnsupportedUseError, takes_encoded_features
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

from .conftest import FAMILIES, greedy

CLASP_FUSION = {"classes": {"general": {"fusion": {"1": 0.3, "2": 0.3, "3": 0.4}, "split": 0.5}}}


@pytest.fixture
def no_cycle_collector():
    """Objects freed with the collector off are freed by their reference counts, as soon as the last one goes."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def pixel_inputs(inputs: dict) -> list[torch.Tensor]:
    return [value for key, value in inputs.items() if key.startswith("pixel_values")]


@pytest.mark.parametrize("method", ["fastv", "visionzip", "random"])
def test_a_finished_request_leaves_nothing_of_its_images(family, method, no_cycle_collector):
    model = FAMILIES[family]("sdpa")
    if method == "visionzip" and family not in {"llava", "llava_next", "video_llava"}:
        pytest.skip("visionzip acts in the vision tower, which the Qwen and OneVision adapters do not offer")
    pruner = vtprune.apply(model, method, 0.4)
    for run in (lambda inputs: greedy(model, inputs), lambda inputs: model(**inputs)):
        inputs = tiny_inputs(model, [SampleLayout(), SampleLayout(images=2, text_after=6)])
        images = [weakref.ref(tensor) for tensor in pixel_inputs(inputs)]
        output = run(inputs)
        del inputs, output
        assert images and all(image() is None for image in images)
    assert pruner.last_decision is not None  # (the decision itself stays: a replay reads it)


def test_clasp_lets_the_towers_states_go_after_the_forward(no_cycle_collector):
    model = tiny_llava("sdpa")
    pruner = vtprune.apply(model, "clasp", 16, question_class="general", calibration=CLASP_FUSION)
    states = []
    handle = model.model.vision_tower.encoder.layers[1].register_forward_hook(
        lambda module, args, output: states.append(weakref.ref(output[0] if isinstance(output, tuple) else output)))
    greedy(model, tiny_inputs(model, [SampleLayout()] * 3))
    handle.remove()
    assert states and all(state() is None for state in states)
    pruner.remove()


def test_a_failed_prefill_lets_its_cache_go(no_cycle_collector):
    model = tiny_llava("sdpa")
    vtprune.apply(model, "fastv", 16)

    def out_of_memory(module, args, kwargs):
        raise torch.OutOfMemoryError("simulated")

    handle = model.model.language_model.layers[3].register_forward_pre_hook(out_of_memory, with_kwargs=True)
    cache = DynamicCache(config=model.config.text_config)
    held = weakref.ref(cache)
    with pytest.raises(torch.OutOfMemoryError):
        model(**tiny_inputs(model, [SampleLayout()] * 2), **{cache_keyword(model.model.language_model): cache},
              use_cache=True)
    handle.remove()
    del cache
    assert held() is None
    # and the next request runs as if the failed one had not been
    inputs = tiny_inputs(model, [SampleLayout()] * 2)
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("method", ["fastv", "clasp"])
def test_a_removed_pruner_lets_its_model_go(method, no_cycle_collector):
    model = tiny_llava("sdpa")
    options = {"question_class": "general", "calibration": CLASP_FUSION} if method == "clasp" else {}
    pruner = vtprune.apply(model, method, 16, **options)
    greedy(model, tiny_inputs(model, [SampleLayout()] * 2))
    pruner.remove()
    pruner.remove()  # a second remove() does nothing
    held_model, held_pruner = weakref.ref(model), weakref.ref(pruner)
    del model, pruner
    assert held_model() is None and held_pruner() is None


# ... and what a later forward still needs stays.
def test_clasp_fusion_remixes_generates_encoded_images_at_every_forward_of_the_call():
    """generate (5.23+) encodes the images once and hands the features to every forward: without a cache each
    step remixes them from the tower's states, which must outlive the first forward."""
    model = tiny_llava("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(text_before=6)])
    with vtprune.apply(model, "clasp", 20, question_class="general", calibration=CLASP_FUSION):
        cached = greedy(model, inputs)
        uncached = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)


@pytest.mark.parametrize("method", ["visionzip", "pool", "clasp"])
def test_features_the_caller_encoded_serve_every_forward_and_generate_they_are_given_to(method):
    model = tiny_llava("sdpa")
    if not takes_encoded_features(model):
        pytest.skip("this transformers' forward takes no mm_encoder_outputs")
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    rest = {key: value for key, value in inputs.items() if key != "pixel_values"}
    options = {"question_class": "general", "calibration": CLASP_FUSION} if method == "clasp" else {}
    with vtprune.apply(model, method, 6, **options):
        expected = model(**inputs).logits
        generated = greedy(model, inputs).sequences

        def encoded():
            return {"image": model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)}

        features = encoded()
        for _ in range(2 if method == "clasp" else 1):  # CLASP remixes them again; a tower method's q/k serve once
            torch.testing.assert_close(model(**rest, mm_encoder_outputs=features).logits, expected, atol=1e-5, rtol=0)
        if method != "clasp":
            with pytest.raises(UnsupportedUseError, match="features encoded ahead serve the one forward after them"):
                model(**rest, mm_encoder_outputs=features)
        assert torch.equal(greedy(model, dict(rest, mm_encoder_outputs=encoded())).sequences, generated)
