"""`vtprune eval --model PATH --tasks pope,gqa --data DIR`: any supported checkpoint on local benchmark copies.

Each task's samples come from DIR/<task> (any format `loaders.load_benchmark` reads); prompts go
through the processor's chat template, answers are generated greedily up to the task's
lmms-eval length, batched with left padding (`generation.py`), and scored by the task's
official rule (`metrics.score`, lmms-eval's or LLaVA's). The run is the synthetic eval's:
resumable, sharded under `accelerate launch`, one JSON line per answer. Every score and normalized
average in the report carries its 95% interval (`intervals.py`: Wilson's for scores that count right
answers, else a percentile bootstrap over the benchmark's independent units, configs paired on the same
resamples).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .intervals import RESAMPLES, SEED, bootstrap, headline_interval, normalized_interval, units
from .loaders import TASKS, BenchmarkSample, load_benchmark
from .metrics import BadReference, normalized_average, sample_outcomes, score, score_outcomes
from .report import by_config, config_row, in_table_order, markdown, plot_accuracy_vs_budget, rich
from .runner import UNPRUNED, SharedInputs, Task

INTERVAL_NOTE = ("score [lo, hi]: the 95% interval; Wilson's where the score counts units each right or wrong (GQA, "
                 "ScienceQA, MMBench's questions, OCRBench's points), else a percentile bootstrap "
                 f"({RESAMPLES} resamples, seed {SEED}) over each benchmark's independent units (a sample; an MMBench "
                 "question with all its rotations; an MME image with its two questions); normalized: a percentile "
                 "bootstrap, every config resampled on the same units as the unpruned model.")


def task_folder(task: str, tasks: list[str], data: Path) -> Path:
    """Where a task's copy is: data/<task>; with a single task, data itself when it has no such folder."""
    folder = Path(data) / task
    return Path(data) if len(tasks) == 1 and not folder.exists() else folder


def load_tasks(tasks: list[str], data: Path, limit: int | None) -> list[BenchmarkSample]:
    """Every task's samples, task after task, each from its task_folder."""
    samples = []
    for task in tasks:
        folder = task_folder(task, tasks, data)
        if not folder.exists():
            raise ValueError(f"no {folder}: put your local copy of {task} there (a folder or file in any format "
                             f"`vtprune.eval.loaders` reads), or leave {task} out of --tasks")
        samples += load_benchmark(task, folder, limit)
    return samples


def check_references(samples: list[BenchmarkSample], scoring: str) -> None:
    """Run each task's metric over its references before any answer is generated, so that a row the scorer
    would refuse stops the run now, named by its file and row, and not after hours of generation."""
    for task in dict.fromkeys(s.task for s in samples):
        rows = [s for s in samples if s.task == task]
        try:
            score(task, [""] * len(rows), [s.reference for s in rows], scoring=scoring)
        except BadReference as bad:
            raise ValueError(f"{rows[bad.index].source}: {task}'s {scoring} scoring refuses this row: it "
                             f"{bad.problem}") from None


# Files hashed by name and size only: a video benchmark's videos (and the archives they came in) run to hundreds
# of GB, which a run must not read before its first answer; its questions and answers are in the tables.
_BY_SIZE = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".zip", ".tar")


def data_digests(tasks: list[str], data: Path, out: Path | None = None) -> dict[str, str]:
    """A SHA-256 per task over the names and bytes of every file of its copy (videos and archives: names and
    sizes), so a report says which data it scored; files under `out` (the run's own folder, which may lie inside
    the data folder) are left out, or the run would change its data by writing."""
    digests = {}
    outputs = out.resolve() if out is not None else None
    for task in tasks:
        root = task_folder(task, tasks, data)
        digest = hashlib.sha256()
        files = (p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
        for path in sorted(p for p in files if outputs is None or not p.resolve().is_relative_to(outputs)):
            digest.update(str(path.relative_to(root if root.is_dir() else root.parent)).encode() + b"\0")
            if path.suffix.lower() in _BY_SIZE:
                digest.update(str(path.stat().st_size).encode() + b"\0")
                continue
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        digests[task] = digest.hexdigest()[:16]
    return digests


def default_frames(model) -> int:
    """Frames per video as lmms-eval's model wrappers sample them: 8 for Video-LLaVA (its video tower's own
    count), 32 for the others (llava_onevision, qwen2_vl, qwen2_5_vl)."""
    return 8 if model.config.model_type == "video_llava" else 32


def benchmark_task(model, processor, samples: list[BenchmarkSample], max_new_tokens: int | None = None,
                   frames: int | None = None) -> Task:
    """Answers generated up to max_new_tokens, or each task's lmms-eval length when None; a video is shown as
    `frames` frames sampled uniformly (`videos.read_frames`; None: `default_frames`)."""
    from .generation import (batch_inputs, check_chat_template, check_takes_videos, decode_answers, generate_from,
                             on_model)
    from .videos import read_frames, shown_frames

    frames = frames or default_frames(model)
    check_takes_videos(processor, {s.task for s in samples if s.videos})
    check_chat_template(processor)  # before the run's folder records its settings: the fix then reruns in it

    def processed(chunk: list[BenchmarkSample]):
        videos = [[read_frames(path, frames) for path in s.videos] for s in chunk]
        return on_model(model, batch_inputs(processor, [s.question for s in chunk], [list(s.images) for s in chunk],
                                            videos=videos if any(videos) else None))

    inputs = SharedInputs(model, processed)  # a batch's videos read, its inputs processed (and encoded) once

    def answer(chunk: list[BenchmarkSample], pruner) -> list[str]:
        spec = TASKS[chunk[0].task]
        tokens = generate_from(model, processor, inputs(chunk, pruner), max_new_tokens or spec.max_new_tokens)
        return decode_answers(processor, tokens, spec.stop)

    # A batch's videos have one frame count (a short video gives fewer): some processors stack them.
    return Task(samples, answer, fields=lambda sample, text: {"task": sample.task, "id": sample.id, "prediction": text},
                batch_of=lambda sample: (sample.task, tuple(shown_frames(path, frames) for path in sample.videos)))


def summarize_benchmarks(records: list[dict], samples: list[BenchmarkSample], scoring: str,
                         resamples: int = RESAMPLES, seed: int = SEED) -> list[dict]:
    """One row per config with every task's official result, its headline score, and the normalized average
    (mean over tasks of score / unpruned score, x100) when the unpruned model ran every task and scored above 0
    on each (else the ratio is undefined: None).

    ``ci95`` holds each score's 95% interval and ``normalized_ci95`` the normalized average's (`intervals.py`),
    bootstrapped on the same resampled units for every config that answered the same samples, so a pruned
    config's ratio to the unpruned one is paired per resample. ``normalized_ci95`` is None where a task's
    samples differ from the unpruned model's, where a resample leaves an unpruned score at 0, and on the
    unpruned row (its 100 is a definition, not an estimate)."""
    tasks = list(dict.fromkeys(s.task for s in samples))
    rows, judged = [], {}
    for name, group in by_config(records).items():
        by_task = defaultdict(list)
        for record in sorted(group, key=lambda r: r["index"]):
            by_task[record["task"]].append(record)
        outcomes = {task: sample_outcomes(task, [r["prediction"] for r in by_task[task]],
                                          [samples[r["index"]].reference for r in by_task[task]], scoring)
                    for task in tasks if by_task[task]}  # every answer judged once, for the score and its interval
        results = {task: score_outcomes(o) for task, o in outcomes.items()}
        judged[name] = {task: (tuple(r["index"] for r in by_task[task]), units(o)) for task, o in outcomes.items()}
        rows.append({**config_row(name, group), "samples": {task: len(by_task[task]) for task in tasks},
                     "results": results, "scores": {task: result["score"] for task, result in results.items()}})
    boots = _bootstraps(judged, tasks, resamples, seed)
    base = next((row for row in rows if row["method"] == UNPRUNED), None)
    for row in rows:
        name = row["config"]
        row["ci95"] = {task: headline_interval(judged[name][task][1], boots[name, task]) for task in row["scores"]}
        complete = base is not None and set(row["scores"]) == set(base["scores"]) == set(tasks) and all(
            base["scores"].values())
        row["normalized"] = 100 * normalized_average(row["scores"], base["scores"]) if complete else None
        paired = complete and row is not base and all(
            judged[name][task][0] == judged[base["config"]][task][0] for task in tasks)
        row["normalized_ci95"] = normalized_interval({task: boots[name, task] for task in tasks},
                                                     {task: boots[base["config"], task] for task in tasks}) \
            if paired else None
    return in_table_order(rows)


def _bootstraps(judged: dict, tasks: list[str], resamples: int, seed: int) -> dict:
    """{(config, task): the headline of each resample}; configs that answered the same samples of a task share
    one draw of its units (paired, and drawn once)."""
    boots = {}
    for task in tasks:
        same: dict[tuple, list[str]] = defaultdict(list)
        for name, per_task in judged.items():
            if task in per_task:
                same[per_task[task][0]].append(name)
        for names in same.values():
            for name, values in zip(names, bootstrap([judged[n][task][1] for n in names], resamples, seed)):
                boots[name, task] = values
    return boots


def _with_interval(value: float, interval) -> str:
    return f"{value:.1f}" if interval is None else f"{value:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"


def _cells(row: dict, tasks: list[str]) -> list[str]:
    equivalent = "-" if row["equivalent_budget"] is None else f"{row['equivalent_budget']:.0f}"
    normalized = "-" if row["normalized"] is None else _with_interval(row["normalized"], row.get("normalized_ci95"))
    return [row["config"], equivalent,
            *(_with_interval(row["scores"][t], row.get("ci95", {}).get(t)) if t in row["scores"] else "-"
              for t in tasks), normalized]


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    tasks = list(dict.fromkeys(task for row in rows for task in row["scores"]))
    return ["config", "eq. budget", *tasks, "normalized"], [_cells(row, tasks) for row in rows]


def benchmark_markdown(rows: list[dict]) -> str:
    return markdown(*_table(rows)) + "\n" + INTERVAL_NOTE + "\n"


def benchmark_table(rows: list[dict], title: str) -> Table:
    return rich(*_table(rows), title, caption=escape(INTERVAL_NOTE))  # rich would read "[lo, hi]" as markup


def plot_normalized(rows: list[dict], path: Path, title: str) -> bool:
    """The normalized average against the budget at path, where any config has one (it needs the unpruned config's
    score, above 0, on every task; an empty plot would read as a failed run); whether it was drawn."""
    if all(row["normalized"] is None for row in rows):
        return False
    plot_accuracy_vs_budget(rows, path, title, value=lambda row: row["normalized"],
                            interval=lambda row: row["normalized_ci95"] or (row["normalized"],) * 2,
                            ylabel="normalized average (% of unpruned), bars: 95% interval")
    return True
