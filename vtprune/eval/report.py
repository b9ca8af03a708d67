"""From per-sample records to the tables and the picture people compare."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.table import Table

from .intervals import paired_difference, wilson_interval
from .published import published_markdown
from .runner import UNPRUNED


def by_config(records: list[dict]) -> dict[str, list[dict]]:
    """The records of each config, in the order configs first appear."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        grouped[record["config"]].append(record)
    return grouped


def config_row(name: str, group: list[dict]) -> dict:
    """What every summary row says of its config: name, method, budget and mean equivalent budget."""
    equivalent = [r["equivalent_budget"] for r in group if r.get("equivalent_budget") is not None]
    return {"config": name, "method": group[0]["method"], "budget": group[0]["budget"],
            "equivalent_budget": sum(equivalent) / len(equivalent) if equivalent else None}


def in_table_order(rows: list[dict]) -> list[dict]:
    """Unpruned first, then by method, each method's budgets from the largest (token counts, then fractions)."""
    return sorted(rows, key=lambda r: (r["method"] != UNPRUNED, r["method"], isinstance(r["budget"], float),
                                       -(r["budget"] or 0)))


def summarize(records: list[dict]) -> list[dict]:
    """One row per config: accuracy per class and overall, and normalized to the unpruned model.

    normalized = mean over classes of (class accuracy / unpruned class accuracy), in percent:
    the papers' "normalized average", with the question classes standing for benchmarks.
    """
    rows, groups = [], by_config(records)
    for name, group in groups.items():
        classes = defaultdict(list)
        for record in group:
            classes[record["qclass"]].append(record["correct"])
        rows.append({
            **config_row(name, group), "samples": len(group),
            "classes": {c: sum(v) / len(v) for c, v in sorted(classes.items())},
            "overall": sum(r["correct"] for r in group) / len(group),
            "overall_ci95": wilson_interval(sum(bool(r["correct"]) for r in group), len(group)),
        })
    base = next((row for row in rows if row["method"] == UNPRUNED), None)
    for row in rows:
        # none where a class's unpruned accuracy is 0 (its ratio is undefined), as the benchmarks' report does
        defined = base is not None and all(base["classes"].get(c) for c in row["classes"])
        ratios = [row["classes"][c] / base["classes"][c] for c in row["classes"]] if defined else []
        row["normalized"] = 100 * sum(ratios) / len(ratios) if ratios else None
    _against_cheaper(rows, hits_by_config(records))
    return in_table_order(rows)


def hits_by_config(records: list[dict]) -> dict[str, dict[int, bool]]:
    """config -> sample index -> answered right."""
    return {name: {r["index"]: bool(r["correct"]) for r in group} for name, group in by_config(records).items()}


def _against_cheaper(rows: list[dict], hits: dict[str, dict[int, bool]]) -> None:
    """Each pruned row's place at matched compute: `frontier` when it answers better than every config that costs
    as much or less, and `versus`, its paired difference from the best of those (`paired_difference`, on the
    samples both answered), so that a reader can tell a lead from noise."""
    best = None
    for row in by_cost(rows):
        row["frontier"] = best is None or row["overall"] > best["overall"]
        shared = sorted(hits[row["config"]].keys() & hits[best["config"]].keys()) if best else []
        if shared:
            difference, interval = paired_difference([hits[row["config"]][i] for i in shared],
                                                     [hits[best["config"]][i] for i in shared])
            row["versus"] = {"config": best["config"], "difference": difference, "ci95": interval}
        else:
            row["versus"] = None
        if row["frontier"]:
            best = row


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def rich(header: list[str], rows: list[list[str]], title: str, caption: str | None = None) -> Table:
    """The terminal's table: the config column left-aligned, numbers right."""
    table = Table(title=title, caption=caption)
    for column in header:
        table.add_column(column, justify="left" if column == "config" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _percent_interval(interval: tuple[float, float]) -> str:
    return f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f}"


def _accuracy_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    classes = sorted({c for row in rows for c in row["classes"]})
    header = ["config", "eq. budget", *classes, "overall", "95% CI", "normalized"]
    return header, [[row["config"], "-" if row["equivalent_budget"] is None else f"{row['equivalent_budget']:.0f}",
                     *(f"{100 * row['classes'].get(c, 0):.1f}" for c in classes), f"{100 * row['overall']:.1f}",
                     _percent_interval(row["overall_ci95"]),
                     "-" if row["normalized"] is None else f"{row['normalized']:.1f}"] for row in rows]


def rich_table(rows: list[dict], title: str) -> Table:
    return rich(*_accuracy_table(rows), title)


def markdown_table(rows: list[dict]) -> str:
    return markdown(*_accuracy_table(rows))


def by_cost(rows: list[dict]) -> list[dict]:
    """The pruned configs ordered by equivalent budget (compute), the better first at equal cost."""
    return sorted((row for row in rows if row["equivalent_budget"] is not None),
                  key=lambda row: (row["equivalent_budget"], -row["overall"]))


def _versus(row: dict) -> str:
    versus = row.get("versus")
    if versus is None:
        return "-"
    low, high = versus["ci95"]
    return f"{100 * versus['difference']:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) vs {versus['config']}"


def _cost_cells(row: dict) -> list[str]:
    return [f"{row['equivalent_budget']:.0f}", row["config"], f"{100 * row['overall']:.1f}",
            _percent_interval(row["overall_ci95"])]


def by_cost_markdown(rows: list[dict]) -> str:
    return markdown(["eq. budget", "config", "overall", "95% CI", "normalized", "best at this cost",
                     "against the best as cheap: difference (paired 95% CI)"],
                    [[*_cost_cells(row), "-" if row["normalized"] is None else f"{row['normalized']:.1f}",
                      "yes" if row["frontier"] else "", _versus(row)] for row in by_cost(rows)])


def frontier_table(rows: list[dict], title: str) -> Table:
    """The configs no cheaper config beats, by equivalent budget, each against the best config before it."""
    return rich(["eq. budget", "config", "overall", "95% CI", "against the best as cheap (paired 95% CI)"],
                [[*_cost_cells(row), _versus(row)] for row in by_cost(rows) if row["frontier"]], title)


def plot_accuracy_vs_budget(rows: list[dict], path: Path, title: str, value=lambda row: 100 * row["overall"],
                            interval=lambda row: tuple(100 * b for b in row["overall_ci95"]),
                            ylabel: str = "accuracy (%), bars: 95% interval") -> None:
    """Accuracy (or `value`, with its `interval` or none) against the nominal budget (left) and the equivalent
    budget (right), one curve per method and options: multi-stage methods keep more than their nominal budget
    in early layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13.5, 4.5), sharey=True)
    # tab20 pairs each hue dark then light: its ten dark colours first, so that methods next to each other in the
    # legend (CLASP and CLSE, say) never share a hue; past ten, the light ones, in another line style and marker
    tab20 = plt.get_cmap("tab20")

    def colours(i: int):
        return tab20(2 * i % 20 + 2 * i // 20 % 2)

    base = next((row for row in rows if row["method"] == UNPRUNED), None)
    methods = sorted({row["method"] for row in rows} - {UNPRUNED})  # "clse:score=attn" is a curve of its own
    # above 100, so that the unpruned line and points at 100% are not drawn on the frame
    top = max([105] + [value(row) + 5 for row in rows if value(row) is not None and value(row) > 100])
    # A fraction budget (0.25) is a share of each image's tokens, not a count: the left panel shows the counts, or
    # the shares where every budget is one, and the equivalent budget (right) is a count for both
    shares = all(isinstance(row["budget"], float) for row in rows if row["budget"] is not None)
    nominal = "nominal budget: share of each image's visual tokens kept" if shares else \
        "nominal budget: visual tokens kept per image" + (
            " (fraction budgets: right panel only)" if any(isinstance(row["budget"], float) for row in rows) else "")

    def on_axis(row: dict, key: str) -> bool:
        return row[key] is not None and (key != "budget" or isinstance(row["budget"], float) == shares)

    for axis, key, name in zip(axes, ("budget", "equivalent_budget"),
                               (nominal, "equivalent budget: visual tokens per image, mean over decoder layers")):
        if base and value(base) is not None:
            axis.axhline(value(base), color="black", linestyle="--", label="unpruned")
        for i, method in enumerate(methods):
            points = sorted((row[key], value(row), *(interval(row) if interval else (value(row),) * 2)) for row in rows
                            if row["method"] == method and on_axis(row, key) and value(row) is not None)
            # styles and markers differ too, so that two configs with the same results both show
            axis.errorbar([p[0] for p in points], [p[1] for p in points],
                          # a bootstrap percentile interval need not hold its point estimate: no negative bar
                          yerr=[[max(0, p[1] - p[2]) for p in points], [max(0, p[3] - p[1]) for p in points]],
                          label=method,
                          color=colours(i), linestyle=("-", "--", "-.", ":")[i % 4], marker="os^Dv<>"[i % 7],
                          markersize=5, capsize=3)
        axis.set_xlabel(name)
        axis.set_ylim(0, top)  # on a fixed scale, flat and steep curves read as what they are
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not over them
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def not_run_lines(settings: dict) -> str:
    """The configs a method refused, with its reason, under a markdown table."""
    return "".join(f"\nNot run: {name}: {reason}\n" for name, reason in settings.get("not_run", {}).items())


def write_reports(rows: list[dict], out: Path, title: str, settings: dict, name: str = "results",
                  published: list[dict] = ()) -> list[Path]:
    """results.json, results.md (with `published`, `against_published`'s comparisons, as a last section) and the
    accuracy-vs-budget picture."""
    out = Path(out)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}_accuracy_vs_budget.png"]
    paths[0].write_text(json.dumps({"settings": settings, "rows": rows, "against_published": list(published)},
                                   indent=2))
    paths[1].write_text(f"# {title}\n\n" + markdown_table(rows) + not_run_lines(settings) + "\n## At matched compute\n\nEvery pruned config by "
                        "equivalent budget (visual tokens per image averaged over the decoder layers); \"best at this "
                        "cost\": no config that costs as much or less answers as well; the last column: its accuracy "
                        "minus that of the best config as cheap, on the same samples, with the paired 95% interval "
                        "(an interval holding 0 is no lead).\n\n" + by_cost_markdown(rows)
                        + ("\n" + published_markdown(published) if published else ""))
    plot_accuracy_vs_budget(rows, paths[2], title)
    return paths
