"""The accuracy tables carry a 95% interval, so a reader can tell a difference from noise."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from vtprune.eval.intervals import paired_difference, wilson_interval
from vtprune.eval.report import by_cost, by_cost_markdown, markdown_table, summarize

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...


@pytest.mark.parametrize("correct, total", [(0, 10), (10, 10), (7, 10), (120, 240), (239, 240)])
def test_wilson_interval_holds_the_rate_and_matches_its_formula(correct, total):
    low, high = wilson_interval(correct, total)
    p = correct / total
    assert 0.0 <= low <= p <= high <= 1.0
    # the interval's bounds are the two roots of (p - q)^2 = z^2 q (1 - q) / n
    for q in (low, high):
        if 0.0 < q < 1.0:
            assert math.isclose((p - q) ** 2, Z95**2 * q * (1 - q) / total, rel_tol=1e-9, abs_tol=1e-12)


def test_more_samples_give_a_narrower_interval():
    widths = [wilson_interval(n // 2, n)[1] - wilson_interval(n // 2, n)[0] for n in (40, 240, 1200)]
    assert widths[0] > widths[1] > widths[2]
    assert 0.12 < widths[1] < 0.13  # about +-6 points at 240 samples and 50%


def test_the_table_prints_the_interval_of_each_config():
    records = [{"config": "random@64", "method": "random", "budget": 64, "index": i, "qclass": "count",
                "correct": i < 30, "equivalent_budget": 64.0} for i in range(40)]
    row = summarize(records)[0]
    assert row["overall_ci95"] == wilson_interval(30, 40)
    low, high = row["overall_ci95"]
    assert f"| 75.0 | {100 * low:.1f}-{100 * high:.1f} |" in markdown_table([row])


def test_configs_at_matched_compute_mark_who_wins_at_equal_cost():
    def config(name, method, budget, equivalent, correct):
        return [{"config": name, "method": method, "budget": budget, "index": i, "qclass": "count",
                 "correct": i < correct, "equivalent_budget": equivalent} for i in range(10)]

    records = (config("unpruned", "unpruned", None, None, 10) + config("fastv@64", "fastv", 64, 235.0, 6)
               + config("clse@64", "clse", 64, 144.0, 7) + config("random@64", "random", 64, 64.0, 5)
               + config("random@192", "random", 192, 192.0, 8) + config("uniform@192", "uniform", 192, 192.0, 9))
    ordered = by_cost(summarize(records))
    assert [row["config"] for row in ordered] == ["random@64", "clse@64", "uniform@192", "random@192", "fastv@64"]
    # fastv@64 costs the most and answers worse than cheaper configs: not on the frontier, nor random@192 at a tie
    assert [row["frontier"] for row in ordered] == [True, True, True, False, False]
    assert "| 235 | fastv@64 | 60.0 |" in by_cost_markdown(summarize(records))
    # each against the best config as cheap, on the same samples: uniform@192 answers samples 0-8, clse@64 0-6
    assert [(row["versus"] or {}).get("config") for row in ordered] == [None, "random@64", "clse@64", "uniform@192",
                                                                         "uniform@192"]
    assert ordered[2]["versus"]["difference"] == pytest.approx(0.2)
    assert "+20.0 (" in by_cost_markdown(summarize(records))


def test_the_matched_compute_tables_read_as_their_rows():
    """A config that only ties the best cheaper one is not "best at this cost"; each row reads its equivalent
    budget, accuracy, interval, normalized score and its difference from the best as cheap, low to high."""
    from vtprune.eval.report import frontier_table

    def config(name, equivalent, correct):
        return [{"config": name, "method": name.split("@")[0], "budget": 64 if equivalent else None, "index": i,
                 "qclass": "count", "correct": i < correct, "equivalent_budget": equivalent} for i in range(10)]

    records = config("unpruned", None, 10) + config("random@64", 64.0, 5) + config("pool@64", 100.4, 5) \
        + config("clse@64", 144.0, 8)
    rows = summarize(records)
    assert (rows[0]["config"], rows[0]["budget"], rows[0]["equivalent_budget"]) == ("unpruned", None, None)
    assert [row["samples"] for row in rows] == [10] * 4
    hits = {name: [i < correct for i in range(10)] for name, correct in (("random@64", 5), ("pool@64", 5),
                                                                        ("clse@64", 8))}

    def cells(name, versus):
        low, high = wilson_interval(sum(hits[name]), 10)
        difference, (d_low, d_high) = paired_difference(hits[name], hits[versus])
        return (f"{100 * low:.1f}-{100 * high:.1f}", f"{100 * sum(hits[name]) / 10:.1f}",
                f"{100 * difference:+.1f} ({100 * d_low:+.1f} to {100 * d_high:+.1f}) vs {versus}")

    pool, clse = cells("pool@64", "random@64"), cells("clse@64", "random@64")
    assert f"| 100 | pool@64 | 50.0 | {pool[0]} | {pool[1]} |  | {pool[2]} |" in by_cost_markdown(rows)
    assert f"| 144 | clse@64 | 80.0 | {clse[0]} | {clse[1]} | yes | {clse[2]} |" in by_cost_markdown(rows)
    assert "| 64 | random@64 | 50.0 |" in by_cost_markdown(rows) and "| yes | - |" in by_cost_markdown(rows)
    assert frontier_table(rows, "t").columns[1]._cells == ["random@64", "clse@64"]
    assert "| pool@64 | 100 | 50.0 |" in markdown_table(rows)  # the accuracy table's eq. budget, whole tokens


def test_a_paired_difference_is_narrower_than_two_intervals_side_by_side():
    """Two configs that answer 200 samples alike but for 12 (11 of them won by the first) differ by 5 points:
    their own intervals overlap (a reader would call it noise), the paired one excludes 0."""
    first = [i < 150 or 190 <= i < 196 for i in range(200)]  # 156 right
    second = [i < 145 or i == 150 for i in range(200)]  # 146 right
    difference, (low, high) = paired_difference(first, second)
    assert difference == pytest.approx((sum(first) - sum(second)) / 200)
    assert wilson_interval(sum(first), 200)[0] < wilson_interval(sum(second), 200)[1]  # overlapping
    assert 0 < low < difference < high
    swapped, (s_low, s_high) = paired_difference(second, first)
    assert swapped == -difference and (s_low, s_high) == pytest.approx((-high, -low))
    half = [i % 2 == 0 for i in range(200)]
    same, (low, high) = paired_difference(half, half)  # identical answers: no difference seen, not a proven 0
    assert same == 0 and low < -0.005 and high > 0.005


def test_newcombes_continuity_correction_stops_at_zero_correlation():
    """Newcombe (1998, method 10) replaces ad - bc by max(ad - bc - n/2, 0) when it is positive. Here a = 6 both
    right, b = 6 first only, c = 4 second only, d = 5 neither (n = 21): ad - bc = 6 < n/2, so phi = 0 and the
    limits are the two Wilson intervals combined as if independent: d -+ sqrt(dl1^2 + du2^2), sqrt(du1^2 + dl2^2)."""
    first = [True] * 12 + [False] * 9
    second = [True] * 6 + [False] * 6 + [True] * 4 + [False] * 5
    p1, p2 = 12 / 21, 10 / 21
    (l1, u1), (l2, u2) = wilson_interval(12, 21), wilson_interval(10, 21)
    difference, (low, high) = paired_difference(first, second)
    assert difference == pytest.approx(2 / 21)
    assert low == pytest.approx(2 / 21 - math.hypot(p1 - l1, u2 - p2))
    assert high == pytest.approx(2 / 21 + math.hypot(u1 - p1, p2 - l2))


def test_a_paired_difference_needs_the_same_samples():
    with pytest.raises(ValueError, match="same, non-empty samples"):
        paired_difference([True, False], [True])  # zip would silently drop the third sample's pair


def test_a_rate_of_no_samples_is_anything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_the_paired_interval_holds_its_level():
    """Coverage of the true difference over 2000 simulated pairs of correlated answers (a seeded generator)."""
    rng = np.random.default_rng(0)
    # the last: two configs that disagree on 1% of the samples (the usual case at neighbouring budgets), where the
    # uncorrected correlation made the interval too narrow (90% coverage)
    for n, p1, p2, both in ((60, 0.9, 0.8, 0.75), (228, 0.8, 0.75, 0.65), (200, 0.5, 0.5, 0.35), (240, 0.71, 0.7, 0.7)):
        # each sample: both right, first only, second only, neither
        cells = [both, p1 - both, p2 - both, 1 - p1 - p2 + both]
        hits = 0
        for _ in range(2000):
            kind = rng.choice(4, size=n, p=cells)
            _, (low, high) = paired_difference(list(kind <= 1), list((kind == 0) | (kind == 2)))
            hits += low <= p1 - p2 <= high
        assert 0.93 <= hits / 2000 <= 0.99, (n, hits / 2000)


def test_the_interval_holds_0_and_100_percent_exactly():
    """Rounding left the upper bound of 100% at 0.9999999999999999 for 407 sample counts up to 1299 (6, 21, 60,
    1200 among them); the plot then got a negative error bar and the run ended without its picture."""
    for total in range(1, 1300):
        assert wilson_interval(total, total)[1] == 1.0 and wilson_interval(0, total)[0] == 0.0


def test_the_plot_draws_an_interval_that_does_not_hold_its_value(tmp_path):
    """A bootstrap percentile interval (the benchmark report's) need not hold its point estimate."""
    from vtprune.eval.report import plot_accuracy_vs_budget

    rows = [{"method": "unpruned", "budget": None, "equivalent_budget": None, "overall": 1.0, "overall_ci95": (0.9, 1.0)},
            {"method": "random", "budget": 64, "equivalent_budget": 64.0, "overall": 1.0,
             "overall_ci95": (0.95, 0.9999999999999999)}]
    plot_accuracy_vs_budget(rows, tmp_path / "plot.png", "t")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_a_run_of_token_and_fraction_budgets_plots_the_tokens_left_and_both_right(tmp_path, monkeypatch):
    import matplotlib.axes

    from vtprune.eval.report import plot_accuracy_vs_budget

    drawn, errorbar = [], matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda axis, x, y, **kwargs: drawn.append(list(x)) or errorbar(axis, x, y, **kwargs))
    rows = [{"method": "random", "budget": budget, "equivalent_budget": equivalent, "overall": 0.5,
             "overall_ci95": (0.4, 0.6)} for budget, equivalent in ((64, 64.0), (0.25, 144.0))]
    plot_accuracy_vs_budget(rows, tmp_path / "plot.png", "t")
    assert drawn == [[64], [64.0, 144.0]]  # the left panel's x is tokens: a share of 0.25 is no count


def test_the_normalized_average_is_undefined_where_the_unpruned_model_scores_0_on_a_class():
    def config(name, method, correct_by_class):
        return [{"config": name, "method": method, "budget": None if method == "unpruned" else 64, "index": i,
                 "qclass": qclass, "correct": i % 10 < correct, "equivalent_budget": None if method == "unpruned"
                 else 64.0} for qclass, correct in correct_by_class.items() for i in range(10)]

    rows = {row["config"]: row for row in summarize(config("unpruned", "unpruned", {"count": 0, "ocr": 10})
                                                    + config("random@64", "random", {"count": 10, "ocr": 0}))}
    assert rows["random@64"]["normalized"] is None  # not 0.0 from the ocr class alone


def test_fraction_budgets_follow_token_budgets_in_the_table():
    """random@0.25 is a share (144 of 576 tokens), not a budget under 64."""
    from vtprune.eval.report import in_table_order

    rows = [{"method": "random", "budget": b} for b in (0.25, 64, 0.5, 192)] + [{"method": "unpruned", "budget": None}]
    assert [row["budget"] for row in in_table_order(rows)] == [None, 192, 64, 0.5, 0.25]
