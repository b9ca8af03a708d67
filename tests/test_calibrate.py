"""CLASP's calibration search: a setting replaces the simpler one only when it answers more beyond chance."""

from types import SimpleNamespace

import pytest

from vtprune.eval import calibrate
from vtprune.methods.clasp import fusion_candidates


def answers(right: int, total: int = 100, start: int = 0) -> list[bool]:
    """`right` answered samples out of `total`, the run of them starting at `start`."""
    return [start <= i < start + right for i in range(total)]


@pytest.mark.parametrize("candidate, incumbent, expected", [
    (answers(55), answers(50), True),  # 5 wins, no loss: p = 1/32
    (answers(54), answers(50), False),  # 4 wins: p = 1/16, could be chance
    (answers(60, start=0), answers(55, start=10), False),  # 10 wins, 5 losses: p = 0.15
    (answers(70, start=0), answers(55, start=20), True),  # 20 wins, 5 losses: p = 0.002
    (answers(50), answers(50), False),  # the same answers
    (answers(50), answers(55), False),  # fewer
])
def test_a_candidate_beats_the_incumbent_only_beyond_chance(candidate, incumbent, expected):
    assert calibrate.beats(candidate, incumbent) is expected


def test_the_sign_test_is_exact():
    # 6 wins and 1 loss among 7 disagreements: P(X >= 6 | 7, 1/2) = 8/128 = 0.0625
    candidate, incumbent = [True] * 6 + [False], [False] * 6 + [True]
    assert not calibrate.beats(candidate, incumbent)
    assert calibrate.beats(candidate, incumbent, alpha=0.063)
    assert not calibrate.beats(candidate, incumbent, alpha=8 / 128)  # significant means p strictly below alpha


def test_the_search_keeps_the_simpler_setting_unless_another_is_clearly_better(monkeypatch):
    """Per class: the split first (with the model's own layer), then the fusion at that split."""
    model = SimpleNamespace(config=SimpleNamespace(vision_feature_layer=-2, vision_config=SimpleNamespace(
        num_hidden_layers=8)))
    fusions = fusion_candidates(-2, 9)
    strategy_d = fusions[4]
    results = {  # (class, split, fusion index) -> answers of the class's 100 samples
        # 0.75 and 1.0 both beat the even split: the one answering most is taken, whichever was tried first
        ("count", 0.5, 0): answers(40), ("count", 0.25, 0): answers(30), ("count", 0.75, 0): answers(46),
        ("count", 1.0, 0): answers(50), ("count", 1.0, 4): answers(75),  # and then strategy D beats split 1.0 alone
        ("ocr", 0.5, 0): answers(90), ("ocr", 0.25, 0): answers(93), ("ocr", 0.75, 0): answers(92),
        ("ocr", 1.0, 0): answers(80), ("ocr", 0.5, 2): answers(94),  # 3-4 more: noise, the defaults stay
    }

    def fake_hits(model, processor, samples, prompt, budget, options):
        name = options["question_class"]
        entry = options["calibration"]["classes"][name]
        fusion = {int(k): v for k, v in entry["fusion"].items()} if entry["fusion"] else None
        return results.get((name, entry["split"], fusions.index(fusion)), answers(0))

    monkeypatch.setattr(calibrate, "hits", fake_hits)
    samples = [SimpleNamespace(qclass=name) for name in ("count", "ocr") for _ in range(100)]
    table = calibrate.calibrate_clasp(model, None, samples, None, 64, {"seed": 4})
    assert table["classes"]["count"] == {"fusion": {str(k): v for k, v in strategy_d.items()}, "split": 1.0}
    assert table["classes"]["ocr"] == {"fusion": None, "split": 0.5}
    assert table["calibration_accuracy"] == {"count": 0.75, "ocr": 0.90}


def test_the_search_tries_every_split_and_then_every_fusion_at_the_chosen_split(monkeypatch):
    model = SimpleNamespace(config=SimpleNamespace(vision_feature_layer=-2, vision_config=SimpleNamespace(
        num_hidden_layers=8)))
    fusions = fusion_candidates(-2, 9)
    tried = []

    def fake_hits(model, processor, samples, prompt, budget, options):
        entry = options["calibration"]["classes"][options["question_class"]]
        fusion = {int(k): v for k, v in entry["fusion"].items()} if entry["fusion"] else None
        tried.append((entry["split"], fusions.index(fusion)))
        return answers(90 if entry["split"] == 0.75 else 50)

    monkeypatch.setattr(calibrate, "hits", fake_hits)
    calibrate.calibrate_clasp(model, None, [SimpleNamespace(qclass="count")] * 100, None, 64, {})
    # the model's own layer (fusion 0) at each split, then each other fusion once at the split chosen (0.75)
    assert tried == [(split, 0) for split in calibrate.SPLITS] + [(0.75, i) for i in range(1, len(fusions))]
