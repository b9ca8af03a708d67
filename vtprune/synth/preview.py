"""Contact sheet of samples, for eyeballing the generator."""

from __future__ import annotations

import math
import textwrap


def contact_sheet(samples, path, cols: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless; never open a window
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(samples) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        ax.imshow(s.image)
        title = f"[{s.qclass}] {s.question} -> {s.answer}"
        if "pope" in s.meta:
            title += f" ({s.meta['pope']})"
        ax.set_title("\n".join(textwrap.wrap(title, 44)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    from .generator import CLASSES, make_sample

    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/synth_preview.png"
    contact_sheet([make_sample(seed, i, c) for c in CLASSES for i in range(2)], out)
    print(out)
