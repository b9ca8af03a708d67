"""Per-item host work of a pruned prefill (issue 17 item 2): what grows with the batch besides the model's FLOPs.

For each method, one prefill at batch 1 and at batch B (the same prompts), counting the aten ops (views aside)
dispatched inside the method's `select_batch` (and ToMe's and FiCoCo-V's merges) and outside it (the engine and
the model), and on CUDA the host synchronisations (torch.cuda.set_sync_debug_mode). On a GPU each op is a launch of some microseconds and each
sync stalls the queue, so "per extra sample" should be ~0 for both: a loop over items shows up there.

    python benchmarks/host_work.py --arch llava-cpu-small --batch 8 --budget 64 --out benchmarks/results
    python benchmarks/host_work.py --arch llava-1.5-7b --device cuda --dtype bfloat16 --batch 16
    python benchmarks/host_work.py --arch llava-1.5-7b --narrow --batch 4     # 7B's depths on the CPU, in a minute

On the CPU there is no device to sync with: the sync columns are left out (ops that would sync on CUDA also run
on host copies by design, so counting them there would mislead), and the engine's host-side bookkeeping (the
prompt's layout, read from a CPU copy of input_ids) is counted with the rest: 20 of the 23 engine ops per extra
sample of `random` on llava-cpu-small are that. Prints a table; saves JSON under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from vtprune import cli_args
from vtprune.api import refusal
from vtprune.bench.ops import count_prefill
from vtprune.bench.run import device_name
from vtprune.bench.presets import PRESETS, Preset, preset_inputs
from vtprune.methods import REGISTRY, WITHOUT_CHECKPOINT


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="llava-cpu-small", choices=sorted(PRESETS))
    parser.add_argument("--methods", type=cli_args.comma_list(cli_args.method_name), default=",".join(sorted(REGISTRY)))
    parser.add_argument("--budget", type=cli_args.token_budget, default=64)
    parser.add_argument("--batch", type=cli_args.positive_int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--narrow", action="store_true",
                        help="the preset's layers and heads at 64 wide: a 7B prefill's ops, counted in seconds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    preset = narrowed(PRESETS[args.arch]) if args.narrow else PRESETS[args.arch]
    with torch.device(args.device):
        model = preset.build().to(dtype).eval()
    inputs = {b: preset_inputs(model, preset, b, device=args.device, dtype=dtype) for b in (1, args.batch)}
    rows = []
    header = ["method", "select ops b1", f"b{args.batch}", "per extra sample", "other ops b1", f"b{args.batch}",
              "per extra sample", f"over replay b{args.batch}"] + (["syncs b1", f"b{args.batch}"] if cuda else [])
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for method in args.methods:
        if refusal(model, method, args.budget, **WITHOUT_CHECKPOINT.get(method, {})):
            print(f"| {method} | not run: {refusal(model, method, args.budget, **WITHOUT_CHECKPOINT.get(method, {}))} |")
            continue
        count_prefill(model, method, args.budget, inputs[1], cuda)  # warm-up: caches a method fills once
        one, many = (count_prefill(model, method, args.budget, inputs[b], cuda) for b in (1, args.batch))
        extra = args.batch - 1
        row = {"method": method, "batch": args.batch, "b1": one, "bn": many,
               "select_ops_per_extra_sample": (many["select_ops"] - one["select_ops"]) / extra,
               "engine_ops_per_extra_sample": (many["engine_ops"] - one["engine_ops"]) / extra,
               "ops_over_replay": many["select_ops"] + many["engine_ops"] - many["replay_ops"]}
        rows.append(row)
        cells = [method, one["select_ops"], many["select_ops"], f"{row['select_ops_per_extra_sample']:.1f}",
                 one["engine_ops"], many["engine_ops"], f"{row['engine_ops_per_extra_sample']:.1f}",
                 row["ops_over_replay"]]
        cells += [one["syncs"], many["syncs"]] if cuda else []
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    if args.out is not None:
        arch = args.arch + ("-narrow" if args.narrow else "")
        path = args.out / device_name(args.device) / f"host-work-{arch}-b{args.batch}-{args.budget}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
        print(f"saved {path}")


def narrowed(preset: Preset) -> Preset:
    """The preset's depths, its vision tower's patching and its prompt layout, at 64 wide with 4 heads: an op count
    does not depend on widths (LLaVA's families; the Qwen towers' configs name their widths otherwise)."""
    if preset.family.startswith("qwen"):
        raise SystemExit(f"--narrow covers the LLaVA families; {preset.family} is not one: run without it")
    vision = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                vocab_size=1024)
    return dataclasses.replace(preset, vision=preset.vision | vision | (
        {"projection_dim": 64} if "projection_dim" in preset.vision else {}), text=preset.text | text)


if __name__ == "__main__":
    main()
