"""`vtprune bench`: every method x budget x batch, side by side with the unpruned model and the oracle."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import transformers
from rich.table import Table
from tqdm import tqdm

from .measure import Measurement, measure
from .presets import PRESETS, build_preset


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def run_bench(arch: str, methods: list[str], budgets: list[int], batches: list[int], *, device: str = "cpu",
              dtype: torch.dtype = torch.float32, repeats: int = 20, warmup: int = 3, new_tokens: int = 16,
              options: dict | None = None) -> list[Measurement]:
    model = build_preset(arch, device=device, dtype=dtype)
    preset = PRESETS[arch]
    plan = [("unpruned", None, b) for b in batches]
    plan += [(m, budget, b) for budget in budgets for b in batches for m in ["oracle", *methods]]
    results = []
    for method, budget, batch in tqdm(plan, desc=f"bench {arch}"):
        results.append(measure(model, preset, method, budget, batch, repeats=repeats, warmup=warmup,
                               new_tokens=new_tokens, device=device, dtype=dtype,
                               options=(options or {}).get(method)))
    return results


def bench_table(results: list[Measurement], title: str) -> Table:
    unpruned = {r.batch: r for r in results if r.method == "unpruned"}
    oracle = {(r.batch, r.budget): r for r in results if r.method == "oracle"}
    table = Table(title=title)
    for column in ("config", "batch", "eq. budget", "prefill ms (p10-p90)", "speedup", "vs oracle", "decode tok/s",
                   "samples/s", "KV MiB", "TFLOPs", "peak GiB"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for r in results:
        base, floor = unpruned.get(r.batch), oracle.get((r.batch, r.budget))
        table.add_row(
            r.config, str(r.batch), f"{r.equivalent_budget:.0f}",
            f"{r.prefill_ms:.1f} ({r.prefill_ms_p10:.1f}-{r.prefill_ms_p90:.1f})",
            f"{base.prefill_ms / r.prefill_ms:.2f}x" if base else "-",
            f"{r.prefill_ms / floor.prefill_ms:.2f}x" if floor and r.method not in ("oracle", "unpruned") else "-",
            f"{r.decode_tokens_per_s:.1f}", f"{r.throughput_samples_per_s:.2f}",
            f"{r.kv_cache_bytes / 2**20:.1f}", f"{r.prefill_tflops:.3f}",
            "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**30:.2f}",
        )
    return table


def save(results: list[Measurement], out: Path, settings: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{settings['arch']}.json"
    environment = {"torch": torch.__version__, "transformers": transformers.__version__, "device": settings["device_name"]}
    path.write_text(json.dumps({"settings": settings, "environment": environment,
                                "results": [r.as_dict() for r in results]}, indent=2))
    return path
