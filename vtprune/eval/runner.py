"""Runs a model over samples, unpruned and under each (method, budget), one JSONL record per sample."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import vtprune
from vtprune.engine import Pruner
from vtprune.engine.compat import takes_encoded_features

from .lock import hold
from .shards import Shard, read_all

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
    """Greedy one-word answers: the first generated token, through the processor as a user would, as text."""
    return _first_words(model, processor, _processed(model, processor, samples, prompt))


def _processed(model, processor, samples, prompt) -> dict:
    return processor(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                     return_tensors="pt", padding=True).to(model.device)


def _first_words(model, processor, inputs: dict) -> list[str]:
    logits = model(**inputs, logits_to_keep=1).logits[:, -1]
    # Decoded, not the token's name: a tokenizer that marks word starts (SentencePiece's "▁red", as every LLaVA-1.5
    # checkpoint's) names the token of the answer "red" (`tokenizer(answer)`, as the model was trained) "▁red".
    return [text.strip() for text in processor.tokenizer.batch_decode([[i] for i in logits.argmax(-1).tolist()])]


def answered_right(model, processor, samples, prompt, batch_size: int = 16) -> list[bool]:
    """Per synthetic sample, whether `predict` (in batches of batch_size) gives its answer."""
    right = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        right += [p == s.answer for p, s in zip(predict(model, processor, chunk, prompt), chunk)]
    return right


@dataclass
class Task:
    """What a run evaluates: its samples, how a batch of them is answered, and what each answer's record keeps."""

    samples: list
    # (a batch of samples, the pruner the model carries or None) -> one answer each; the runner answers a batch
    # under every config before the next batch
    answer: Callable[[list, Pruner | None], list[str]]
    fields: Callable[[object, str], dict]  # (sample, answer) -> the record's own fields beside config and index
    batch_of: Callable[[object], object] = lambda sample: None  # samples batched together share this (a benchmark)


class PerBatch:
    """What a batch's answers under every config share, made once: `make(samples)` for the batch the runner is on
    (it answers a batch under every config in turn). A batch is known by its samples' identity, so a resume's
    partial batch is a batch of its own."""

    def __init__(self, make: Callable[[list], object]):
        self.make = make
        self._samples: list = []
        self._value = None

    def __call__(self, samples: list):
        if len(samples) != len(self._samples) or any(a is not b for a, b in zip(samples, self._samples)):
            self._samples, self._value = list(samples), self.make(samples)
        return self._value


class SharedInputs:
    """A batch's inputs under each config, made once for all of them: the processed inputs (`processed(samples)`,
    on the model's device), and on transformers 5.23+, where they are pixels alone (LLaVA-1.5's; other families'
    encoders need their image sizes or grids too), the images encoded by the model's own tower, which the unpruned
    model and every pruner that leaves the tower alone (not `Pruner.reads_vision_tower`) get as
    mm_encoder_outputs: the same features, so the same answers, without running the tower again (on the reference
    model, ~11 of the ~15 ms a sample that a prefill at budget 64 takes)."""

    def __init__(self, model, processed: Callable[[list], Mapping]):
        self.encodes_ahead = model is not None and takes_encoded_features(model)
        self.processed = PerBatch(processed)
        self._encoded = PerBatch(lambda samples: model.get_image_features(
            pixel_values=self.processed(samples)["pixel_values"], return_dict=True))

    def __call__(self, samples: list, pruner: Pruner | None) -> Mapping:
        inputs = self.processed(samples)
        pixels_alone = set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
        if self.encodes_ahead and pixels_alone and not (pruner is not None and pruner.reads_vision_tower):
            inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
            inputs["mm_encoder_outputs"] = {"image": self._encoded(samples)}
        return inputs


class SyntheticAnswers:
    """`predict` for config after config on the same batch, its inputs shared (`SharedInputs`)."""

    def __init__(self, model, processor, prompt):
        self.model, self.processor = model, processor
        self.inputs = SharedInputs(model, lambda samples: _processed(model, processor, samples, prompt))

    def __call__(self, samples: list, pruner: Pruner | None) -> list[str]:
        return _first_words(self.model, self.processor, self.inputs(samples, pruner))


def synthetic_task(model, processor, samples, prompt) -> Task:
    """The reference model's synthetic VQA: first-token exact match, per question class."""
    return Task(
        samples,
        answer=SyntheticAnswers(model, processor, prompt),
        fields=lambda sample, answer: {"qclass": sample.qclass, "answer": sample.answer, "prediction": answer,
                                       "correct": answer == sample.answer},
    )


def evaluate(model, task: Task, configs: list[Config], out: Path, settings: dict, batch_size: int = 16,
             shard: Shard = Shard()) -> list[dict]:
    """Evaluate every config on every sample of this process's shard, skipping what out's results files already
    hold; returns every record of the folder once all processes are done.

    Another run evaluating into `out` at the same time is refused with FolderBusy (`lock.hold`).
    """
    names = [config.name for config in configs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"configs named twice: {', '.join(repeated)}; give each method and budget once")
    with hold(out, shard.lock_rank):
        _check_settings(Path(out), settings, shard)
        _evaluate(model, task, configs, Path(out), batch_size, shard)
        shard.wait_for_everyone()
        records = read_all(Path(out), _record_check(task, configs))
    _check_complete(records, configs, len(task.samples), shard)
    return records


def _check_complete(records: list[dict], configs: list[Config], count: int, shard: Shard) -> None:
    """Every config has every sample once all processes are done: a data-parallel run whose processes were given
    other configs would otherwise report each on the samples of the processes that ran it."""
    have = {config.name: 0 for config in configs}
    for record in records:
        if record["config"] in have:
            have[record["config"]] += 1
    short = [f"{name} ({n} of {count})" for name, n in have.items() if n < count]
    if short:
        processes = f" of its {shard.processes} processes" if shard.processes > 1 else ""
        raise ValueError(f"samples missing after every process finished: {', '.join(short)}; give each{processes} "
                         "the same --methods and --budgets, and run it again to complete them")


def _config_fields(config: Config) -> dict:
    return {"config": config.name, "method": config.label or config.method, "budget": config.budget}


def _record_check(task: Task, configs: list[Config]) -> Callable[[dict], str | None]:
    """What is wrong with a record of the folder, read back to resume or report this run (`shards.read_all`): a
    record missing a field stopped the report with a bare KeyError; one beyond the samples was silently scored."""
    by_name = {config.name: config for config in configs}
    return lambda record: _record_problem(record, task, by_name)


def _record_problem(record: dict, task: Task, configs: dict[str, Config]) -> str | None:
    """Whether the record is one this run would have written: a config's name, an index of its samples, a string
    prediction, and the fields it writes with the values it writes (`_fields_problem`)."""
    name, index, prediction, count = record["config"], record["index"], record["prediction"], len(task.samples)
    if not isinstance(name, str):
        return f"config {name!r} is not a config's name"
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        return f"index {index!r} is not one of this run's samples (0 to {count - 1})"
    if not isinstance(prediction, str):
        return f"prediction {prediction!r} is not a string"
    config = configs.get(name)  # None for a config an earlier run of the folder had and this one leaves out
    expected = {**task.fields(task.samples[index], prediction), **(_config_fields(config) if config else {})}
    return _fields_problem(record, expected, index)


def _fields_problem(record: dict, expected: dict, index: int) -> str | None:
    missing = [key for key in ("method", "budget", "equivalent_budget", *expected) if key not in record]
    if missing:
        return f"the record has no {', '.join(repr(key) for key in dict.fromkeys(missing))}"
    wrong = next((key for key, value in expected.items() if record[key] != value), None)
    if wrong is not None:
        return f"field {wrong!r} is {record[wrong]!r} where this run has {expected[wrong]!r} (sample {index})"
    equivalent = record["equivalent_budget"]
    if equivalent is not None and (isinstance(equivalent, bool) or not isinstance(equivalent, (int, float))):
        return f"equivalent_budget {equivalent!r} is not a number"
    return None


SETTINGS_FILE = "run.json"  # a run's settings, in its folder: what a resume is checked against


def _check_settings(out: Path, settings: dict, shard: Shard) -> None:
    """The folder's run.json (written by the first process) must equal these settings: a resume continues one run."""
    path = out / SETTINGS_FILE
    if shard.main and not path.exists():
        path.write_text(json.dumps(settings, indent=2))
    shard.wait_for_everyone()
    try:
        previous = json.loads(path.read_text())
        found = None if isinstance(previous, dict) else f"a JSON {type(previous).__name__}"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        found = f"invalid JSON ({error})"
    if found is not None:
        raise ValueError(f"{path}: holds {found}, not the settings of the run whose results the folder holds, so "
                         "a resume cannot be checked against them; pass another --out")
    if previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        code = " (versions: it was made by other code, vtprune's source included)" if "versions" in changed else ""
        raise ValueError(
            f"{out} holds a run with other settings ({', '.join(changed)}){code}: "
            f"{'; '.join(_difference(k, previous.get(k), settings.get(k)) for k in changed)}; resume it with the "
            "same arguments and code, or pass another --out"
        )


def _difference(key: str, then, now) -> str:
    """`key: THEN there, NOW now`, a dict's changed entries only, so that the user sees what to give back."""
    if isinstance(then, dict) and isinstance(now, dict):
        return "; ".join(_difference(f"{key}.{k}", then.get(k), now.get(k))
                         for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k))
    return f"{key}: {json.dumps(then)} there, {json.dumps(now)} now"


def _batches(indices: list[int], task: Task, size: int) -> list[list[int]]:
    """Consecutive indices, at most `size` a batch, never mixing samples whose batch_of differs."""
    batches = []
    for i in indices:
        if batches and len(batches[-1]) < size and task.batch_of(task.samples[i]) == task.batch_of(task.samples[batches[-1][0]]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _evaluate(model, task: Task, configs: list[Config], out: Path, batch_size: int, shard: Shard) -> None:
    results = shard.results(out)
    results.repair_tail()
    done = {(r["config"], r["index"]) for r in read_all(out, _record_check(task, configs))}
    mine = shard.mine(list(range(len(task.samples))))
    remaining = sum((c.name, i) not in done for c in configs for i in mine)
    desc = "eval" if shard.processes == 1 else f"eval {shard.rank + 1}/{shard.processes}"
    with tqdm(total=len(configs) * len(mine), initial=len(configs) * len(mine) - remaining, desc=desc) as progress:
        # Batch by batch, each under every config in turn: what a batch's answers share is made once (Task.answer).
        for chunk in _batches(mine, task, batch_size):
            for config in configs:
                todo = [i for i in chunk if (config.name, i) not in done]
                if not todo:
                    continue
                with _applied(model, config) as pruner, torch.no_grad():
                    answers = task.answer([task.samples[i] for i in todo], pruner)
                    stats = None if pruner is None else pruner.last_stats
                    results.append([
                        {**_config_fields(config), "index": i, **task.fields(task.samples[i], answer),
                         "equivalent_budget": None if stats is None else stats.sample_equivalent_budget(b)}
                        for b, (i, answer) in enumerate(zip(todo, answers))
                    ])
                progress.update(len(todo))


def _applied(model, config: Config) -> contextlib.AbstractContextManager[Pruner | None]:
    """The config's pruner, removed when the block ends (an error included); none for the unpruned model."""
    if config.method == UNPRUNED:
        return contextlib.nullcontext()
    return vtprune.apply(model, config.method, config.budget, **config.options)
