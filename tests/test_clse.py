"""CLSE's score and schedule pinned on hand-made inputs, and CLSE-M's merge."""

import numpy as np
import pytest
import torch

import vtprune
from vtprune.methods import ModelInfo, Selection
from vtprune.methods.clse import CLSE, evolution_gate, high_frequency_magnitude, scaled_layers
from vtprune.methods.clse_merge import CLSEMerge
from vtprune.methods.primitives import merge_into_nearest

from .picks import assert_same_pick

LLAVA_7B, QWEN_7B = ModelInfo("llava", 32), ModelInfo("qwen2_vl", 28)


def numpy_high_frequency(tokens: np.ndarray, rows: int, cols: int, cutoff: float) -> np.ndarray:
    """An independent reading of the authors' score: per channel, Gaussian high-pass of the shifted 2-D spectrum."""
    out = np.zeros(rows * cols)
    sigma = min(rows // 2, cols // 2) * cutoff
    mask = np.array([[1 - np.exp(-((u - rows // 2) ** 2 + (v - cols // 2) ** 2) / (2 * sigma**2)) for v in range(cols)]
                     for u in range(rows)])
    for channel in tokens.T:
        spectrum = np.fft.fftshift(np.fft.fft2(channel.reshape(rows, cols)))
        out += np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum * mask))).flatten()
    return out / tokens.shape[1]


def numpy_clse_score(s_reference: np.ndarray, s_current: np.ndarray, attention: np.ndarray, tau: float) -> np.ndarray:
    """The authors' gated score (tools.py) from the two layers' high-frequency magnitudes: the relative change,
    clipped at 1, z-scored with the unbiased std, through sigmoid(z / tau), times the last query's attention."""
    change = np.minimum(np.abs(s_current - s_reference) / (s_reference.mean() + s_reference + 1e-6), 1.0)
    z = (change - change.mean()) / (change.std(ddof=1) + 1e-6)
    return attention / (1 + np.exp(-z / tau))


@pytest.mark.parametrize("grid", [(24, 24), (6, 10), (7, 5)])
def test_high_frequency_magnitude_matches_an_independent_implementation(grid):
    tokens = torch.randn(grid[0] * grid[1], 16, dtype=torch.float64)
    ours = high_frequency_magnitude(tokens, grid, 0.1)
    reference = numpy_high_frequency(tokens.numpy(), *grid, 0.1)
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-4, atol=1e-5)


def smooth_grid(rows=12, cols=12, channels=8):
    y, x = torch.meshgrid(torch.linspace(0, 1, rows), torch.linspace(0, 1, cols), indexing="ij")
    planes = torch.stack([torch.sin(2 * torch.pi * (x + c / channels)) + y for c in range(channels)])
    return planes.flatten(1).T  # [N, C]


def test_an_isolated_spike_scores_above_smooth_tokens():
    reference = smooth_grid()
    current = reference.clone()
    spike = 5 * 12 + 7
    current[spike] += 3.0  # one token gains high-frequency detail across layers
    magnitude = high_frequency_magnitude(current, (12, 12), 0.1)
    assert int(magnitude.argmax()) == spike
    gate = evolution_gate(high_frequency_magnitude(reference, (12, 12), 0.1), magnitude, tau=0.1)
    assert int(gate.argmax()) == spike
    assert float(gate[spike]) > 0.99 and float(gate.median()) < 0.5


def test_a_constant_grid_gives_a_flat_gate():
    constant = torch.full((64, 4), 2.5)
    magnitude = high_frequency_magnitude(constant, (8, 8), 0.1)
    assert torch.allclose(magnitude, torch.zeros(64), atol=1e-5)
    gate = evolution_gate(magnitude, high_frequency_magnitude(constant * 3, (8, 8), 0.1), tau=0.1)
    assert torch.allclose(gate, torch.full((64,), 0.5))


def test_the_authors_schedule():
    clse = CLSE(CLSE.Options())
    assert [(s.layer, s.keep) for s in clse.stages(LLAVA_7B, 192, 576)] == [(1, 330), (11, 210), (21, 62)]
    assert [(s.layer, s.keep) for s in clse.stages(LLAVA_7B, 128, 576)] == [(1, 220), (11, 140), (21, 41)]
    assert [(s.layer, s.keep) for s in clse.stages(LLAVA_7B, 64, 576)] == [(1, 110), (11, 70), (21, 20)]
    assert [s.keep for s in clse.stages(LLAVA_7B, 100, 576)] == [172, 109, 32]
    assert [s.keep for s in clse.stages(LLAVA_7B, 30, 576)] == [52, 33, 10]  # 51.6, 32.7, 9.6 rounded
    assert [s.layer for s in clse.stages(QWEN_7B, 342, 1024)] == [1, 10, 19]
    assert scaled_layers(ModelInfo("llava", 16)) == (1, 6, 10)
    assert scaled_layers(ModelInfo("llava", 4)) == (1, 2, 3)
    custom = CLSE(CLSE.Options(layers=(2, 3), keep=(40, 10)))
    assert [(s.layer, s.keep) for s in custom.stages(LLAVA_7B, 64, 576)] == [(2, 40), (3, 10)]


# The authors' Qwen2-VL keep ratios per stage, of the item's original visual length, for the three retain ratios
# they report (zjubinchen/CLSE, Qwen2VL/clse_qwen2vl_model.py: keep_ratio_list_334/_223/_112 in ratio_dict);
# each stage keeps max(1, int(N x ratio)). Any other retain ratio r keeps r x (1.71, 1.08, 0.294) of N.
AUTHORS_QWEN_TABLE = {0.334: (0.57, 0.36, 0.098), 0.223: (0.38, 0.24, 0.066), 0.112: (0.19, 0.12, 0.034)}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("num_tokens", [1024, 391, 100, 64])
@pytest.mark.parametrize("retain", sorted(AUTHORS_QWEN_TABLE))
def test_qwen_keep_counts_follow_the_authors_table(family, num_tokens, retain):
    from vtprune.engine.budget import tokens_for_budget

    clse = CLSE(CLSE.Options())
    model = ModelInfo(family, 28)
    expected = [max(1, int(num_tokens * ratio)) for ratio in AUTHORS_QWEN_TABLE[retain]]
    for budget in (retain, round(retain * num_tokens)):  # a fraction, or the same count of tokens
        keep = tokens_for_budget(budget, num_tokens)
        assert [(s.layer, s.keep) for s in clse.stages(model, keep, num_tokens)] == list(zip((1, 10, 19), expected))


def test_qwen_keep_counts_hand_checked():
    clse = CLSE(CLSE.Options())
    counts = lambda budget, n: [s.keep for s in clse.stages(QWEN_7B, budget, n)]  # noqa: E731
    assert counts(342, 1024) == [583, 368, 100]  # 0.334: 1024 x 0.57 = 583.68 ...
    assert counts(228, 1024) == [389, 245, 67]  # 0.223
    assert counts(115, 1024) == [194, 122, 34]  # 0.112
    assert counts(33, 100) == [56, 36, 9]  # 100 * 0.57 is 56.99999999999999 in floats: the authors' int() gives 56
    # Elsewhere: r = budget / N, each stage int(N x (r x multiplier)).
    assert counts(500, 1000) == [855, 540, 147]
    assert counts(250, 1000) == [int(1000 * (0.25 * 1.71)), int(1000 * (0.25 * 1.08)), int(1000 * (0.25 * 0.294))]
    assert counts(250, 1000) == [427, 270, 73]
    assert counts(900, 1000) == [1000, 972, 264]  # a stage never keeps more than the item has
    # On 4 tokens every table ratio rounds to 1 token; the nearest to 1 / 4 is 0.223: int(4 x 0.38) = 1, not 0.334's 2
    assert counts(1, 4) == [1, 1, 1]


@pytest.mark.parametrize("family, slices", [
    ("llava", True), ("llava_next", True), ("llava_onevision", True), ("video_llava", True),
    ("qwen2_vl", False), ("qwen2_5_vl", False)])
def test_kv_slicing_follows_the_authors_per_family(family, slices):
    """The authors slice the early layers' cache on LLaVA; their Qwen2-VL code has it commented out."""
    assert CLSE(CLSE.Options()).slices_kv_cache_of("image", family) is slices
    assert CLSE(CLSE.Options(slice_kv=True)).slices_kv_cache_of("image", family) is True
    assert CLSE(CLSE.Options(slice_kv=False)).slices_kv_cache_of("image", family) is False
    for slice_kv in (None, True, False):
        assert CLSE(CLSE.Options(slice_kv=slice_kv)).slices_kv_cache_of("video", family) is False


@pytest.mark.parametrize("options, message", [
    ({"score": "fft"}, "score must be one of"),
    ({"layers": (1, 2), "keep": (10,)}, "one keep count per stage"),
    ({"keep": (10, 20, 5)}, "must not grow"),
    ({"layers": (3, 2, 1)}, "increasing"),
])
def test_bad_clse_options(options, message):
    from vtprune.tiny import tiny_llava

    with pytest.raises(ValueError, match=message):
        vtprune.apply(tiny_llava(), "clse", 16, **options)


def unpruned_run(model, inputs, layers):
    """(the unpruned model's output with attentions, {layer: the hidden states entering it}) for `layers`: what a
    method sees up to its stage."""
    decoder = model.model.language_model.layers
    captured = {}
    hooks = [decoder[i].register_forward_pre_hook(
        lambda module, args, kwargs, i=i: captured.__setitem__(i, kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True) for i in layers]
    try:
        return model(**inputs, output_attentions=True, use_cache=False), captured
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_the_image_score_matches_an_independent_implementation(tau):
    """Stage 0's score on a whole image, value by value (a tau large enough that the gate is no step function, so
    the change's formula and the z-score's statistics show)."""
    from vtprune.methods import ImageView

    generator = torch.Generator().manual_seed(4)
    rows, cols = 6, 10
    hidden = torch.randn(rows * cols, 8, generator=generator, dtype=torch.float64)
    reference = hidden + 0.5 * torch.randn(rows * cols, 8, generator=generator, dtype=torch.float64)
    attention = torch.rand(rows * cols, generator=generator, dtype=torch.float64)
    view = ImageView.of_grid(hidden, rows, cols, keep=8, layer=1, stage=0, image_index=0,
                             sizes=torch.ones(rows * cols), attention=attention, reference=reference)
    expected = numpy_clse_score(numpy_high_frequency(reference.numpy(), rows, cols, 0.1),
                                numpy_high_frequency(hidden.numpy(), rows, cols, 0.1), attention.numpy(), tau)
    np.testing.assert_allclose(CLSE(CLSE.Options(tau=tau)).score(view).double().numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_an_image_follows_the_authors_first_stage(family):
    """On a tiny model: the reference states entering layer 0, the current ones entering the first stage layer K,
    the last query's attention of layer K-1 averaged over heads; the stage keeps the top of gate x attention (on
    Qwen2-VL over its merged grid, at the count of the authors' ratios)."""
    from tests.conftest import FAMILIES
    from vtprune.tiny import SampleLayout, tiny_inputs

    model = FAMILIES[family]("eager")
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    layers = model.model.language_model.layers
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    rows, cols = (8, 8) if family == "llava" else (int(side) // 2 for side in inputs["image_grid_thw"][0, 1:])
    assert rows * cols == len(image)
    method = CLSE(CLSE.Options(tau=1.0))
    info = ModelInfo(family, len(layers))
    first = method.item_stages(info, 8, len(image), "image")[0]
    reference_layer = method.reference_layer(info, "image")
    out, captured = unpruned_run(model, inputs, (reference_layer, first.layer))
    attention = out.attentions[first.layer - 1][0].mean(dim=0)[-1, image].double().numpy()
    before, after = (captured[i][0, image].double().numpy() for i in (reference_layer, first.layer))
    score = numpy_clse_score(numpy_high_frequency(before, rows, cols, 0.1),
                             numpy_high_frequency(after, rows, cols, 0.1), attention, tau=1.0)
    expected = np.sort(np.argsort(-score, kind="stable")[: first.keep])
    with vtprune.apply(model, "clse", 8, tau=1.0) as pruner:
        model(**inputs)
    assert pruner.last_decision.stage_layers[0] == first.layer
    assert sorted((pruner.last_decision.kept[0][0] - image[0]).tolist()) == expected.tolist()


def numpy_merge_into_nearest(hidden: np.ndarray, sizes: np.ndarray, keep: list[int]):
    """CLSE-M's documented merge: each dropped token into the kept token of highest cosine similarity, every kept
    token the size-weighted mean of itself and what joined it."""
    unit = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
    destination = np.argmax(unit @ unit[keep].T, axis=1)
    destination[keep] = np.arange(len(keep))
    merged = np.stack([(hidden[destination == k] * sizes[destination == k, None]).sum(0) / sizes[destination == k].sum()
                       for k in range(len(keep))])
    return merged, np.array([sizes[destination == k].sum() for k in range(len(keep))]), destination


def test_clse_m_merges_as_an_independent_implementation():
    """Tokens of very different norms, so that the nearest by cosine is not the nearest by dot product."""
    from vtprune.methods import ImageView

    generator = torch.Generator().manual_seed(5)
    n = 48
    hidden = torch.randn(n, 6, generator=generator, dtype=torch.float64) * torch.logspace(-1, 1, n, dtype=torch.float64)[:, None]
    view = ImageView.of_grid(hidden, 6, 8, keep=9, layer=1, stage=1, image_index=0,
                             sizes=torch.randint(1, 5, (n,), generator=generator).double(),
                             attention=torch.rand(n, generator=generator, dtype=torch.float64), reference=None)
    picked = CLSEMerge(CLSEMerge.Options()).select(view)
    keep = CLSE(CLSE.Options()).select(view)
    assert picked.keep.tolist() == keep.tolist()
    merged, sizes, destination = numpy_merge_into_nearest(hidden.numpy(), view.sizes.numpy(), keep.tolist())
    dot = np.argmax(hidden.numpy() @ hidden.numpy()[keep.tolist()].T, axis=1)
    assert (dot != destination).sum() > n // 4  # the test tells cosine from dot product
    assert picked.destination.tolist() == destination.tolist()
    np.testing.assert_allclose(picked.sizes.numpy(), sizes)
    np.testing.assert_allclose(picked.hidden.double().numpy(), merged, rtol=1e-5, atol=1e-6)


def test_clse_m_carries_sizes_from_stage_to_stage():
    """In a model, each stage's merge is the written rule on the states entering its layer, weighted by the sizes
    the earlier stages' merges left (not by ones)."""
    from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

    model = tiny_llava("eager", layers=8)
    inputs = tiny_inputs(model, [SampleLayout()])
    with torch.no_grad(), vtprune.apply(model, "clse_m", 6, layers=(1, 3, 5), keep=(24, 12, 6)) as pruner:
        states = model(**inputs, output_hidden_states=True).hidden_states
    decision = pruner.last_decision
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    sizes = dict.fromkeys(image.tolist(), 1.0)
    for stage, layer in enumerate(decision.stage_layers):
        rows = decision.positions_at(layer - 1)[0]
        visual = torch.isin(rows, image)
        positions = rows[visual].tolist()
        kept = sorted(decision.kept[stage][0].tolist())
        merged, merged_sizes, _ = numpy_merge_into_nearest(states[layer][0][visual].double().numpy(),
                                                           np.array([sizes[p] for p in positions]),
                                                           [positions.index(p) for p in kept])
        written_at, written = decision.merged[stage][0][0]
        np.testing.assert_allclose(written[written_at.argsort()].double().numpy(), merged, rtol=1e-5, atol=1e-6)
        sizes = dict(zip(kept, merged_sizes.tolist()))
    assert max(sizes.values()) > 2  # the later stages had sizes to carry


def test_score_variants_use_what_they_say():
    n = 64
    view_args = dict(keep=8, layer=1, stage=0, image_index=0, sizes=torch.ones(n), attention=torch.rand(n),
                     reference=smooth_grid(8, 8) * 0.5)
    from vtprune.methods import ImageView

    view = ImageView.of_grid(smooth_grid(8, 8), 8, 8, **view_args)
    attn_only = CLSE(CLSE.Options(score="attn")).score(view)
    assert torch.equal(attn_only, view.attention)
    gate = CLSE(CLSE.Options(score="clse")).score(view)
    both = CLSE(CLSE.Options()).score(view)
    torch.testing.assert_close(both, gate * view.attention)
    later = ImageView.of_grid(smooth_grid(8, 8), 8, 8, **dict(view_args, stage=1))
    assert torch.equal(CLSE(CLSE.Options()).score(later), view.attention)  # no whole grid after stage 1


@pytest.mark.parametrize("method", [CLSE(CLSE.Options()), CLSEMerge(CLSEMerge.Options())], ids=["clse", "clse_m"])
def test_a_batch_of_views_is_each_view_alone(method):
    """select_batch scores and selects views of one shape, parts, keep and stage together (the gate's statistics
    are each item's own); an anyres item, a later stage, another keep and another dtype are grouped apart. Each
    pick equals its view alone; a stacked gated pick equals the gate computed on its own grid."""
    from vtprune.methods import Grid, ImageView

    generator = torch.Generator().manual_seed(0)

    def view(keep=8, stage=0, parts=(Grid(8, 8),), dtype=torch.float32):
        n = sum(grid.size for grid in parts)
        hidden = torch.randn(n, 6, generator=generator).to(dtype)
        return ImageView(hidden=hidden, coords=torch.zeros(n, 3, dtype=torch.long), part=torch.zeros(n, dtype=torch.long),
                         parts=parts, keep=keep, layer=1, stage=stage, image_index=0,
                         sizes=torch.randint(1, 4, (n,), generator=generator).float(),
                         attention=torch.rand(n, generator=generator), reference=torch.randn(n, 6, generator=generator))

    views = [view() for _ in range(3)] + [view(parts=(Grid(4, 4), Grid(4, 6))), view(stage=1), view(keep=5),
                                          view(dtype=torch.float64), view()]
    for one, pick in zip(views, method.select_batch(views), strict=True):
        assert_same_pick(pick, method.select(one))
    gate = evolution_gate(high_frequency_magnitude(views[1].reference, (8, 8), 0.1),
                          high_frequency_magnitude(views[1].hidden, (8, 8), 0.1), tau=0.1)
    expected = torch.topk(gate * views[1].attention, 8).indices.sort().values
    picked = method.select_batch(views)[1]
    assert (picked.keep if isinstance(picked, Selection) else picked).tolist() == expected.tolist()


def test_merge_into_nearest_is_a_size_weighted_mean():
    hidden = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.0, 2.0]])
    sizes = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0])
    merged, new_sizes, destination = merge_into_nearest(hidden, sizes, torch.tensor([0, 2]))
    assert new_sizes.tolist() == [4.0, 4.0]
    torch.testing.assert_close(merged[0], (hidden[0] * 1 + hidden[1] * 3) / 4)
    torch.testing.assert_close(merged[1], (hidden[2] * 1 + hidden[3] * 1 + hidden[4] * 2) / 4)
    assert destination.tolist() == [0, 0, 1, 1, 1]
    # items along a leading dimension merge as each alone
    other = torch.flip(hidden, dims=[1])
    batched = merge_into_nearest(torch.stack([hidden, other]), torch.stack([sizes, sizes]), torch.tensor([[0, 2], [1, 4]]))
    for b, (h, k) in enumerate([(hidden, [0, 2]), (other, [1, 4])]):
        for got, alone in zip(batched, merge_into_nearest(h, sizes, torch.tensor(k))):
            torch.testing.assert_close(got[b], alone, rtol=0, atol=0)


@pytest.mark.parametrize("family, slice_kv", [("llava", None), ("llava", True), ("qwen2_vl", True)])
def test_a_plain_forward_slices_the_cache_it_returns(family, slice_kv):
    """Qwen2-VL passes use_cache=None to its LM: the pruner must still own (and slice) the cache."""
    from vtprune.engine.cache import output_cache
    from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava, tiny_qwen2_vl

    model = (tiny_llava if family == "llava" else tiny_qwen2_vl)()
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(text_before=6)])
    with torch.no_grad(), vtprune.apply(model, "clse", 10, slice_kv=slice_kv):
        cache = output_cache(model(**inputs))
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    assert len(lengths) == 1 and lengths.pop() < inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family, slice_kv", [("qwen2_vl", None), ("qwen2_5_vl", None), ("llava", False)])
def test_without_slicing_each_layer_caches_what_it_ran_on(family, slice_kv):
    """Qwen2-VL's default (the authors'), or slice_kv=False: layers before a stage keep their tokens cached."""
    from tests.conftest import FAMILIES
    from vtprune.engine.cache import output_cache
    from vtprune.tiny import SampleLayout, tiny_inputs

    model = FAMILIES[family]("sdpa")
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(text_before=6)])
    with torch.no_grad(), vtprune.apply(model, "clse", 10, slice_kv=slice_kv) as pruner:
        cache = output_cache(model(**inputs))
        decision = pruner.last_decision
    layers = len(model.model.language_model.layers)
    assert [cache.get_seq_length(i) for i in range(layers)] == [decision.positions_at(i).shape[1] for i in range(layers)]
    assert cache.get_seq_length(0) == inputs["input_ids"].shape[1] > cache.get_seq_length(layers - 1)


def test_a_stage_at_the_llm_input_is_refused_for_attention_scores():
    from vtprune.tiny import tiny_llava

    with pytest.raises(ValueError, match="must be >= 1"):
        vtprune.apply(tiny_llava(), "clse", 16, layers=(0, 2, 3))


def test_a_videos_spectral_score_is_each_frames_own():
    """Frames are the FFT's batch (the authors' video branch): a frame scores as it would alone."""
    from vtprune.methods import Grid

    frames = [torch.randn(4 * 6, 8, generator=torch.Generator().manual_seed(f)) for f in range(3)]
    video = high_frequency_magnitude(torch.cat(frames), Grid(4, 6, frames=3), 0.1)
    alone = torch.cat([high_frequency_magnitude(frame, (4, 6), 0.1) for frame in frames])
    torch.testing.assert_close(video, alone)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_video_follows_the_authors_video_branch(family):
    """One stage: reference at the input of layer L, prune before layer L+1 (2 and 3 of 32, scaled), frames as the
    FFT's batch, gate x last-query attention of layer L, `budget` tokens for the whole video, early cache kept."""
    from tests.conftest import FAMILIES
    from vtprune.engine.cache import output_cache
    from vtprune.methods.clse import video_layers
    from vtprune.tiny import QWEN_VIDEO_TOKEN, SampleLayout, tiny_inputs

    assert video_layers(ModelInfo(family, 32)) == (2, 3)  # the authors' own depth (a 4-layer model scales any to 1, 2)
    model = FAMILIES[family]("eager")
    inputs = tiny_inputs(model, [SampleLayout(images=0, videos=1, qwen_video=(4, 8, 8))])  # 4 frames of 4x4
    layers = model.model.language_model.layers
    reference_layer, stage_layer = video_layers(ModelInfo(family, len(layers)))
    out, captured = unpruned_run(model, inputs, (reference_layer, stage_layer))
    video = torch.nonzero(inputs["input_ids"][0] == QWEN_VIDEO_TOKEN).flatten()
    attention = out.attentions[reference_layer][0].mean(dim=0)[-1, video].double().numpy()
    before, after = (captured[i][0, video].double().numpy() for i in (reference_layer, stage_layer))

    def per_frame(tokens):
        return np.concatenate([numpy_high_frequency(frame, 4, 4, 0.1) for frame in tokens.reshape(4, 16, -1)])

    score = numpy_clse_score(per_frame(before), per_frame(after), attention, tau=0.1)
    expected = np.sort(np.argsort(-score, kind="stable")[:12])

    with vtprune.apply(model, "clse", 12) as pruner:
        cache = output_cache(model(**inputs, use_cache=True))
        stats, decision = pruner.last_stats, pruner.last_decision
    assert decision.stage_layers == [stage_layer]
    assert stats.visual_tokens_per_layer[0] == [64] * stage_layer + [12] * (len(layers) - stage_layer)
    assert sorted((decision.kept[0][0] - video[0]).tolist()) == expected.tolist()
    prompt = inputs["input_ids"].shape[1]  # the video branch leaves the early layers' cache whole
    assert [cache.get_seq_length(i) for i in range(len(layers))] == \
        [prompt] * stage_layer + [prompt - 52] * (len(layers) - stage_layer)


def test_the_relative_change_is_clipped_at_one():
    """A few tokens whose magnitude grows twentyfold: their change is clipped at 1 before the z-score, as the
    authors' (a gentle tau keeps the clipped and unclipped gates apart)."""
    generator = torch.Generator().manual_seed(3)
    reference = torch.rand(64, generator=generator, dtype=torch.float64) + 0.5
    current = reference * (1 + 0.2 * torch.rand(64, generator=generator, dtype=torch.float64))
    current[[3, 17, 40, 41, 60]] *= 20
    expected = numpy_clse_score(reference.numpy(), current.numpy(), np.ones(64), tau=5.0)
    np.testing.assert_allclose(evolution_gate(reference, current, tau=5.0).numpy(), expected, rtol=1e-10)


def test_items_of_one_size_on_different_grids_are_filtered_each_on_its_own():
    """Two images of 64 tokens, one 8 x 8 and one 4 x 16, selected in one batch: each is high-passed on its own
    grid (the independent numpy reading), not on its neighbour's. A wide cutoff makes the grids' filters differ."""
    from vtprune.methods import Grid, ImageView

    generator = torch.Generator().manual_seed(4)
    views, expected = [], []
    for rows, cols in ((8, 8), (4, 16)):
        reference, hidden = (torch.randn(64, 6, generator=generator, dtype=torch.float64).cumsum(0) for _ in range(2))
        attention = torch.rand(64, generator=generator, dtype=torch.float64)
        views.append(ImageView(hidden=hidden, coords=torch.zeros(64, 3, dtype=torch.long),
                               part=torch.zeros(64, dtype=torch.long), parts=(Grid(rows, cols),), keep=20, layer=1,
                               stage=0, image_index=0, sizes=torch.ones(64, dtype=torch.float64), attention=attention,
                               reference=reference))
        score = numpy_clse_score(numpy_high_frequency(reference.numpy(), rows, cols, 0.5),
                                 numpy_high_frequency(hidden.numpy(), rows, cols, 0.5), attention.numpy(), tau=0.1)
        expected.append(sorted(np.argsort(-score)[:20].tolist()))
    picks = CLSE(CLSE.Options(cutoff=0.5)).select_batch(views)
    assert [pick.tolist() for pick in picks] == expected
