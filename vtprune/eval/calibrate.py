"""`vtprune calibrate --method clasp`: fit CLASP's per-class fusion weights and pivot splits by grid search.

Coordinate search per class on a calibration split (never the evaluation samples):
first the split with the model's own feature layer, then the fusion with that split.
A candidate replaces the setting found so far only when it answers more of the class's
samples beyond chance (`beats`: a one-sided exact sign test on the samples where the two
disagree, p < 0.05): with a hundred samples a class, a strict "more correct" would fit the
sample noise (one answer decides it), so ties and noise keep the simpler setting.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

import vtprune
from vtprune.methods.clasp import fusion_candidates
from vtprune.router import CLASSES

from .runner import predict

SPLITS = (0.5, 0.25, 0.75, 1.0)  # the default first: it wins ties
SIGNIFICANCE = 0.05


def hits(model, processor, samples, prompt, budget, options) -> list[bool]:
    """Per sample, whether CLASP with these options answers it."""
    with torch.no_grad(), vtprune.apply(model, "clasp", budget, **options):
        found = []
        for start in range(0, len(samples), 16):
            chunk = samples[start : start + 16]
            found += [p == s.answer for p, s in zip(predict(model, processor, chunk, prompt), chunk)]
    return found


def beats(candidate: list[bool], incumbent: list[bool], alpha: float = SIGNIFICANCE) -> bool:
    """Whether candidate answers more of the same samples than incumbent beyond chance: the exact one-sided
    sign (McNemar) test on the samples only one of them answers."""
    wins = sum(c and not i for c, i in zip(candidate, incumbent, strict=True))
    losses = sum(i and not c for c, i in zip(candidate, incumbent))
    disagreements = wins + losses
    chance = sum(math.comb(disagreements, k) for k in range(wins, disagreements + 1)) / 2 ** disagreements
    return wins > losses and chance < alpha


def calibrate_clasp(model, processor, samples, prompt, budget: int, describe: dict) -> dict:
    """A calibration table (as JSON-ready dict) fitted on samples, which carry their class."""
    num_states = model.config.vision_config.num_hidden_layers + 1
    fusions = fusion_candidates(model.config.vision_feature_layer, num_states)
    by_class = {c: [s for s in samples if s.qclass == c] for c in CLASSES}
    by_class = {c: group for c, group in by_class.items() if group}
    progress = tqdm(total=sum(len(SPLITS) + len(fusions) - 1 for _ in by_class), desc="calibrate clasp")
    classes, scores = {}, {}
    for name, group in by_class.items():
        def score(fusion, split):
            entry = {"fusion": {str(k): v for k, v in fusion.items()} if fusion else None, "split": split}
            options = {"question_class": name, "calibration": {"classes": {name: entry}}}
            progress.update()
            return hits(model, processor, group, prompt, budget, options)

        best_split, best = SPLITS[0], score(None, SPLITS[0])
        for split in SPLITS[1:]:
            found = score(None, split)
            if beats(found, best):
                best_split, best = split, found
        best_fusion = None
        for fusion in fusions[1:]:
            found = score(fusion, best_split)
            if beats(found, best):
                best_fusion, best = fusion, found
        classes[name] = {"fusion": {str(k): v for k, v in best_fusion.items()} if best_fusion else None,
                         "split": best_split}
        scores[name] = sum(best) / len(best)
    progress.close()
    return dict(describe, method="clasp", budget=budget, classes=classes, calibration_accuracy=scores)


def write_table(table: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")
