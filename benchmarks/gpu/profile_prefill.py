"""Where a prefill's time goes (issue 17 item 4): torch.profiler over a few prefills of one configuration.

    python benchmarks/gpu/profile_prefill.py --arch llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
        --method random --budget 192 --compile --out $OUT/profile
    python benchmarks/gpu/profile_prefill.py ... --batch 16 --method tome,clse --budget 192 --replay
    python benchmarks/gpu/profile_prefill.py ... --batch 1 --method unpruned,oracle --budget 192

Prints the wall time per prefill, the device's busy time (the sum of its kernels; on a GPU, wall minus busy is
time the device sat waiting for the host: launches, Python, syncs), and the ops that take the most host and
device time; saves a gzipped Chrome trace (ui.perfetto.dev), the tables, and every op's count and host and
device time as JSON under --out, for each method named (one model built for all; "oracle" is the bench's input
oracle at --budget: the unmodified model fed that many visual tokens, the least a prefill at that budget can
cost, so its device busy time says how much of a batch-1 prefill is the GPU's own work). --replay profiles each method's
schedule oracle too (its decision replayed: the bench's "vs schedule oracle" column), so that the two JSON files
of a method and its replay say which ops make the gap (`benchmarks/gpu/profile_gap.py` compares them). Runs on
the CPU too (host time only), which is how it is tested before a GPU session.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vtprune
from vtprune import cli_args
from vtprune.methods import WITHOUT_CHECKPOINT
from vtprune.bench.measure import input_oracle
from vtprune.bench.presets import PRESETS, build_preset, preset_inputs
from vtprune.engine.compiled import COMPILERS


def device_time_us(event) -> float:
    """An aggregated event's own time on the device (the attribute's name changed across torch versions)."""
    return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="llava-cpu-small", choices=sorted(PRESETS))
    parser.add_argument("--method", type=cli_args.comma_list(
                            lambda t: t if t in ("unpruned", "oracle") else cli_args.method_name(t)),
                        default="unpruned", help="registered methods, comma-separated, unpruned or oracle")
    parser.add_argument("--budget", type=cli_args.token_budget, default=192)
    parser.add_argument("--batch", type=cli_args.positive_int, default=1)
    parser.add_argument("--compile", nargs="?", const="inductor", choices=sorted(COMPILERS),
                        help="the prefill compiled (compile_prefill): inductor (the default) or cudagraphs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--replay", action="store_true",
                        help="also profile each method replaying its own decision (the schedule oracle: no scoring)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prefills", type=int, default=3, help="prefills profiled")
    parser.add_argument("--out", type=Path, default=Path("out/profile"))
    args = parser.parse_args(argv)
    methods = args.method
    if args.replay and {"unpruned", "oracle"} & set(methods):
        parser.error("--replay replays a method's decision: unpruned and the oracle have none")
    dtype = getattr(torch, args.dtype)
    model = build_preset(args.arch, args.device, dtype)
    inputs = preset_inputs(model, PRESETS[args.arch], args.batch, device=args.device, dtype=dtype)
    for method in methods:
        if method == "oracle":
            oracle = input_oracle(model, PRESETS[args.arch], args.batch, args.budget, args.device, dtype)
            profile_config(model, oracle, "oracle", False, args)
            continue
        for replay in (False, True) if args.replay else (False,):
            profile_config(model, lambda: model(**inputs, use_cache=True, logits_to_keep=1), method, replay, args)


def profile_config(model, forward, method: str, replay: bool, args) -> None:
    """Profile `prefills` prefills (`forward()`) of one configuration after `warmup` ones; print and save what they
    spent."""
    cuda = args.device.startswith("cuda")
    pruner = None if method in ("unpruned", "oracle") else vtprune.apply(model, method, args.budget,
                                                                         **WITHOUT_CHECKPOINT.get(method, {}))
    compiled = vtprune.compile_prefill(model, **COMPILERS[args.compile]) if args.compile else None

    def prefill():
        forward()
        if cuda:
            torch.cuda.synchronize()

    try:
        with torch.no_grad():
            for _ in range(args.warmup):
                prefill()
            # a replay: the last warm-up's decision, replayed from here on (its first run warm, as the bench's is)
            with pruner.replaying(pruner.last_decision) if replay else contextlib.nullcontext():
                if replay:
                    prefill()
                with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                    start = time.perf_counter()
                    for _ in range(args.prefills):
                        prefill()
                    wall_ms = (time.perf_counter() - start) * 1000 / args.prefills
    finally:
        for handle in (compiled, pruner):
            if handle is not None:
                handle.remove()

    averages = prof.key_averages()
    busy_ms = sum(device_time_us(event) for event in averages) / 1000 / args.prefills
    config = "unpruned" if method == "unpruned" else f"{method}@{args.budget}{'-replay' if replay else ''}"
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
    ops = {event.key: {"count": event.count / args.prefills, "host_us": event.self_cpu_time_total / args.prefills,
                       "device_us": device_time_us(event) / args.prefills} for event in averages}
    (args.out / f"{name}.json").write_text(json.dumps({"summary": summary, "ops_per_prefill": ops}, indent=1))
    print(f"saved {args.out / name}.*")


if __name__ == "__main__":
    main()
