"""The papers' ranking of the methods on LLaVA-1.5-7B, set beside a run's own.

A reference model is only a stand-in for a real LLaVA if it orders the methods as the papers do, so `vtprune eval`
reports, for each published table and budget, the methods both rank: the published order, the run's (by overall
accuracy), Kendall's tau between them, and each pair the run orders otherwise, with the paired 95% interval of
the run's difference, so that a reversal can be told from noise.

The numbers are those of ../shared/notes/methods.md (reports on LLaVA-1.5-7B, 576 visual tokens), one table per
list there: CLSE's table, CLASP's, and the six-benchmark scores methods.md compiles (several papers' reports, as
baselines are usually reproduced by the papers that compare against them). Lists are not merged with each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from .intervals import paired_difference

# GQA, MMBench, MME, POPE, ScienceQA, TextVQA of the unpruned LLaVA-1.5-7B
VANILLA_SIX = (61.9, 64.7, 1862, 85.9, 69.5, 58.2)


def normalized_six(scores: tuple[float, ...]) -> float:
    """The normalized average (%) of six benchmark scores against VANILLA_SIX."""
    return 100 * sum(s / v for s, v in zip(scores, VANILLA_SIX, strict=True)) / len(VANILLA_SIX)


@dataclass(frozen=True)
class PublishedTable:
    source: str
    measure: str
    scores: dict[int, dict[str, float]]  # budget -> method -> the measure (higher is better)


PUBLISHED = (
    PublishedTable(
        "CLSE (ECCV 2026)", "normalized average over 9 benchmarks",
        {192: {"clse": 99.4, "fastv": 92.1, "pdrop": 96.9, "sparsevlm": 96.3, "ficoco_v": 96.2},
         128: {"clse": 98.1, "fastv": 87.2, "pdrop": 95.3, "sparsevlm": 93.7, "ficoco_v": 94.3},
         64: {"clse": 94.8, "fastv": 78.0, "pdrop": 77.0, "sparsevlm": 84.3, "ficoco_v": 89.8}}),
    PublishedTable(
        "CLASP (2026)", "normalized average over 8 benchmarks (DART's and VisionZip's read as ~93.0, ~92.8)",
        {64: {"clasp": 94.7, "dart": 93.0, "visionzip": 92.8}}),
    PublishedTable(
        "six-benchmark scores compiled in methods.md (several papers' reports)",
        "normalized average of GQA, MMBench, MME, POPE, ScienceQA, TextVQA",
        {budget: {method: normalized_six(scores) for method, scores in methods.items()} for budget, methods in {
            192: {"fastv": (52.7, 61.2, 1612, 64.8, 67.3, 52.5), "sparsevlm": (57.6, 62.5, 1721, 83.6, 69.1, 56.1),
                  "pdrop": (57.1, 63.2, 1766, 82.3, 70.2, 56.1), "visionzip": (59.3, 63.0, 1783, 85.3, 68.9, 57.3)},
            128: {"fastv": (49.6, 56.1, 1490, 59.6, 60.2, 50.6), "sparsevlm": (56.0, 60.0, 1696, 80.5, 67.1, 54.9),
                  "pdrop": (56.0, 61.1, 1664, 82.3, 69.9, 55.1), "visionzip": (57.6, 62.0, 1762, 83.2, 68.9, 56.8)},
            64: {"fastv": (46.1, 48.0, 1256, 48.0, 51.1, 47.8), "sparsevlm": (52.7, 56.2, 1505, 75.1, 62.2, 51.8),
                 "pdrop": (41.9, 33.3, 1092, 55.9, 69.2, 45.9), "visionzip": (55.1, 60.1, 1690, 77.0, 69.0, 55.5),
                 "dart": (55.9, 60.6, 1765, 73.9, 69.8, 54.4)},
        }.items()}),
)


def kendall_tau(first: dict[str, float], second: dict[str, float]) -> float | None:
    """Kendall's tau-b of two scorings of the same items (ties allowed); None where one scoring ties them all."""
    concordant = discordant = tied_first = tied_second = 0
    for a, b in combinations(sorted(first), 2):
        x, y = first[a] - first[b], second[a] - second[b]
        if x == 0 and y == 0:
            continue
        if x == 0:
            tied_first += 1
        elif y == 0:
            tied_second += 1
        elif (x > 0) == (y > 0):
            concordant += 1
        else:
            discordant += 1
    pairs = ((concordant + discordant + tied_first) * (concordant + discordant + tied_second)) ** 0.5
    return (concordant - discordant) / pairs if pairs else None


def against_published(rows: list[dict], hits: dict[str, dict[int, bool]]) -> list[dict]:
    """For each published table and budget with two or more methods the run has at that budget (plain configs
    "method@budget" only: options change a method): the published and the run's orders, tau, and the pairs the run
    orders otherwise, each with the run's paired difference (the published leader's accuracy minus the other's)
    and its 95% interval. hits: config -> sample index -> answered right."""
    overall = {row["config"]: row["overall"] for row in rows}
    comparisons = []
    for table in PUBLISHED:
        for budget, published in table.scores.items():
            ours = {m: overall[f"{m}@{budget}"] for m in published if f"{m}@{budget}" in overall}
            if len(ours) < 2:
                continue
            theirs = {m: published[m] for m in ours}
            reversed_pairs = []
            for a, b in combinations(sorted(ours), 2):
                leader, other = (a, b) if theirs[a] > theirs[b] else (b, a)
                if theirs[a] == theirs[b] or ours[leader] >= ours[other]:
                    continue
                shared = sorted(hits[f"{leader}@{budget}"].keys() & hits[f"{other}@{budget}"].keys())
                difference, interval = paired_difference([hits[f"{leader}@{budget}"][i] for i in shared],
                                                         [hits[f"{other}@{budget}"][i] for i in shared])
                reversed_pairs.append({"published_leader": leader, "other": other, "difference": difference,
                                       "ci95": interval, "beyond_noise": interval[1] < 0})
            comparisons.append({
                "source": table.source, "measure": table.measure, "budget": budget,
                "published_order": sorted(theirs, key=lambda m: -theirs[m]),
                "published": theirs, "ours_order": sorted(ours, key=lambda m: -ours[m]), "ours": ours,
                "kendall_tau": kendall_tau(theirs, ours), "reversed": reversed_pairs,
            })
    return comparisons


def published_markdown(comparisons: list[dict]) -> str:
    """The comparisons as a markdown section (empty without any)."""
    if not comparisons:
        return ""
    lines = ["## Against the papers' ranking (LLaVA-1.5-7B)", "",
             "Each published table's methods that this run has at that budget, in the table's order and in this "
             "run's (overall accuracy); tau: Kendall's tau-b of the two (1: the same order, -1: reversed). Reversed "
             "pairs: this run's accuracy of the table's better method minus the other's, with the paired 95% "
             "interval (an interval holding 0 is within noise). Tables from different papers are not merged.", "",
             "| source | budget | published order | this run's order | tau | reversed pairs |",
             "|---|---|---|---|---|---|"]
    for c in comparisons:
        published = " > ".join(f"{m} {c['published'][m]:.1f}" for m in c["published_order"])
        ours = " > ".join(f"{m} {100 * c['ours'][m]:.1f}" for m in c["ours_order"])
        reversed_pairs = "; ".join(
            f"{p['published_leader']} vs {p['other']}: {100 * p['difference']:+.1f} "
            f"({100 * p['ci95'][0]:+.1f} to {100 * p['ci95'][1]:+.1f}){'' if p['beyond_noise'] else ', within noise'}"
            for p in c["reversed"]) or "none"
        lines.append(f"| {c['source']}: {c['measure']} | {c['budget']} | {published} | {ours} | "
                     f"{_tau(c['kendall_tau'])} | {reversed_pairs} |")
    return "\n".join(lines) + "\n"


def published_table(comparisons: list[dict]):
    """The terminal's short form: per table and budget, tau and the reversals beyond noise."""
    from rich.table import Table

    table = Table(title="against the papers' ranking on LLaVA-1.5-7B (results.md has the orders)")
    for column in ("source", "budget", "methods", "tau", "reversed beyond noise"):
        table.add_column(column, justify="left" if column in ("source", "reversed beyond noise") else "right")
    for c in comparisons:
        beyond = [f"{p['published_leader']} < {p['other']}" for p in c["reversed"] if p["beyond_noise"]]
        table.add_row(c["source"], str(c["budget"]), str(len(c["ours"])), f"{_tau(c['kendall_tau'])}",
                      ", ".join(beyond) or "none")
    return table


def _tau(tau: float | None) -> str:
    return "n/a" if tau is None else f"{tau:+.2f}"
