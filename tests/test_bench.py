"""The efficiency benchmark runs on the CPU and its numbers are consistent (not that they are fast)."""

import io
import json
import math

import pytest
import torch
from rich.console import Console

from vtprune.bench.flops import decoder_layer_flops
from vtprune.bench.measure import Measurement, measure, oracle_grid
from vtprune.bench.run import bench_table, save
from vtprune.bench.presets import Preset

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


def test_timings_and_rates_are_positive_and_ordered(results):
    _, r = results
    for run in r.values():
        assert 0 < run.prefill_ms_p10 <= run.prefill_ms <= run.prefill_ms_p90
        # decode speed is a difference of two timings: NaN (never <= 0) when a busy machine's noise swamps it
        assert not run.decode_tokens_per_s <= 0 and run.throughput_samples_per_s > 0


def test_flops_formula():
    assert decoder_layer_flops(10, 4, 8) == 4 * 10 * 16 + 2 * 100 * 4 + 3 * 10 * 4 * 8


@pytest.mark.parametrize("keep", [64, 128, 192, 100])
def test_qwen_oracle_grid_holds_exactly_the_kept_tokens(keep):
    h, w = oracle_grid(keep)
    assert (h // 2) * (w // 2) == keep and h % 2 == 0 and w % 2 == 0


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
    results = [measurement("unpruned"), measurement("oracle@64"), measurement("fastv@64", p10=5.0, p90=8.0),
               measurement("random@64", decode=math.nan), measurement("clse@64")]
    rows, text = rendered(bench_table(results, "t"))
    assert {config: cells[2] for config, cells in rows.items()} == {
        "unpruned": "", "oracle@64": "", "fastv@64": "!", "random@64": "!", "clse@64": ""}
    assert rows["fastv@64"][5:7] == ["1.69x!", "0.59x!"]  # speedup and vs oracle: a ratio with a noisy side
    assert rows["random@64"][7] == "nan"
    assert rows["clse@64"][5:7] == ["1.00x", "1.00x"]
    assert "too noisy to trust: prefill p90/p10 above 1.5" in " ".join(text.split())


def test_a_quiet_table_has_no_marks():
    rows, text = rendered(bench_table([measurement("unpruned"), measurement("fastv@64")], "t"))
    assert not any("!" in cell for cells in rows.values() for cell in cells)
    assert "noisy" not in text


def test_saved_results_say_which_are_too_noisy(tmp_path):
    path = save([measurement("unpruned"), measurement("fastv@64", p10=5.0, p90=8.0)], tmp_path,
                {"arch": "tiny", "device_name": "cpu"})
    assert [row["untrustworthy"] for row in json.loads(path.read_text())["results"]] == [False, True]
