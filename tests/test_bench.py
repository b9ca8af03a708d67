"""The efficiency benchmark runs on the CPU and its numbers are consistent (not that they are fast)."""

import dataclasses
import io
import json
import math
import platform
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from transformers.vision_utils import get_vision_window_index

from vtprune.bench.flops import decoder_layer_flops, prefill_flops, vision_layer_flops, window_spans
from vtprune.bench.measure import (Measurement, generation_rates, measure, oracle_grid, oracle_kept_features,
                                   video_oracle_kept)
from vtprune.bench.run import bench_table, save
from vtprune.bench.presets import PRESETS, AnyresLayout, Preset, anyres_layout, build_preset, preset_inputs
from vtprune.engine.compiled import COMPILERS, compile_prefill
from vtprune.methods import FastV

TINY = Preset(
    "llava",
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=7,
         projection_dim=32),
    dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
         num_key_value_heads=2, max_position_embeddings=512),
)


@pytest.fixture(scope="module")
def results():
    torch.manual_seed(0)
    model = TINY.build().eval()
    runs = [("unpruned", None), ("oracle", 16), ("random", 16), ("random", 32), ("fastv", 16), ("clse", 16)]
    return model, {f"{m}@{b}": measure(model, TINY, m, b, batch=2, repeats=2, warmup=1, new_tokens=6) for m, b in runs}


def kv_bytes(model, batch, tokens_per_layer):
    text = model.config.text_config
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # keys + values, fp32
    return batch * per_token * sum(tokens_per_layer)


def test_flops_fall_with_the_budget(results):
    _, r = results
    assert r["unpruned@None"].prefill_tflops > r["random@32"].prefill_tflops > r["random@16"].prefill_tflops
    assert r["unpruned@None"].prefill_tflops > r["fastv@16"].prefill_tflops > r["random@16"].prefill_tflops
    assert r["oracle@16"].prefill_tflops == pytest.approx(r["random@16"].prefill_tflops)


def test_kv_cache_bytes_match_the_kept_tokens(results):
    model, r = results
    text = 40  # preset_inputs' text tokens
    for name, run in r.items():
        if name.startswith("clse"):
            continue
        assert run.kv_cache_bytes == kv_bytes(model, 2, [text + v for v in run.visual_tokens_per_layer]), name
    assert r["random@16"].visual_tokens_per_layer == [16] * 6
    assert r["fastv@16"].visual_tokens_per_layer == [64, 64] + [16] * 4
    # clse slices the early layers' cache to its final tokens: all layers end with the same count
    assert r["clse@16"].kv_cache_bytes == kv_bytes(model, 2, [text + r["clse@16"].visual_tokens_per_layer[-1]] * 6)


def test_methods_are_timed_against_their_schedule_oracle_and_their_selection(results):
    _, r = results
    for name in ("random@16", "fastv@16", "clse@16"):
        assert r[name].schedule_oracle_ms > 0 and r[name].input_oracle_ms > 0
    assert set(r["fastv@16"].select_ms) == {"layer 2"} and set(r["random@16"].select_ms) == {"layer 0"}
    assert set(r["clse@16"].select_ms) == {"layer 1", "layer 2", "layer 4"}  # 1/11/21 of 32, scaled to 6 layers
    assert r["unpruned@None"].schedule_oracle_ms is None and r["oracle@16"].select_ms is None
    assert r["oracle@16"].input_oracle_ms is None


def test_timings_and_rates_are_positive_and_ordered(results):
    _, r = results
    for run in r.values():
        assert 0 < run.prefill_ms_p10 <= run.prefill_ms <= run.prefill_ms_p90
        # decode speed is a difference of two timings: NaN (never <= 0) when a busy machine's noise swamps it
        assert not run.decode_tokens_per_s <= 0 and run.throughput_samples_per_s > 0


def test_generation_rates_price_decode_as_the_difference_of_two_generates():
    # batch 4, 16 new tokens in 1600 ms, 1 in 100 ms: 15 decode steps of 4 samples in 1.5 s; 4 answers in 1.6 s
    assert generation_rates(4, 16, 1600.0, 100.0) == pytest.approx((40.0, 2.5))
    decode, samples = generation_rates(4, 16, 90.0, 100.0)  # noise ate the decode time
    assert math.isnan(decode) and samples == pytest.approx(4 / 0.09)


def test_flops_formula():
    assert decoder_layer_flops(10, 4, 8) == 4 * 10 * 16 + 2 * 100 * 4 + 3 * 10 * 4 * 8
    assert vision_layer_flops(10, 4, 8) == 4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 8  # CLIP's two-matrix MLP
    # Qwen2.5-VL's windowed block: attention within windows of 4 and 6 tokens, a three-matrix MLP
    assert vision_layer_flops(10, 4, 8, 3, [4, 6]) == 4 * 10 * 16 + 2 * (16 + 36) * 4 + 3 * 10 * 4 * 8


@pytest.mark.parametrize("keep, merged", [(64, (8, 8)), (128, (8, 16)), (192, (12, 16)), (100, (10, 10)),
                                          (7, (1, 7))])
def test_qwen_oracle_grid_holds_exactly_the_kept_tokens_as_square_as_it_can(keep, merged):
    """The oracle's smaller image: its tower runs as many patches as the kept tokens', in an image shaped like one."""
    assert oracle_grid(keep) == (2 * merged[0], 2 * merged[1])


def measurement(config, p10=10.0, p90=12.0, decode=50.0):
    method, _, budget = config.partition("@")
    return Measurement(config=config, method=method, budget=int(budget) if budget else None, batch=1,
                       prefill_ms=(p10 + p90) / 2,
                       prefill_ms_p10=p10, prefill_ms_p90=p90, decode_tokens_per_s=decode, throughput_samples_per_s=1.0,
                       kv_cache_bytes=0, peak_memory_bytes=None, prefill_tflops=0.1, equivalent_budget=64.0,
                       visual_tokens_per_layer=[64])


def rendered(table) -> tuple[dict[str, list[str]], str]:
    """The table's cells by config, and its whole text."""
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    return {cells[0]: cells for cells in rows}, text


def test_the_table_marks_measurements_too_noisy_to_compare():
    clse = dataclasses.replace(measurement("clse@64"), schedule_oracle_ms=10.0, input_oracle_ms=5.5,
                               select_ms={"layer 2": 1.5, "layer 11": 0.5})
    fastv = dataclasses.replace(measurement("fastv@64", p10=5.0, p90=8.0), input_oracle_ms=11.0)
    oracle = dataclasses.replace(measurement("oracle@64"), unpruned_ms=33.0)  # the unpruned model, timed in turn
    results = [measurement("unpruned"), oracle, fastv, measurement("random@64", decode=math.nan), clse]
    rows, text = rendered(bench_table(results, "t"))
    assert {config: cells[2] for config, cells in rows.items()} == {
        "unpruned": "", "oracle@64": "", "fastv@64": "!", "random@64": "!", "clse@64": ""}
    assert rows["oracle@64"][5] == "3.00x"  # its unpruned times over its own, not over the unpruned row's (11 ms)
    # speedup: the oracle row's 3x times this row's oracle / method; both with a noisy side
    assert rows["fastv@64"][5:7] == ["5.08x!", "0.59x!"]
    assert rows["random@64"][9] == "nan"
    # against its input oracle (timed alternating with it, not the oracle@64 row) and schedule oracle; select ms
    assert rows["clse@64"][5:9] == ["1.50x", "2.00x", "1.10x", "2.0"]
    rows, _ = rendered(bench_table([measurement("unpruned"), clse], "t"))
    assert rows["clse@64"][5] == "-"  # no oracle row at its budget: no ratio made side by side to chain
    assert "too noisy to trust: prefill p90/p10 above 1.5" in " ".join(text.split())


def test_a_noisy_oracle_marks_the_ratio_it_enters():
    fastv = dataclasses.replace(measurement("fastv@64"), schedule_oracle_ms=10.0, input_oracle_ms=5.0,
                                schedule_oracle_spread=1.2, input_oracle_spread=1.8)
    oracle = dataclasses.replace(measurement("oracle@64"), unpruned_ms=33.0)
    rows, text = rendered(bench_table([measurement("unpruned"), oracle, fastv], "t"))
    assert rows["fastv@64"][2] == "" and rows["fastv@64"][6:8] == ["2.20x!", "1.10x"]
    # the speedup chains the oracle row's ratio with this row's input oracle: its noise marks it too
    assert (rows["oracle@64"][5], rows["fastv@64"][5]) == ("3.00x", "1.36x!")
    assert "or an oracle's p90/p10 above the limit" in " ".join(text.split())


def test_percentiles_interpolate_between_the_sorted_times():
    from vtprune.bench.measure import _spread, percentiles

    assert percentiles([5.0, 1.0, 4.0, 2.0, 3.0]) == pytest.approx((1.4, 4.6))  # not the extremes 1 and 5
    assert percentiles([7.0]) == (7.0, 7.0)
    assert _spread([5.0, 1.0, 4.0, 2.0, 3.0]) == pytest.approx(4.6 / 1.4)  # an oracle's p90 / p10, as the table reads
    assert _spread([]) is None


def test_each_timing_times_the_prefill_it_names(monkeypatch):
    """Timed with a clock that reads the language model's input length instead: the oracle's row times the oracle
    (40 text + 16 visual tokens) and, alternating with it, the unpruned model (64 visual); FastV's row its input
    oracle, itself and its replay (both pruning inside the LM, after its input)."""
    from vtprune.bench import measure as measure_module

    torch.manual_seed(0)
    model = TINY.build().eval()
    lengths = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)

    def input_length(run, device):
        seen = len(lengths)
        run()
        return float(lengths[seen])

    monkeypatch.setattr(measure_module, "_time_ms", input_length)
    oracle = measure(model, TINY, "oracle", 16, batch=2, repeats=2, warmup=1, new_tokens=2)
    assert (oracle.prefill_ms, oracle.unpruned_ms) == (56, 104)
    fastv = measure(model, TINY, "fastv", 16, batch=2, repeats=2, warmup=1, new_tokens=2)
    assert (fastv.input_oracle_ms, fastv.prefill_ms, fastv.schedule_oracle_ms) == (56, 104, 104)


def test_selection_time_is_per_prefill(monkeypatch):
    """select ms is what one prefill spends selecting: on a clock that ticks a second per reading, FastV's one
    selection a prefill (the batch's items at once) reads 1000 ms, however many prefills measured it."""
    from vtprune.bench import measure as measure_module

    torch.manual_seed(0)
    model = TINY.build().eval()
    ticks = iter(range(10**6))
    monkeypatch.setattr(measure_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    assert measure(model, TINY, "fastv", 16, batch=2, repeats=12, warmup=1, new_tokens=2).select_ms == {"layer 2": 1000.0}


def test_without_warm_up_the_schedule_oracle_still_replays_a_decision(monkeypatch):
    """measure(warmup=0): the decision is made by an untimed prefill, so the schedule oracle asks the method
    nothing (it was the method itself before)."""
    torch.manual_seed(0)
    model = TINY.build().eval()
    calls, original = [], FastV.select_batch
    monkeypatch.setattr(FastV, "select_batch", lambda self, views: calls.append(len(views)) or original(self, views))
    measure(model, TINY, "fastv", 16, batch=2, repeats=3, warmup=0, new_tokens=2)
    # the decision's prefill, 3 timed runs, select_ms's 3 runs, the KV cache's prefill, 2 x 3 generate calls
    assert len(calls) == 1 + 3 + 3 + 1 + 6


def test_tower_merges_are_the_methods_work_in_the_bench():
    """ToMe merges inside the vision tower: its merges count as its selection time, and its schedule oracle
    (a replay) runs none of them."""
    torch.manual_seed(0)
    model = TINY.build().eval()
    r = measure(model, TINY, "tome", 48, batch=2, repeats=2, warmup=1, new_tokens=2)
    assert set(r.select_ms) == {"vision", "tower merges"} and r.select_ms["tower merges"] > 0


def test_a_quiet_table_has_no_marks():
    rows, text = rendered(bench_table([measurement("unpruned"), measurement("fastv@64")], "t"))
    assert not any("!" in cell for cells in rows.values() for cell in cells)
    assert "noisy" not in text


def test_saved_results_say_which_are_too_noisy(tmp_path):
    path = save([measurement("unpruned"), measurement("fastv@64", p10=5.0, p90=8.0)], tmp_path,
                {"arch": "tiny", "device_name": "cpu"})
    assert [row["untrustworthy"] for row in json.loads(path.read_text())["results"]] == [False, True]


# LLaVA-NeXT and Qwen2.5-VL: tiny shapes for measure(), the CPU presets for the token counts.
TINY_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
# 56 px tiles of patch 14 (a 4x4 base grid); an 80x120 image picks the 112x112 pinpoint, 8x8 unpadded to 6x8.
TINY_NEXT = Preset("llava_next", TINY.vision | dict(patch_size=14), TINY_TEXT, image_size=(80, 120),
                   grid_pinpoints=((56, 112), (112, 56), (112, 112)))
TINY_QWEN2_5 = Preset(
    "qwen2_5_vl",
    dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=112,
         fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    TINY_TEXT | dict(bos_token_id=None, eos_token_id=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
    image_patches=(8, 16),  # 32 tokens, two 8x8-patch windows
)
# LLaVA-OneVision: 56 px SigLIP tiles of patch 14 (4x4, no CLS), anyres up to 3x3 tiles; a 112x168 image picks
# 2x3 tiles, an 8x12 grid, over 1.1^2 x anyres_max_4's 4 tiles' worth: shrunk to 6x9 (16 + 54 = 70 visual tokens).
TINY_ONEVISION = Preset(
    "llava_onevision",
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
         vision_use_head=False),
    TINY_TEXT | dict(bos_token_id=None, eos_token_id=None), image_size=(112, 168),
    grid_pinpoints=tuple((56 * i, 56 * j) for i in range(1, 4) for j in range(1, 4)), aspect_ratio="anyres_max_4",
)
# 56 px frames of patch 14: 8 frames of a CLS token and 4x4 patches, 136 placeholders, 128 visual tokens.
TINY_VIDEO = Preset("video_llava", TINY.vision | dict(patch_size=14), TINY_TEXT)
TEXT = 40  # preset_inputs' text tokens


def packed_features(model, preset):
    """The model's own packing of preset_inputs' first image: its features and which of them are newlines."""
    inputs = preset_inputs(model, preset, 1)
    with torch.no_grad():
        if preset.family == "video_llava":  # (frames, CLS + patches, hidden), as the model scatters it
            output = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                                    vision_feature_layer=model.config.vision_feature_layer)
            features = output.pooler_output.flatten(0, 1)
            return features, None, int((inputs["input_ids"][0] == model.config.video_token_id).sum())
        if preset.family in ("llava_next", "llava_onevision"):
            output = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        else:
            output = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                    image_grid_thw=inputs["image_grid_thw"])
    features = output.pooler_output[0]
    placeholders = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    anyres = preset.family in ("llava_next", "llava_onevision")
    newline = (features == model.model.image_newline).all(-1) if anyres else None
    return features, newline, placeholders


def test_the_7b_presets_token_geometry():
    layout = anyres_layout(PRESETS["llava-next-7b"].config(), (672, 672))
    assert layout == AnyresLayout(base=576, rows=48, cols=48, tiles=5) and layout.visual == 2880
    config = PRESETS["qwen2.5-vl-7b"].config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (3584, 28, 28, 4, 18944)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.window_size,
            list(vision.fullatt_block_indexes)) == (32, 1280, 3584, 112, [7, 15, 23, 31])


@pytest.mark.parametrize("name, visual, layers", [("llava-next-cpu-small", 2880, 32), ("qwen2.5-vl-cpu-small", 576, 28),
                                                  ("video-llava-cpu-small", 2048, 32),
                                                  ("llava-onevision-cpu-small", 3645, 28)])
def test_the_cpu_presets_pack_their_tokens_and_run(name, visual, layers):
    """The model's own packing gives the visual tokens the preset promises; random and fastv run on it."""
    model, preset = build_preset(name), PRESETS[name]
    features, newline, placeholders = packed_features(model, preset)
    assert len(features) == placeholders
    if preset.family == "llava_next":  # 2880 visual tokens and a newline after each 48-token high-resolution row
        assert placeholders == 2928 and int(newline.sum()) == 48
        assert not newline[:576].any() and newline[576 + 48 :: 49].all()
        assert anyres_layout(model.config, preset.image_size) == anyres_layout(PRESETS["llava-next-7b"].config(), (672, 672))
    elif preset.family == "llava_onevision":  # 729 base + 54x54 high-resolution tokens, a newline after each row
        assert placeholders == 3645 + 54 and int(newline.sum()) == 54 and visual == placeholders - int(newline.sum())
        assert not newline[:729].any() and newline[729 + 54 :: 55].all()
        layout = anyres_layout(PRESETS["llava-onevision-7b"].config(), (768, 768))
        assert anyres_layout(model.config, preset.image_size) == layout
        assert torch.equal(newline, oracle_kept_features(layout, 0))
    elif preset.family == "video_llava":  # 8 frames of a CLS token and 16x16 patches; the CLS tokens are not visual
        assert features.shape[0] == placeholders == 8 * 257 and visual == 8 * 256
    else:
        assert placeholders == visual
    r = {m: measure(model, preset, m, 64, batch=1, repeats=1, warmup=0, new_tokens=2) for m in ("random", "fastv")}
    assert r["random"].visual_tokens_per_layer == [64] * layers
    assert r["fastv"].visual_tokens_per_layer == [visual, visual] + [64] * (layers - 2)
    assert r["fastv"].equivalent_budget == pytest.approx((2 * visual + 64 * (layers - 2)) / layers)  # layers' mean
    assert r["fastv"].prefill_tflops > r["random"].prefill_tflops > 0


def test_the_tiny_presets_pack_as_the_models_do():
    model = TINY_NEXT.build().eval()
    layout = anyres_layout(model.config, TINY_NEXT.image_size)
    assert layout == AnyresLayout(base=16, rows=6, cols=8, tiles=5)
    features, newline, placeholders = packed_features(model, TINY_NEXT)
    assert len(features) == placeholders == layout.placeholders
    assert torch.equal(newline, oracle_kept_features(layout, 0))  # keeping 0 visual tokens keeps the newlines alone


def test_the_oracle_keeps_the_first_visual_tokens_and_every_newline():
    layout = anyres_layout(PRESETS["llava-next-7b"].config(), (672, 672))
    kept = oracle_kept_features(layout, 64)
    assert int(kept.sum()) == 64 + 48 and kept[:64].all() and not kept[64:576].any()
    kept = oracle_kept_features(layout, 600)  # the base grid, then the first high-resolution row's first 24
    assert int(kept.sum()) == 600 + 48 and kept[:600].all() and not kept[600:624].any() and kept[624]
    assert bool(oracle_kept_features(layout, 2880).all())


@pytest.mark.parametrize("grid", [(48, 48), (22, 34), (8, 16), (2, 2)])
def test_qwen2_5_vl_windows_match_the_tower(grid):
    vision = PRESETS["qwen2.5-vl-7b"].config().vision_config
    _, bounds = get_vision_window_index(torch.tensor([[1, *grid]]), vision.spatial_merge_size, vision.window_size,
                                        vision.patch_size)
    assert window_spans(vision, *grid) == bounds.diff().tolist()


def family_runs(preset, budget):
    torch.manual_seed(0)
    model = preset.build().eval()
    runs = [("unpruned", None), ("oracle", budget), ("random", budget), ("fastv", budget)]
    return model, {f"{m}@{b}": measure(model, preset, m, b, batch=2, repeats=2, warmup=0, new_tokens=3) for m, b in runs}


@pytest.fixture(scope="module")
def next_results():
    return family_runs(TINY_NEXT, 16)


@pytest.fixture(scope="module")
def qwen2_5_results():
    return family_runs(TINY_QWEN2_5, 8)


def test_qwen2_5_vl_counts_kv_bytes_and_flops(qwen2_5_results):
    model, r = qwen2_5_results
    assert r["unpruned@None"].visual_tokens_per_layer == [32] * 6
    assert r["oracle@8"].visual_tokens_per_layer == r["random@8"].visual_tokens_per_layer == [8] * 6
    assert r["fastv@8"].visual_tokens_per_layer == [32, 32] + [8] * 4
    assert r["oracle@8"].kv_cache_bytes == r["random@8"].kv_cache_bytes == kv_bytes(model, 2, [TEXT + 2 + 8] * 6)
    # unpruned: windowed block 0 (two 64-patch windows), full block 1 (128 patches), SwiGLU MLPs
    vision = vision_layer_flops(128, 32, 64, 3, [64, 64]) + vision_layer_flops(128, 32, 64, 3)
    expected = prefill_flops(model, [TEXT + 2 + 32] * 6, [128], [(8, 16)])
    assert expected["vision"] == vision
    assert r["unpruned@None"].prefill_tflops * 1e12 == pytest.approx(2 * expected["total"])
    # the oracle's smaller image (4x8 patches) also spares the tower: cheaper than random at the same LM tokens
    assert r["unpruned@None"].prefill_tflops > r["fastv@8"].prefill_tflops > r["random@8"].prefill_tflops
    assert r["random@8"].prefill_tflops > r["oracle@8"].prefill_tflops


def test_qwen_towers_flops_are_read_off_their_configs():
    """Qwen2-VL-7B's tower: 32 blocks of width embed_dim 1280 (hidden_size, 3584, is the merger's output) and an MLP
    of mlp_ratio 4, two matrices. Qwen2.5-VL's windowed blocks need each image's grid, one per image."""
    qwen2 = SimpleNamespace(config=PRESETS["qwen2-vl-7b"].config())
    assert prefill_flops(qwen2, [100] * 28, [1024])["vision"] == 32 * (
        4 * 1024 * 1280 ** 2 + 2 * 1024 ** 2 * 1280 + 2 * 1024 * 1280 * 5120)
    qwen2_5 = SimpleNamespace(config=PRESETS["qwen2.5-vl-7b"].config())
    with pytest.raises(ValueError, match="each image's"):
        prefill_flops(qwen2_5, [100] * 28, [1024, 1024], [(32, 32)])


def test_the_video_llava_7b_preset():
    """Video-LLaVA-7B's shapes, its 8 x 257 placeholders and its FLOPs, read off the config (no 7B model built)."""
    config = PRESETS["video-llava-7b"].config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.intermediate_size) == (4096, 32, 32, 11008)
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers,
            vision.num_attention_heads, vision.intermediate_size) == (224, 14, 1024, 24, 16, 4096)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    stand_in = SimpleNamespace(config=config)
    inputs = preset_inputs(stand_in, PRESETS["video-llava-7b"], 1)
    assert int((inputs["input_ids"][0] == config.video_token_id).sum()) == 8 * 257
    assert inputs["pixel_values_videos"].shape == (1, 8, 3, 224, 224)
    flops = prefill_flops(stand_in, [TEXT + 8 + 64] * 32, [257] * 8)
    assert flops["vision"] == 8 * 24 * vision_layer_flops(257, 1024, 4096)


def test_the_video_oracle_keeps_the_first_patches_and_every_cls_token():
    kept = video_oracle_kept(8, 16, 64)
    assert int(kept.sum()) == 8 + 64 and kept[:65].all() and not kept[65:257].any() and kept[257::257].all()
    kept = video_oracle_kept(8, 16, 300)  # the first frame, then the second frame's CLS and first 44 patches
    assert int(kept.sum()) == 8 + 300 and kept[:257 + 45].all() and not kept[257 + 45 : 514].any()
    assert bool(video_oracle_kept(8, 16, 2048).all())


@pytest.fixture(scope="module")
def video_results():
    return family_runs(TINY_VIDEO, 16)


def test_video_llava_counts_kv_bytes_and_flops(video_results):
    model, r = video_results
    assert r["unpruned@None"].visual_tokens_per_layer == [128] * 6
    assert r["oracle@16"].visual_tokens_per_layer == r["random@16"].visual_tokens_per_layer == [16] * 6
    assert r["fastv@16"].visual_tokens_per_layer == [128, 128] + [16] * 4
    # each frame's CLS token is a text-like token: kept by the methods and by the oracle alike
    assert r["unpruned@None"].kv_cache_bytes == kv_bytes(model, 2, [TEXT + 8 * 17] * 6)
    for name in ("oracle@16", "random@16", "fastv@16"):
        tokens = [TEXT + 8 + v for v in r[name].visual_tokens_per_layer]
        assert r[name].kv_cache_bytes == kv_bytes(model, 2, tokens), name
    assert r["oracle@16"].kv_cache_bytes == r["random@16"].kv_cache_bytes
    # the video tower runs 8 frames of 16 patches + CLS, whatever the method keeps
    vision = 8 * 2 * vision_layer_flops(17, 32, 64)
    language = 6 * decoder_layer_flops(TEXT + 8 * 17, 64, 128)
    assert r["unpruned@None"].prefill_tflops * 1e12 == pytest.approx(2 * (vision + language))
    assert r["oracle@16"].prefill_tflops == pytest.approx(r["random@16"].prefill_tflops)
    assert r["unpruned@None"].prefill_tflops > r["fastv@16"].prefill_tflops > r["random@16"].prefill_tflops
    assert "get_video_features" not in vars(model.model)  # the oracle's wrapper is gone


def test_the_llava_onevision_7b_preset():
    """LLaVA-OneVision-7B's shapes, its 768x768 image's 3645 visual tokens and its FLOPs, read off the config."""
    preset = PRESETS["llava-onevision-7b"]
    config = preset.config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (3584, 28, 28, 4, 18944)
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers,
            vision.num_attention_heads, vision.intermediate_size) == (384, 14, 1152, 26, 16, 4304)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy,
            config.vision_aspect_ratio) == (-1, "full", "anyres_max_9")
    assert config.image_grid_pinpoints == [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    layout = anyres_layout(config, (768, 768))
    assert layout == AnyresLayout(base=729, rows=54, cols=54, tiles=5) and layout.visual == 3645
    stand_in = SimpleNamespace(config=config)
    inputs = preset_inputs(stand_in, preset, 1)
    assert int((inputs["input_ids"][0] == config.image_token_id).sum()) == 3645 + 54
    assert inputs["pixel_values"].shape == (1, 5, 3, 384, 384)
    flops = prefill_flops(stand_in, [TEXT + 54 + 64] * 28, [729] * 5)  # the tower: per tile of 729 patches
    assert flops["vision"] == 5 * 26 * vision_layer_flops(729, 1152, 4304)
    kept = oracle_kept_features(layout, 64)
    assert int(kept.sum()) == 64 + 54 and kept[:64].all() and not kept[64:729].any()


@pytest.mark.parametrize("aspect_ratio, rows, cols", [
    ("anyres_max_4", 6, 9),  # 8x12 patches is 1.22^2 x 4 tiles' worth: shrunk by 1.22
    ("anyres_max_5", 8, 12),  # 1.095^2 x 5 tiles' worth: within the model's 1.1, kept whole
])
def test_a_shrunk_onevision_grid_packs_as_the_model_does(aspect_ratio, rows, cols):
    preset = dataclasses.replace(TINY_ONEVISION, aspect_ratio=aspect_ratio)
    model = preset.build().eval()
    layout = anyres_layout(model.config, preset.image_size)
    assert layout == AnyresLayout(base=16, rows=rows, cols=cols, tiles=7)
    features, newline, placeholders = packed_features(model, preset)
    assert len(features) == placeholders == layout.placeholders
    assert torch.equal(newline, oracle_kept_features(layout, 0))


@pytest.fixture(scope="module")
def onevision_results():
    return family_runs(TINY_ONEVISION, 16)


@pytest.mark.parametrize("results, preset, visual, vision", [
    # LLaVA-NeXT's CLIP tower runs on 5 tiles of 16 patches + CLS, OneVision's SigLIP on 7 of 16 (no CLS)
    ("next_results", TINY_NEXT, 64, 5 * 2 * vision_layer_flops(17, 32, 64)),
    ("onevision_results", TINY_ONEVISION, 70, 7 * 2 * vision_layer_flops(16, 32, 64)),
])
def test_anyres_families_count_kv_bytes_and_flops(request, results, preset, visual, vision):
    model, r = request.getfixturevalue(results)
    layout = anyres_layout(model.config, preset.image_size)
    assert r["unpruned@None"].visual_tokens_per_layer == [visual] * 6
    assert r["oracle@16"].visual_tokens_per_layer == r["random@16"].visual_tokens_per_layer == [16] * 6
    assert r["fastv@16"].visual_tokens_per_layer == [visual, visual] + [16] * 4
    # the newlines are text-like tokens: kept by the methods and by the oracle alike
    assert r["unpruned@None"].kv_cache_bytes == kv_bytes(model, 2, [TEXT + layout.placeholders] * 6)
    for name in ("oracle@16", "random@16", "fastv@16"):
        tokens = [TEXT + layout.newlines + v for v in r[name].visual_tokens_per_layer]
        assert r[name].kv_cache_bytes == kv_bytes(model, 2, tokens), name
    assert r["oracle@16"].kv_cache_bytes == r["random@16"].kv_cache_bytes
    # the vision tower runs on every tile, whatever the method keeps
    language = 6 * decoder_layer_flops(TEXT + layout.placeholders, 64, 128)
    assert r["unpruned@None"].prefill_tflops * 1e12 == pytest.approx(2 * (vision + language))
    assert r["oracle@16"].prefill_tflops == pytest.approx(r["random@16"].prefill_tflops)
    assert r["unpruned@None"].prefill_tflops > r["fastv@16"].prefill_tflops > r["random@16"].prefill_tflops
    assert "get_image_features" not in vars(model.model)  # the oracle's wrapper is gone


def test_a_config_the_method_refuses_is_left_out_with_its_reason(monkeypatch, capsys):
    """Said once (not once per batch size) and kept in the saved settings."""
    from vtprune.bench import presets
    from vtprune.bench.run import run_bench

    monkeypatch.setitem(presets.PRESETS, "tiny", TINY)
    not_run = {}
    results = run_bench("tiny", ["tome", "random"], [16, 40], [1, 2], repeats=1, warmup=1, new_tokens=2,
                        not_run=not_run)
    # one block before LLaVA's layer -2 merges at most half of 64
    assert list(not_run) == ["tome@16"] and "tome cannot merge 64 patches down to 16 in 1 blocks" in not_run["tome@16"]
    assert capsys.readouterr().out.count("not run: tome@16: tome cannot merge") == 1
    assert {r.config for r in results} == {"unpruned", "oracle@16", "random@16", "oracle@40", "tome@40", "random@40"}


def test_a_compiled_run_measures_the_same_tokens_and_leaves_the_model_eager(results):
    """--compile: prefill through the compiled decoder (vtprune.compile_prefill, open for the run), same kept tokens
    and cache."""
    model, r = results
    with compile_prefill(model, **COMPILERS["inductor"]):
        compiled = measure(model, TINY, "fastv", 16, batch=2, repeats=2, warmup=1, new_tokens=6)
    assert compiled.visual_tokens_per_layer == r["fastv@16"].visual_tokens_per_layer
    assert compiled.kv_cache_bytes == r["fastv@16"].kv_cache_bytes and compiled.schedule_oracle_ms > 0
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)


def test_the_input_oracle_runs_with_no_pruner_on_the_model(results):
    """Timed in turn with the method, the input oracle still runs the model as it is (the pruner off, then back)."""
    import vtprune
    from vtprune.bench.measure import _alternating_times

    model, _ = results
    inputs = preset_inputs(model, TINY, 2)
    seen = []
    pruner = vtprune.apply(model, "fastv", 16)
    with torch.no_grad():
        model(**inputs)
        pruner, times, replayed, floor = _alternating_times(
            pruner, lambda: vtprune.apply(model, "fastv", 16), lambda: model(**inputs),
            lambda: seen.append(getattr(model, "_vtprune_pruner", None)), torch.device("cpu"), repeats=3)
    assert seen == [None] * 4  # the warm-up and three timed runs
    assert model._vtprune_pruner is pruner and len(times) == len(replayed) == len(floor) == 3
    assert min(replayed) > 0 and min(floor) >= 0
    assert pruner.last_stats.visual_tokens_per_layer[0] == [64, 64] + [16] * 4  # the method's own runs pruned
    pruner.remove()


def test_a_run_hands_over_its_results_after_every_configuration(monkeypatch):
    """What `vtprune bench` saves as it goes, so that a run cut short keeps what it measured."""
    from vtprune.bench import presets
    from vtprune.bench.run import run_bench

    monkeypatch.setitem(presets.PRESETS, "tiny", TINY)
    seen = []
    results = run_bench("tiny", ["random"], [16], [1], repeats=1, warmup=1, new_tokens=2,
                        measured=lambda so_far: seen.append([r.config for r in so_far]))
    assert seen == [["unpruned"], ["unpruned", "oracle@16"], ["unpruned", "oracle@16", "random@16"]]
    assert [r.config for r in results] == seen[-1]


def test_a_checkpoint_on_disk_is_timed_at_its_own_shapes(tmp_path, capsys, monkeypatch):
    """`vtprune bench --model DIR`: the checkpoint's own weights and shapes, prompted as the presets of its family,
    measuring what the same model measures in memory. Its image token lies inside the vocabulary, as a real
    checkpoint's special tokens do, at an id the prompts' random text would otherwise draw."""
    from transformers import LlavaForConditionalGeneration

    from vtprune import cli
    from vtprune.bench import run
    from vtprune.bench.presets import _plain_tokens

    config = TINY.config()
    plain = _plain_tokens(config)
    drawn = plain[torch.randint(len(plain), (2, 40), generator=torch.Generator().manual_seed(0))]
    config.image_token_id = int(drawn[1, 7])
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "my-llava")
    timed = []
    monkeypatch.setattr(run, "measure", lambda model, *args, **kwargs: timed.append(model) or measure(model, *args,
                                                                                                       **kwargs))
    assert cli.main(["bench", "--model", str(tmp_path / "my-llava"), "--methods", "fastv", "--budgets", "16",
                     "--batch", "2", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
                     "--out", str(tmp_path / "out")]) == 0
    assert "model-my-llava on cpu" in capsys.readouterr().out.replace("\n", " ")
    assert all(torch.equal(p, q) for p, q in zip(timed[0].parameters(), model.parameters()))  # its own weights
    saved = json.loads((tmp_path / "out" / f"cpu-{platform.machine()}" / "bench-model-my-llava.json").read_text())
    assert saved["settings"]["model"] == str((tmp_path / "my-llava").resolve())
    rows = {row["config"]: row for row in saved["results"]}
    in_memory = {name: measure(model, TINY, method, budget, batch=2, repeats=1, warmup=0, new_tokens=2)
                 for name, method, budget in [("unpruned", "unpruned", None), ("fastv@16", "fastv", 16)]}
    for name, expected in in_memory.items():
        for field in ("visual_tokens_per_layer", "kv_cache_bytes", "prefill_tflops"):
            assert rows[name][field] == getattr(expected, field), (name, field)
    assert rows["fastv@16"]["visual_tokens_per_layer"] == [64, 64] + [16] * 4


def test_a_qwen_checkpoint_is_prompted_as_its_7b_preset(tmp_path):
    """One 48x48-patch image a prompt: 576 visual tokens, LLaVA-1.5's count, as the qwen2-vl-7b preset."""
    from vtprune.bench.run import run_bench
    from vtprune.tiny import tiny_qwen2_vl

    tiny_qwen2_vl("sdpa").save_pretrained(tmp_path / "qwen")
    [unpruned, _, random] = run_bench("qwen", ["random"], [64], [1], repeats=1, warmup=0, new_tokens=2,
                                      checkpoint=tmp_path / "qwen")
    assert unpruned.visual_tokens_per_layer == [576] * 4 and random.visual_tokens_per_layer == [64] * 4


def test_a_checkpoint_and_a_preset_are_not_both_given(tmp_path, capsys):
    from vtprune import cli

    TINY.build().save_pretrained(tmp_path)
    assert cli.parse(["bench", "--model", str(tmp_path)]).model == str(tmp_path)
    with pytest.raises(SystemExit):
        cli.parse(["bench", "--model", str(tmp_path), "--arch", "llava-cpu-small"])
    assert "argument --arch: not allowed with argument --model" in capsys.readouterr().err


def test_a_budget_keeping_every_visual_token_is_not_run(monkeypatch):
    """It would time the unpruned model under a pruned config's name (and an oracle equal to it)."""
    from vtprune.bench import presets
    from vtprune.bench.run import run_bench

    monkeypatch.setitem(presets.PRESETS, "tiny", TINY)
    not_run = {}
    results = run_bench("tiny", ["random", "fastv"], [64, 100, 16], [1], repeats=1, warmup=0, new_tokens=2,
                        not_run=not_run)
    assert sorted(not_run) == ["fastv@100", "fastv@64", "random@100", "random@64"]
    assert all("keeps every one of the 64 visual tokens" in reason for reason in not_run.values())
    assert [r.config for r in results] == ["unpruned", "oracle@16", "random@16", "fastv@16"]
