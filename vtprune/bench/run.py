"""`vtprune bench`: every method x budget x batch, side by side with the unpruned model and the two oracles."""

from __future__ import annotations

import contextlib
import json
import math
import platform
from pathlib import Path

import torch
import transformers
from rich.table import Table
from tqdm import tqdm

from vtprune.api import refusal
from vtprune.engine.budget import keeps_whole
from vtprune.engine.compiled import COMPILERS, compile_prefill

from .measure import Measurement, measure, preset_visual_tokens
from .presets import PRESETS, build_preset, checkpoint_preset


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def run_bench(arch: str, methods: list[str], budgets: list[int], batches: list[int], *, device: str = "cpu",
              dtype: torch.dtype = torch.float32, repeats: int = 20, warmup: int = 3, new_tokens: int = 16,
              compiled: str | None = None, options: dict | None = None, measured=None,
              not_run: dict | None = None, checkpoint: Path | None = None) -> list[Measurement]:
    """Every configuration in turn, on the preset `arch` (random weights) or on the checkpoint folder `checkpoint`
    (`arch` then names it); `measured(results so far)` is called after each one. A method that refuses the model
    at a budget, or the preset's videos, is left out, its reason printed and put in `not_run` ({config: reason})
    where one is given."""
    if checkpoint is None:
        model, preset = build_preset(arch, device=device, dtype=dtype), PRESETS[arch]
    else:
        from vtprune.eval.generation import load_model

        model = load_model(checkpoint, dtype=dtype).to(device)  # (its processor is not needed: prompts are made)
        preset = checkpoint_preset(model)
    visual = preset_visual_tokens(model, preset)
    whole = f"it keeps every one of the {visual} visual tokens of this model's prompt: the unpruned row times that"
    reasons = {(m, budget): whole if keeps_whole(budget, visual)
               else refusal(model, m, budget, videos=preset.videos, **(options or {}).get(m, {}))
               for budget in budgets for m in methods}
    for (m, budget), reason in reasons.items():
        if reason is not None:
            tqdm.write(f"not run: {m}@{budget}: {reason}")
            if not_run is not None:
                not_run[f"{m}@{budget}"] = reason
    plan = [("unpruned", None, b) for b in batches]
    plan += [(m, budget, b) for budget in budgets if not keeps_whole(budget, visual) for b in batches
             for m in ["oracle", *methods] if m == "oracle" or reasons[m, budget] is None]
    results = []
    # One compiled handle for the run: each configuration reuses the segments an earlier one compiled.
    with compile_prefill(model, **COMPILERS[compiled]) if compiled else contextlib.nullcontext():
        with tqdm(plan, desc=f"bench {arch}") as progress:
            for method, budget, batch in progress:
                results.append(measure(model, preset, method, budget, batch, repeats=repeats, warmup=warmup,
                                       new_tokens=new_tokens, device=device, dtype=dtype,
                                       options=(options or {}).get(method)))
                if measured is not None:
                    measured(results)
    return results


SPREAD_LIMIT = 1.5  # p90 / p10 of the prefill times above which a median is not worth comparing


def untrustworthy(r: Measurement) -> bool:
    """Timings too noisy to compare: a wide prefill spread, or a decode rate lost in the noise (NaN)."""
    return r.prefill_ms_p90 > SPREAD_LIMIT * r.prefill_ms_p10 or math.isnan(r.decode_tokens_per_s)


def bench_table(results: list[Measurement], title: str) -> Table:
    """The results side by side; a noisy measurement, and every ratio it enters, is marked with `!`."""
    oracles = {(r.budget, r.batch): r for r in results if r.method == "oracle"}
    table = Table(title=title)
    for column in ("config", "batch", "!", "eq. budget", "prefill ms (p10-p90)", "speedup", "vs input oracle",
                   "vs schedule oracle", "select ms", "decode tok/s", "samples/s", "KV MiB", "TFLOPs", "peak GiB"):
        if column == "config":  # whole (a narrow terminal cut "random@64" to "random…")
            table.add_column(column, no_wrap=True, min_width=max([len(r.config) for r in results], default=6))
        else:
            table.add_column(column, justify="right")

    def ratio(value: float, *parts: Measurement, oracle_spread: float | None = None) -> str:
        noisy = any(untrustworthy(p) for p in parts) or (oracle_spread or 0) > SPREAD_LIMIT
        return f"{value:.2f}x" + ("!" if noisy else "")

    def speedup(r: Measurement) -> str:
        """Unpruned / this prefill, from ratios each timed side by side: the oracle's row times the unpruned model
        alternating with the oracle, a method's row the oracle alternating with the method."""
        if r.method == "unpruned":
            return "1.00x"
        oracle = r if r.method == "oracle" else oracles.get((r.budget, r.batch))
        if oracle is None or oracle.unpruned_ms is None or (r is not oracle and not r.input_oracle_ms):
            return "-"
        value = oracle.unpruned_ms / oracle.prefill_ms * (1.0 if r is oracle else r.input_oracle_ms / r.prefill_ms)
        spread = max(oracle.unpruned_spread or 0, 0 if r is oracle else r.input_oracle_spread or 0)
        return ratio(value, oracle, r, oracle_spread=spread)

    for r in results:
        table.add_row(
            r.config, str(r.batch), "!" if untrustworthy(r) else "", f"{r.equivalent_budget:.0f}",
            f"{r.prefill_ms:.1f} ({r.prefill_ms_p10:.1f}-{r.prefill_ms_p90:.1f})", speedup(r),
            ratio(r.prefill_ms / r.input_oracle_ms, r, oracle_spread=r.input_oracle_spread)
            if r.input_oracle_ms else "-",
            ratio(r.prefill_ms / r.schedule_oracle_ms, r, oracle_spread=r.schedule_oracle_spread)
            if r.schedule_oracle_ms else "-",
            "-" if r.select_ms is None else f"{sum(r.select_ms.values()):.1f}",
            f"{r.decode_tokens_per_s:.1f}", f"{r.throughput_samples_per_s:.2f}",
            f"{r.kv_cache_bytes / 2**20:.1f}", f"{r.prefill_tflops:.3f}",
            "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**30:.2f}",
        )
    noisy_oracle = any((spread or 0) > SPREAD_LIMIT for r in results
                       for spread in (r.input_oracle_spread, r.schedule_oracle_spread))
    if noisy_oracle or any(untrustworthy(r) for r in results):
        table.caption = (f"! too noisy to trust: prefill p90/p10 above {SPREAD_LIMIT}, or a decode rate lost in the "
                         "noise (nan); a ratio marked ! involves such a measurement (or an oracle's p90/p10 above the "
                         "limit). Rerun on a quieter machine, or with more --repeats.")
    return table


def result_file(folder: Path, arch: str) -> Path:
    """Where save() writes an arch's results in a device's folder."""
    return folder / f"bench-{arch}.json"


def save(results: list[Measurement], out: Path, settings: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = result_file(out, settings["arch"])
    environment = {"torch": torch.__version__, "transformers": transformers.__version__, "device": settings["device_name"]}
    rows = [dict(r.as_dict(), untrustworthy=untrustworthy(r)) for r in results]
    path.write_text(json.dumps({"settings": settings, "environment": environment, "results": rows}, indent=2))
    return path
