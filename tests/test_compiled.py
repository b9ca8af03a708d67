"""compile_prefill: the prefill's layer stacks compiled segment by segment compute what the eager ones compute, on the
same kept set; a segment spans only layers inside which no one needs to look."""

import contextlib
import copy
import gc
import threading
import weakref

import pytest
import torch

import vtprune
from vtprune.engine.cache import cache_keyword, output_cache
from vtprune.engine.compiled import COMPILERS, HiddenAccess, Segment
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

from .conftest import FAMILIES, greedy
from .test_engine_conversation import drop_images, grown
from .test_engine_invariants import METHODS, OPTIONS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # a GPU session runs the CUDA-graph path too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", sorted(COMPILERS))  # (plain CUDA graphs: on the CPU, dynamo's graphs as traced)
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)  # no segment silently eager (monkeypatch's undo would
def test_compiled_prefill_equals_eager_on_the_same_kept_set(device, compiler):  # hide the setting from torch)
    torch._dynamo.reset()
    model = tiny_llava(layers=12).to(device).eval()
    inputs = {k: v.to(device) for k, v in tiny_inputs(model, [SampleLayout(images=1)]).items()}
    layers = list(model.model.language_model.layers)
    originals = [layer.forward for layer in layers]
    # in the LLM (pruned before layer 2, scored with layer 1's attention), in the vision tower
    for method, budget, segments in (("fastv", 8, [(0, 2), (2, 12)]), ("visionzip", 6, [(0, 12)])):
        with torch.no_grad(), vtprune.apply(model, method, budget) as pruner:
            eager = model(**inputs).logits
            eager_kept = pruner.last_decision.kept
            eager_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            with vtprune.compile_prefill(model, **COMPILERS[compiler]) as handle:
                torch._dynamo.utils.counters.clear()
                compiled = model(**inputs).logits
                assert handle.last_segments == segments
                assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
                assert [[k.tolist() for k in stage] for stage in pruner.last_decision.kept] == \
                    [[k.tolist() for k in stage] for stage in eager_kept]
                torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
                again = model(**inputs).logits  # the graphs replayed
                torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
                # decode steps (one token, a growing cache) stay eager; the prefill is compiled
                assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), eager_tokens)
            assert pruner.last_stats.kept_per_sample == [budget]
    assert all("forward" not in vars(layer) for layer in layers)  # remove() gave the layers their own forward back
    assert [layer.forward for layer in layers] == originals


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", sorted(COMPILERS))
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_one_compiled_model_serves_prompts_of_several_lengths(device, compiler):
    """What the bench does: one compiled model, unpruned and at two budgets, prompts of two lengths. Under CUDA
    graphs a segment recorded at one sequence length was once replayed with another's inputs (H100, session 15)."""
    torch._dynamo.reset()
    model = tiny_llava(layers=6).to(device).eval()
    prompts = [{k: v.to(device) for k, v in tiny_inputs(model, [SampleLayout(images=1, text_after=after)]).items()}
               for after in (4, 9)]
    configs = [(None, None), ("random", 32), ("random", 8), ("fastv", 8)]
    with torch.no_grad():
        eager = []
        for method, budget in configs:
            with (vtprune.apply(model, method, budget) if method else contextlib.nullcontext()):
                eager.append([model(**inputs).logits for inputs in prompts])
        with vtprune.compile_prefill(model, **COMPILERS[compiler]):
            for (method, budget), expected in zip(configs, eager):
                with (vtprune.apply(model, method, budget) if method else contextlib.nullcontext()):
                    for _ in range(2):  # recorded, then replayed
                        for inputs, logits in zip(prompts, expected):
                            torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-5, atol=1e-5)


def test_compiling_twice_is_refused():
    model = tiny_llava().eval()
    with vtprune.compile_prefill(model, backend="eager"):
        with pytest.raises(ValueError, match="already have a forward of their own"):
            vtprune.compile_prefill(model, backend="eager")


@pytest.mark.parametrize("options, refusal", [({"mode": "bogus"}, "Unrecognized mode=bogus"),
                                             ({"bogus": 1}, "unexpected keyword argument 'bogus'"),
                                             ({"backend": "nosuch"}, "Invalid backend: 'nosuch'")])
def test_options_torch_compile_refuses_are_refused_at_once(options, refusal):
    """Not at the first forward: torch.compile checks them when called, and compiles only then."""
    model = tiny_llava().eval()
    with pytest.raises(ValueError, match=f"compile_prefill's options .* are torch.compile's, which refuses them: "
                                         f".*{refusal}"):
        vtprune.compile_prefill(model, **options)
    assert all(not layer.__dict__.get("forward") for layer in model.model.language_model.layers)  # nothing installed


def test_a_layer_called_on_its_own_runs_alone_and_eagerly():
    """Segments run inside the loop of the module holding the layers; a layer called elsewhere is one layer."""
    model = tiny_llava(layers=4).eval()
    layer = model.model.language_model.layers[0]
    hidden = torch.randn(1, 5, model.config.text_config.hidden_size)
    rotary = model.model.language_model.rotary_emb(hidden, torch.arange(5)[None])
    with torch.no_grad():
        eager = layer(hidden, position_embeddings=rotary)
        with vtprune.compile_prefill(model, backend="eager") as compiled:
            torch.testing.assert_close(layer(hidden, position_embeddings=rotary), eager, rtol=0, atol=0)
            assert compiled.last_segments == [] and not compiled.decoder.segments


def test_a_layer_with_a_hook_of_someone_elses_runs_alone_and_its_hook_sees_what_eager_computes():
    model = tiny_llava(layers=8).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    seen = []
    key = "mine"  # (a closure over `key`, as transformers' capturing hooks have: it is still not one of theirs)

    def hook(module, args, output):
        seen.append((args[0], output, key))

    hooked = model.model.language_model.layers[4]
    handle = hooked.register_forward_hook(hook)
    try:
        with torch.no_grad(), vtprune.apply(model, "visionzip", 6):
            eager = model(**inputs).logits
            with vtprune.compile_prefill(model, backend="eager") as compiled:
                torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)
                assert compiled.last_segments == [(0, 4), (4, 5), (5, 8)]
    finally:
        handle.remove()
    (eager_input, eager_output, _), (compiled_input, compiled_output, _) = seen
    torch.testing.assert_close(compiled_input, eager_input, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_output, eager_output, rtol=1e-5, atol=1e-5)


def test_a_hook_of_someone_elses_that_changes_a_layers_input_starts_a_segment_there():
    model = tiny_llava(layers=6).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    handle = model.model.language_model.layers[3].register_forward_pre_hook(lambda module, args: (args[0] * 2,
                                                                                                  *args[1:]))
    try:
        with torch.no_grad():
            eager = model(**inputs).logits
            with vtprune.compile_prefill(model, backend="eager") as compiled:
                torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)
                assert compiled.last_segments == [(0, 3), (3, 6)]
    finally:
        handle.remove()


@pytest.mark.parametrize("register", ["register_module_forward_hook", "register_module_forward_pre_hook"])
def test_hooks_on_every_module_see_each_layer_run_eagerly(register):
    """Hooks registered for every module (torch.nn.modules.module's) would be traced inside the graphs, or skipped:
    each layer runs on its own, eagerly, and they see what it computes."""
    model = tiny_llava(layers=4).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    layers = list(model.model.language_model.layers)
    seen = []

    def record(module, args, *output):
        if module in layers:
            seen.append((layers.index(module), args[0], *output))

    handle = getattr(torch.nn.modules.module, register)(record)
    try:
        with torch.no_grad():
            eager = model(**inputs).logits
            heard = len(seen)
            with vtprune.compile_prefill(model, backend="eager") as compiled:
                torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)
                assert compiled.decoder.last_segments == [Segment(i, i + 1, eager=True) for i in range(4)]
    finally:
        handle.remove()
    assert [entry[0] for entry in seen] == [0, 1, 2, 3] * 2 and heard == 4
    for mine, theirs in zip(seen[heard:], seen[:heard]):
        for a, b in zip(mine[1:], theirs[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hidden_states_asked_for_are_every_layers_own():
    """A segment returns the outputs of its layers that a hook reads (transformers' output_hidden_states, or the
    vision recorder's start hook beside it on the tower's first layer), so they are each layer's own."""
    model = tiny_llava(layers=6).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    tower = model.model.vision_tower
    with torch.no_grad(), vtprune.apply(model, "visionzip", 6):
        eager = model(**inputs, output_hidden_states=True).hidden_states
        eager_tower = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        with vtprune.compile_prefill(model, backend="eager") as compiled:
            hidden = model(**inputs, output_hidden_states=True).hidden_states
            assert [(s.start, s.end, s.exposed) for s in compiled.decoder.last_segments] == [(0, 6, (0, 1, 2, 3, 4))]
            hidden_tower = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
            # the recorder's hook inside layer 4 (it keeps that layer's queries and keys): that layer runs eagerly
            assert [(s.start, s.end, s.exposed, s.eager) for s in compiled.towers[0].last_segments] == \
                [(0, 4, (0, 1, 2), False), (4, 5, (), True), (5, 6, (), False)]
            model(**inputs)  # transformers' capturing hooks stay on the layers, idle: nothing returned beside
            assert [s.exposed for s in compiled.decoder.last_segments] == [()]
            again = model(**inputs, output_hidden_states=True).hidden_states  # asked again after a forward that did not
    for mine, theirs in zip(hidden + hidden_tower + again, eager + eager_tower + eager, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_attentions_asked_for_after_a_compiled_forward_are_recorded_as_eager():
    """transformers' attention-capturing hooks, idle in a forward that records nothing, are off the attention blocks
    only for the compiled call: the next forward asking for attentions runs each layer eagerly and records them."""
    model = tiny_llava("eager", layers=4).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions
        with vtprune.compile_prefill(model, backend="eager") as compiled:
            torch._dynamo.utils.counters.clear()
            model(**inputs)
            assert compiled.last_segments == [(0, 4)]
            # traced, the idle hooks would break the graph (their ContextVar read) and the segment would run eagerly
            assert not torch._dynamo.utils.counters["graph_break"]
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
            again = model(**inputs, output_attentions=True).attentions
            assert compiled.last_segments == [(i, i + 1) for i in range(4)]
    for mine, theirs in zip(again, eager, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_a_segment_whose_later_layer_gets_other_inputs_stops_the_forward(monkeypatch):
    """Were the engine to miss a layer it prunes before, the segment would have run it on the unpruned tokens: the
    layer sees other hidden states than the segment's, and the forward stops instead of going on wrong."""
    model = tiny_llava(layers=6).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    monkeypatch.setattr(vtprune.Pruner, "hidden_access", lambda self: HiddenAccess())
    with torch.no_grad(), vtprune.apply(model, "fastv", 8), vtprune.compile_prefill(model, backend="eager"):
        with pytest.raises(vtprune.UnsupportedUseError, match="layer 2 of LlamaDecoderLayer was called inside a "
                                                      r"compiled segment of layers 0-5 \(layer 2 next\)"):
            model(**inputs)


def test_a_hook_that_only_reads_one_layers_output_sees_that_layers_own_inside_a_segment():
    """A hook marked as reading a layer's output (CLASP's fusion hooks on the tower) leaves the layers in one segment,
    which returns that layer's output beside its last."""
    model = tiny_llava(layers=6).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    seen = []

    def reading(module, args, output):
        seen.append(output)

    reading.vtprune_reads_output = True
    handle = model.model.language_model.layers[2].register_forward_hook(reading)
    try:
        with torch.no_grad():
            eager = model(**inputs).logits
            with vtprune.compile_prefill(model, backend="eager") as compiled:
                torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)
                # (and its input: hooks that read a layer's output are taken to read its input, as transformers' do)
                assert [(s.start, s.end, s.exposed) for s in compiled.decoder.last_segments] == [(0, 6, (1, 2))]
    finally:
        handle.remove()
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changed", ["hidden states", "an argument"])
def test_a_hook_the_plan_takes_for_the_pruners_that_changes_a_layers_input_stops_the_forward(changed):
    """The plan trusts the pruner's layer hooks to change nothing inside a segment; one that did would have the
    segment's layer skip what it was given: the forward stops instead."""
    model = tiny_llava(layers=6).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])

    def doubling(module, args, kwargs):
        if changed == "hidden states":
            return (args[0] * 2, *args[1:]), kwargs
        return args, dict(kwargs, position_embeddings=tuple(2 * part for part in kwargs["position_embeddings"]))

    doubling.vtprune_layer_hook = True
    handle = model.model.language_model.layers[3].register_forward_pre_hook(doubling, with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.compile_prefill(model, backend="eager"):
            with pytest.raises(vtprune.UnsupportedUseError, match="layer 3 of LlamaDecoderLayer was called inside a "
                                                          r"compiled segment of layers 0-5 \(layer 3 next\)"):
                model(**inputs)
    finally:
        handle.remove()


def test_single_token_decode_steps_run_eagerly():
    """Each decode step's cache is one longer (a new shape each step): compiled, every step would compile again."""
    model = tiny_llava(layers=4).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with torch.no_grad(), vtprune.compile_prefill(model, backend="eager") as compiled:
        lengths, run = [], compiled.decoder._run

        def counted(index, hidden, *rest):
            lengths.append(hidden.shape[1])
            return run(index, hidden, *rest)

        compiled.decoder._run = counted
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert lengths == [inputs["input_ids"].shape[1]] * 4  # the prefill's four layers, and no step of one token


def test_a_follow_up_turn_on_a_pruned_cache_runs_layer_by_layer_and_equals_eager():
    """After a stage the early layers' caches hold more tokens than the later ones': each layer gets a mask of its
    own, so a several-token turn on that cache is no one segment."""
    model = tiny_llava(layers=6).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with torch.no_grad(), vtprune.apply(model, "fastv", 8):
        first = greedy(model, inputs, steps=2)
        conversation = grown(inputs, torch.cat([first.sequences, torch.tensor([[5, 9, 17]])], dim=1))
        drop_images(conversation)
        keyword = cache_keyword(model.model.language_model)
        eager = model(**dict(conversation, **{keyword: copy.deepcopy(output_cache(first))})).logits
        with vtprune.compile_prefill(model, backend="eager") as compiled:
            turn = model(**dict(conversation, **{keyword: output_cache(first)})).logits
            assert compiled.last_segments == [(i, i + 1) for i in range(6)]
    torch.testing.assert_close(turn, eager, rtol=1e-5, atol=1e-5)


def test_a_replayed_decision_reuses_its_methods_segments():
    """FastV scores with layer 1's input, which its segment returns; the schedule oracle (its decision replayed) reads
    nothing, yet runs the same segments, compiled once."""
    model = tiny_llava(layers=6).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with torch.no_grad(), vtprune.apply(model, "fastv", 8) as pruner:
        eager = model(**inputs).logits
        with vtprune.compile_prefill(model, backend="eager") as compiled:
            model(**inputs)
            assert [(s.start, s.end, s.exposed) for s in compiled.decoder.last_segments] == [(0, 2, (0,)), (2, 6, ())]
            made = dict(compiled.decoder.segments)
            with pruner.replaying(pruner.last_decision):
                torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)
            assert compiled.decoder.segments == made


def test_another_threads_forward_is_refused_while_one_runs():
    """The loop's state lives on the handle: a second thread's forward through the same layers would be handed the
    first one's tensors."""
    model = tiny_llava(layers=4).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    errors = []

    def other_thread(module, args):
        def run():
            try:
                model(**inputs)
            except RuntimeError as error:
                errors.append(str(error))
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    with torch.no_grad():
        eager = model(**inputs).logits
        handle = model.model.language_model.layers[2].register_forward_pre_hook(other_thread)
        try:
            with vtprune.compile_prefill(model, backend="eager"):
                torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)
                handle.remove()
                torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)  # free again
        finally:
            handle.remove()
    assert len(errors) == 1 and "one forward of a model at a time" in errors[0]


def test_a_compiled_model_is_not_deep_copied_and_is_freed_with_its_handle_open():
    model = tiny_llava(layers=4).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    pruner = vtprune.apply(model, "fastv", 8)
    handle = vtprune.compile_prefill(model, backend="eager")
    with torch.no_grad():
        model(**inputs)
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(model)
    alive = weakref.ref(model)
    del model, pruner, handle
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("compile_model", [lambda model: model.compile(backend="eager"),
                                           lambda model: setattr(model, "forward",
                                                                 torch.compile(model.forward, backend="eager"))],
                         ids=["Module.compile", "a compiled forward"])
def test_a_model_compiled_and_run_before_apply_is_pruned_and_after_remove_is_not(compile_model):
    """torch does not guard compiled graphs on module hooks: a graph traced before apply() ran on without the
    pruner's (the logits were the unpruned model's, last_stats None, no error), and one traced under it would go on
    pruning after remove()."""
    torch._dynamo.reset()
    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with torch.no_grad():
        unpruned = model(**inputs).logits
        with vtprune.apply(tiny_llava(), "fastv", 4) as pruner:
            pruned = pruner.model(**inputs).logits
        compile_model(model)
        torch.testing.assert_close(model(**inputs).logits, unpruned, rtol=1e-5, atol=1e-5)  # traced, unpruned
        with vtprune.apply(model, "fastv", 4) as pruner:
            torch.testing.assert_close(model(**inputs).logits, pruned, rtol=1e-5, atol=1e-5)
            assert pruner.last_stats.kept_per_sample == [4]
        torch.testing.assert_close(model(**inputs).logits, unpruned, rtol=1e-5, atol=1e-5)


# every method on LLaVA (each acts at its own layers, with hooks of its own), and on every family one method acting in
# the LLM at several layers, one at its input and one in the vision tower (dynamo takes ~2 s a case on the CPU)
CASES = [("llava", method) for method in METHODS] + \
    [(family, method) for family in sorted(FAMILIES) if family != "llava" for method in ("clse", "random", "visionzip")]


@pytest.mark.parametrize(("family", "method"), CASES)
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_compiled_equals_eager_for_every_method_and_family(family, method):
    """Dynamo traces every segment (its "eager" backend: the graphs run as traced, quick to make) and the engine
    hands their outputs on: the logits equal eager ones (generation: the first test)."""
    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(images=1, text_before=6)])
    with torch.no_grad(), vtprune.apply(model, method, 10, **OPTIONS.get(method, {})) as pruner:
        eager = model(**inputs).logits
        kept = pruner.last_stats.kept_per_sample
        with vtprune.compile_prefill(model, backend="eager") as compiled:
            torch._dynamo.utils.counters.clear()
            torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)
            # each segment traced whole: one graph each, no break (a break in its loop would leave it eager)
            traced = [s for stack in compiled.stacks for s in stack.last_segments if not s.eager]
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(traced) > 0
            assert not torch._dynamo.utils.counters["graph_break"]
            assert pruner.last_stats.kept_per_sample == kept
            # the decoder breaks where the method prunes, not where it only reads
            assert [start for start, _ in compiled.last_segments] == \
                [0] + [layer for layer in pruner.last_decision.stage_layers if layer > 0]
