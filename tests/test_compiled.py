"""compile_prefill: the decoder layers compiled for prefill compute what the eager ones compute, on the same kept set."""

import pytest
import torch

import vtprune
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # a GPU session runs the CUDA-graph path too


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_prefill_equals_eager_on_the_same_kept_set(device, monkeypatch):
    torch._dynamo.reset()
    # dynamo guards on each layer's cache slot: a layer past its recompile limit would silently run eager
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    model = tiny_llava(layers=12).to(device).eval()  # 12 layers x 2 lengths: past the default recompile limit
    inputs = {k: v.to(device) for k, v in tiny_inputs(model, [SampleLayout(images=1)]).items()}
    layers = list(model.model.language_model.layers)
    originals = [layer.forward for layer in layers]
    limit = torch._dynamo.config.recompile_limit
    for method, budget in (("fastv", 8), ("visionzip", 6)):  # in the LLM (two layer shapes), before it (one)
        with torch.no_grad(), vtprune.apply(model, method, budget) as pruner:
            eager = model(**inputs).logits
            eager_kept = pruner.last_decision.kept
            eager_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            with vtprune.compile_prefill(model):
                torch._dynamo.utils.counters.clear()
                compiled = model(**inputs).logits
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
    assert torch._dynamo.config.recompile_limit == limit


def test_compiling_twice_is_refused():
    model = tiny_llava().eval()
    with vtprune.compile_prefill(model, backend="eager"):
        with pytest.raises(ValueError, match="already have a forward of their own"):
            vtprune.compile_prefill(model, backend="eager")


def test_the_recompile_limit_follows_the_open_handles(monkeypatch):
    """8 graphs per layer of the largest model with a handle open, whichever closes first; as before once none is."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    small, large = tiny_llava(layers=4).eval(), tiny_llava(layers=12).eval()
    first = vtprune.compile_prefill(small, backend="eager")
    second = vtprune.compile_prefill(large, backend="eager")
    assert torch._dynamo.config.recompile_limit == 96
    first.remove()
    assert torch._dynamo.config.recompile_limit == 96  # the large model's layers still need theirs
    first.remove()  # twice: nothing more
    assert torch._dynamo.config.recompile_limit == 96
    second.remove()
    assert torch._dynamo.config.recompile_limit == 8
