"""What production runs add to the float32 invariants: half precision, autocast, and training forwards
(labels, gradient checkpointing)."""

import warnings

import pytest
import torch

import vtprune
from vtprune.engine.prefill import hooks_inside_checkpoint
from vtprune.methods import REGISTRY, WITHOUT_CHECKPOINT
from vtprune.tiny import SampleLayout, tiny_inputs

from .conftest import FAMILIES

METHODS = sorted(REGISTRY)
LAYOUTS = [SampleLayout(images=2), SampleLayout(images=1, text_before=6)]
PLACEHOLDERS = torch.tensor([100, 101])  # the tiny models' image (and video) tokens


def prunes_and_keeps_all_exactly(model, method, inputs) -> None:
    reference = model(**inputs).logits
    options = WITHOUT_CHECKPOINT.get(method, {})
    with vtprune.apply(model, method, 1.0, **options):
        assert torch.equal(model(**inputs).logits, reference)
    with vtprune.apply(model, method, 10, **options) as pruner:
        logits = model(**inputs).logits
        assert pruner.last_stats.kept_per_sample != pruner.last_stats.visual_tokens_per_sample  # it pruned
    assert logits.dtype == reference.dtype and torch.isfinite(logits[:, -1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_a_half_precision_model_keeps_all_exactly_and_prunes(family, method, dtype):
    model = FAMILIES[family]("sdpa").to(dtype)
    prunes_and_keeps_all_exactly(model, method, tiny_inputs(model, LAYOUTS))


@pytest.mark.parametrize("method", METHODS)
def test_under_autocast_a_model_keeps_all_exactly_and_prunes(family, method):
    """A float32 model under bfloat16 autocast: attention outputs in half precision, the residual stream in
    float32 (ToMe's and FiCoCo-V's merges write into both)."""
    model = FAMILIES[family]("sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prunes_and_keeps_all_exactly(model, method, tiny_inputs(model, LAYOUTS))


def labels_of(inputs) -> torch.Tensor:
    """Training labels as usual: every token but padding and the image placeholders."""
    labels = inputs["input_ids"].masked_fill(torch.isin(inputs["input_ids"], PLACEHOLDERS), -100)
    return labels.masked_fill(inputs["attention_mask"] == 0, -100)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_labels_predicted_from_a_dropped_visual_token_are_refused(family):
    """The token after an image is predicted from the image's last visual token; where FastV dropped it, its
    logits are a zero state's. LLaVA-NeXT's images end with a newline placeholder, which no method drops."""
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, LAYOUTS)
    labels = labels_of(inputs)
    with vtprune.apply(model, "fastv", 1):
        if family == "llava_next":
            assert torch.isfinite(model(**inputs, labels=labels).loss)
        else:
            with pytest.raises(ValueError, match="labels: some follow a visual token the method dropped"):
                model(**inputs, labels=labels)
            after_visual = torch.zeros_like(labels, dtype=torch.bool)
            after_visual[:, 1:] = torch.isin(inputs["input_ids"][:, :-1], PLACEHOLDERS)
            assert torch.isfinite(model(**inputs, labels=labels.masked_fill(after_visual, -100)).loss)
        assert torch.isfinite(model(**inputs).logits).all()  # a refusal leaves the pruner usable


def checkpointed_for_training(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in 5.24
        model.gradient_checkpointing_enable()
    return model.train()


VISION_METHODS = [name for name, method in sorted(REGISTRY.items()) if method.acts_in_vision]


@pytest.mark.parametrize("method", VISION_METHODS)
def test_a_vision_tower_that_checkpointing_would_replay_is_refused(method):
    """Gradient checkpointing runs a tower layer again in backward, without the method's scoring or merges
    (wrong gradients, or torch's CheckpointError): refused, even with the tower frozen (checkpointing makes the
    embeddings' output require grad); with checkpointing off in the tower, the model trains."""
    model = checkpointed_for_training(FAMILIES["llava"]("sdpa"))
    inputs = tiny_inputs(model, LAYOUTS)
    with torch.enable_grad(), vtprune.apply(model, method, 10, **WITHOUT_CHECKPOINT.get(method, {})):
        with pytest.raises(ValueError, match="which gradient checkpointing would run again"):
            model(**inputs)
        model.model.vision_tower.requires_grad_(False)
        with pytest.raises(ValueError, match="which gradient checkpointing would run again"):
            model(**inputs)
        for layer in model.model.vision_tower.encoder.layers:
            layer.gradient_checkpointing = False
        if hooks_inside_checkpoint():  # 5.17 refuses a checkpointed decoder too (the next test)
            for layer in model.model.language_model.layers:
                layer.gradient_checkpointing = False
        model(**inputs).logits[:, -1].sum().backward()
        assert model.lm_head.weight.grad is not None


def test_an_in_llm_method_trains_alike_with_and_without_checkpointing(family):
    """Checkpointed decoder layers fill no KV cache (transformers drops it): the prefill runs as one without.
    Where transformers checkpoints a layer's __call__ (5.17), the backward pass would run vtprune's layer hooks
    again after the forward: refused; a forward without gradients runs there too."""
    model = FAMILIES[family]("sdpa").train()
    inputs = tiny_inputs(model, LAYOUTS)

    def gradients():
        model.zero_grad()
        with torch.enable_grad(), vtprune.apply(model, "fastv", 10):
            model(**inputs).logits[:, -1].sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    with vtprune.apply(model, "fastv", 10):
        without_gradients = model(**inputs).logits
    checkpointed_for_training(model)
    with vtprune.apply(model, "fastv", 10):
        torch.testing.assert_close(model(**inputs).logits, without_gradients)
    if hooks_inside_checkpoint():
        with pytest.raises(NotImplementedError, match="gradient checkpointing in transformers"):
            gradients()
        return
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
