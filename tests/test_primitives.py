"""Selection primitives and the recomputed last-query attention."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.adapters import adapter_for
from vtprune.engine.cache import output_cache
from vtprune.methods.primitives import (DISTANCE_MATRIX_ENTRIES, HELD_ON_GPU, distance_matrix_chunks, evenly_spaced,
                                        grid_lattice, held_entries, topk_in_order)
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

from .conftest import FAMILIES


@given(st.integers(1, 200), st.integers(1, 200))
def test_evenly_spaced_gives_k_distinct_sorted_indices(n, k):
    picked = evenly_spaced(n, k)
    assert picked.numel() == min(n, k)
    assert picked.unique().numel() == picked.numel()
    assert torch.equal(picked, picked.sort().values)
    assert 0 <= int(picked.min()) and int(picked.max()) < n


@settings(max_examples=60)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 900))
def test_grid_lattice_gives_k_distinct_cells(rows, cols, k):
    picked = grid_lattice(rows, cols, k)
    assert picked.numel() == min(k, rows * cols)
    assert picked.unique().numel() == picked.numel()
    assert int(picked.max()) < rows * cols


def test_grid_lattice_spreads_over_the_grid():
    """The lattice keeps the grid's aspect ratio, and when it has more points than k the ones left out are spread
    evenly over it, not cut from its end."""
    picked = grid_lattice(24, 24, 64)
    rows, cols = picked // 24, picked % 24
    assert rows.unique().numel() == 8 and cols.unique().numel() == 8  # an 8x8 lattice
    assert int(rows.min()) <= 2 and int(rows.max()) >= 21
    picked = grid_lattice(6, 24, 36)  # a wide grid: 3 rows of 12, not 6 of 6
    assert (picked // 24).unique().numel() == 3 and (picked % 24).unique().numel() == 12
    per_row = torch.bincount(grid_lattice(24, 24, 60) // 24)  # 60 of an 8x8 lattice: 7 or 8 in each of its rows
    per_row = per_row[per_row > 0]
    assert per_row.numel() == 8 and int(per_row.max() - per_row.min()) <= 1


def test_topk_in_order():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert topk_in_order(scores, 2).tolist() == [1, 3]
    assert topk_in_order(scores, 9).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("keys_from_cache", [False, True])
def test_recomputed_last_query_attention_matches_eager_weights(family, padding_side, keys_from_cache):
    """The q/k recomputation (or the query with the keys the layer cached, as the engine takes them) equals the
    head-averaged attention row eager attention returns."""
    model = FAMILIES[family]("eager")
    adapter = adapter_for(model)
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(text_before=9)], padding_side=padding_side)
    layer = 1
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["pe"] = kwargs["position_embeddings"]

    handle = adapter.decoder_layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, use_cache=keys_from_cache)
    handle.remove()
    mask = inputs["attention_mask"].bool()
    slots = torch.arange(mask.shape[1])
    query = torch.where(mask, slots, -1).amax(dim=1)
    keys = output_cache(out).layers[layer].keys if keys_from_cache else None
    with torch.no_grad():
        ours = adapter.last_query_attention(layer, captured["hidden"], captured["pe"], query,
                                            mask & (slots <= query[:, None]), keys)
    eager = out.attentions[layer].mean(dim=1)[torch.arange(2), query]
    torch.testing.assert_close(ours, eager * mask, atol=1e-6, rtol=0)


# LLaVA's decoder as each model_type that REPRODUCED_ATTENTION names (Qwen2-VL's and 2.5-VL's own: FAMILIES above),
# with options that make what it does differently count: a window switched off, a scaling other than 1/sqrt(d)
DECODERS = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "gemma": {}, "granite": {
    "attention_multiplier": 0.3}}


def test_every_decoder_said_to_be_reproduced_is_tested():
    from vtprune.adapters.base import REPRODUCED_ATTENTION

    assert set(REPRODUCED_ATTENTION) == set(DECODERS) | {"qwen2_vl_text", "qwen2_5_vl_text"}


@pytest.mark.parametrize("text", sorted(DECODERS))
def test_the_recomputed_attention_is_each_reproduced_decoders_own_at_every_layer(text):
    model = tiny_llava("eager", text=text, **DECODERS[text])
    adapter = adapter_for(model)
    inputs = tiny_inputs(model, [SampleLayout(images=1), SampleLayout(images=1, text_before=9)])
    captured = {}

    def capture(index):
        def hook(module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True)
               for i, layer in enumerate(adapter.decoder_layers)]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for handle in handles:
        handle.remove()
    mask = inputs["attention_mask"].bool()
    query = torch.full((2,), mask.shape[1] - 1)  # left-padded: the last slot is each sample's last token
    for layer, (hidden, position_embeddings) in captured.items():
        with torch.no_grad():
            ours = adapter.last_query_attention(layer, hidden, position_embeddings, query, mask)
        torch.testing.assert_close(ours, out.attentions[layer][:, :, -1].mean(dim=1), atol=1e-6, rtol=0)


# decoders whose attention differs from the recomputation: q/k norms, interleaved RoPE, a layer without RoPE (the
# 4th of 4), a fused q/k/v projection, a post-norm layer
NOT_REPRODUCED = {"qwen3": {}, "cohere": {}, "smollm3": {"no_rope_layers": [1, 1, 1, 0]}, "phi3": {}, "olmo2": {}}


@pytest.mark.parametrize("text", sorted(NOT_REPRODUCED))
def test_methods_reading_decoder_attention_refuse_a_decoder_it_does_not_reproduce_and_the_others_run(text):
    from vtprune.methods import REGISTRY

    model = tiny_llava("eager", text=text, **NOT_REPRODUCED[text])
    reading = sorted(name for name, cls in REGISTRY.items() if cls.reads_decoder_attention())
    assert {"fastv", "pdrop", "sparsevlm", "dart", "clse", "clse_m", "clasp"} <= set(reading)
    for name in reading:
        with pytest.raises(ValueError, match=f"method '{name}' scores tokens with the language model's attention, "
                                             f"which vtprune recomputes as llama, .* this model's is a '{text}' "
                                             "decoder"):
            vtprune.apply(model, name, 8)
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    with torch.no_grad(), vtprune.apply(model, "divprune", 8) as pruner:
        model(**inputs)
    assert pruner.last_stats.kept_per_sample == [8]


def test_split_budget_is_proportional_and_exact():
    from vtprune.methods.primitives import split_budget

    assert split_budget([576, 2304], 64) == [13, 51]  # an anyres image: base and high-resolution grids
    assert split_budget([10, 10, 10], 10) == [4, 3, 3]  # ties go to the first parts
    assert split_budget([5, 1000], 2000) == [5, 1000]
    for sizes, k in (([7, 3, 11], 9), ([1, 1], 1), ([100], 37)):
        counts = split_budget(sizes, k)
        assert sum(counts) == k and all(0 <= c <= s for c, s in zip(counts, sizes))


def test_volume_lattice_of_one_frame_is_the_grid_lattice():
    """Lattices worked by hand from the documented rule: rows = round(sqrt(k x height / width)), cols = ceil(k / rows),
    each axis at the centres of equal bins (n / m bins of an axis of n: floor((i + 0.5) n / m)), then k of the
    rows x cols points at the bin centres of their raster order."""
    from vtprune.methods.primitives import volume_lattice

    def raster(rows, cols, width):
        return [r * width + c for r in rows for c in cols]

    # 24 x 24, 64: an 8 x 8 lattice at the centres of bins of 3: 1, 4, ..., 22; all 64 of its points
    assert volume_lattice(1, 24, 24, 64).tolist() == raster(range(1, 24, 3), range(1, 24, 3), 24)
    # 6 x 24, 36 (wide): 3 rows (bins of 2: 1, 3, 5) of 12 columns (bins of 2: 1, 3, ..., 23)
    assert volume_lattice(1, 6, 24, 36).tolist() == raster([1, 3, 5], range(1, 24, 2), 24)
    # 5 x 9, 7: round(sqrt(35 / 9)) = 2 rows (5 / 2: 1, 3) of ceil(7 / 2) = 4 columns (9 / 4: 1, 3, 5, 7); 7 of the
    # 8 points at floor((i + 0.5) 8 / 7) = 0, 1, 2, 4, 5, 6, 7: the fourth (row 1, column 7) left out
    assert volume_lattice(1, 5, 9, 7).tolist() == [10, 12, 14, 28, 30, 32, 34]
    # every cell: the grid in order
    assert volume_lattice(1, 4, 4, 16).tolist() == list(range(16))
    # two frames of 4 x 4, 4 of 32 cells: round(2 x (4 / 32)^(1/3)) = 1 frame, the middle bin's (frame 1), with a
    # 2 x 2 lattice (bins of 2: rows and columns 1, 3)
    assert volume_lattice(2, 4, 4, 4).tolist() == [16 + cell for cell in raster([1, 3], [1, 3], 4)]


def test_volume_lattice_is_k_distinct_cells_spread_over_frames():
    from vtprune.methods.primitives import volume_lattice

    for frames, rows, cols, k in ((8, 16, 16, 194), (8, 4, 4, 16), (3, 2, 3, 5), (16, 2, 2, 64)):
        cells = volume_lattice(frames, rows, cols, k)
        assert cells.numel() == k == cells.unique().numel()
        assert int(cells.min()) >= 0 and int(cells.max()) < frames * rows * cols
        per_frame = torch.bincount(cells // (rows * cols), minlength=frames)
        used = per_frame[per_frame > 0]
        assert int(used.max() - used.min()) <= max(1, int(used.max()) // 2)  # frames used about equally
    # round(frames x (k / cells)^(1/3)) frames: 8 x (40 / 2048)^(1/3) = 2.15 -> 2
    assert int((torch.bincount(volume_lattice(8, 16, 16, 40) // 256, minlength=8) > 0).sum()) == 2


def test_uniform_batch_equals_each_view_alone():
    """uniform computes a whole item's lattice once per (grids, keep) in a batch; a partial view is its own."""
    from vtprune.methods import ImageView
    from vtprune.methods.uniform_grid import UniformGrid

    method = UniformGrid(UniformGrid.Options())

    def whole(rows, cols, keep):
        return ImageView.of_grid(torch.zeros(rows * cols, 4), rows, cols, keep=keep, layer=0, stage=0, image_index=0,
                                 sizes=torch.ones(rows * cols))

    partial = whole(6, 6, 9)
    partial.hidden, partial.coords, partial.part, partial.sizes = (t[::2] for t in (partial.hidden, partial.coords,
                                                                                   partial.part, partial.sizes))
    views = [whole(6, 6, 9), whole(6, 6, 9), whole(6, 6, 4), whole(4, 9, 9), partial]
    picks = method.select_batch(views)
    for view, pick in zip(views, picks):
        assert pick.tolist() == method.select(view).tolist()
    assert picks[0].data_ptr() != picks[1].data_ptr()  # alike views get their own tensors


def test_a_gpu_holds_more_matrices_at_once_but_decides_whole_alike():
    """Chunking never changes a pick; whether an item holds its matrix is its size's business, on any device. A GPU
    takes a batch of 16 LLaVA-NeXT-sized items (2880 tokens) in one loop, the CPU two at a time."""
    n, entries = 2880, DISTANCE_MATRIX_ENTRIES
    cpu_whole, cpu_chunks = distance_matrix_chunks(16, n, entries, "cpu")
    gpu_whole, gpu_chunks = distance_matrix_chunks(16, n, entries, "cuda")
    assert cpu_whole and gpu_whole
    assert len(cpu_chunks) == 8 and len(gpu_chunks) == 1
    assert distance_matrix_chunks(16, 5000, entries, "cuda")[0] is False  # too big to hold, on either device
    assert held_entries("cpu", 16) == 16 and held_entries("cuda", 16) == HELD_ON_GPU
