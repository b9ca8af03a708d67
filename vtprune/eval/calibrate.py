"""`vtprune calibrate --method clasp`: fit CLASP's per-class fusion weights and pivot splits by grid search.

Coordinate search per class on a calibration split (never the evaluation samples):
first the split with the model's own feature layer, then the fusion with that split.
Each step keeps its simplest setting (the even split; the model's own layer) unless another
answers more of the class's samples beyond chance (`beats`: a one-sided exact sign test on
the samples where the two disagree, p < 0.05 per comparison, not corrected for the several
tried); of those that do, the one answering most. With a hundred samples a class, a strict
"more correct" would fit the sample noise (one answer decides it).
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

from .runner import answered_right

SPLITS = (0.5, 0.25, 0.75, 1.0)  # the default first
SIGNIFICANCE = 0.05


def hits(model, processor, samples, prompt, budget, options) -> list[bool]:
    """Per sample, whether CLASP with these options answers it."""
    with torch.no_grad(), vtprune.apply(model, "clasp", budget, **options):
        return answered_right(model, processor, samples, prompt)


def beats(candidate: list[bool], incumbent: list[bool], alpha: float = SIGNIFICANCE) -> bool:
    """Whether candidate answers more of the same samples than incumbent beyond chance: the exact one-sided
    sign (McNemar) test on the samples only one of them answers."""
    disagreements = [c for c, i in zip(candidate, incumbent, strict=True) if c != i]
    wins, n = sum(disagreements), len(disagreements)
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n < alpha


def choose(settings: list, hits_of: dict) -> object:
    """settings[0] (the simplest), unless others beat it beyond chance: then the one of them answering most."""
    simplest = settings[0]
    better = [s for s in settings[1:] if beats(hits_of[s], hits_of[simplest])]
    return max(better, key=lambda s: sum(hits_of[s]), default=simplest)


def calibrate_clasp(model, processor, samples, prompt, budget: int, describe: dict) -> dict:
    """A calibration table (as JSON-ready dict) fitted on samples, which carry their class."""
    num_states = model.config.vision_config.num_hidden_layers + 1
    fusions = fusion_candidates(model.config.vision_feature_layer, num_states)
    by_class = {c: [s for s in samples if s.qclass == c] for c in CLASSES}
    by_class = {c: group for c, group in by_class.items() if group}
    classes, scores = {}, {}
    with tqdm(total=sum(len(SPLITS) + len(fusions) - 1 for _ in by_class), desc="calibrate clasp") as progress:
        for name, group in by_class.items():
            def score(fusion, split):
                entry = {"fusion": {str(k): v for k, v in fusion.items()} if fusion else None, "split": split}
                options = {"question_class": name, "calibration": {"classes": {name: entry}}}
                progress.update()
                return hits(model, processor, group, prompt, budget, options)

            by_split = {split: score(None, split) for split in SPLITS}
            split = choose(list(SPLITS), by_split)
            by_fusion = {0: by_split[split]} | {i: score(fusions[i], split) for i in range(1, len(fusions))}
            index = choose(list(by_fusion), by_fusion)
            fusion, best = fusions[index], by_fusion[index]
            classes[name] = {"fusion": {str(k): v for k, v in fusion.items()} if fusion else None, "split": split}
            scores[name] = sum(best) / len(best)
    return dict(describe, method="clasp", budget=budget, classes=classes, calibration_accuracy=scores)


def write_table(table: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")
