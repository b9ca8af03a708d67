"""Where a prefill's time goes (issue 17 item 4): torch.profiler over a few prefills of one configuration.

    python benchmarks/gpu/profile_prefill.py --arch llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
        --method random --budget 192 --compile --out $OUT/profile

Prints the wall time per prefill, the device's busy time (the sum of its kernels; on a GPU, wall minus busy is
time the device sat waiting for the host: launches, Python, syncs), and the ops that take the most host and
device time; saves a gzipped Chrome trace (ui.perfetto.dev) and the tables under --out. Runs on the CPU
too (host time only), which is how it is tested before a GPU session.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vtprune
from vtprune.methods import WITHOUT_TOKENIZER
from vtprune.bench.presets import PRESETS, build_preset, preset_inputs
from vtprune.engine.compiled import COMPILERS


def device_time_us(event) -> float:
    """An aggregated event's own time on the device (the attribute's name changed across torch versions)."""
    return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="llava-cpu-small", choices=sorted(PRESETS))
    parser.add_argument("--method", default="unpruned", help="a registered method, or unpruned")
    parser.add_argument("--budget", type=int, default=192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", nargs="?", const="inductor", choices=sorted(COMPILERS),
                        help="the prefill compiled (compile_prefill): inductor (the default) or cudagraphs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prefills", type=int, default=3, help="prefills profiled")
    parser.add_argument("--out", type=Path, default=Path("out/profile"))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    model = build_preset(args.arch, args.device, getattr(torch, args.dtype))
    inputs = preset_inputs(model, PRESETS[args.arch], args.batch, device=args.device, dtype=getattr(torch, args.dtype))
    pruner = None if args.method == "unpruned" else vtprune.apply(model, args.method, args.budget,
                                                                  **WITHOUT_TOKENIZER.get(args.method, {}))
    compiled = vtprune.compile_prefill(model, **COMPILERS[args.compile]) if args.compile else None

    def prefill():
        model(**inputs, use_cache=True, logits_to_keep=1)
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(args.warmup):
            prefill()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(args.prefills):
                prefill()
            wall_ms = (time.perf_counter() - start) * 1000 / args.prefills
    for handle in (compiled, pruner):
        if handle is not None:
            handle.remove()

    averages = prof.key_averages()
    busy_ms = sum(device_time_us(event) for event in averages) / 1000 / args.prefills
    config = f"{args.method}@{args.budget}" if pruner else "unpruned"
    summary = {"config": config, "arch": args.arch, "batch": args.batch, "compiled": args.compile,
               "device": torch.cuda.get_device_name() if cuda else "cpu", "wall_ms_per_prefill": wall_ms,
               "device_busy_ms_per_prefill": busy_ms if cuda else None}
    print(json.dumps(summary))
    host = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    print(host)
    device = averages.table(sort_by="self_device_time_total" if hasattr(averages[0], "self_device_time_total")
                            else "self_cuda_time_total", row_limit=25) if cuda else ""
    print(device)
    name = f"{args.arch}-{config}-b{args.batch}{'-' + args.compile if args.compile else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:  # ui.perfetto.dev reads it as is
        shutil.copyfileobj(raw, packed)
    trace.unlink()
    (args.out / f"{name}.txt").write_text(json.dumps(summary) + "\n\n" + host + "\n\n" + device)
    print(f"saved {args.out / name}.*")


if __name__ == "__main__":
    main()
