"""LayerProbe: the stage layer's (or the layer before's) queries and keys over a whole sample, as the engine gives
them to methods that score with text tokens or with their own stage layer's attention."""

from dataclasses import dataclass

import pytest
import torch

import vtprune
from vtprune.adapters import adapter_for
from vtprune.methods import REGISTRY, LayerProbe, Method, Stage
from vtprune.methods.primitives import topk_in_order
from vtprune.tiny import SampleLayout, tiny_inputs

from .conftest import FAMILIES

LAYER = 2
SEEN = {}


class ProbeTop(Method):
    """Keeps the tokens the prompt's last token attends to most at the probed layer, computed from the probe."""

    name = "test_probe_top"
    summary = where = "test only"

    @dataclass(frozen=True)
    class Options:
        at: str = "stage"
        cached: bool = False

    @property
    def probe_layer(self):
        return self.options.at

    @property
    def probe_from_cache(self):
        return self.options.cached

    def stages(self, model, budget, num_tokens):
        return [Stage(LAYER, budget)]

    def select(self, view):
        probe = view.probe
        query = probe.queries(torch.tensor([probe.last]))[:, 0]
        logits = torch.einsum("hd,hld->hl", query, probe.key[:, : probe.last + 1]) * probe.scaling
        attention = logits.float().softmax(-1).mean(0)
        SEEN.setdefault("probes", []).append(probe)
        SEEN.setdefault("attention", []).append(attention[probe.visual])
        return topk_in_order(attention[probe.visual], view.keep)


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, ProbeTop.name, ProbeTop)
    SEEN.clear()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
@pytest.mark.parametrize("at, layer, cached", [("stage", LAYER, False), ("previous", LAYER - 1, False),
                                               ("previous", LAYER - 1, True)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_probe_attention_is_the_layers_own(family, at, layer, cached, attn):
    """Before the only stage, the probed layer ran on every token: the probe's last-token attention over an item
    must be the unpruned eager model's own attention weights of that layer."""
    layouts = [SampleLayout(images=1, text_before=4), SampleLayout(images=2)]
    model = FAMILIES[family](attn)
    inputs = tiny_inputs(model, layouts)
    reference = FAMILIES[family]("eager")
    attentions = reference(**inputs, output_attentions=True).attentions[layer]  # [B, H, L, L]
    with vtprune.apply(model, ProbeTop.name, budget=3, at=at, cached=cached):
        model(**inputs)
    computed = iter(SEEN["attention"])
    mask = inputs["attention_mask"].bool()
    for b, sample in enumerate(adapter_for(model).visual_items(inputs["input_ids"], inputs)):
        last = int(torch.nonzero(mask[b]).max())
        for item in sample:
            expected = attentions[b, :, last, item.positions()].mean(0)
            torch.testing.assert_close(next(computed), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hole", [False, True])
def test_probe_rows_name_text_visual_and_last_tokens(hole):
    """hole: a masked-out token inside the first prompt, so that its present rows are not one run of slots."""
    model = FAMILIES["llava_next"]("sdpa")
    layouts = [SampleLayout(images=1, text_before=4, text_after=3), SampleLayout(images=1, text_before=1)]
    inputs = tiny_inputs(model, layouts)
    if hole:
        first = int(torch.nonzero(inputs["attention_mask"][0]).min())
        inputs["attention_mask"][0, first + 2] = 0
    with vtprune.apply(model, ProbeTop.name, budget=3):
        model(**inputs)
    items = [item for sample in adapter_for(model).visual_items(inputs["input_ids"], inputs) for item in sample]
    for probe, item, b in zip(SEEN["probes"], items, range(2)):
        present = torch.nonzero(inputs["attention_mask"][b]).flatten()
        ids = inputs["input_ids"][b, present]
        assert probe.key.shape[1] == probe.hidden.shape[0] == present.numel()
        # queries are held for the text rows and the last row only
        assert probe.asking.tolist() == sorted(set(probe.text.tolist()) | {probe.last})
        assert probe.asking_query.shape[1] == probe.asking.numel()
        with pytest.raises(ValueError, match="text rows and its last row only"):
            probe.queries(probe.visual[:1])
        # the unchecked readers (no host read) answer what the checked one does
        assert torch.equal(probe.text_queries(), probe.queries(probe.text))
        assert torch.equal(LayerProbe.stacked_text_queries([probe, probe]), torch.stack([probe.text_queries()] * 2))
        assert torch.equal(probe.last_query(), probe.queries(torch.tensor([probe.last]))[:, 0])
        assert torch.equal(present[probe.visual], item.positions())
        assert not torch.isin(ids[probe.text], torch.tensor([100])).any()  # newlines are placeholders, not text
        assert probe.text.numel() == int((ids != 100).sum()) and probe.last == present.numel() - 1
