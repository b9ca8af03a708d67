"""CLASP: identity fusion is exact, fusion agrees between forward and generate, classes mix in a batch."""

import json

import pytest
import torch

import vtprune
from vtprune.methods import ImageView
from vtprune.methods.clasp import CLASP
from vtprune.methods.primitives import farthest_point
from vtprune.router import CLASSES
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

from .conftest import SUPPRESS
from .test_engine_invariants import sample_alone, split_vision


class IdsAsText:
    """Stands in for a tokenizer: the tiny models' prompts are random ids."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def class_of_first_token(text: str) -> str:
    return CLASSES[int(text.split()[0]) % len(CLASSES)]


@pytest.fixture
def table(tmp_path):
    """Every class fuses differently; the tiny tower's own feature layer is -2."""
    classes = {name: {"fusion": {"-1": 0.2 * i, "-2": 1 - 0.2 * i}, "split": 0.25 + 0.1 * i} for i, name in enumerate(CLASSES)}
    path = tmp_path / "clasp.json"
    path.write_text(json.dumps({"classes": classes}))
    return path


def test_identity_fusion_reproduces_the_model_exactly(tmp_path):
    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(text_before=6)])
    path = tmp_path / "identity.json"
    path.write_text(json.dumps({"classes": {c: {"fusion": {"-2": 1.0}, "split": 0.5} for c in CLASSES}}))
    with torch.no_grad():
        reference = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)
        with vtprune.apply(model, "clasp", 10_000, question_class="ocr", calibration=str(path)) as pruner:
            assert pruner.method.fuses_vision_layers
            assert torch.equal(model(**inputs).logits, reference)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS), generated)


def test_fusion_is_the_same_in_forward_and_generate(table):
    """generate() may encode images ahead of the first forward; the fused features must not differ."""
    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(text_before=6)])
    with torch.no_grad(), vtprune.apply(model, "clasp", 20, tokenizer=IdsAsText(), router=class_of_first_token,
                                        calibration=str(table)):
        forward = model(**inputs).logits[:, -1]
        first_step = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True).logits[0]
    torch.testing.assert_close(first_step, forward, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[:, -1], forward)  # fusion did change the answer


def test_a_batch_with_mixed_classes_equals_its_samples_alone(table):
    model = tiny_llava()
    layouts = [SampleLayout(images=2), SampleLayout(images=1, text_before=7), SampleLayout(images=1, text_before=4)]
    inputs = tiny_inputs(model, layouts, seed=3)
    classes = {class_of_first_token(IdsAsText.decode(row[mask.bool()].tolist()))
               for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])}
    assert len(classes) > 1
    with torch.no_grad(), vtprune.apply(model, "clasp", 12, tokenizer=IdsAsText(), router=class_of_first_token,
                                        calibration=str(table)) as pruner:
        batch = model(**inputs).logits[:, -1]
        for b, share in enumerate(split_vision(model, inputs, layouts)):
            alone = model(**sample_alone(inputs, b), **share).logits[0, -1]
            torch.testing.assert_close(batch[b], alone, atol=1e-5, rtol=0)


def view(attention, hidden, keep, text=torch.tensor([5])):
    n = attention.numel()
    return ImageView.of_grid(hidden, 1, n, keep=keep, layer=2, stage=0, image_index=0, sizes=torch.ones(n),
                             attention=attention, text=text)


def test_pivots_follow_attention_and_completion_covers_the_rest():
    attention = torch.tensor([0.5, 0.4, 0.05, 0.03, 0.02])
    hidden = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.98, 0.02], [0.0, 1.0], [-1.0, 0.0]])
    pivots_only = CLASP(CLASP.Options(question_class="ocr", split=1.0))
    assert sorted(pivots_only.select(view(attention, hidden, 2)).tolist()) == [0, 1]
    half = CLASP(CLASP.Options(question_class="ocr", split=0.5))
    # One pivot (token 0), then the token farthest from it (4, opposite), not the near-duplicate 1.
    assert sorted(half.select(view(attention, hidden, 2)).tolist()) == [0, 4]
    no_completion = CLASP(CLASP.Options(question_class="ocr", split=0.5, completion=False))
    assert sorted(no_completion.select(view(attention, hidden, 2)).tolist()) == [0, 1]


def test_farthest_point_picks_the_least_covered_token_each_time():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    assert farthest_point(points, torch.tensor([0]), 2).tolist() == [2, 1]
    assert farthest_point(points, torch.tensor([0, 1, 2, 3]), 2).numel() == 0


def test_clasp_asks_for_a_way_to_route():
    with pytest.raises(ValueError, match="tokenizer=processor.tokenizer"):
        vtprune.apply(tiny_llava(), "clasp", 16)
    with pytest.raises(ValueError, match="not a CLASP calibration table"):
        vtprune.apply(tiny_llava(), "clasp", 16, question_class="ocr", calibration="/nonexistent.json")


def test_fusion_on_a_model_without_it_is_refused(table):
    from vtprune.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl()
    with pytest.raises(ValueError, match="fusion=False"):
        vtprune.apply(model, "clasp", 16, question_class="ocr", calibration=str(table))
    assert not any(m._forward_pre_hooks for m in model.model.language_model.layers)
    vtprune.apply(model, "clasp", 16, question_class="ocr", calibration=str(table), fusion=False).remove()
