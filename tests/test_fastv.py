"""FastV against an independent reading of the authors' inplace branch (pkunlp-icler/FastV @ d165972, the decoder loop
of src/transformers/src/transformers/models/llama/modeling_llama.py, "FastV Token Rerank, Token Drop Implementation"):
the kept set from the eager model's own attention weights, and the pruned forward's logits."""

import numpy as np
import pytest
import torch

import vtprune
from vtprune.methods import ImageView
from vtprune.methods.fastv import FastV
from vtprune.tiny import IMAGE_TOKEN, SampleLayout, tiny_inputs, tiny_llava

LAYERS = 5


def authors_keep(attention: np.ndarray, sys_length: int, image_length: int, rank: int) -> np.ndarray:
    """At idx == AGG_LAYER: layer AGG_LAYER-1's attention weights [heads, L, L] (what the eager layer returns),
    averaged over heads, the last row, the image span [SYS_LENGTH, SYS_LENGTH + IMAGE_TOKEN_LENGTH), its
    ATTENTION_RANK largest, shifted by SYS_LENGTH; sorted (their keep_indexs, text positions left out)."""
    row = attention.mean(axis=0)[-1, sys_length:sys_length + image_length]
    return np.sort(np.argsort(-row, kind="stable")[:rank] + sys_length)


def authors_forward(model, inputs, layer: int, keep: torch.Tensor) -> torch.Tensor:
    """Their forward from layer AGG_LAYER on: hidden_states[:, keep_indexs], position_ids = keep_indexs and a fresh
    causal mask over the shorter sequence (no padding: their code runs one prompt). Last position's logits."""
    language_model = model.model.language_model

    def inplace(module, args, kwargs):
        hidden = kwargs.pop("hidden_states", None) if not args else args[0]
        if hidden.shape[1] != len(keep):  # the first layer of the pruned part: cut
            hidden = hidden[:, keep]
        n = len(keep)
        causal = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype).triu(1)[None, None]
        positions = keep[None]
        kwargs.update(attention_mask=causal, position_ids=positions,
                      position_embeddings=language_model.rotary_emb(hidden, positions))
        return (hidden, *args[1:]), kwargs

    hooks = [language_model.layers[i].register_forward_pre_hook(inplace, with_kwargs=True)
             for i in range(layer, len(language_model.layers))]
    try:
        return model(**inputs, use_cache=False).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()


def prompt(seed: int, before: int = 5, after: int = 7):
    model = tiny_llava("eager", seed=seed, layers=LAYERS)
    inputs = tiny_inputs(model, [SampleLayout(images=1, text_before=before, text_after=after)], seed=seed)
    visual = torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN).flatten()
    return model, inputs, int(visual[0]), len(visual)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_the_kept_tokens_and_logits_are_the_authors(seed, layer):
    model, inputs, sys_length, image_length = prompt(seed)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True, use_cache=False).attentions
        full = model(**inputs, use_cache=False).logits[0, -1]
        for rank in (1, 7, 16, 32, image_length - 1):
            theirs = authors_keep(attentions[layer - 1][0].double().numpy(), sys_length, image_length, rank)
            with vtprune.apply(model, "fastv", rank, layer=layer) as pruner:
                logits = model(**inputs, use_cache=False).logits[0, -1]
            assert pruner.last_decision.kept[0][0].tolist() == theirs.tolist(), rank
            text = torch.cat([torch.arange(sys_length), torch.arange(sys_length + image_length, len(inputs["input_ids"][0]))])
            keep = torch.cat([text, torch.from_numpy(theirs)]).sort().values
            expected = authors_forward(model, inputs, layer, keep)
            assert not torch.allclose(expected, full, atol=1e-4), "the reference forward did not prune"
            torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


def test_each_sample_of_a_padded_batch_is_the_authors_alone():
    """Their code reads sample 0 of an unpadded prompt; each sample of a left-padded batch gets what their rule picks
    for it run alone."""
    model = tiny_llava("eager", seed=4, layers=LAYERS)
    layouts = [SampleLayout(images=1, text_before=5, text_after=7), SampleLayout(images=1, text_before=2, text_after=3)]
    batch = tiny_inputs(model, layouts, seed=4)
    with torch.no_grad(), vtprune.apply(model, "fastv", 12, layer=2) as pruner:
        model(**batch, use_cache=False)
    kept = pruner.last_decision.kept[0]
    for index in range(len(layouts)):
        alone = {key: (value[index:index + 1] if key in ("input_ids", "attention_mask", "pixel_values") else value)
                 for key, value in batch.items()}
        real = alone["attention_mask"][0].bool()
        alone = dict(alone, input_ids=alone["input_ids"][:, real], attention_mask=alone["attention_mask"][:, real])
        visual = torch.nonzero(alone["input_ids"][0] == IMAGE_TOKEN).flatten()
        with torch.no_grad():
            attention = model(**alone, output_attentions=True, use_cache=False).attentions[1][0]
        theirs = authors_keep(attention.double().numpy(), int(visual[0]), len(visual), 12)
        padding = int((~real).sum())
        assert (kept[index] - padding).tolist() == theirs.tolist(), index


def test_two_images_in_a_sample_are_each_ranked_by_the_eager_attention_row(monkeypatch):
    """FastV's score is the last prompt token's head-mean attention row, softmax over every key up to and including
    its own; with two images in one sample each image gets its own slice of that row and its own top-k."""
    model = tiny_llava("eager", seed=0, layers=LAYERS)
    inputs = tiny_inputs(model, [SampleLayout(images=2, text_before=5, text_after=7)], seed=0)
    images = torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN).flatten().view(2, -1)
    seen = []
    select = FastV.select
    monkeypatch.setattr(FastV, "select", lambda self, view: seen.append(view.attention.clone()) or select(self, view))
    with torch.no_grad():
        row = model(**inputs, output_attentions=True, use_cache=False).attentions[1][0].mean(0)[-1]
        with vtprune.apply(model, "fastv", 10, layer=2) as pruner:
            model(**inputs, use_cache=False)
    assert len(seen) == 2
    kept = pruner.last_decision.kept[0][0]
    for i, image in enumerate(images):
        torch.testing.assert_close(seen[i].double(), row[image].double(), atol=1e-6, rtol=0)
        expected = image[torch.topk(row[image], 10).indices].sort().values
        assert kept[i * 10:(i + 1) * 10].tolist() == expected.tolist(), i


def test_tied_attention_keeps_torch_topks_pick():
    """The authors call .topk on the image slice; on equal scores vtprune keeps whatever torch.topk returns (on the
    CPU not the lowest indices), in original order."""
    attention = torch.full((64,), 1 / 64)
    view = ImageView.of_grid(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), 8, 8, keep=5, layer=2,
                             stage=0, image_index=0, sizes=torch.ones(64), attention=attention)
    assert FastV(FastV.Options()).select(view).tolist() == torch.topk(attention, 5).indices.sort().values.tolist()
