"""The engine raises instead of running unpruned or wrong when transformers does something it does not track.

Each test provokes one guard the way a transformers release could: a renamed cache
keyword, a cache the model makes for itself, decoder layers that bypass their hooks,
a placeholder id the adapter does not know.
"""

import copy
import dataclasses
import inspect
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

import vtprune
from vtprune.api import refusal
from vtprune.adapters import adapter_for
from vtprune.engine import EngineError, TESTED_TRANSFORMERS, UnsupportedUseError
from vtprune.engine.cache import cache_keyword, output_cache
from vtprune.methods import WITHOUT_CHECKPOINT
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

from .conftest import FAMILIES, greedy

LAYOUTS = [SampleLayout(images=2), SampleLayout(images=1, text_before=6)]


def test_the_cache_keyword_is_read_off_the_forward_signature(model):
    import inspect

    keyword = cache_keyword(model.model.language_model)
    assert keyword in inspect.signature(model.model.language_model.forward).parameters
    assert keyword in ("cache", "past_key_values")


def test_a_cache_under_a_keyword_the_forward_does_not_take_is_caught(model):
    """What transformers 5.24 did to the engine: its cache went in under the old name and was dropped."""
    inputs = tiny_inputs(model, LAYOUTS)
    pruner = vtprune.apply(model, "fastv", 10)
    pruner._cache_keyword = "past_key_values" if pruner._cache_keyword == "cache" else "cache"
    with pytest.raises(EngineError, match="different KV cache") as error, pruner, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.24's deprecation notice, which users often silence
        model(**inputs, use_cache=True)
    assert f"transformers {transformers.__version__}, a release vtprune is tested with" in str(error.value)


@pytest.mark.parametrize("version, tested", [("5.17.0", True), ("5.24.0", True), ("5.16.2", False), ("5.25.0", False)])
def test_an_engine_error_points_to_a_tested_release_only_from_outside_the_range(monkeypatch, version, tested):
    monkeypatch.setattr(transformers, "__version__", version)
    message = str(EngineError("a problem"))
    assert message.startswith(f"a problem (transformers {version}, ")
    assert ("install a tested release" in message) is not tested and (TESTED_TRANSFORMERS in message) is not tested
    assert ("please report it" in message) is tested
    # a call the caller must change is not ours to fix, whatever the release
    assert str(UnsupportedUseError("a problem")) == "a problem"


def test_a_cache_swapped_inside_the_model_is_caught(model):
    inputs = tiny_inputs(model, LAYOUTS)
    language_model = model.model.language_model
    keyword = cache_keyword(language_model)

    def swap(module, args, kwargs):
        kwargs[keyword] = DynamicCache(config=module.config)
        return args, kwargs

    with vtprune.apply(model, "random", 10):
        handle = language_model.register_forward_pre_hook(swap, with_kwargs=True)  # runs after the pruner's
        try:
            with pytest.raises(EngineError, match="different KV cache"):
                model(**inputs, use_cache=True)
        finally:
            handle.remove()


def test_images_whose_placeholders_the_adapter_cannot_find_are_caught(model):
    """As if the prompt came from a processor whose placeholder id the model's config does not name."""
    inputs = tiny_inputs(model, LAYOUTS)
    placeholders = torch.isin(inputs["input_ids"], torch.tensor([100, 101]))
    inputs["input_ids"] = inputs["input_ids"].masked_fill(placeholders, 127)
    with vtprune.apply(model, "random", 10):
        with pytest.raises(ValueError, match="found none of their placeholder tokens .* put its image or video placeholder"):
            model(**inputs)


@pytest.mark.parametrize("method", ["random", "dart"])
def test_a_sample_whose_attention_mask_is_all_zeros_is_refused(model, method):
    """A batch row with no token to run has nothing to prune by (a probe of it has no rows): a clear error, for every
    method alike, instead of an index error inside some."""
    inputs = tiny_inputs(model, LAYOUTS)
    inputs["attention_mask"][1] = 0
    with vtprune.apply(model, method, 10):
        with pytest.raises(ValueError, match="sample 1 of the batch has an attention_mask of zeros only"):
            model(**inputs)


@pytest.mark.parametrize("method", ["random", "fastv", "visionzip"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", ["llava", "video_llava", "llava_next"])
def test_generate_on_a_prompt_ending_with_a_droppable_image_token_is_refused(family, method, padding_side):
    """generate reads the next token off the prompt's last position: were it an image token that pruning drops, the
    logits of a zero state, unrelated to the input. LLaVA and Video-LLaVA prompts can end so; LLaVA-NeXT's images end
    with a newline token, which no method drops, so there it runs. A forward of the caller's own (a prefix cached for
    reuse) reads no next token from it and runs, and a keep-all budget runs as before."""
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(), SampleLayout(text_after=0)], padding_side=padding_side)
    # a chunk as long as the prompt: the prompt in one piece (transformers 5.17 drops the images from any chunked
    # prefill, unpruned too: nothing is pruned there)
    length = inputs["input_ids"].shape[1]
    chunks = [None] + [length] * torch.allclose(greedy(model, inputs, steps=1, prefill_chunk_size=length).logits[0],
                                                greedy(model, inputs, steps=1).logits[0])
    with vtprune.apply(model, method, 10_000):
        greedy(model, inputs, steps=1)
    with vtprune.apply(model, method, 4):
        model(**inputs)
        if family == "llava_next":
            greedy(model, inputs, steps=1)
            return
        for chunk in chunks:
            with pytest.raises(ValueError, match="sample 1's prompt ends with an image or video token: generate would "
                                                 "predict its next token from that token's state"):
                greedy(model, inputs, steps=1, prefill_chunk_size=chunk)
        greedy(model, tiny_inputs(model, [SampleLayout(), SampleLayout(text_after=1)], padding_side=padding_side),
               steps=1)


def test_classifier_free_guidance_is_refused(model):
    """Its processor runs the model again at each step on the prompt without the images: the pruner took that for a
    new prompt (a fresh decision at every step without a cache; stats of a text-only forward with one)."""
    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "fastv", 10) as pruner:
        for use_cache in (True, False):
            with pytest.raises(NotImplementedError, match=r"classifier-free guidance \(guidance_scale=1.5\) runs the "
                                                          "model a second time at each step"):
                greedy(model, inputs, steps=2, guidance_scale=1.5, use_cache=use_cache)
        greedy(model, inputs, steps=2, guidance_scale=1.0)  # 1 guides nothing: transformers adds no processor
        assert pruner.last_stats.kept_per_sample == [20, 10]


@pytest.mark.parametrize("setting", [{"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}])
def test_a_follow_up_turn_generating_more_rows_than_its_cache_holds_is_refused(model, setting):
    """generate repeats a follow-up turn's rows for beams or return sequences, not the cache it is given: transformers
    fails on it unpruned too; pruned, the error was a shape error deep in the engine, or said the tokens differ."""
    from .test_engine_conversation import drop_images, grown

    inputs = tiny_inputs(model, LAYOUTS)
    for method in ("fastv", "random"):
        with vtprune.apply(model, method, 10):
            first = greedy(model, inputs, steps=2)
            conversation = grown(inputs, torch.cat([first.sequences, torch.full((2, 3), 7)], dim=1))
            drop_images(conversation)
            conversation[cache_keyword(model.model.language_model)] = output_cache(first)
            with pytest.raises(ValueError, match="a forward on a pruned prompt's cache has 4 rows, but the cache holds "
                                                 "2 samples: generate repeats a follow-up turn's rows"):
                model.generate(**conversation, max_new_tokens=2, pad_token_id=0, **setting)


def test_decoder_layers_that_bypass_their_hooks_are_caught(model):
    inputs = tiny_inputs(model, LAYOUTS)
    pruner = vtprune.apply(model, "fastv", 10)
    layers = len(model.model.language_model.layers)
    for handle in pruner._handles[-layers:]:  # the decoder-layer hooks are installed last
        handle.remove()
    with pytest.raises(EngineError, match="without passing through vtprune's hooks"), pruner:
        model(**inputs)


def test_a_prefill_that_prunes_nothing_is_caught(model, monkeypatch):
    from vtprune.engine import prefill

    inputs = tiny_inputs(model, LAYOUTS)
    monkeypatch.setattr(prefill.Layout, "narrowed", lambda self, *args: self)  # a stage that drops nothing
    with vtprune.apply(model, "fastv", 10), pytest.raises(EngineError, match=r"should have left \[20, 10\] visual"):
        model(**inputs)


def test_a_cache_shortened_behind_the_engines_back_is_caught(model):
    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "clse", 10):
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        cache.crop(-1)  # drop the last token of every layer: one of the pruned prompt's
        step = _next_step(inputs, cache_keyword(model.model.language_model), cache)
        with pytest.raises(UnsupportedUseError, match="lost its last 1 tokens, 1 of them the pruned prompt's"):
            model(**step)
        cache.layers[-1].keys = cache.layers[-1].keys[:, :, :-1]  # one layer shorter still: not a crop
        cache.layers[-1].values = cache.layers[-1].values[:, :, :-1]
        with pytest.raises(EngineError, match="before a decode step"):
            model(**step)


@pytest.mark.parametrize("method", ["random", "fastv", "clse"])
def test_prompt_lookup_decoding_takes_back_rejected_candidates_and_equals_greedy(method, monkeypatch):
    """Assisted decoding crops the candidates it rejects from the cache; the run forgets them too, and greedy
    decoding with prompt lookup gives greedy decoding's tokens (here the first forward holds the prompt alone)."""
    from vtprune.engine import decode

    crops = []
    monkeypatch.setattr(decode, "crop", lambda run, tokens, crop=decode.crop: crops.append(tokens) or crop(run, tokens))
    model = tiny_llava("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with vtprune.apply(model, method, 6):
        plain = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)
        looked_up = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                   prompt_lookup_num_tokens=3)
    assert crops and torch.equal(looked_up, plain)


def test_a_cache_filled_without_pruning_is_continued_as_the_plain_model_would(model):
    """Each pruned prompt's run travels with its own cache: a cache the pruner did not fill (here, filled before
    apply, continued after a pruned prompt) holds the whole prompt, and its next step is the plain model's."""
    if "Qwen" in type(model).__name__:
        pytest.skip("transformers' Qwen models take no hand-made decode step (their M-RoPE positions), pruned or not")
    inputs = tiny_inputs(model, LAYOUTS)
    keyword = cache_keyword(model.model.language_model)
    foreign = output_cache(model(**inputs, use_cache=True))  # filled without the pruner
    plain = model(**_next_step(inputs, keyword, copy.deepcopy(foreign))).logits
    with vtprune.apply(model, "fastv", 10):
        model(**inputs, use_cache=True)
        assert torch.equal(model(**_next_step(inputs, keyword, foreign)).logits, plain)


def test_a_cache_another_pruner_filled_is_refused(model):
    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "fastv", 10):
        cache = output_cache(model(**inputs, use_cache=True))
    with vtprune.apply(model, "fastv", 10):
        with pytest.raises(UnsupportedUseError, match="that pruner has been removed since"):
            model(**_next_step(inputs, cache_keyword(model.model.language_model), cache))


def test_a_cache_another_models_pruner_filled_is_refused(model):
    inputs = tiny_inputs(model, LAYOUTS)
    other = copy.deepcopy(model)
    with vtprune.apply(model, "fastv", 10), vtprune.apply(other, "fastv", 10):
        cache = output_cache(model(**inputs, use_cache=True))
        with pytest.raises(UnsupportedUseError, match=r"that a pruned prompt of another vtprune pruner filled"):
            other(**_next_step(inputs, cache_keyword(other.model.language_model), cache))


@pytest.mark.parametrize("method", ["random", "fastv", "clse"])
def test_a_pruned_cache_continued_after_remove_is_refused_until_emptied(model, method):
    """Without the pruner the model would read a pruned cache as a shorter prompt (re-feeding the rest, image
    placeholders as text): the cache refuses instead, in generate as in a hand-made step, deep copies too. Emptied
    (reset), it serves a new prompt as a plain cache."""
    inputs = tiny_inputs(model, LAYOUTS)
    keyword = cache_keyword(model.model.language_model)
    with vtprune.apply(model, method, 10):
        first = greedy(model, inputs, steps=2)
        cache = output_cache(first)
        copied = copy.deepcopy(cache)
    added = first.sequences.shape[1] - inputs["input_ids"].shape[1]
    conversation = {"input_ids": first.sequences,
                    "attention_mask": torch.nn.functional.pad(inputs["attention_mask"], (0, added), value=1)}
    for held in (cache, copied):
        with pytest.raises(UnsupportedUseError, match="that pruner has been removed since"):
            model.generate(**dict(conversation, **{keyword: held}), max_new_tokens=1, do_sample=False, pad_token_id=0)
    if "Qwen" not in type(model).__name__:  # transformers' Qwen models take no hand-made decode step, pruned or not
        with pytest.raises(UnsupportedUseError, match="that pruner has been removed since"):
            model(**_next_step(inputs, keyword, copied))
    cache.reset()
    if any(layer.get_seq_length() for layer in cache.layers):  # transformers 5.17 zeroes a reset cache's tokens
        return
    plain = model(**inputs, use_cache=True).logits
    assert torch.equal(model(**inputs, use_cache=True, **{keyword: cache}).logits, plain)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("regroup", [lambda cache: cache.batch_select_indices(torch.tensor([0])),
                                     lambda cache: cache.batch_repeat_interleave(2)])
def test_a_pruned_cache_whose_rows_would_be_regrouped_is_refused(model, regroup):
    """The run keeps each sample's kept tokens by its row: selected or repeated rows would be continued with
    another sample's layout (a shape error deep in the engine before). Emptied, the cache is free again."""
    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "fastv", 10):
        cache = output_cache(model(**inputs, use_cache=True))
        lengths = [layer.get_seq_length() for layer in cache.layers]
        with pytest.raises(UnsupportedUseError, match="vtprune keeps each sample's kept tokens by its row"):
            regroup(cache)
        assert [layer.get_seq_length() for layer in cache.layers] == lengths and cache.layers[0].keys.shape[0] == 2
    cache.reset()
    if not any(layer.get_seq_length() for layer in cache.layers):  # (transformers 5.17 zeroes a reset cache's tokens)
        regroup(cache)  # emptied, it holds no sample's tokens: nothing to refuse


def test_attention_switched_after_apply_is_refused_at_the_next_prompt():
    """apply() refuses flash/flex attention; a switch made afterwards is caught by the next prompt with images
    (flex under the engine's masks crashed the process)."""
    model = tiny_llava("sdpa")
    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "fastv", 10):
        model.set_attn_implementation("flex_attention")
        with pytest.raises(ValueError, match="'flex_attention' is not supported.*eager, sdpa"):
            model(**inputs)


def test_a_prompt_fed_with_candidate_tokens_is_refused():
    """Assisted decoding's first forward carries the assistant's candidates after the prompt (logits_to_keep =
    candidates + 1): pruned as part of the prompt they gave answers other than greedy decoding's, silently when every
    candidate was accepted."""
    model = tiny_llava("sdpa")
    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "pdrop", 10):
        with pytest.raises(NotImplementedError, match="logits of its last 3 tokens.*assistant_model"):
            model(**inputs, logits_to_keep=3)
        with pytest.raises(NotImplementedError, match="assistant_model"):  # (assisted generation takes batch 1)
            model.generate(**tiny_inputs(model, LAYOUTS[:1]), assistant_model=tiny_llava("sdpa", seed=1), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
        torch.testing.assert_close(model(**inputs, logits_to_keep=1).logits, model(**inputs).logits[:, -1:])


@pytest.mark.parametrize("layouts, chunk", [
    ([SampleLayout(images=1, text_before=3)], 8),
    ([SampleLayout(images=1), SampleLayout(images=1, text_before=9)], 20),  # cut at other places in each sample
    ([SampleLayout(images=2), SampleLayout(images=1, text_before=6)], 8),  # the second's first chunk all padding
])
def test_a_chunked_prefill_cutting_an_image_says_so(model, layouts, chunk):
    """generate(prefill_chunk_size=...) hands the first chunk part of an image: the layout error names chunking
    (before, each family's error blamed the prompt, Qwen2-VL's a missing mm_token_type_ids or an empty sample)."""
    inputs = tiny_inputs(model, layouts)
    options = dict(max_new_tokens=1, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    try:  # transformers 5.17 drops the images from a chunked prefill (LLaVA) or fails on it (Qwen2-VL), unpruned
        chunked = model.generate(**inputs, prefill_chunk_size=chunk, **options).logits[0]
    except RuntimeError:
        chunked = None
    if chunked is None or not torch.allclose(chunked, model.generate(**inputs, **options).logits[0], atol=1e-5):
        pytest.skip("this transformers does not prefill this model in chunks as in one piece, unpruned")
    with vtprune.apply(model, "fastv", 10_000), pytest.raises((ValueError, NotImplementedError),
                                                               match="prefill_chunk_size"):
        model.generate(**inputs, prefill_chunk_size=chunk, **options)


def test_stats_after_generate_are_the_prefills(model):
    """Decode steps must not look like new prompts: after generate, last_stats still describes the prefill."""
    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "fastv", 10) as pruner:
        model(**inputs)
        expected = pruner.last_stats
        greedy(model, inputs, steps=3)
        assert pruner.last_stats == expected
        assert pruner.last_stats.kept_per_sample == [20, 10]


def test_stats_are_counted_when_read_and_are_the_prefills(model, monkeypatch):
    """last_stats is counted from the prefill's layouts when first read: a prefill whose stats nobody reads counts
    only its last layer (the engine's own check), and stats read after generate are still the prefill's."""
    from vtprune.engine.layout import Layout

    counted = []
    count = Layout.count
    monkeypatch.setattr(Layout, "count", lambda self, selected: counted.append(self) or count(self, selected))
    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "fastv", 10) as pruner:
        greedy(model, inputs, steps=3)
        assert len(counted) == 1
        assert pruner.last_stats.kept_per_sample == [20, 10]
        assert len(counted) == 1 + 2  # FastV's two layouts (before and after its stage), each counted once
        assert pruner.last_stats.visual_tokens_per_layer[0][-1] == 20 and len(counted) == 3


def _next_step(inputs, keyword, cache):
    """One decode step's inputs after the prompt, on cache."""
    batch = inputs["input_ids"].shape[0]
    step = {
        "input_ids": torch.full((batch, 1), 5),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], dim=1),
        keyword: cache,
    }
    if "mm_token_type_ids" in inputs:
        step["mm_token_type_ids"] = torch.zeros(batch, 1, dtype=torch.long)
    return step


def test_the_tested_range_is_the_packages_requirement():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    requirement = next(r for r in project["dependencies"] if r.startswith("transformers"))
    assert requirement == "transformers" + TESTED_TRANSFORMERS
    floor = TESTED_TRANSFORMERS.split(",")[0].removeprefix(">=")
    locks = {name: (Path(__file__).parents[1] / name).read_text().splitlines() for name in ("constraints.txt", "constraints-floor.txt")}
    assert f"transformers=={floor}.0" in locks["constraints-floor.txt"]  # CI's floor run tests the floor itself
    from packaging.specifiers import SpecifierSet

    locked = next(line.split("==")[1] for line in locks["constraints.txt"] if line.startswith("transformers=="))
    assert locked in SpecifierSet(TESTED_TRANSFORMERS)


def test_an_untested_transformers_is_warned_about_at_apply(model, monkeypatch):
    import transformers

    for version in ("5.17.0", "5.24.3"):  # none on a tested release (make compat runs this on the newest)
        monkeypatch.setattr(transformers, "__version__", version)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vtprune.apply(model, "fastv", 10).remove()
    for version in ("5.25.0", "5.25.0.dev0", "5.16.2"):  # a later upgrade past the cap, a build from main, too old
        monkeypatch.setattr(transformers, "__version__", version)
        with pytest.warns(UserWarning, match=f"transformers {version} is outside the range vtprune is tested with"):
            vtprune.apply(model, "fastv", 10).remove()


@pytest.mark.parametrize("module, renamed", [("layer", "attention_mask"), ("layer", "position_embeddings"),
                                             ("language_model", "inputs_embeds"), ("language_model", "position_ids")])
def test_an_argument_renamed_in_a_release_is_caught_at_apply(model, module, renamed):
    """A release renaming an argument the engine passes would have it reach the module twice (a TypeError from
    deep inside transformers) or not at all: apply names it."""
    target = model.model.language_model.layers[0] if module == "layer" else model.model.language_model
    stock = target.forward
    parameters = [p.replace(name="renamed") if p.name == renamed else p
                  for p in inspect.signature(stock).parameters.values()]

    def forward(*args, **kwargs):
        return stock(*args, **kwargs)

    forward.__signature__ = inspect.Signature(parameters)
    target.forward = forward
    with pytest.raises(EngineError, match=f"forward takes no {renamed} argument"):
        vtprune.apply(model, "fastv", 10)
    assert getattr(model, "_vtprune_pruner", None) is None  # nothing left on the model


def test_a_wrapper_that_hides_the_forwards_signature_is_not_taken_for_a_rename(model):
    """A user's (or a library's) `def forward(*args, **kwargs)` says nothing of what it passes on: apply runs."""
    layer = model.model.language_model.layers[0]
    stock = layer.forward

    def forward(*args, **kwargs):
        return stock(*args, **kwargs)

    layer.forward = forward
    vtprune.apply(model, "fastv", 10).remove()


@pytest.mark.parametrize("padding", [True, False])
def test_static_caches_are_refused_at_the_first_forward(model, padding):
    from transformers import StaticCache

    layouts = LAYOUTS if padding else LAYOUTS[:1]
    inputs = tiny_inputs(model, layouts)
    if not padding:
        del inputs["attention_mask"]
    with vtprune.apply(model, "fastv", 10):
        with pytest.raises(NotImplementedError, match="StaticCache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=256)
        with pytest.raises(NotImplementedError, match="StaticCache"):
            model(**inputs, **{cache_keyword(model.model.language_model): cache})


def test_a_quantized_cache_is_refused_for_what_it_is(model):
    from transformers import QuantizedCache

    try:  # (its fp8 backend needs no other package; transformers 5.17 has none such)
        cache = QuantizedCache(backend="fp8", config=model.config.get_text_config())
    except ValueError:
        pytest.skip("this transformers has no fp8 QuantizedCache")
    with vtprune.apply(model, "fastv", 10), pytest.raises(NotImplementedError, match=(
            "cannot prune into a QuantizedCache: its pruned prompt's layers hold different numbers of tokens, which "
            "only a plain DynamicCache keeps .* a quantized one keeps its tokens its own way")):
        model(**tiny_inputs(model, LAYOUTS), **{cache_keyword(model.model.language_model): cache})


def test_qwen2_vl_images_without_mm_token_type_ids_say_to_pass_them():
    """Releases that need mm_token_type_ids to place images fail with a sentence that names it."""
    from vtprune.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl()
    inputs = tiny_inputs(model, LAYOUTS)
    del inputs["mm_token_type_ids"]
    with vtprune.apply(model, "random", 10):
        try:
            model.generate(**inputs, max_new_tokens=2, pad_token_id=0)
        except ValueError as error:
            assert "mm_token_type_ids" in str(error)


@pytest.mark.parametrize("method", ["random", "pdrop", "sparsevlm"])  # one stage; three, each probing a layer
@pytest.mark.parametrize("answer", [
    lambda view: torch.arange(view.keep - 1),  # too few
    lambda view: torch.zeros(view.keep, dtype=torch.long),  # one token `keep` times
    lambda view: torch.arange(view.keep) + view.hidden.shape[0] - 2,  # past the end
], ids=["too few", "repeated", "past the end"])
def test_a_method_answering_wrong_indices_is_caught(model, monkeypatch, method, answer):
    """Every answer of a batch's selection is checked, on the device without reading it at the stage, and a wrong
    one is raised by the prefill's one read at its end; until then the stages after it run on the shapes planned
    (no crash of their own first), and no decision is left for a replay."""
    from vtprune.methods import REGISTRY, Selection

    wrong = []

    class Careless(REGISTRY[method]):
        name = "careless"

        def select_batch(self, views):
            picks = super().select_batch(views)
            if wrong:  # the first stage's last item only is answered wrong
                return picks
            view, last = views[-1], picks[-1]
            bad = answer(view).to(view.hidden.device)
            wrong.append(f"returned {bad.numel()} indices for a keep of {view.keep} of {view.hidden.shape[0]} tokens")
            return picks[:-1] + [dataclasses.replace(last, keep=bad) if isinstance(last, Selection) else bad]

    monkeypatch.setitem(REGISTRY, Careless.name, Careless)
    with vtprune.apply(model, "careless", 4, **WITHOUT_CHECKPOINT.get(method, {})) as pruner:
        with pytest.raises(RuntimeError) as raised:
            model(**tiny_inputs(model, LAYOUTS))
        assert f"'careless' {wrong[0]} (they must be distinct and in range)" in str(raised.value)
        assert pruner.last_decision is None


def test_a_pruned_cache_is_freed_with_its_last_reference_and_pickles_without_its_run(model, tmp_path):
    """The cache holds its run and not the reverse: dropping the generation's output frees its KV cache at once
    (no cycle left for the garbage collector). A pickled cache comes back marked, and continuing it is refused."""
    import gc
    import weakref

    inputs = tiny_inputs(model, LAYOUTS)
    with vtprune.apply(model, "random", 10):
        gc.disable()
        try:
            out = model(**inputs, use_cache=True)
            held = weakref.ref(output_cache(out))
            del out
            assert held() is None
        finally:
            gc.enable()
        if "Qwen" in type(model).__name__:
            return  # no hand-made decode step on Qwen (see above)
        cache = output_cache(model(**inputs, use_cache=True))
        torch.save(cache, tmp_path / "cache.pt")
        loaded = torch.load(tmp_path / "cache.pt", weights_only=False)
        with pytest.raises(UnsupportedUseError, match="or this is a pickled copy of one"):
            model(**_next_step(inputs, cache_keyword(model.model.language_model), loaded))


def test_a_decision_replayed_on_another_prompt_is_refused(model):
    """A decision's kept positions and merged states belong to its prompt: other images, other tokens or another
    batch are refused; its own prompt, alone or continued, replays."""
    inputs = tiny_inputs(model, LAYOUTS)
    pixels = next(key for key in ("pixel_values", "pixel_values_images") if key in inputs)
    # the same values laid out otherwise in memory are the same images; mirrored ones are not (a fingerprint of
    # sums alone would take them for the same)
    laid_out_otherwise = inputs[pixels].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(laid_out_otherwise, inputs[pixels]) and not laid_out_otherwise.is_contiguous()
    others = [dict(inputs, **{pixels: inputs[pixels] + 1}), dict(inputs, **{pixels: inputs[pixels].flip(-1)}),
              tiny_inputs(model, LAYOUTS, seed=7), tiny_inputs(model, LAYOUTS[:1])]
    with vtprune.apply(model, "random", 10) as pruner:
        logits = model(**inputs).logits
        decisions = [pruner.last_decision]
        greedy(model, inputs)
        decisions.append(pruner.last_decision)  # generate's (5.23+: its forwards get the features it encoded)
        for decision in decisions:
            with pruner.replaying(decision):
                assert torch.equal(model(**inputs).logits, logits)
                assert torch.equal(model(**dict(inputs, **{pixels: laid_out_otherwise})).logits, logits)
                for other in others:
                    with pytest.raises(ValueError, match="got a prompt the decision was not made for"):
                        model(**other)


def test_replaying_no_decision_is_refused_with_what_to_do(model):
    """Before any pruned prefill last_decision is None; replaying it would run the unhooked tower and fail later
    with an unrelated message (as `profile_prefill.py --replay --warmup 0` did)."""
    with vtprune.apply(model, "random", 10) as pruner:
        with pytest.raises(TypeError, match="run a prefill under the pruner first"):
            with pruner.replaying(pruner.last_decision):
                pass


def test_a_replay_inside_another_gives_the_outer_one_back(model):
    inputs = tiny_inputs(model, LAYOUTS)
    method = "random" if refusal(model, "visionzip", 10) else "visionzip"  # (its recorder pauses too)
    with vtprune.apply(model, method, 10) as pruner:
        logits = model(**inputs).logits
        outer = pruner.last_decision
        with pruner.replaying(outer):
            with pruner.replaying(outer):
                pass
            assert torch.equal(model(**inputs).logits, logits) and pruner.last_decision is outer
        assert pruner._replay is None


def test_a_second_thread_is_refused_while_a_forward_runs_and_a_deep_copy_is_refused(model):
    """The per-forward state lives on the pruner, which threads (and DataParallel's replicas) would share."""
    import threading

    inputs = tiny_inputs(model, LAYOUTS)
    entered, release, errors = threading.Event(), threading.Event(), []
    layer = adapter_for(model).decoder_layers[1]

    def wait(module, args):
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(10)

    with vtprune.apply(model, "fastv", 10):
        expected = model(**inputs).logits
        handle = layer.register_forward_pre_hook(wait)
        worker = threading.Thread(target=lambda: errors.append(model(**inputs).logits))
        worker.start()
        try:
            assert entered.wait(10)
            with pytest.raises(RuntimeError, match="runs one forward at a time, and another thread is running one"):
                model(**inputs)
        finally:
            release.set()
            worker.join()
            handle.remove()
        assert torch.equal(errors[0], expected)  # the first forward was not disturbed
        def fail(module, args):
            raise RuntimeError("boom")

        handle = layer.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="boom"):
            model(**inputs)
        handle.remove()
        after = threading.Thread(target=lambda: errors.append(model(**inputs).logits))  # freed by the error
        after.start()
        after.join()
        assert torch.equal(errors[1], expected)
        with pytest.raises(TypeError, match="cannot be deep-copied"):
            copy.deepcopy(model)
