"""CLASP: identity fusion is exact, fusion agrees between forward and generate, classes mix in a batch."""

import json

import numpy as np
import pytest
import torch

import vtprune
from vtprune.methods import ImageView, ModelInfo, Stage
from vtprune.methods.clasp import CLASP, fusion_candidates
from vtprune.methods import primitives
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


def test_identity_fusion_reproduces_the_model_exactly(tmp_path, monkeypatch):
    """A table whose every class "mixes" the model's own feature layer alone prunes as no table does, bit for bit,
    with the mixing run (at a budget that prunes: a kept-whole image is not fused)."""
    from vtprune.adapters.llava import LlavaAdapter

    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(text_before=6)])
    path = tmp_path / "identity.json"
    path.write_text(json.dumps({"classes": {c: {"fusion": {"-2": 1.0}, "split": 0.5} for c in CLASSES}}))
    mixed = []
    mix = LlavaAdapter.mixed_features
    monkeypatch.setattr(LlavaAdapter, "mixed_features", lambda self, *args: mixed.append(1) or mix(self, *args))
    with torch.no_grad():
        with vtprune.apply(model, "clasp", 10, question_class="ocr"):
            reference = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)
        assert not mixed
        with vtprune.apply(model, "clasp", 10, question_class="ocr", calibration=str(path)) as pruner:
            assert pruner.method.fuses_vision_layers
            assert torch.equal(model(**inputs).logits, reference)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS), generated)
        assert mixed


def test_fusion_on_a_projector_reading_several_layers_is_refused(table):
    model = tiny_llava()
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match=r"reads layers \[-2, -1\] side by side; pass fusion=False"):
        vtprune.apply(model, "clasp", 16, question_class="ocr", calibration=str(table))
    vtprune.apply(model, "clasp", 16, question_class="ocr", calibration=str(table), fusion=False).remove()


def test_the_router_reads_the_question_without_the_template():
    """CLASP hands its router the prompt's question: the chat template around it is cut (the reference model's
    "USER: ... ASSISTANT:", whose word-level tokenizer decodes it as "user : ... assistant :")."""
    from vtprune.eval.generation import batch_inputs
    from vtprune.synth import generate
    from vtprune.synth.reference import load_reference

    model, processor = load_reference()
    samples = generate(4, 6)
    inputs = batch_inputs(processor, [s.question for s in samples], [s.image for s in samples])
    seen = []
    with torch.no_grad(), vtprune.apply(model, "clasp", 64, tokenizer=processor.tokenizer,
                                        router=lambda text: seen.append(text) or "general"):
        model(**inputs)
    assert seen == [s.question for s in samples]


@pytest.mark.parametrize("budget", [64, 1.0, 10_000])
def test_a_budget_keeping_every_token_leaves_the_features_unfused(table, budget):
    """A budget at or above an image's token count is a no-op (README, Semantics), a fusion table or not; an image
    the budget prunes is fused beside it."""
    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(text_before=6)])
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtprune.apply(model, "clasp", budget, tokenizer=IdsAsText(), router=class_of_first_token,
                           calibration=str(table)) as pruner:
            assert pruner.method.fuses_vision_layers
            assert torch.equal(model(**inputs).logits, reference)
        with vtprune.apply(model, "clasp", 63, tokenizer=IdsAsText(), router=class_of_first_token,
                           calibration=str(table)):
            fused = model(**inputs).logits
        with vtprune.apply(model, "clasp", 63, tokenizer=IdsAsText(), router=class_of_first_token,
                           calibration=str(table), fusion=False):
            assert not torch.allclose(model(**inputs).logits, fused)


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
                                        calibration=str(table)):
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


def numpy_farthest_point(features: np.ndarray, chosen: list[int], k: int) -> list[int]:
    """The completion rule written plainly: each pick is the token whose nearest chosen token (cosine distance)
    is farthest; from nothing, the token farthest from the mean direction."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    chosen, picks = list(chosen), []
    for _ in range(min(k, len(unit) - len(chosen))):
        if chosen:
            nearest = (1 - unit @ unit[chosen].T).min(axis=1)
        else:
            mean = unit.mean(axis=0)
            nearest = 1 - unit @ (mean / np.linalg.norm(mean))
        nearest[chosen] = -np.inf
        pick = int(nearest.argmax())
        chosen.append(pick)
        picks.append(pick)
    return picks


@pytest.fixture(params=["held", "pick by pick"])
def distance_matrix(request, monkeypatch):
    """Whether the greedy loop reads each pick's distances off the held distance matrix or computes them."""
    if request.param == "pick by pick":
        monkeypatch.setattr(primitives, "DISTANCE_MATRIX_ENTRIES", 16)


@pytest.mark.parametrize("pivots", [[], [3], [0, 7, 19]])
def test_farthest_point_is_the_plain_rule(pivots, distance_matrix):
    features = torch.randn(40, 12, generator=torch.Generator().manual_seed(len(pivots)), dtype=torch.float64)
    expected = numpy_farthest_point(features.numpy(), pivots, 9)
    assert farthest_point(features, torch.tensor(pivots, dtype=torch.long), 9).tolist() == expected


def test_a_batch_of_items_is_selected_as_each_alone(table, distance_matrix):
    """select_batch grows the completion tokens of items of one shape and pivot count in one loop; the others
    (another size, another keep, another class's split) in groups of their own."""
    g = torch.Generator().manual_seed(5)
    shapes = [(48, 16, 12, 0)] * 3 + [(42, 16, 12, 0), (48, 16, 7, 0), (48, 16, 12, 3), (48, 16, 12, 0)]
    views = [ImageView.of_grid(torch.randn(n, d, generator=g), 6, n // 6, keep=k, layer=2, stage=0, image_index=0,
                               sizes=torch.ones(n), attention=torch.rand(n, generator=g), text=torch.tensor([word]))
             for n, d, k, word in shapes]
    method = CLASP(CLASP.parse_options({"tokenizer": IdsAsText(), "router": class_of_first_token,
                                        "calibration": str(table)}))
    batched = method.select_batch(views)
    assert batched[0].numel() == 12 and batched[4].numel() == 7
    for view, picked in zip(views, batched, strict=True):
        assert picked.tolist() == method.select(view).tolist()
        assert picked.unique().numel() == view.keep


def test_clasp_asks_for_a_way_to_route():
    with pytest.raises(ValueError, match="tokenizer=processor.tokenizer"):
        vtprune.apply(tiny_llava(), "clasp", 16)
    with pytest.raises(ValueError, match="router reads the instruction's text, which needs the tokenizer"):
        vtprune.apply(tiny_llava(), "clasp", 16, router=lambda text: "ocr")  # it would route "" every time
    with pytest.raises(ValueError, match="not a CLASP calibration table"):
        vtprune.apply(tiny_llava(), "clasp", 16, question_class="ocr", calibration="/nonexistent.json")
    for entry, problem in [({"generl": {"fusion": None, "split": 0.5}}, "names class 'generl', which the router"),
                           ({"ocr": {"fusion": None, "split": 7}}, "gives class 'ocr' a split of 7.0, outside"),
                           ({"ocr": {"fusion": {"1": 0.0, "2": 0.0}, "split": 0.5}}, "fusion weights"),
                           ({"ocr": {"fusion": {"1": 2.0, "2": 2.0}, "split": 0.5}}, "sum to 1"),
                           ({"ocr": {"fusion": {"1": 1.5, "2": -0.5}, "split": 0.5}}, ">= 0")]:
        with pytest.raises(ValueError, match=problem):
            vtprune.apply(tiny_llava(), "clasp", 16, question_class="ocr", calibration={"classes": entry})
    thirds_by_hand = {"ocr": {"fusion": {"1": 0.3333, "2": 0.3333, "3": 0.3333}, "split": 0.5}}
    vtprune.apply(tiny_llava(), "clasp", 16, question_class="ocr", calibration={"classes": thirds_by_hand}).remove()


def test_options_of_the_types_clasp_declares_are_accepted(table):
    """The option checks that name a wrong type (a number for the table, a string for the tokenizer or the
    router) let through what the options declare: a table's pathlib.Path, a real tokenizer, any callable."""
    from vtprune.tiny_processors import tiny_processor

    model = tiny_llava()
    tokenizer = tiny_processor(model).tokenizer
    vtprune.apply(model, "clasp", 16, question_class="ocr", calibration=table).remove()
    with vtprune.apply(model, "clasp", 16, tokenizer=tokenizer, router=lambda text: "count") as pruner:
        model(**tiny_inputs(model, [SampleLayout()]))
        assert pruner.last_stats.kept_per_sample == [16]


def test_fusion_on_a_model_without_it_is_refused(table):
    from vtprune.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl()
    with pytest.raises(ValueError, match="fusion=False"):
        vtprune.apply(model, "clasp", 16, question_class="ocr", calibration=str(table))
    assert not any(m._forward_pre_hooks for m in model.model.language_model.layers)
    vtprune.apply(model, "clasp", 16, question_class="ocr", calibration=str(table), fusion=False).remove()


@pytest.mark.parametrize("depth", [4, 32])
def test_default_is_one_step_keeping_the_budget_and_progressive_is_an_option(depth):
    model = ModelInfo("llava", depth)
    one_step = CLASP(CLASP.parse_options({"question_class": "ocr"}))
    assert one_step.stages(model, 192, 576) == [Stage(2, 192)]
    progressive = CLASP(CLASP.parse_options({"question_class": "ocr", "progressive": True}))
    expected_layers = [2, 6, 15] if depth == 32 else [1, 2, 3]
    assert [s.layer for s in progressive.stages(model, 64, 576)] == expected_layers
    assert [s.keep for s in progressive.stages(model, 64, 576)] == [128, 96, 64]
    # 65 x 1.5 = 97.5 rounds (half to even) to 98; a stage never keeps more than the image has
    assert [s.keep for s in progressive.stages(model, 65, 576)] == [130, 98, 65]
    assert [s.keep for s in progressive.stages(model, 400, 576)] == [576, 576, 400]


def test_one_step_keeps_pivots_then_coverage_of_exactly_the_budget():
    torch.manual_seed(0)
    hidden, attention = torch.randn(40, 16), torch.rand(40)
    view = ImageView.of_grid(hidden, 5, 8, keep=10, layer=2, stage=0, image_index=0, sizes=torch.ones(40),
                             attention=attention, text=torch.tensor([5]))
    method = CLASP(CLASP.parse_options({"question_class": "ocr", "split": 0.3}))
    picked = method.select(view)
    pivots = torch.topk(attention, 3).indices.sort().values
    assert picked.numel() == 10 and torch.equal(picked[:3], pivots)
    assert torch.equal(picked[3:], farthest_point(hidden, pivots, 7))


@pytest.mark.parametrize("split, keep", [(0.55, 7), (0.3, 10), (0.75, 9), (0.05, 6), (0.0, 5), (1.0, 4), (0.5, 5)])
def test_a_stage_selects_as_an_independent_implementation(split, keep):
    """Pivots: the round(split x R) tokens of highest attention (at least one unless the split is 0), in image order;
    then completion tokens by the plain farthest-point rule; splits whose share of R is not whole included. The
    rounding is Python's round, half to even: 0.5 of 5 is 2 pivots."""
    generator = torch.Generator().manual_seed(int(100 * split) + keep)
    hidden = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    attention = torch.rand(40, generator=generator, dtype=torch.float64)
    view = ImageView.of_grid(hidden, 5, 8, keep=keep, layer=2, stage=0, image_index=0, sizes=torch.ones(40),
                             attention=attention, text=torch.tensor([5]))
    count = max(round(split * keep), 1 if split > 0 else 0)
    pivots = sorted(np.argsort(-attention.numpy(), kind="stable")[:count].tolist())
    expected = pivots + numpy_farthest_point(hidden.numpy(), pivots, keep - count)
    method = CLASP(CLASP.parse_options({"question_class": "ocr", "split": split}))
    assert method.select(view).tolist() == expected


CALIBRATION = {"classes": {"ocr": {"fusion": None, "split": 0.25}, "count": {"fusion": None, "split": 0.75}}}


@pytest.mark.parametrize("calibration, question_class, keep, count", [
    (None, "ocr", 10, 5), (CALIBRATION, "ocr", 8, 2), (CALIBRATION, "count", 8, 6),
])
def test_the_pivots_share_is_the_classs_split_or_one_half_without_a_table(calibration, question_class, keep, count):
    """Each class's split in the calibration table is its pivots' share of the keep (ocr 0.25, count 0.75 here);
    without a table every class splits evenly (DEFAULT_SPLIT 0.5)."""
    attention = torch.rand(64, generator=torch.Generator().manual_seed(2))
    hidden = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    method = CLASP(CLASP.Options(question_class=question_class, calibration=calibration))
    picked = method.select(view(attention, hidden, keep))
    pivots = torch.topk(attention, count).indices.sort().values
    assert picked[:count].tolist() == pivots.tolist()
    assert picked[count:].tolist() == farthest_point(hidden, pivots, keep - count).tolist()


def test_tied_attention_keeps_torch_topks_pivots():
    """Pivots are a top-k by attention; on equal attention they are whatever torch.topk returns (on the CPU not the
    lowest indices), in image order."""
    attention = torch.full((64,), 1 / 64)
    hidden = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    picked = CLASP(CLASP.Options(question_class="ocr", split=1.0)).select(view(attention, hidden, 5))
    assert picked.tolist() == torch.topk(attention, 5).indices.sort().values.tolist()


@pytest.mark.parametrize("tower_layers, own", [(24, -2), (2, -2), (26, -1)])
def test_fusion_candidates_sweep_shallow_to_deep(tower_layers, own):
    num_states = tower_layers + 1
    candidates = fusion_candidates(own, num_states)
    assert candidates[0] is None and len(candidates) == 6  # the model's own layer, then strategies A-E
    deep = own % num_states
    for mix in candidates[1:]:
        assert abs(sum(mix.values()) - 1) < 1e-9 and max(mix) == deep and all(1 <= layer <= deep for layer in mix)
    on_deep = [mix[deep] for mix in candidates[1:]]
    assert on_deep == sorted(on_deep) and on_deep[0] < on_deep[-1]  # A is shallow-weighted, E deep-weighted
    if tower_layers == 24:
        assert sorted(candidates[1]) == [6, 12, 23]  # a quarter, half the depth, and the feature layer


def test_items_of_one_shape_and_pivot_count_but_different_keeps_are_selected_apart():
    """keep 5 and 4 at split 0.5 both give 2 pivots (round(2.5) = 2): grouped together, one would grow the other's
    number of completion tokens."""
    g = torch.Generator().manual_seed(8)
    views = [ImageView.of_grid(torch.randn(48, 16, generator=g), 6, 8, keep=keep, layer=2, stage=0, image_index=0,
                               sizes=torch.ones(48), attention=torch.rand(48, generator=g), text=torch.tensor([5]))
             for keep in (5, 4)]
    method = CLASP(CLASP.Options(question_class="ocr", split=0.5))
    for view, picked in zip(views, method.select_batch(views), strict=True):
        assert picked.numel() == view.keep == picked.unique().numel()
        assert picked.tolist() == method.select(view).tolist()
