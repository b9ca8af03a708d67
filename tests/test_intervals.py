"""95% intervals of the benchmarks' headline scores (vtprune.eval.intervals): a percentile bootstrap over each
metric's independent units, vectorized, equal per resample to the official scorer on the resampled samples."""

import numpy as np
import pytest

from vtprune.eval.intervals import (
    bootstrap, normalized_interval, percentile_interval, resample_counts, score_interval, units,
)
from vtprune.eval.metrics import sample_outcomes, score
from vtprune.eval.intervals import wilson_interval

from .test_metrics import MME_PREDS, MME_REFS, POPE_PREDS, mmb_row, pope_refs


def gqa(hits: int, n: int):
    """n GQA answers, the first `hits` right: a plain accuracy of hits / n."""
    return ["yes"] * hits + ["no"] * (n - hits), [{"answer": "yes"}] * n


def width(interval):
    return interval[1] - interval[0]


def mmbench(rights: list[bool], rotations: int = 4):
    """Questions with `rotations` circular copies each, every copy right or every copy wrong."""
    opts = ["dog", "cat", "bird", "fish"]
    preds, refs = [], []
    for q, right in enumerate(rights):
        for k in range(rotations):
            rot = opts[k:] + opts[:k]
            gold = "ABCD"[rot.index("cat")]
            refs.append(mmb_row(q + k * 1_000_000, gold, rot))
            preds.append(gold if right else "ABCD"[rot.index("dog")])
    return preds, refs


def mme(subtask: str, both_right: int, images: int, start: int = 0):
    """`images` MME images of a subtask, the first `both_right` with both questions right, the rest both wrong."""
    preds, refs = [], []
    for i in range(start, start + images):
        for gold in ("Yes", "No"):
            refs.append({"question_id": f"{subtask}/{i}.png", "category": subtask, "answer": gold})
            preds.append(gold if i - start < both_right else ("No" if gold == "Yes" else "Yes"))
    return preds, refs


def one_rotation_wrong(preds, refs):
    """The first question's last circular copy answered wrong: the question is wrong, the others unchanged."""
    assert refs[3]["index"] == 3_000_000 and preds[3] == "C"
    return preds[:3] + ["A"] + preds[4:], refs


SMALL = [  # (task, predictions, references, rule): every task, both rules where they differ
    ("textvqa", ["2", "cat", "go", "stop"], [{"answers": ["two", "2", "2."] + ["x"] * 7},
                                             {"answers": ["A Cat"] * 10}, {"answers": ["stop"] * 10},
                                             {"answers": ["stop"] * 4 + ["go"] * 6}], "llava"),
    ("vizwiz", ["red", "Unanswerable", "blue"], [{"answers": ["red"] * 2 + ["blue"] * 8},
                                                 {"answers": ["unanswerable"] * 10}, {"answers": []}], "lmms-eval"),
    ("gqa", ["Yes.", "no", "T-shirt"], [{"answer": "yes"}, {"answer": "yes"}, {"answer": "t-shirt"}], "lmms-eval"),
    ("gqa", ["Yes.", "no", "T-shirt"], [{"answer": "yes"}, {"answer": "yes"}, {"answer": "t-shirt"}], "llava"),
    ("pope", POPE_PREDS, pope_refs(), "lmms-eval"),
    ("pope", POPE_PREDS, pope_refs(), "llava"),
    ("mme", MME_PREDS, MME_REFS, "lmms-eval"),
    ("mme", MME_PREDS, MME_REFS, "llava"),
    ("mmbench_en", *mmbench([True, False, True]), "lmms-eval"),
    ("mmbench_cn", *mmbench([True, True, False], rotations=2), "lmms-eval"),
    ("mmbench_en", *one_rotation_wrong(*mmbench([True, True])), "lmms-eval"),  # a question right but in one copy
    ("scienceqa_img", ["A", "B.", "(C)"], [{"choices": ["x", "y", "z"], "answer": a} for a in (0, 1, 2)], "llava"),
    ("ocrbench", ["HELLO", "x"], [{"question_type": "Regular Text Recognition", "dataset": "IIIT5K", "answer": ["hello"]},
                                  {"question_type": "Doc-oriented VQA", "dataset": "docVQA", "answer": ["y"]}],
     "lmms-eval"),
    ("videomme", ["A", "B", "C", "A", "D"], [{"answer": a, "duration": "short", "videoID": v} for a, v in
                                             [("A", "1"), ("C", "1"), ("C", "2"), ("B", "3"), ("D", "3")]], "lmms-eval"),
]


@pytest.mark.parametrize("task, preds, refs, rule", SMALL, ids=[f"{t}-{r}" for t, _, _, r in SMALL])
def test_the_numpy_headline_is_the_scorers_score(task, preds, refs, rule):
    assert units(sample_outcomes(task, preds, refs, rule)).point() == pytest.approx(
        score(task, preds, refs, rule)["score"], abs=1e-9)


def resampled(task, preds, refs, u, counts, b):
    """Resample b as a data set: each unit's samples repeated as often as drawn (copies of an MME image or an
    MMBench question renamed so that they stay separate units)."""
    cols = sample_outcomes(task, preds, refs).columns
    if task == "mme":
        keys = list(zip(cols["subtask"], cols["image"]))
    elif task.startswith("mmbench"):
        keys = cols["question"]
    elif task == "videomme":
        keys = cols["video"]
    else:
        keys = list(range(len(preds)))
    rows_of = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)
    unit_rows = list(rows_of.values())  # units in first-appearance order, as `units` numbers them
    out_p, out_r = [], []
    for s in counts:
        for j, unit in enumerate(np.flatnonzero(u.strata == s)):
            for copy in range(int(counts[s][b, j])):
                for row in unit_rows[unit]:
                    ref = dict(refs[row])
                    if task == "mme":
                        ref["question_id"] = f"{ref['question_id']}#{copy}"
                    elif task.startswith("mmbench"):
                        ref["index"] = ref["index"] + 1000 * copy
                    elif task == "videomme":
                        ref["videoID"] = f"{ref['videoID']}#{copy}"
                    out_p.append(preds[row])
                    out_r.append(ref)
    return out_p, out_r


@pytest.mark.parametrize("task, rule", [("pope", "lmms-eval"), ("pope", "llava"), ("mme", "lmms-eval"),
                                        ("mmbench_en", "lmms-eval"), ("textvqa", "llava"), ("ocrbench", "lmms-eval"),
                                        ("videomme", "lmms-eval")])
def test_each_resample_is_the_official_scorer_on_the_resampled_units(task, rule):
    task_, preds, refs, _ = next(case for case in SMALL if case[0] == task and case[3] == rule)
    if task == "mme":  # two subtasks of several images, so that resamples differ
        preds, refs = mme("existence", 3, 5, start=10)  # MME_REFS' images are existence/1, /2
        more = mme("code_reasoning", 1, 3)
        preds, refs = preds + more[0] + MME_PREDS[:2], refs + more[1] + MME_REFS[:2]
    u = units(sample_outcomes(task, preds, refs, rule))
    values = bootstrap(u, resamples=20, seed=3)
    (_, counts), = resample_counts(u, 20, seed=3)
    for b in range(20):
        p, r = resampled(task, preds, refs, u, counts, b)
        assert values[b] == pytest.approx(score(task, p, r, rule)["score"], abs=1e-9), b


def test_the_interval_holds_the_score_and_a_fixed_seed_repeats_it():
    cases = [("gqa", *gqa(130, 200), "lmms-eval"), ("mmbench_en", *mmbench([i % 3 > 0 for i in range(90)]), "lmms-eval"),
             ("mme", *mme("existence", 30, 50), "llava")]
    rng = np.random.default_rng(0)
    gold = rng.choice(["yes", "no"], 600)
    answers = np.where(rng.random(600) < 0.8, gold, np.where(gold == "yes", "no", "yes"))
    refs = [{"answer": g, "category": ("random", "popular", "adversarial")[i % 3]} for i, g in enumerate(gold)]
    cases += [("pope", list(answers), refs, rule) for rule in ("lmms-eval", "llava")]
    for task, preds, refs, rule in cases:
        point = score(task, preds, refs, rule)["score"]
        low, high = score_interval(task, preds, refs, rule)
        assert low < point < high, task
        assert score_interval(task, preds, refs, rule) == (low, high)  # reproducible
        u = units(sample_outcomes(task, preds, refs, rule))
        assert np.array_equal(bootstrap(u), bootstrap(u)) and not np.array_equal(bootstrap(u, seed=1), bootstrap(u))


def test_it_shrinks_as_one_over_the_root_of_n():
    widths = [width(score_interval("gqa", *gqa(7 * n // 10, n))) for n in (100, 400, 1600)]
    assert 1.7 < widths[0] / widths[1] < 2.3 and 1.7 < widths[1] / widths[2] < 2.3


@pytest.mark.parametrize("hits", [100, 140, 180])
def test_a_plain_accuracy_gets_wilsons_interval_away_from_the_bounds_too(hits):
    low, high = score_interval("gqa", *gqa(hits, 200))
    w_low, w_high = (100 * x for x in wilson_interval(hits, 200))
    assert (low, high) == pytest.approx((w_low, w_high))


@pytest.mark.parametrize("hits, n", [(50, 50), (0, 50), (49, 50), (198, 200)])
def test_right_or_wrong_units_get_wilsons_interval_near_the_bounds(hits, n):
    """At 100% every resample is the same and a percentile bootstrap collapses to the point; Wilson's does not.
    OCRBench's headline counts points, and so does its interval."""
    low, high = score_interval("gqa", *gqa(hits, n))
    w_low, w_high = (100 * x for x in wilson_interval(hits, n))
    assert (low, high) == pytest.approx((w_low, w_high)) and high - low > 3
    preds, refs = gqa(hits, n)
    ocr_refs = [{"answer": r["answer"], "question_type": "Regular Text Recognition", "dataset": "IIIT5K"} for r in refs]
    assert score_interval("ocrbench", preds, ocr_refs) == pytest.approx((n * w_low / 100, n * w_high / 100))


def test_mmbench_resamples_whole_questions():
    """100 questions of 4 rotations each, every rotation right or every one wrong: 100 independent units, not
    400. The interval is that of a 60% accuracy on 100 samples, twice as wide as one on 400 rows would be."""
    preds, refs = mmbench([q < 60 for q in range(100)])
    u = units(sample_outcomes("mmbench_en", preds, refs))
    assert len(u) == 100
    got = width(score_interval("mmbench_en", preds, refs))
    per_question = width(score_interval("gqa", *gqa(60, 100)))
    per_row = width(score_interval("gqa", *gqa(240, 400)))
    assert got == pytest.approx(per_question, rel=0.15)
    assert got > 1.6 * per_row


def test_mme_keeps_image_pairs_together_within_their_subtask():
    """60 of 100 existence images with both questions right, 40 with both wrong; 50 count images all right.
    score = acc + acc+ per subtask = 2 x 100 x (share of images right) + 200: it moves in steps of 2 points
    (one image in a resample of exactly 100), and its width is twice that of a 60% accuracy on 100 samples;
    count stays at 200 in every resample."""
    p1, r1 = mme("existence", 60, 100)
    p2, r2 = mme("count", 50, 50)
    u = units(sample_outcomes("mme", p1 + p2, r1 + r2))
    assert len(u) == 150 and u.names == ("existence", "count")
    assert list(u.sizes) == [100, 50]
    values = bootstrap(u)
    steps = (values - 200) / 2
    assert np.allclose(steps, np.round(steps)) and values.min() >= 200
    assert score("mme", p1 + p2, r1 + r2)["score"] == 320
    assert width(percentile_interval(values)) == pytest.approx(2 * width(score_interval("gqa", *gqa(60, 100))),
                                                               rel=0.15)


@pytest.mark.parametrize("rule", ["lmms-eval", "llava"])
def test_pope_f1_interval_on_a_known_case(rule):
    """1000 answers: TP 400, FN 100, FP 100, TN 400: F1 = 0.8. By the delta method its standard error is
    sqrt(0.192 / 1000) = 1.39 points (gradient of 2a / (2a + b + c): 0.4 on TP, -0.8 on FP and FN), so the 95%
    interval is about 80 +- 2.7."""
    answers = ["Yes"] * 400 + ["No"] * 100 + ["Yes"] * 100 + ["No"] * 400
    gold = ["yes"] * 500 + ["no"] * 500
    refs = [{"answer": g, "category": "random"} for g in gold]
    assert score("pope", answers, refs, "llava")["score"] == pytest.approx(80.0)
    low, high = score_interval("pope", answers, refs, rule)
    assert low < 80 < high
    assert 80 - low == pytest.approx(2.72, rel=0.2) and high - 80 == pytest.approx(2.72, rel=0.2)
    assert score_interval("pope", gold, refs, rule) == (100.0, 100.0)  # every answer right: no resample differs


def test_the_normalized_average_is_paired_on_the_same_units():
    """A pruned config that differs from the unpruned one on a few answers: paired on the same resamples its
    normalized average is known to within a point; resampled independently (another seed), it would not be."""
    base_p, refs = gqa(600, 1000)
    pruned_p = ["no"] * 10 + base_p[10:]  # 10 answers fewer right: 98.3% of unpruned
    mme_base, mme_refs = mme("existence", 70, 100)
    base = {"gqa": units(sample_outcomes("gqa", base_p, refs)), "mme": units(sample_outcomes("mme", mme_base, mme_refs))}
    pruned = {"gqa": units(sample_outcomes("gqa", pruned_p, refs)), "mme": base["mme"]}
    paired_p, paired_b = ({t: bootstrap([pruned[t], base[t]])[i] for t in base} for i in (0, 1))
    low, high = normalized_interval(paired_p, paired_b)
    point = 100 * (590 / 600 + 1) / 2
    assert low < point < high and high - low < 1.5
    unpaired = normalized_interval({t: bootstrap(pruned[t], seed=1) for t in base}, paired_b)
    assert width(unpaired) > 3 * (high - low)
    assert normalized_interval(paired_b, paired_b) == (100.0, 100.0)
    zero = {t: np.zeros(1000) for t in base}
    assert normalized_interval(paired_p, zero) is None  # the ratio is undefined


def test_a_resample_draws_every_unit_alike_and_each_task_its_own_draws():
    """Units are drawn uniformly with replacement, as many as there are (each unit 1 time per resample on average,
    the last one too); a task's draws are its own (seeded by its name), so that the normalized average's interval
    does not reuse one benchmark's draws for another of the same size."""
    def counts(task, preds, refs):
        u = units(sample_outcomes(task, preds, refs))
        return np.concatenate([chunk[0] for _, chunk in resample_counts(u, 2000)])

    gqa_draws = counts("gqa", *gqa(2, 3))
    assert gqa_draws.shape == (2000, 3) and (gqa_draws.sum(axis=1) == 3).all()
    assert gqa_draws.mean(axis=0) == pytest.approx([1, 1, 1], abs=0.1)
    sqa_draws = counts("scienceqa_img", ["A"] * 3, [{"choices": ["x", "y"], "answer": 0}] * 3)
    assert not np.array_equal(gqa_draws, sqa_draws)
    assert np.array_equal(gqa_draws, counts("gqa", *gqa(1, 3)))  # the same task and units: the same draws


def test_the_normalized_interval_averages_each_benchmarks_ratio():
    """The normalized average is the mean of per-benchmark ratios, not a ratio of summed scores: MME's ~1800 points
    must not outweigh GQA's ~60."""
    pruned = {"gqa": np.array([30.0, 30.0]), "mme": np.array([1800.0, 1800.0])}
    unpruned = {"gqa": np.array([60.0, 60.0]), "mme": np.array([1800.0, 1800.0])}
    assert normalized_interval(pruned, unpruned) == pytest.approx((75.0, 75.0))  # (0.5 + 1.0) / 2
    assert normalized_interval({"gqa": pruned["gqa"]}, {"mme": unpruned["mme"]}) is None  # benchmarks differ


def test_a_soft_accuracy_gets_the_percentile_interval():
    """Wilson's interval is for units each right or wrong; TextVQA's per-answer accuracies (0, 1/3, 2/3, 0.9, 1)
    take the bootstrap's percentiles."""
    preds = ["a", "b", "c", "d"] * 5
    refs = [{"answers": ["a"] * 10}, {"answers": ["b"] * 2 + ["x"] * 8}, {"answers": ["c"] + ["x"] * 9},
            {"answers": ["x"] * 10}] * 5
    u = units(sample_outcomes("textvqa", preds, refs))
    assert not np.isin(u.values, (0, 1)).all()
    assert score_interval("textvqa", preds, refs) == pytest.approx(percentile_interval(bootstrap(u)))
