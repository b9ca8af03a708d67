"""A run's ranking of the methods set beside the papers' (issue 18's check): tau, and reversals told from noise."""

import itertools
import json
import math
import re

import pytest
from hypothesis import given, strategies as st

from vtprune.eval.published import (PUBLISHED, VANILLA_SIX, against_published, kendall_tau, normalized_six,
                                     published_markdown, published_table)
from vtprune.eval.report import hits_by_config, summarize, write_reports


def test_the_six_benchmark_average_is_the_papers_normalized_average():
    assert normalized_six(VANILLA_SIX) == pytest.approx(100)
    fastv_192 = (52.7, 61.2, 1612, 64.8, 67.3, 52.5)  # FastV at 192, by hand: 88.1
    assert normalized_six(fastv_192) == pytest.approx(
        100 / 6 * (52.7 / 61.9 + 61.2 / 64.7 + 1612 / 1862 + 64.8 / 85.9 + 67.3 / 69.5 + 52.5 / 58.2))
    assert round(PUBLISHED[2].scores[192]["fastv"], 1) == 88.1


def _tau_b_by_definition(first: dict, second: dict) -> float:
    """tau-b = (P - Q) / sqrt((P + Q + T) (P + Q + U)), T / U: pairs tied in the first / second only."""
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    products = [sign(first[a] - first[b]) * sign(second[a] - second[b]) for a, b in itertools.combinations(first, 2)]
    untied_first = sum(first[a] != first[b] for a, b in itertools.combinations(first, 2))
    untied_second = sum(second[a] != second[b] for a, b in itertools.combinations(first, 2))
    return sum(products) / math.sqrt(untied_first * untied_second)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=3, max_size=7))
def test_kendall_tau_is_tau_b(pairs):
    first = {f"m{i}": a for i, (a, _) in enumerate(pairs)}
    second = {f"m{i}": b for i, (_, b) in enumerate(pairs)}
    if len(set(first.values())) < 2 or len(set(second.values())) < 2:
        assert kendall_tau(first, second) is None  # undefined: shown as n/a, stored as null
        return
    assert kendall_tau(first, second) == pytest.approx(_tau_b_by_definition(first, second))


def test_kendall_tau_of_the_same_and_the_reversed_order():
    order = {"a": 3, "b": 2, "c": 1}
    assert kendall_tau(order, order) == 1
    assert kendall_tau(order, {m: -v for m, v in order.items()}) == -1
    assert kendall_tau(order, {"a": 3, "b": 1, "c": 2}) == pytest.approx(1 / 3)


def _records(config: str, correct: list[bool]) -> list[dict]:
    method, budget = config.split("@")
    return [{"config": config, "method": method, "budget": int(budget), "index": i, "qclass": "count",
             "correct": hit, "equivalent_budget": float(budget)} for i, hit in enumerate(correct)]


def test_a_reversal_is_told_from_noise():
    """At 192 the CLSE paper ranks clse > sparsevlm > fastv: here fastv beats clse clearly (a reversal beyond noise)
    and sparsevlm by one sample (within noise); clse with an option is another method, and 64 has one method."""
    n = 200
    records = (_records("clse@192", [i < 100 for i in range(n)]) + _records("fastv@192", [i < 180 for i in range(n)])
               + _records("sparsevlm@192", [i < 179 for i in range(n)])
               + _records("clse:score=attn@192", [True] * n) + _records("clse@64", [True] * n))
    for record in records:
        if record["config"].startswith("clse:"):
            record["method"] = "clse:score=attn"
    rows = summarize(records)
    comparisons = [c for c in against_published(rows, hits_by_config(records)) if c["source"].startswith("CLSE")]
    assert [c["budget"] for c in comparisons] == [192]
    (clse_192,) = comparisons
    assert clse_192["published_order"] == ["clse", "sparsevlm", "fastv"]
    assert clse_192["ours_order"] == ["fastv", "sparsevlm", "clse"]
    assert clse_192["kendall_tau"] == -1
    verdicts = {(p["published_leader"], p["other"]): p["beyond_noise"] for p in clse_192["reversed"]}
    assert verdicts == {("clse", "fastv"): True, ("clse", "sparsevlm"): True, ("sparsevlm", "fastv"): False}
    lead = next(p for p in clse_192["reversed"] if p["other"] == "fastv" and p["published_leader"] == "clse")
    assert lead["difference"] == pytest.approx(-0.4) and lead["ci95"][1] < 0
    text = published_markdown(comparisons)
    assert text.count(", within noise") == 1 and re.search(r"sparsevlm vs fastv: -0\.5 \([^)]*\), within noise", text)
    assert published_table(comparisons).columns[4]._cells == ["clse < fastv, clse < sparsevlm"]  # beyond noise only


def test_a_tie_in_this_run_is_no_reversal():
    records = _records("fastv@64", [i % 2 == 0 for i in range(40)]) + _records("dart@64", [i < 20 for i in range(40)])
    (comparison,) = against_published(summarize(records), hits_by_config(records))
    assert comparison["reversed"] == [] and comparison["kendall_tau"] is None  # this run ties them: no order


def test_the_report_carries_the_comparison(tmp_path):
    records = _records("fastv@64", [i % 2 == 0 for i in range(40)]) + _records("dart@64", [True] * 40)
    rows = summarize(records)
    comparisons = against_published(rows, hits_by_config(records))
    assert [c["source"] for c in comparisons] == [PUBLISHED[2].source]  # the only table with both at 64
    write_reports(rows, tmp_path, "t", {}, published=comparisons)
    text = (tmp_path / "results.md").read_text()
    assert "## Against the papers' ranking" in text and "dart 93.1 > fastv 71.3" in text
    assert json.loads((tmp_path / "results.json").read_text())["against_published"][0]["kendall_tau"] == 1
    assert published_markdown([]) == ""


def test_vtprune_eval_reports_the_papers_ranking(tmp_path):
    from vtprune import cli

    command = ["eval", "--methods", "fastv,dart", "--budgets", "64", "--samples", "6", "--out", str(tmp_path)]
    assert cli.main(command) == 0
    (comparison,) = json.loads((tmp_path / "results.json").read_text())["against_published"]
    assert comparison["budget"] == 64 and sorted(comparison["published_order"]) == ["dart", "fastv"]
    assert "## Against the papers' ranking" in (tmp_path / "results.md").read_text()
