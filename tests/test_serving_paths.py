"""The ways a production user runs a model that the other tests do not: transformers' `image-text-to-text`
pipeline (its own preprocessing, collation and generate call) and accelerate's offloading hooks (how a model
larger than one device is run: weights moved in at each module's forward). A pruned model must answer through
them exactly as it answers when called directly."""

import copy

import pytest
import torch
from accelerate import cpu_offload
from transformers import pipeline

import vtprune
from vtprune.eval.generation import generate_answers
from vtprune.tiny import SampleLayout, tiny_inputs

from .conftest import FAMILIES, SUPPRESS
from .test_generation import image, templated

STEPS = 3
QUESTIONS = ["what colour is the cat ?", "how many shapes are there ?"]
IMAGES = [[image(40, 90, 1)], [image(56, 56, 3)]]


def messages(question, images):
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                          {"type": "text", "text": question}]}]


@pytest.mark.parametrize("method", ["fastv", "clse"])
def test_the_pipeline_answers_as_the_pruned_model_called_directly(family, method):
    """The pipeline's answers, batched as it collates them (left-padded), equal vtprune's own generation on the
    same prompts, and the pipeline's prefill was pruned. (transformers' pipeline cannot collate OneVision's anyres
    pixels of two image sizes, pruned or not: one sample a batch there.)"""
    model = FAMILIES[family]("sdpa")
    processor = templated(model)
    processor.tokenizer.padding_side = "left"
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    batch_size = 1 if family == "llava_onevision" else 2
    with vtprune.apply(model, method, 0.5) as pruner:
        out = pipe(text=[messages(q, i) for q, i in zip(QUESTIONS, IMAGES)], batch_size=batch_size,
                   max_new_tokens=STEPS, return_full_text=False,
                   generate_kwargs=dict(do_sample=False, suppress_tokens=SUPPRESS))
        stats = pruner.last_stats
        assert len(stats.kept_per_sample) == batch_size
        assert all(kept < seen for kept, seen in zip(stats.kept_per_sample, stats.visual_tokens_per_sample))
        direct = [generate_answers(model, processor, [q], [i], STEPS, suppress_tokens=SUPPRESS)[0]
                  for q, i in zip(QUESTIONS, IMAGES)]
    assert [o[0]["generated_text"].strip() for o in out] == direct


OFFLOADED = [("llava", "fastv"), ("llava", "clse"), ("llava", "pdrop"), ("llava", "visionzip"), ("llava", "tome"),
             ("llava_next", "hired"), ("qwen2_vl", "clse"), ("qwen2_5_vl", "dart"), ("video_llava", "sparsevlm")]


@pytest.mark.parametrize("family, method", OFFLOADED)
def test_a_model_under_accelerate_offloading_prunes_as_the_model_in_memory(family, method):
    """accelerate's cpu_offload replaces every module's forward with a hook that brings its weights in (the
    mechanism device_map="auto" uses to spread a model over devices and disk): the same tokens are kept, the
    logits are the same, and remove() leaves the offloaded model computing as before."""
    model = FAMILIES[family]("sdpa")
    samples = [SampleLayout(images=1), SampleLayout(images=2, text_before=1)]
    inputs = tiny_inputs(model, samples)
    budget = 12 if method == "tome" else 4
    with vtprune.apply(model, method, budget) as pruner:
        expected, kept = model(**inputs).logits, pruner.last_decision.kept
    unpruned = model(**inputs).logits
    offloaded = cpu_offload(copy.deepcopy(model), execution_device="cpu")
    with vtprune.apply(offloaded, method, budget) as pruner:
        logits = offloaded(**inputs).logits
        assert [[k.tolist() for k in stage] for stage in pruner.last_decision.kept] == \
               [[k.tolist() for k in stage] for stage in kept]
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(logits, unpruned)
    torch.testing.assert_close(offloaded(**inputs).logits, unpruned, atol=1e-6, rtol=0)
