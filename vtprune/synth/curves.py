"""The loss and validation-accuracy curves of `vtprune train-reference` runs, from their train_log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training_logs(logs: dict[str, Path], path: Path) -> None:
    """One figure: losses per step (left) and validation accuracy (right) of each named run, per class for the last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, log in logs.items():
        records = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in records]
        for key, style in (("answer_loss", "-"), ("caption_loss", "--"), ("dense_loss", ":"),
                           ("grounding_loss", "-."), ("relevance_loss", (0, (1, 3)))):
            points = [(s, r[key]) for s, r in zip(steps, records) if key in r]
            if points:
                losses.plot(*zip(*points), linestyle=style, label=f"{name}: {key}", linewidth=0.8)
        evaluated = [r for r in records if "validation" in r]
        accuracy.plot([r["step"] for r in evaluated], [r["validation"]["overall"] for r in evaluated], marker="o",
                      label=f"{name}: overall")
    for qclass in sorted(evaluated[-1]["validation"]) if evaluated else []:
        if qclass != "overall":
            accuracy.plot([r["step"] for r in evaluated], [r["validation"][qclass] for r in evaluated],
                          linewidth=0.7, alpha=0.7, label=f"{name}: {qclass}")
    accuracy.axhline(0.9, color="black", linestyle="--", linewidth=0.8, label="target 0.90")
    losses.set_xlabel("step")
    losses.set_ylabel("loss")
    losses.set_ylim(0, 5)  # the first steps' dense losses (10+) would flatten the rest
    losses.legend(fontsize=7)
    accuracy.set_xlabel("step")
    accuracy.set_ylabel("validation accuracy (seed 1)")
    accuracy.set_ylim(0, 1)
    accuracy.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vtprune.synth.curves", description=__doc__)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("runs", nargs="+", metavar="NAME=LOG", help="a run's legend name and its train_log.jsonl")
    args = parser.parse_args()
    if bad := [run for run in args.runs if "=" not in run]:
        parser.error(f"{bad[0]!r} is not NAME=LOG (e.g. 'attempt 9=out/ref/train_log.jsonl')")
    plot_training_logs(dict(run.split("=", 1) for run in args.runs), args.out)
    print(args.out)
