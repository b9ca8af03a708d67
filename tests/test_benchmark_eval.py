"""`vtprune eval --model PATH --tasks ... --data DIR`: a saved checkpoint on local benchmark copies, end to end."""

import json
import re
from collections.abc import Mapping

import pytest
import torch

from vtprune import cli
import vtprune
from vtprune.engine.compat import takes_encoded_features
from vtprune.eval import Config, evaluate
from vtprune.eval.benchmark_eval import (benchmark_markdown, benchmark_table, benchmark_task, check_references,
                                         summarize_benchmarks)
from vtprune.eval.intervals import bootstrap, headline_interval, normalized_interval, units
from vtprune.eval.loaders import BenchmarkSample, load_benchmark
from vtprune.eval.metrics import normalized_average, sample_outcomes, score
from vtprune.eval.shards import read_all
from vtprune.tiny import tiny_llava
from vtprune.tiny_processors import tiny_processor

from .test_loaders import mme_release, pope_llava


LLAVA_TEMPLATE = (
    "{% for message in messages %}USER: {% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaVA saved as a user's checkpoint is, with a chat template (its answers are arbitrary text)."""
    path = tmp_path_factory.mktemp("checkpoint")
    model = tiny_llava("sdpa")
    processor = tiny_processor(model)
    processor.chat_template = LLAVA_TEMPLATE
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    pope_llava(root / "pope")  # LLaVA's coco_pope files
    mme_release(root / "mme")  # MME's release folder
    return root


def run(checkpoint, data, out, *extra):
    return cli.main(["eval", "--model", str(checkpoint), "--tasks", "pope,mme", "--data", str(data), "--methods",
                     "random", "--budgets", "8", "--batch", "3", "--out", str(out), *extra])


def test_each_task_is_scored_by_its_official_rule_and_resumes(checkpoint, data, tmp_path):
    assert run(checkpoint, data, tmp_path, "--scoring", "llava") == 0
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {row["config"]: row for row in report["rows"]}
    assert set(rows) == {"unpruned", "random@8"}
    records = read_all(tmp_path)
    samples = {task: load_benchmark(task, data / task) for task in ("pope", "mme")}
    for name, row in rows.items():
        scores = {}
        for task, references in samples.items():
            answers = {r["id"]: r["prediction"] for r in records if r["config"] == name and r["task"] == task}
            assert sorted(answers) == sorted(s.id for s in references)  # every sample answered once
            scores[task] = score(task, [answers[s.id] for s in references], [s.reference for s in references],
                                 scoring="llava")
        assert row["scores"] == {task: result["score"] for task, result in scores.items()}
        base = rows["unpruned"]["scores"]
        if all(base.values()):
            assert row["normalized"] == pytest.approx(100 * normalized_average(scores, base))
        else:  # a random tiny model may score 0 unpruned: the ratio is undefined, not a division error
            assert row["normalized"] is None
    assert rows["random@8"]["equivalent_budget"] == 8
    for row in rows.values():  # every score carries its interval, in results.json and results.md
        assert set(row["ci95"]) == {"pope", "mme"}
        assert all(low <= row["scores"][task] <= high for task, (low, high) in row["ci95"].items())
    assert "score [lo, hi]: the 95% interval" in (tmp_path / "results.md").read_text()
    settings = report["settings"]
    assert "percentile bootstrap" in settings["intervals"]
    assert settings["tasks"] == ["pope", "mme"] and settings["scoring"] == "llava"
    assert set(settings["data"]) == {"pope", "mme"} and "transformers" in settings["versions"]
    plot = tmp_path / "results_normalized_vs_budget.png"
    # drawn where the normalized average is defined: an empty plot would read as a failed run
    assert plot.exists() == all(base.values())

    lines = sum(1 for _ in (tmp_path / "results.jsonl").open())
    plot.touch()  # an earlier run's plot (another scoring rule) is not left standing for these scores
    assert run(checkpoint, data, tmp_path, "--scoring", "llava") == 0  # a rerun finds everything done
    assert plot.exists() == all(base.values())
    assert sum(1 for _ in (tmp_path / "results.jsonl").open()) == lines
    assert run(checkpoint, data, tmp_path, "--scoring", "lmms-eval") == 0  # the other rule scores the same answers
    assert sum(1 for _ in (tmp_path / "results.jsonl").open()) == lines
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["scoring"] == "lmms-eval"


def test_a_run_inside_its_data_folder_resumes(checkpoint, data, tmp_path):
    """The data's digest leaves out the run's own folder: writing results there does not change the data."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    assert run(checkpoint, copy, copy / "out", "--limit", "2") == 0
    lines = sum(1 for _ in (copy / "out" / "results.jsonl").open())
    assert run(checkpoint, copy, copy / "out", "--limit", "2") == 0
    assert sum(1 for _ in (copy / "out" / "results.jsonl").open()) == lines


def test_a_resume_on_changed_code_is_refused(checkpoint, data, tmp_path, monkeypatch):
    assert run(checkpoint, data, tmp_path, "--limit", "2") == 0
    monkeypatch.setattr(cli, "_source_digest", lambda: "edited")
    with pytest.raises(SystemExit, match=r"other settings \(versions\).*other code"):
        run(checkpoint, data, tmp_path, "--limit", "2")


def test_a_resume_with_another_chat_template_or_clasp_table_is_refused(checkpoint, data, tmp_path):
    """What the model answers depends on more than its weights: a changed template or CLASP table is another run."""
    import shutil

    model = shutil.copytree(checkpoint, tmp_path / "model")
    assert run(model, data, tmp_path / "out", "--limit", "2") == 0
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("USER: ", "USER:  "))
    with pytest.raises(SystemExit, match=r"other settings \(model\)"):
        run(model, data, tmp_path / "out", "--limit", "2")
    assert run(model, data, tmp_path / "out2", "--limit", "2") == 0
    (model / "clasp_calibration.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"other settings \(clasp_calibration\)"):
        run(model, data, tmp_path / "out2", "--limit", "2")


def test_the_model_id_follows_every_file_but_notes_and_samples_large_ones(tmp_path):
    folder = tmp_path / "a" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    shard = folder / "model-00001-of-00002.safetensors"
    with shard.open("wb") as handle:  # 80 MiB, sparse: hashed by its size and 16 spread blocks
        handle.truncate(80 * 2**20)
    first = cli._model_id(folder)
    assert first.startswith("model ") and cli._model_id(folder) == first
    (folder / "README.md").write_text("notes")
    (folder / "clasp_calibration.json").write_text("{}")  # recorded apart
    assert cli._model_id(folder) == first
    (tmp_path / "a").rename(tmp_path / "b")  # the same model elsewhere
    folder = tmp_path / "b" / "model"
    assert cli._model_id(folder) == first
    with (folder / shard.name).open("r+b") as handle:
        handle.seek(79 * 2**20)
        handle.write(b"\1")  # in the last block
    changed = cli._model_id(folder)
    assert changed != first
    (folder / "tokenizer_config.json").write_text("{}")
    assert cli._model_id(folder) not in (first, changed)


def test_the_data_digest_reads_the_questions_names_the_videos_and_leaves_the_run_out(tmp_path):
    """A video counts by its name and size (a benchmark's videos run to hundreds of GB, read before any answer
    otherwise), whatever its suffix's case; every other file by its bytes; the run's own folder not at all, even
    inside the single task's folder."""
    from vtprune.eval.benchmark_eval import data_digests

    (tmp_path / "test.parquet").write_bytes(b"questions")
    (tmp_path / "a.mp4").write_bytes(b"x" * 10)
    (tmp_path / "b.MP4").write_bytes(b"x" * 10)
    digest = lambda: data_digests(["videomme"], tmp_path, tmp_path / "out")  # noqa: E731
    first = digest()
    (tmp_path / "a.mp4").write_bytes(b"y" * 10)
    (tmp_path / "b.MP4").write_bytes(b"y" * 10)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text("{}\n")
    assert digest() == first
    (tmp_path / "a.mp4").rename(tmp_path / "c.mp4")
    assert digest() != first
    (tmp_path / "c.mp4").rename(tmp_path / "a.mp4")
    (tmp_path / "test.parquet").write_bytes(b"questionz")
    assert digest() != first


def test_videos_get_the_frames_the_familys_lmms_eval_model_takes():
    from types import SimpleNamespace

    from vtprune.eval.benchmark_eval import default_frames

    frames = {family: default_frames(SimpleNamespace(config=SimpleNamespace(model_type=family)))
              for family in ("video_llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl")}
    assert frames == {"video_llava": 8, "llava_onevision": 32, "qwen2_vl": 32, "qwen2_5_vl": 32}


def test_the_normalized_plot_draws_the_unpruned_point_without_a_bar_and_no_plot_without_a_point(tmp_path,
                                                                                                 monkeypatch):
    import vtprune.eval.benchmark_eval as benchmark_eval

    drawn = {}
    monkeypatch.setattr(benchmark_eval, "plot_accuracy_vs_budget", lambda rows, path, title, value, interval, ylabel:
                        drawn.update({row["config"]: (value(row), interval(row)) for row in rows}))
    rows = [{"config": "unpruned", "normalized": 100.0, "normalized_ci95": None},  # a definition, not an estimate
            {"config": "random@8", "normalized": 80.0, "normalized_ci95": (70.0, 90.0)}]
    assert benchmark_eval.plot_normalized(rows, tmp_path / "p.png", "t")
    assert drawn == {"unpruned": (100.0, (100.0, 100.0)), "random@8": (80.0, (70.0, 90.0))}
    drawn.clear()
    undefined = [dict(row, normalized=None, normalized_ci95=None) for row in rows]
    assert not benchmark_eval.plot_normalized(undefined, tmp_path / "p.png", "t") and not drawn


def test_the_source_digest_follows_every_file(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = cli._source_digest(tmp_path)
    assert cli._source_digest(tmp_path) == first and len(first) == 16
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert cli._source_digest(tmp_path) != first
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    assert cli._source_digest(tmp_path) == first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")
    assert cli._source_digest(tmp_path) != first


def test_a_missing_task_copy_and_the_synthetic_only_flags_are_refused(checkpoint, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(checkpoint), "--tasks", "pope", "--out", str(tmp_path)])
    assert "--tasks and --data go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the benchmark-only flags on the synthetic default would be ignored
        cli.main(["eval", "--limit", "5", "--frames", "4", "--out", str(tmp_path)])
    assert "--limit, --frames are for real benchmarks (--tasks, --data); the synthetic benchmark's settings are " \
        "--samples and --seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # and the synthetic-only ones on real benchmarks
        cli.main(["eval", "--model", str(checkpoint), "--tasks", "pope", "--data", str(data), "--samples", "50",
                  "--seed", "7", "--out", str(tmp_path)])
    assert "--samples, --seed are for the synthetic benchmark; with --tasks, --limit takes" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--frames: no sample of pope has a video; leave it out"):
        cli.main(["eval", "--model", str(checkpoint), "--tasks", "pope", "--data", str(data), "--frames", "4",
                  "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(checkpoint), "--tasks", "popee", "--data", str(data)])
    assert "unknown task 'popee'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no .*gqa: put your local copy of gqa there"):
        cli.main(["eval", "--model", str(checkpoint), "--tasks", "gqa,pope", "--data", str(data), "--out", str(tmp_path)])


def test_a_row_the_scorer_would_refuse_stops_the_run_before_any_answer(checkpoint, tmp_path):
    """MME scores each image's pair of questions: an image with one is named by its file and line before any
    answer is generated (no results file is written)."""
    release = mme_release(tmp_path / "data" / "mme")
    (release / "code_reasoning" / "0020.txt").write_text("Is the output 3? Please answer yes or no.\tNo\n")
    with pytest.raises(SystemExit, match=r"code_reasoning/0020.txt line 1: mme's lmms-eval scoring refuses this "
                                         r"row: it is one of 1 questions on image"):
        cli.main(["eval", "--model", str(checkpoint), "--tasks", "mme", "--data", str(tmp_path / "data"),
                  "--methods", "random", "--budgets", "8", "--out", str(tmp_path / "out")])
    assert not list((tmp_path / "out").glob("results*.jsonl"))


def test_check_references_follows_the_scoring_rule():
    rows = [BenchmarkSample("textvqa", str(i), (), "?", {"answers": ["a"] * n}, f"val.json data[{i}]")
            for i, n in enumerate((10, 9))]
    check_references(rows, "lmms-eval")  # lmms-eval scores any number of answers
    with pytest.raises(ValueError, match=re.escape("val.json data[1]: textvqa's llava scoring refuses this row: "
                                                   "it has 9 answers; the llava rule (m4c) needs 10")):
        check_references(rows, "llava")


def test_a_single_task_may_be_given_its_own_folder(checkpoint, data, tmp_path):
    assert cli.main(["eval", "--model", str(checkpoint), "--tasks", "pope", "--data", str(data / "pope"), "--methods",
                     "random", "--budgets", "8", "--out", str(tmp_path)]) == 0
    assert len(read_all(tmp_path)) == 2 * 5  # unpruned and random@8 on POPE's 5 questions


def test_a_checkpoint_refused_for_its_missing_chat_template_runs_in_the_same_folder_once_given_one(data, tmp_path):
    """The refusal comes before the folder records the run's settings (which named the model without its
    template, so the fixed checkpoint was refused there as another model)."""
    path = tmp_path / "checkpoint"
    model = tiny_llava("sdpa")
    model.save_pretrained(path)
    tiny_processor(model).save_pretrained(path)
    command = ["eval", "--model", str(path), "--tasks", "pope", "--data", str(data / "pope"), "--methods", "random",
               "--budgets", "8", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="has no chat template"):
        cli.main(command)
    (path / "chat_template.jinja").write_text(LLAVA_TEMPLATE)
    assert cli.main(command) == 0


def test_a_config_the_model_refuses_is_listed_in_both_reports(checkpoint, data, tmp_path, monkeypatch):
    import vtprune.api

    reason = "tome cannot merge 64 patches down to 2 in 3 blocks"  # (what ToMe says on a shallow tower)
    monkeypatch.setattr(vtprune.api, "refusal", lambda model, method, budget, **_: reason if method == "tome" else None)
    assert cli.main(["eval", "--model", str(checkpoint), "--tasks", "pope", "--data", str(data / "pope"), "--methods",
                     "random,tome", "--budgets", "2", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["not_run"] == {"tome@2": reason}
    assert f"Not run: tome@2: {reason}" in (tmp_path / "results.md").read_text()


def test_the_reference_model_answers_the_synthetic_task_written_as_ocrbench(tmp_path):
    """The whole path (files, loader, chat template, generation, scoring, report) on a model that answers: its
    answers equal the synthetic eval's own, unpruned and pruned, and it gets nearly all of them right."""
    import torch

    import vtprune
    from vtprune.eval.runner import predict
    from vtprune.synth import generate
    from vtprune.synth.export import write_as_ocrbench
    from vtprune.synth.reference import REFERENCE_DIR, load_reference, prompt

    samples = generate(3, 24)
    write_as_ocrbench(samples, tmp_path / "data" / "ocrbench")
    assert cli.main(["eval", "--model", str(REFERENCE_DIR), "--tasks", "ocrbench", "--data", str(tmp_path / "data"),
                     "--methods", "fastv", "--budgets", "64", "--max-new-tokens", "1", "--batch", "8",
                     "--out", str(tmp_path / "out")]) == 0
    rows = {row["config"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert rows["unpruned"]["scores"]["ocrbench"] >= 22  # points: one per question answered right
    assert (tmp_path / "out" / "results_normalized_vs_budget.png").stat().st_size > 10_000
    model, processor = load_reference()
    records = read_all(tmp_path / "out")
    for config, method in (("unpruned", None), ("fastv@64", "fastv")):
        with torch.no_grad(), (vtprune.apply(model, method, 64) if method else torch.no_grad()):
            expected = predict(model, processor, samples, prompt)
        got = [r["prediction"] for r in sorted((r for r in records if r["config"] == config), key=lambda r: r["index"])]
        assert got == expected, config


def test_the_report_shows_each_score_with_its_interval_and_pairs_the_normalized_average():
    """Two tasks, the unpruned model and a pruned config that loses a few POPE answers: each score in the
    table reads "score [lo, hi]", the normalized average's interval comes from the two configs bootstrapped
    on the same units, and results.json's rows carry both."""
    gold = ["yes", "no"] * 150
    samples = [BenchmarkSample("pope", f"p{i}", (), "?", {"answer": g, "category": ("random", "popular")[i // 2 % 2]})
               for i, g in enumerate(gold)]
    samples += [BenchmarkSample("gqa", f"g{i}", (), "?", {"answer": "cat"}) for i in range(200)]
    base = [g if i % 10 else "no" for i, g in enumerate(gold)] + ["cat" if i % 4 else "dog" for i in range(200)]
    pruned = [a if i >= 30 else ("no" if a == "yes" else "yes") for i, a in enumerate(base[:300])] + base[300:]

    def records(config, method, budget, answers):
        return [{"config": config, "method": method, "budget": budget, "index": i, "task": s.task, "id": s.id,
                 "prediction": a, "equivalent_budget": budget} for i, (s, a) in enumerate(zip(samples, answers))]

    rows = summarize_benchmarks(records("unpruned", "unpruned", None, base) + records("random@8", "random", 8, pruned),
                                samples, "lmms-eval")
    by = {row["config"]: row for row in rows}
    for name, answers in (("unpruned", base), ("random@8", pruned)):
        for task, lo in (("pope", 0), ("gqa", 300)):
            refs = [s.reference for s in samples[lo:lo + (300 if task == "pope" else 200)]]
            got = units(sample_outcomes(task, answers[lo:lo + len(refs)], refs))
            assert by[name]["ci95"][task] == headline_interval(got, bootstrap(got))
    low, high = by["random@8"]["ci95"]["pope"]
    assert low < by["random@8"]["scores"]["pope"] < high
    paired = {name: {task: bootstrap(units(sample_outcomes(task, [r["prediction"] for r in recs if r["task"] == task],
                                                           [samples[r["index"]].reference for r in recs
                                                            if r["task"] == task])))
                     for task in ("pope", "gqa")}
              for name, recs in (("unpruned", records("u", "u", None, base)), ("random@8", records("r", "r", 8, pruned)))}
    assert by["random@8"]["normalized_ci95"] == normalized_interval(paired["random@8"], paired["unpruned"])
    n_low, n_high = by["random@8"]["normalized_ci95"]
    assert n_low < by["random@8"]["normalized"] < n_high < 100  # fewer POPE answers right: below the unpruned
    assert by["unpruned"]["normalized_ci95"] is None  # 100 by definition

    table = benchmark_markdown(rows)
    row = by["random@8"]
    cells = [f"{row['scores'][t]:.1f} [{row['ci95'][t][0]:.1f}, {row['ci95'][t][1]:.1f}]" for t in ("pope", "gqa")]
    assert f"| random@8 | 8 | {cells[0]} | {cells[1]} | {row['normalized']:.1f} [{n_low:.1f}, {n_high:.1f}] |" in table
    assert "| unpruned | - | " in table and "score [lo, hi]: the 95% interval" in table
    json.loads(json.dumps(rows))  # results.json carries them
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(benchmark_table(rows, "t"))
    text = console.export_text()
    assert cells[0] in text and "score [lo, hi]: the 95% interval" in text  # the caption's brackets are not markup


VIDEO_TEMPLATE = (
    "{% for message in messages %}USER: {% for part in message['content'] %}{% if part['type'] == 'video' %}"
    "<video>\n{% elif part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endfor %} ASSISTANT:")


def test_videomme_is_asked_with_its_frames_and_pruned(tmp_path, monkeypatch):
    """Each question reaches the model with its video's frames (as many as asked, sampled by `read_frames`), the
    pruner keeps its budget of the video's tokens, and a checkpoint that takes no videos is refused up front."""
    from vtprune.eval import benchmark_eval, videos
    from vtprune.tiny import tiny_video_llava

    from .test_loaders import videomme_rows, write_parquet, write_video

    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", videomme_rows())
    for name in ("fFjv93ACGo8", "xyz"):
        write_video(tmp_path / "data" / f"{name}.mp4")
    samples = load_benchmark("videomme", tmp_path)
    check_references(samples, "lmms-eval")
    model = tiny_video_llava("sdpa")
    processor = tiny_processor(model)
    processor.chat_template = VIDEO_TEMPLATE
    read, original = [], videos.read_frames

    def spy(path, count):
        read.append((path.name, count))
        return original(path, count)

    monkeypatch.setattr(videos, "read_frames", spy)
    task = benchmark_task(model, processor, samples, max_new_tokens=2, frames=4)
    with vtprune.apply(model, "random", 8) as pruner:
        answers = task.answer(samples, pruner)
        assert pruner.last_stats.kept_per_sample == [8, 8, 8]
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert read == [("fFjv93ACGo8.mp4", 4), ("fFjv93ACGo8.mp4", 4), ("xyz.mp4", 4)]
    with pytest.raises(ValueError, match=r"videomme asks about videos, but this checkpoint's processor "
                                         r"\(LlavaProcessor\) takes none"):
        benchmark_eval.benchmark_task(tiny_llava("sdpa"), tiny_processor(tiny_llava("sdpa")), samples)


def test_videos_of_other_frame_counts_are_batched_apart(tmp_path):
    """A video shorter than the frames asked for gives fewer, and Video-LLaVA's processor stacks a batch's videos
    into one tensor: such samples run in batches of their own, each pruned and its equivalent budget counted."""
    from vtprune.tiny import tiny_video_llava

    from .test_loaders import videomme_rows, write_parquet, write_video

    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", videomme_rows())
    write_video(tmp_path / "data" / "fFjv93ACGo8.mp4", frames=10)
    write_video(tmp_path / "data" / "xyz.mp4", frames=3)
    samples = load_benchmark("videomme", tmp_path)
    model = tiny_video_llava("sdpa")
    processor = tiny_processor(model)
    processor.chat_template = VIDEO_TEMPLATE
    task = benchmark_task(model, processor, samples, max_new_tokens=2, frames=4)
    assert [task.batch_of(sample) for sample in samples] == [("videomme", (4,))] * 2 + [("videomme", (3,))]
    records = evaluate(model, task, [Config("random", 8)], tmp_path / "out", {}, batch_size=3)
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    assert all(r["equivalent_budget"] is not None for r in records)


def tensors(value):
    """Every tensor in the inputs of a generate call (nested in mm_encoder_outputs' model outputs too)."""
    if isinstance(value, torch.Tensor):
        return [value]
    children = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else []
    return [tensor for child in children for tensor in tensors(child)]


def counting_calls(monkeypatch) -> dict:
    """Counts the runner's videos read (`read`) and batches processed (`processed`), and checks that no config's
    generate changes the inputs the next config is given."""
    from vtprune.eval import generation, videos

    calls = {"read": 0, "processed": 0}

    def counted(name, function):
        def run(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return run

    monkeypatch.setattr(videos, "read_frames", counted("read", videos.read_frames))
    monkeypatch.setattr(generation, "batch_inputs", counted("processed", generation.batch_inputs))
    generate_from = generation.generate_from

    def leaves_inputs_as_they_were(model, processor, inputs, *args, **kwargs):
        before = [tensor.clone() for tensor in tensors(inputs)]
        tokens = generate_from(model, processor, inputs, *args, **kwargs)
        assert all(torch.equal(now, then) for now, then in zip(tensors(inputs), before, strict=True))
        return tokens

    monkeypatch.setattr(generation, "generate_from", leaves_inputs_as_they_were)
    return calls


def answered_alone(model, processor, samples, configs, together, tmp_path, **task_args):
    """Each config's answers in `together` are those it gives run on its own."""
    for config in configs:
        alone = evaluate(model, benchmark_task(model, processor, samples, **task_args), [config],
                         tmp_path / config.name, {}, batch_size=2)
        assert sorted((r["index"], r["prediction"]) for r in alone) == sorted(
            (r["index"], r["prediction"]) for r in together if r["config"] == config.name), config.name


def test_a_batch_is_read_and_processed_once_for_every_config_and_answered_as_each_alone(tmp_path, monkeypatch):
    """The runner answers a batch under every config in turn: its videos are read and its inputs processed once
    for all of them, and each config's answers are those it gives run alone."""
    from vtprune.tiny import tiny_video_llava

    from .test_loaders import videomme_rows, write_parquet, write_video

    write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", videomme_rows())
    for name in ("fFjv93ACGo8", "xyz"):
        write_video(tmp_path / "data" / f"{name}.mp4")
    samples = load_benchmark("videomme", tmp_path)
    model = tiny_video_llava("sdpa")
    processor = tiny_processor(model)
    processor.chat_template = VIDEO_TEMPLATE
    calls = counting_calls(monkeypatch)
    configs = [Config("unpruned", None), Config("random", 8), Config("fastv", 12)]
    task = benchmark_task(model, processor, samples, max_new_tokens=3, frames=4)
    together = evaluate(model, task, configs, tmp_path / "together", {}, batch_size=2)
    assert calls == {"read": 3, "processed": 2}  # 3 videos in batches of 2 and 1
    answered_alone(model, processor, samples, configs, together, tmp_path, max_new_tokens=3, frames=4)


def test_a_batch_of_images_is_encoded_once_for_the_configs_that_leave_the_tower_alone(data, tmp_path, monkeypatch):
    """LLaVA-1.5's inputs are pixels alone: on transformers 5.23+ the unpruned model and the pruners that do not
    read the tower generate from one encoding of the batch's images (mm_encoder_outputs), and answer as each
    config run alone does (from the pixels)."""
    samples = load_benchmark("pope", data / "pope")[:5]
    model = tiny_llava("sdpa")
    processor = tiny_processor(model)
    processor.chat_template = LLAVA_TEMPLATE
    calls = counting_calls(monkeypatch)
    configs = [Config("unpruned", None), Config("random", 8), Config("fastv", 12), Config("visionzip", 8)]
    tower_runs = []
    handle = model.model.vision_tower.register_forward_hook(lambda *_: tower_runs.append(1))
    try:
        together = evaluate(model, benchmark_task(model, processor, samples, max_new_tokens=3), configs,
                            tmp_path / "together", {}, batch_size=2)
    finally:
        handle.remove()
    assert calls["processed"] == 3  # batches of 2, 2 and 1
    shared = 1 if takes_encoded_features(model) else 3  # unpruned, random, fastv
    assert len(tower_runs) == 3 * (shared + 1)  # visionzip reads the tower: its own run
    answered_alone(model, processor, samples, configs, together, tmp_path, max_new_tokens=3)


def test_answers_are_cut_at_the_tasks_stop_strings(monkeypatch):
    """TextVQA's lmms-eval generation stops at "ASSISTANT:" (its "until"), as the lmms-eval plugin cuts: a model
    running on into a new turn is scored on its answer, not on the turn it made up."""
    from vtprune.eval import generation

    class Processor:
        video_processor = None
        chat_template = "(generate_tokens is replaced: never rendered)"

        def batch_decode(self, tokens, skip_special_tokens):
            return [" Coca Cola\nASSISTANT: The sign says Coca Cola"] * len(tokens)

    monkeypatch.setattr(generation, "batch_inputs", lambda processor, questions, *args, **kwargs: questions)
    monkeypatch.setattr(generation, "on_model", lambda model, inputs: inputs)
    monkeypatch.setattr(generation, "generate_from", lambda model, processor, questions, *args, **kwargs:
                        [[1]] * len(questions))
    textvqa = BenchmarkSample("textvqa", "1", (), "what brand?", {"answers": ["coca cola"] * 10})
    assert benchmark_task(None, Processor(), [textvqa], frames=8).answer([textvqa], None) == ["Coca Cola"]
    assert score("textvqa", ["Coca Cola"], [textvqa.reference])["score"] == 100.0
    # GQA sets no stop string: the whole answer is kept
    gqa = BenchmarkSample("gqa", "2", (), "what brand?", {"answer": "coca cola"})
    assert benchmark_task(None, Processor(), [gqa], frames=8).answer([gqa], None) == [
        "Coca Cola\nASSISTANT: The sign says Coca Cola"]


def test_an_answer_is_stripped_before_it_is_cut():
    """As lmms-eval's models do: a reply opening with the stop string is not cut to nothing."""
    from vtprune.eval.generation import cut_at_stops

    assert cut_at_stops("\n\nA bus.\n\nUSER: more", ["\n\n"]) == "A bus."
    assert cut_at_stops(" yes ASSISTANT: no", "ASSISTANT:") == "yes"
    assert cut_at_stops("a\nb\n\nc", "\n\n") == "a\nb"  # one stop string, not its characters
    assert cut_at_stops(" yes ", None) == "yes"
