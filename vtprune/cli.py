"""The `vtprune` command: thin parsing and printing around the library."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

console = Console()


def cmd_methods(args) -> int:
    import vtprune

    table = Table(title="vtprune methods")
    for column in ("method", "acts", "rule", "defaults"):
        table.add_column(column)
    for info in vtprune.methods():
        defaults = ", ".join(f"{k}={v}" for k, v in info.defaults.items()) or "-"
        table.add_row(info.name, info.where, info.summary, defaults)
    console.print(table)
    return 0


def cmd_demo(args) -> int:
    """A pruned greedy generation on a tiny random LLaVA-1.5, with the stats of each method."""
    import torch

    import vtprune
    from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

    model = tiny_llava(layers=8)
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(images=1, text_before=6)])
    steps = 6
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0)[:, -steps:]
    table = Table(title=f"tiny LLaVA-1.5 (random weights, 8 layers, 64 tokens/image), budget {args.budget}")
    for column in ("method", "kept per sample", "equivalent budget", "tokens equal to unpruned"):
        table.add_column(column)
    table.add_row("unpruned", str([128, 64]), "64.0", f"{reference.numel()}/{reference.numel()}")
    for info in vtprune.methods():
        with torch.no_grad(), vtprune.apply(model, info.name, args.budget) as pruner:
            out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0)[:, -steps:]
            stats = pruner.last_stats
        same = int((out == reference).sum())
        table.add_row(info.name, str(stats.kept_per_sample), f"{stats.equivalent_budget:.1f}", f"{same}/{reference.numel()}")
    console.print(table)
    console.print("Random weights: this shows the engine at work, not accuracy.")
    return 0


def cmd_train_reference(args) -> int:
    from pathlib import Path

    from vtprune.synth.train import train

    accuracy = train(Path(args.out), steps=args.steps, batch_size=args.batch, lr=args.lr,
                     eval_every=args.eval_every, eval_samples=args.eval_samples)
    console.print(accuracy)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for multimodal LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list the registered methods").set_defaults(run=cmd_methods)
    demo = commands.add_parser("demo", help="pruned generation on a tiny random model, with stats")
    demo.add_argument("--budget", type=int, default=16, help="visual tokens kept per image")
    demo.set_defaults(run=cmd_demo)
    trainer = commands.add_parser("train-reference", help="train the reference model on generated samples (resumes)")
    trainer.add_argument("--out", required=True, help="folder for the checkpoint, its processor and train_log.jsonl")
    trainer.add_argument("--steps", type=int, default=2400)
    trainer.add_argument("--batch", type=int, default=32)
    trainer.add_argument("--lr", type=float, default=2e-3)
    trainer.add_argument("--eval-every", type=int, default=200)
    trainer.add_argument("--eval-samples", type=int, default=240)
    trainer.set_defaults(run=cmd_train_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
