"""`vtprune calibrate --method clasp`: fit CLASP's per-class fusion weights and pivot splits by grid search.

Coordinate search per class on a calibration split (never the evaluation samples):
first the split with the model's own feature layer, then the fusion with that split.
A candidate replaces the default only when it is strictly better, so ties keep the
simpler setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

import vtprune
from vtprune.methods.clasp import fusion_candidates
from vtprune.router import CLASSES

from .runner import predict

SPLITS = (0.5, 0.25, 0.75, 1.0)  # the default first: it wins ties


def accuracy(model, processor, samples, prompt, budget, options) -> float:
    with torch.no_grad(), vtprune.apply(model, "clasp", budget, **options):
        hits = 0
        for start in range(0, len(samples), 16):
            chunk = samples[start : start + 16]
            hits += sum(p == s.answer for p, s in zip(predict(model, processor, chunk, prompt), chunk))
    return hits / len(samples)


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
            return accuracy(model, processor, group, prompt, budget, options)

        best_split, best = SPLITS[0], score(None, SPLITS[0])
        for split in SPLITS[1:]:
            found = score(None, split)
            if found > best:
                best_split, best = split, found
        best_fusion = None
        for fusion in fusions[1:]:
            found = score(fusion, best_split)
            if found > best:
                best_fusion, best = fusion, found
        classes[name] = {"fusion": {str(k): v for k, v in best_fusion.items()} if best_fusion else None,
                         "split": best_split}
        scores[name] = best
    progress.close()
    return dict(describe, method="clasp", budget=budget, classes=classes, calibration_accuracy=scores)


def write_table(table: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")
