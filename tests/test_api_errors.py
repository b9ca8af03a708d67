"""Bad input gets an error that names the problem and the fix."""

import math
import re

import numpy as np

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtprune
from vtprune.tiny import tiny_llava, tiny_qwen2_vl


@pytest.fixture
def model():
    return tiny_llava()


@pytest.mark.parametrize(
    "budget, message",
    [
        (0, "at least 1"),
        (-5, "at least 1"),
        (math.nan, r"\(0, 1\]"),
        (1.5, r"\(0, 1\]"),
        (0.0, r"\(0, 1\]"),
        (True, "int"),
        ("64", "int"),
        (None, "int"),
    ],
)
def test_bad_budgets(model, budget, message):
    with pytest.raises(ValueError, match=message):
        vtprune.apply(model, "fastv", budget)


def test_unknown_method_lists_the_registered_ones(model):
    with pytest.raises(ValueError, match="unknown method 'fastvv' \\(did you mean 'fastv'\\?\\); registered methods: "
                                         ".*fastv, ficoco_v, hired, pdrop, pool, prumerge\\+, random,"):
        vtprune.apply(model, "fastvv", 64)
    with pytest.raises(ValueError, match="unknown method 'zzz'; registered"):  # nothing near: no guess
        vtprune.apply(model, "zzz", 64)


@pytest.mark.parametrize("method, message", [
    ("fastv:layer=3", r"a method's options are keyword arguments of apply "
                      r"\(apply\(model, 'fastv', budget, layer=3\)\)"),
    ("fastv,clse", "one method here"),
    ("unpruned", "the unpruned model is no method"),
])
def test_a_method_named_as_the_command_line_would_is_told_how_apply_takes_it(model, method, message):
    with pytest.raises(ValueError, match=f"unknown method '{method}': {message}"):
        vtprune.apply(model, method, 64)


def test_a_method_that_is_no_name_is_a_type_error_saying_so(model):
    with pytest.raises(TypeError, match="a method is given by its name, a string .*; got NoneType"):
        vtprune.apply(model, None, 64)


def test_unknown_option_lists_the_method_options(model):
    with pytest.raises(TypeError, match="no option 'k'; its options are: layer"):
        vtprune.apply(model, "fastv", 64, k=3)
    with pytest.raises(TypeError, match="no option 'per_rond' \\(did you mean 'per_round'\\?\\); its options are: "
                                        "important_ratio, layer, per_round"):
        vtprune.apply(model, "vispruner", 64, per_rond=4)


@pytest.mark.parametrize("layer", [0, 4, 99])
def test_fastv_layer_out_of_range(model, layer):
    with pytest.raises(ValueError, match="layer"):
        vtprune.apply(model, "fastv", 64, layer=layer)


def test_unsupported_model_lists_the_supported_ones():
    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*LlavaForConditionalGeneration.*Qwen2VLForConditionalGeneration"):
        vtprune.apply(text_only, "random", 8)


def test_applying_twice_is_an_error_until_removed(model):
    first = vtprune.apply(model, "random", 8)
    with pytest.raises(RuntimeError, match="already carries a pruner.*remove"):
        vtprune.apply(model, "fastv", 8)
    first.remove()
    vtprune.apply(model, "fastv", 8).remove()


def mistral_llava(sliding_window):
    return tiny_llava(text="mistral", sliding_window=sliding_window)


def test_a_sliding_window_decoder_is_refused_whichever_way_its_config_says_so():
    """Mistral has no layer_types (MistralConfig's default window, 4096, makes every layer slide); Qwen2 names its
    sliding layers. The engine's cache slicing and masks assume full attention (a Mistral window ran into a
    cache-length EngineError, or a shape error inside sdpa)."""
    with pytest.raises(ValueError, match="sliding window of 4096 tokens.*sliding_window=None"):
        vtprune.apply(mistral_llava(4096), "fastv", 16)
    qwen = tiny_qwen2_vl()
    text = qwen.model.language_model.config
    text.sliding_window, text.layer_types = 8, ["full_attention"] + ["sliding_attention"] * (len(text.layer_types) - 1)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        vtprune.apply(qwen, "fastv", 16)
    assert not hasattr(qwen, "_vtprune_pruner")


@pytest.mark.parametrize("family, strategy, expected", [
    ("llava", "full", "'default' \\(each image's CLS token dropped\\)"),
    ("llava_onevision", "default", "'full' \\(every token the tower outputs\\)")])
def test_a_feature_strategy_the_family_is_not_laid_out_for_is_refused(family, strategy, expected):
    from .conftest import FAMILIES

    model = FAMILIES[family]("sdpa")
    model.config.vision_feature_select_strategy = strategy
    with pytest.raises(ValueError, match=f"vision_feature_select_strategy='{strategy}' is not supported: .*{expected}"):
        vtprune.apply(model, "random", 4)
    assert not hasattr(model, "_vtprune_pruner")


@pytest.mark.parametrize("key, value", [("vision_feature_select_strategy", "full"), ("vision_feature_layer", -3)])
def test_a_forward_that_reads_the_tower_otherwise_than_the_config_is_refused(key, value):
    """LLaVA's forward takes both over its config's: the grids would then be another size (a CLS token more), or the
    tower methods would read a layer the projector does not."""
    from vtprune.tiny import SampleLayout, tiny_inputs

    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])  # (refused before its placeholders are counted)
    with vtprune.apply(model, "random", 8) as pruner:
        with pytest.raises(ValueError, match=re.escape(f"{key}={value!r} was passed to the forward (or generate), over "
                                                       f"the model config's {getattr(model.config, key)!r}")):
            model(**inputs, **{key: value})
        model(**inputs, **{key: getattr(model.config, key)})  # the config's own: runs
        assert pruner.last_stats.kept_per_sample == [8]


@pytest.mark.parametrize("method", ["tome", "ficoco_v"])
def test_merging_in_the_tower_is_refused_where_the_projector_reads_several_layers(method):
    model = tiny_llava()
    model.config.vision_feature_layer = [-2, -5]
    with pytest.raises(ValueError, match=re.escape(f"method {method!r} merges in the tower's blocks up to the one whose "
                                                   "output the projector reads, but this model's projector reads "
                                                   "layers [-2, -5] side by side")):
        vtprune.apply(model, method, 16)
    assert not hasattr(model, "_vtprune_pruner")


def test_a_mistral_decoder_without_a_window_is_pruned():
    from vtprune.tiny import SampleLayout, tiny_inputs

    model = mistral_llava(None)
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    before = model(**inputs).logits
    with vtprune.apply(model, "fastv", 8) as pruner:
        pruned = model(**inputs).logits
        assert pruner.last_stats.kept_per_sample == [8]
    assert not torch.allclose(pruned, before)
    assert torch.equal(model(**inputs).logits, before)


def test_unsupported_attention_implementation():
    model = tiny_llava("eager")
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention.*eager, sdpa"):
        vtprune.apply(model, "random", 8)


def test_two_models_carry_different_methods_at_once():
    from vtprune.tiny import SampleLayout, tiny_inputs

    llava, qwen = tiny_llava(), tiny_qwen2_vl()
    with torch.no_grad(), vtprune.apply(llava, "fastv", 5) as a, vtprune.apply(qwen, "uniform", 7) as b:
        llava(**tiny_inputs(llava, [SampleLayout()]))
        qwen(**tiny_inputs(qwen, [SampleLayout()]))
        assert a.last_stats.kept_per_sample == [5] and b.last_stats.kept_per_sample == [7]


def test_methods_lists_each_with_where_and_defaults():
    listed = {info.name: info for info in vtprune.methods()}
    assert set(listed) == {"clasp", "clse", "clse_m", "dart", "divprune", "fastv", "ficoco_v", "hired", "pdrop", "pool", "prumerge+", "random",
                           "sparsevlm", "tome", "uniform", "visionzip", "vispruner"}
    assert listed["fastv"].defaults == {"layer": 2}
    assert listed["random"].defaults == {"seed": 0}
    assert "LLM" in listed["uniform"].where
    assert listed["clse"].defaults["score"] == "clse_attn" and listed["clse"].defaults["slice_kv"] is None


def test_images_without_input_ids_are_refused(model):
    from vtprune.tiny import SampleLayout, tiny_inputs

    inputs = tiny_inputs(model, [SampleLayout()])
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with vtprune.apply(model, "random", 8), pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=embeds, **inputs)


@pytest.mark.parametrize(
    "budget, expected",
    [(np.int64(8), 8), (np.int32(8), 8), (torch.tensor(8), 8), (np.float64(0.25), 0.25), (torch.tensor(0.25), 0.25),
     (np.array(8), 8), (np.array(0.25), 0.25), (np.float32(1.0), 1.0)],  # a fraction of 1: every token
)
def test_integral_and_real_budgets_of_any_type(model, budget, expected):
    from vtprune.tiny import SampleLayout, tiny_inputs

    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with vtprune.apply(model, "random", budget) as pruner:
        assert pruner.budget == expected and type(pruner.budget) is type(expected)
        model(**inputs)
        kept = pruner.last_stats.kept_per_sample
    with vtprune.apply(model, "random", expected) as pruner:
        model(**inputs)
        assert pruner.last_stats.kept_per_sample == kept


@pytest.mark.parametrize("budget", [torch.tensor(True), np.bool_(True), torch.tensor([8]), np.array([8])])
def test_budgets_that_are_not_one_number(model, budget):
    with pytest.raises(ValueError, match="budget must be"):
        vtprune.apply(model, "fastv", budget)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("random", {"seed": "abc"}, "'seed' must be an int"),
        ("random", {"seed": 1.5}, "'seed' must be an int"),
        ("random", {"seed": True}, "'seed' must be an int"),
        ("random", {"seed": 2**70}, r"\[0, 2\*\*32\)"),
        ("random", {"seed": -1}, r"\[0, 2\*\*32\)"),
        ("clse", {"layers": 1}, "'layers' must be a tuple of an int or None"),
        ("clse", {"layers": (1, "x")}, "'layers' must be a tuple of an int"),
        ("clse", {"slice_kv": "false"}, "'slice_kv' must be True or False"),
        ("fastv", {"layer": 2.0}, "'layer' must be an int"),
        ("clse", {"keep": (0, 0, 0)}, "keep counts must each be >= 1"),
        ("clse", {"tau": float("inf")}, "finite tau > 0"),
        ("clasp", {"question_class": "ocr", "progressive": True, "multipliers": (2.0, -1.0, 1.0)}, "must be > 0"),
        ("clasp", {"question_class": "ocr", "calibration": 5}, "'calibration' must be a str or a path or a dict"),
        ("clasp", {"question_class": "ocr", "router": "ocr"}, "'router' must be a callable"),
        ("clasp", {"tokenizer": "notatokenizer"}, "a str has no decode: pass tokenizer=processor.tokenizer"),
        ("sparsevlm", {"counts": (10, 20, 30)}, "counts must not grow from stage to stage"),
    ],
)
def test_method_options_of_the_wrong_type_are_refused_at_apply(model, method, options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        vtprune.apply(model, method, 8, **options)


def test_method_options_of_numpy_types_are_accepted_and_read_as_pythons(model):
    """(random's seed reached torch.Generator.manual_seed, which takes a Python int only: it failed at the first
    forward.)"""
    from vtprune.tiny import SampleLayout, tiny_inputs

    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    kept = []
    for seed in (3, np.int64(3)):
        with vtprune.apply(model, "random", 8, seed=seed) as pruner:
            model(**inputs)
            kept.append(pruner.last_decision.kept[0][0].tolist())
            assert type(pruner.method.options.seed) is int
    assert kept[0] == kept[1]
    with vtprune.apply(model, "clse", 8, layers=(1, 2, 3), tau=np.float32(0.2)) as pruner:
        assert type(pruner.method.options.tau) is float and pruner.method.options.layers == (1, 2, 3)


def test_a_pruned_model_is_not_pickled_and_a_compiled_one_is_told_to_apply_first(model):
    import pickle

    with vtprune.apply(model, "fastv", 8):
        with pytest.raises(TypeError, match=r"a model with a vtprune pruner cannot be pickled \(torch.save of the "
                                            r"model, multiprocessing\).*remove\(\) the pruner first"):
            pickle.dumps(model)
    pickle.dumps(model)  # removed: the model's own again
    with pytest.raises(ValueError, match="vtprune.apply takes the model itself, not what torch.compile returned"):
        vtprune.apply(torch.compile(model, backend="eager"), "fastv", 8)


def test_a_removed_pruner_refuses_a_with_block_and_a_replay(model):
    """Its hooks are off the model: a with block or a replay on it would run unpruned, without a word."""
    from vtprune.tiny import SampleLayout, tiny_inputs

    pruner = vtprune.apply(model, "random", 8)
    model(**tiny_inputs(model, [SampleLayout()]))
    decision = pruner.last_decision
    pruner.remove()
    with pytest.raises(RuntimeError, match="this pruner was removed.*call vtprune.apply"):
        with pruner:
            pass
    with pytest.raises(RuntimeError, match="this pruner was removed.*call vtprune.apply"):
        with pruner.replaying(decision):
            pass
    pruner.remove()  # (removing twice stays harmless)


def test_a_pruners_with_block_ends_it_and_is_not_opened_twice(model):
    pruner = vtprune.apply(model, "random", 8)
    with pruner:
        with pytest.raises(RuntimeError, match="with block is already open"):
            with pruner:
                pass
        assert getattr(model, "_vtprune_pruner", None) is pruner  # the refused inner block removed nothing
    assert getattr(model, "_vtprune_pruner", None) is None
    with pytest.raises(RuntimeError, match="this pruner was removed"):
        with pruner:
            pass


def test_a_pruners_repr_is_one_line_whatever_its_options_hold(model):
    class LongWinded:
        def decode(self, ids, **kwargs):
            return "what colour is it ?"

        def __repr__(self):
            return "LongWinded(\n" + "vocab ...\n" * 300 + ")"

    with vtprune.apply(model, "clasp", 16, tokenizer=LongWinded()) as pruner:
        text = repr(pruner)
    assert text.startswith("Pruner(method='clasp', budget=16, options=Options(tokenizer=<LongWinded>, ")
    assert "\n" not in text and len(text) < 300
