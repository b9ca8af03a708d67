"""Host cost of a compiled prefill (issue 17 item 4): what compile_prefill adds per prefill besides the kernels.

At batch 1 on a GPU the prefill is launch-bound, so what the host does per prefill is what latency is made of.
This measures it where the kernels cost next to nothing: a tiny model (narrow layers, as many as a 7B LLM) on the
CPU, batch 1, median wall time of a prefill eager and through compile_prefill with plain CUDA graphs
(`--compile cudagraphs`; on the CPU the traced graphs run as they are, so no replay hides the host work), for the
unpruned model and a few methods, with the compiled segments each stack ran. The difference is the compiled
dispatch's own host cost; the segments are what a GPU replays.

    python benchmarks/compiled_dispatch.py --layers 32 --out benchmarks/results
    PYTHONPATH=<an older checkout> python benchmarks/compiled_dispatch.py   # the same, before a change

Prints a table; saves JSON under --out/<device>/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import vtprune
from vtprune.bench.run import device_name
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava


def median_ms(call, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median_high(times) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the tiny LLaVA")
    parser.add_argument("--methods", default="random,fastv,clse,visionzip")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_llava(layers=args.layers).eval()
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    rows = []
    print("| config | eager ms | compiled ms | compiled - eager ms | segments (decoder; tower) |\n| --- | --- | --- | --- | --- |")
    for method in ["unpruned", *args.methods.split(",")]:
        pruning = contextlib.nullcontext() if method == "unpruned" else vtprune.apply(model, method, args.budget)
        with torch.no_grad(), pruning:
            eager = median_ms(lambda: model(**inputs), args.repeats)
            with vtprune.compile_prefill(model, backend="cudagraphs", mode=None) as compiled:
                ms = median_ms(lambda: model(**inputs), args.repeats)
                segments = [[(s.start, s.end) for s in stack.last_segments]  # (an older checkout: per decoder layer)
                            for stack in getattr(compiled, "stacks", [])]
        config = method if method == "unpruned" else f"{method}@{args.budget}"
        rows.append({"config": config, "eager_ms": eager, "compiled_ms": ms, "segments": segments})
        shown = "; ".join(" ".join(f"{a}-{b - 1}" for a, b in stack) for stack in segments) or "each decoder layer"
        print(f"| {config} | {eager:.1f} | {ms:.1f} | {ms - eager:+.1f} | {shown} |")
    if args.out is not None:
        folder = args.out / device_name("cpu")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"compiled-dispatch-{args.layers}-layers.json"
        settings = {"layers": args.layers, "budget": args.budget, "repeats": args.repeats, "torch": torch.__version__}
        path.write_text(json.dumps({"settings": settings, "results": rows}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
