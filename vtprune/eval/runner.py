"""Runs a model over samples, unpruned and under each (method, budget), one JSONL record per sample."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import vtprune

from .lock import hold
from .records import ResultsFile

UNPRUNED = "unpruned"


@dataclass(frozen=True)
class Config:
    method: str  # a registered method, or UNPRUNED for the model as it is
    budget: int | float | None = None
    options: dict = field(default_factory=dict, hash=False, compare=False)
    label: str = ""  # how reports name it: the method, with any options given on the command line

    @property
    def name(self) -> str:
        return self.method if self.method == UNPRUNED else f"{self.label or self.method}@{self.budget}"


def predict(model, processor, samples, prompt) -> list[str]:
    """Greedy one-word answers: the first generated token, through the processor as a user would."""
    inputs = processor(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                       return_tensors="pt", padding=True).to(model.device)
    logits = model(**inputs, logits_to_keep=1).logits[:, -1]
    return processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())


def evaluate(model, processor, samples, configs: list[Config], out: Path, prompt, settings: dict,
             batch_size: int = 16) -> list[dict]:
    """Evaluate every config on every sample, skipping what out/results.jsonl already holds.

    Another process evaluating into `out` at the same time is refused with FolderBusy.
    """
    names = [config.name for config in configs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"configs named twice: {', '.join(repeated)}; give each method and budget once")
    with hold(out):
        return _evaluate(model, processor, samples, configs, Path(out), prompt, settings, batch_size)


def _evaluate(model, processor, samples, configs: list[Config], out: Path, prompt, settings: dict,
              batch_size: int) -> list[dict]:
    settings_path = out / "run.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(changed)}); resume it with the same "
                "arguments, or pass another --out"
            )
    else:
        settings_path.write_text(json.dumps(settings, indent=2))
    results = ResultsFile(out / "results.jsonl")
    results.repair_tail()
    records = results.read()
    done = {(r["config"], r["index"]) for r in records}
    remaining = sum((c.name, i) not in done for c in configs for i in range(len(samples)))
    progress = tqdm(total=len(configs) * len(samples), initial=len(configs) * len(samples) - remaining, desc="eval")
    for config in configs:
        indices = [i for i in range(len(samples)) if (config.name, i) not in done]
        pruner = None if config.method == UNPRUNED else vtprune.apply(model, config.method, config.budget, **config.options)
        try:
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                with torch.no_grad():
                    predictions = predict(model, processor, [samples[i] for i in chunk], prompt)
                stats = pruner.last_stats if pruner else None
                batch = []
                for b, (i, prediction) in enumerate(zip(chunk, predictions)):
                    sample = samples[i]
                    batch.append({
                        "config": config.name, "method": config.label or config.method, "budget": config.budget, "index": i,
                        "qclass": sample.qclass, "answer": sample.answer, "prediction": prediction,
                        "correct": prediction == sample.answer,
                        "equivalent_budget": None if stats is None else stats.sample_equivalent_budget(b),
                    })
                results.append(batch)
                records += batch
                progress.update(len(chunk))
        finally:
            if pruner is not None:
                pruner.remove()
    progress.close()
    return records
