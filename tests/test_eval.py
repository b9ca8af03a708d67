"""The evaluation harness: resumable per-sample records, clear errors, consistent summaries."""

import contextlib
import json
import re
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest

from vtprune.eval import Config, ResultsFile, evaluate, summarize
from vtprune.eval import FolderBusy, runner
from vtprune.eval.runner import synthetic_task
from vtprune.eval.lock import LOCK_NAME, hold
from vtprune.engine.compat import takes_encoded_features
from vtprune.eval.records import MalformedResults
from vtprune.eval.shards import read_all
from vtprune.eval.report import markdown_table, write_reports
from vtprune.synth import generate
from vtprune.synth.reference import (REFERENCE_DIR, build_model, build_processor, build_tokenizer, load_reference,
                                     prompt, prompt_for)
from vtprune.tiny import tiny_qwen2_vl

from .test_generation import templated


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """A randomly initialised reference model saved and loaded the way a user's checkpoint is."""
    path = tmp_path_factory.mktemp("reference")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    build_processor(tokenizer).save_pretrained(path)
    return load_reference(path)


CONFIGS = [Config("unpruned"), Config("random", 64), Config("fastv", 32)]
SETTINGS = {"task": "synthetic", "seed": 5, "samples": 10}


def test_an_interrupted_eval_resumes_without_redoing_or_losing_samples(tiny_reference, tmp_path, monkeypatch):
    model, processor = tiny_reference
    bars, bar = [], runner.tqdm
    monkeypatch.setattr(runner, "tqdm", lambda **kwargs: bars.append(bar(**kwargs)) or bars[-1])
    task = synthetic_task(model, processor, generate(5, 10), prompt)
    calls = []

    def flaky_answer(chunk, pruner):
        calls.append(len(chunk))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return task.answer(chunk, pruner)

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, replace(task, answer=flaky_answer), CONFIGS, tmp_path, SETTINGS, batch_size=4)
    done_before = ResultsFile(tmp_path / "results.jsonl").read()
    assert len(done_before) == 3 * 4  # the first batch finished under every config
    assert not hasattr(model, "_vtprune_pruner")  # the interrupted method's pruner was removed
    assert bars[0].disable  # its progress bar closed: the line saying so starts on a line of its own

    records = evaluate(model, task, CONFIGS, tmp_path, SETTINGS, batch_size=4)
    keys = [(r["config"], r["index"]) for r in ResultsFile(tmp_path / "results.jsonl").read()]
    assert sorted(keys) == sorted((c.name, i) for c in CONFIGS for i in range(10))  # each exactly once
    assert records[:12] == done_before


TOWER_CONFIGS = [Config("unpruned"), Config("random", 64), Config("fastv", 32), Config("visionzip", 64)]


def test_configs_answer_a_batch_as_each_would_alone_with_the_images_encoded_once_for_all_that_leave_the_tower(
        tiny_reference, tmp_path):
    """The runner answers each batch under every config in turn; the unpruned model and the pruners that do not
    read the vision tower share one encoding of the batch's images (transformers 5.23+), and answer as
    `predict` does under each config on its own."""
    model, processor = tiny_reference
    samples = generate(5, 10)
    tower_runs = []
    handle = model.model.vision_tower.register_forward_hook(lambda *_: tower_runs.append(1))
    try:
        records = evaluate(model, synthetic_task(model, processor, samples, prompt), TOWER_CONFIGS, tmp_path,
                           SETTINGS, batch_size=4)
    finally:
        handle.remove()
    reading_tower = 1  # visionzip
    shared = 1 if takes_encoded_features(model) else len(TOWER_CONFIGS) - reading_tower
    assert len(tower_runs) == 3 * (shared + reading_tower)  # 3 batches

    got = {(r["config"], r["index"]): (r["prediction"], r["equivalent_budget"]) for r in records}
    for config in TOWER_CONFIGS:
        with runner._applied(model, config) as pruner:
            for start in range(0, 10, 4):
                chunk = samples[start : start + 4]
                answers = runner.predict(model, processor, chunk, prompt)
                for b, answer in enumerate(answers):
                    equivalent = None if pruner is None else pruner.last_stats.sample_equivalent_budget(b)
                    assert got[config.name, start + b] == (answer, equivalent), (config.name, start + b)


def test_the_synthetic_task_runs_a_checkpoint_whose_images_need_more_than_pixels(tmp_path):
    """Qwen2-VL's encoder needs each image's grid beside its pixels: its batches are not encoded ahead."""
    model = tiny_qwen2_vl("sdpa")
    processor = templated(model)
    samples = generate(5, 4)
    prompt_of = prompt_for(processor)
    records = evaluate(model, synthetic_task(model, processor, samples, prompt_of), CONFIGS[:2], tmp_path, SETTINGS,
                       batch_size=4)
    unpruned = runner.predict(model, processor, samples, prompt_of)
    assert [r["prediction"] for r in records if r["config"] == "unpruned"] == unpruned


def test_resuming_the_same_run_is_deterministic(tiny_reference, tmp_path):
    model, processor = tiny_reference
    first = evaluate(model, synthetic_task(model, processor, generate(5, 6), prompt), CONFIGS, tmp_path / "a", SETTINGS)
    second = evaluate(model, synthetic_task(model, processor, generate(5, 6), prompt), CONFIGS, tmp_path / "b", SETTINGS)
    assert first == second


def with_word_start_markers(checkpoint):
    """The checkpoint's tokenizer rewritten to name its tokens as SentencePiece does, every id kept: a word starts
    with "▁" ("▁red"), as in the Llama tokenizer of every LLaVA-1.5 checkpoint (Metaspace pre-tokenizer)."""
    path = checkpoint / "tokenizer.json"
    spec = json.loads(path.read_text())
    special = {token["content"] for token in spec["added_tokens"]}
    spec["model"]["vocab"] = {w if w in special else "▁" + w: i for w, i in spec["model"]["vocab"].items()}
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [spec["pre_tokenizer"], metaspace]}
    spec["decoder"] = metaspace
    path.write_text(json.dumps(spec))


def test_answers_are_words_whatever_the_tokenizer_names_its_tokens(tmp_path):
    # predict compared the token's name with the answer: "▁red" never equals "red", so the synthetic eval of
    # such a checkpoint scored 0% and `vtprune show` printed "answer: ▁red"
    shutil.copytree(REFERENCE_DIR, tmp_path, dirs_exist_ok=True)
    with_word_start_markers(tmp_path)
    model, processor = load_reference(tmp_path)
    assert processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("red")["input_ids"]) == ["▁red"]
    samples = generate(5, 12)
    answers = runner.predict(model, processor, samples, prompt)
    assert answers == runner.predict(*load_reference(REFERENCE_DIR), samples, prompt)  # the same ids, as words
    assert sum(a == s.answer for a, s in zip(answers, samples)) >= 10  # the shipped model answers


def test_a_half_written_last_line_is_redone(tmp_path):
    path = tmp_path / "results.jsonl"
    whole = {"config": "unpruned", "index": 0, "qclass": "ocr", "answer": "cat", "prediction": "dog", "correct": False}
    path.write_text(json.dumps(whole) + "\n" + json.dumps(whole)[:20])
    results = ResultsFile(path)
    results.repair_tail()
    assert results.read() == [whole]
    assert path.read_text() == json.dumps(whole) + "\n"  # the next record starts a line of its own
    # a last record whole but for its newline is finished: kept, and its line ended
    second = dict(whole, index=1)
    path.write_text(json.dumps(whole) + "\n" + json.dumps(second))
    results.repair_tail()
    assert path.read_text() == json.dumps(whole) + "\n" + json.dumps(second) + "\n"


def test_another_processs_cut_off_last_line_is_read_past(tmp_path):
    """A 2-process run killed mid-write, resumed by one process: that process repairs only its own file, and reads
    the other's cut-off tail as not written (it then redoes that sample) instead of stopping there."""
    from vtprune.eval.shards import read_all

    whole = {"config": "unpruned", "index": 1, "qclass": "ocr", "answer": "cat", "prediction": "dog", "correct": False}
    (tmp_path / "results.1-of-2.jsonl").write_text(json.dumps(whole) + "\n" + json.dumps(dict(whole, index=3))[:20])
    assert read_all(tmp_path) == [whole]
    (tmp_path / "results.1-of-2.jsonl").write_text(json.dumps(whole)[:20] + "\n" + json.dumps(whole))
    with pytest.raises(MalformedResults, match="results.1-of-2.jsonl:1: not valid JSON"):  # not the last line
        read_all(tmp_path)


@pytest.mark.parametrize("line, message", [("{not json\n", "not valid JSON"), ('{"config": "x"}\n', "needs index")])
def test_a_malformed_results_file_names_the_line(tmp_path, line, message):
    path = tmp_path / "results.jsonl"
    whole = {"config": "unpruned", "index": 0, "qclass": "ocr", "answer": "cat", "prediction": "cat", "correct": True}
    path.write_text(json.dumps(whole) + "\n" + line)
    with pytest.raises(MalformedResults, match=rf"results.jsonl:2: .*{message}"):
        ResultsFile(path).read()


def answered_by_its_answer(samples):
    """The synthetic task with every answer right and no model: what the runner makes of its records."""
    return replace(synthetic_task(None, None, samples, prompt), answer=lambda chunk, pruner: [s.answer for s in chunk])


RUN = [Config("unpruned"), Config("random", 64)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    evaluate(None, answered_by_its_answer(generate(5, 2)), RUN[:1], folder, SETTINGS)
    return folder


def test_a_run_killed_mid_write_resumes_to_every_sample_once(tmp_path, monkeypatch):
    """Killed while writing its third record: the resume drops the cut line (appending after it would glue the
    next record to it, a malformed line in the middle of the file), redoes that sample and the rest, and its
    progress bar starts from the two already done."""
    task = answered_by_its_answer(generate(5, 5))
    evaluate(None, task, RUN[:1], tmp_path, SETTINGS)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:25])
    bars, bar = [], runner.tqdm
    monkeypatch.setattr(runner, "tqdm", lambda **kwargs: bars.append(bar(**kwargs)) or bars[-1])
    records = evaluate(None, task, RUN[:1], tmp_path, SETTINGS)
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3, 4]
    assert path.read_text().splitlines(keepends=True)[:2] == lines[:2]
    assert [(b.initial, b.n) for b in bars] == [(2, 5)]  # from the two done to all, not past it


def test_each_record_carries_its_own_samples_equivalent_budget(tmp_path, monkeypatch):
    """The pruner's stats give one equivalent budget per sample of a batch; each record takes its sample's."""
    pruner = SimpleNamespace(last_stats=SimpleNamespace(sample_equivalent_budget=lambda b: 100.0 + b))
    monkeypatch.setattr(runner, "_applied", lambda model, config: contextlib.nullcontext(pruner))
    records = evaluate(None, answered_by_its_answer(generate(5, 5)), RUN[1:], tmp_path, SETTINGS, batch_size=3)
    assert [(r["index"], r["equivalent_budget"]) for r in records] == [(0, 100), (1, 101), (2, 102), (3, 100), (4, 101)]


def edit_first_line(folder, edit):
    path = folder / "results.jsonl"
    first, rest = path.read_text().split("\n", 1)
    record = json.loads(first)
    edit(record)
    path.write_text("\n" + json.dumps(record) + "\n" + rest)  # a blank line first: the line number counts it


@pytest.mark.parametrize("edit, problem", [
    # a missing field stopped the report with a bare KeyError
    (lambda r: r.pop("qclass"), "the record has no 'qclass'"),
    (lambda r: r.pop("method"), "the record has no 'method'"),
    (lambda r: r.pop("equivalent_budget"), "the record has no 'equivalent_budget'"),
    # an index beyond the run's samples, or a copy of a record under another index, was silently scored
    (lambda r: r.update(index=7), "index 7 is not one of this run's samples (0 to 1)"),
    (lambda r: r.update(index="0"), "index '0' is not one of this run's samples (0 to 1)"),
    (lambda r: r.update(index=True), "index True is not one of this run's samples (0 to 1)"),  # a bool is no index
    (lambda r: r.update(index=-1), "index -1 is not one of this run's samples (0 to 1)"),  # Python's last sample
    (lambda r: r.update(index=1), "field 'qclass' is 'ocr' where this run has 'count' (sample 1)"),
    (lambda r: r.update(correct=False), "field 'correct' is False where this run has True (sample 0)"),
    (lambda r: r.update(prediction=None), "prediction None is not a string"),
    (lambda r: r.update(config=["unpruned"]), "config ['unpruned'] is not a config's name"),
    (lambda r: r.update(budget=32), "field 'budget' is 32 where this run has None (sample 0)"),
    (lambda r: r.update(equivalent_budget="64"), "equivalent_budget '64' is not a number"),
    (lambda r: r.update(equivalent_budget=True), "equivalent_budget True is not a number"),
])
def test_a_record_the_run_would_not_have_written_is_named_on_resume(finished_run, tmp_path, edit, problem):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    edit_first_line(tmp_path, edit)
    message = re.escape(f"{tmp_path / 'results.jsonl'}:2: {problem}; delete that line (a resume computes its sample "
                        "again), or start a new run with another --out")
    with pytest.raises(MalformedResults, match=message):
        evaluate(None, answered_by_its_answer(generate(5, 2)), RUN[:1], tmp_path, SETTINGS)


def test_a_record_of_a_config_this_run_leaves_out_is_checked_against_the_samples(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "results.jsonl", "a") as f:  # an earlier run of this folder had random@64 too
        f.write(json.dumps({"config": "random@64", "method": "random", "budget": 64, "index": 2, "qclass": "ocr",
                            "answer": "jar", "prediction": "jar", "correct": True, "equivalent_budget": 64.0}) + "\n")
    with pytest.raises(MalformedResults, match="results.jsonl:3: index 2 is not one of this run's samples"):
        evaluate(None, answered_by_its_answer(generate(5, 2)), RUN[:1], tmp_path, SETTINGS)


def test_the_records_of_a_finished_run_pass_the_check(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    records = evaluate(None, answered_by_its_answer(generate(5, 2)), RUN[:1], tmp_path, SETTINGS)
    assert [(r["index"], r["correct"]) for r in records] == [(0, True), (1, True)]


def test_other_settings_in_the_same_folder_are_refused(tiny_reference, tmp_path):
    model, processor = tiny_reference
    evaluate(model, synthetic_task(model, processor, generate(5, 2), prompt), CONFIGS[:1], tmp_path, SETTINGS)
    with pytest.raises(ValueError, match=r"other settings \(seed\): seed: 5 there, 6 now; resume"):
        evaluate(model, synthetic_task(model, processor, generate(6, 2), prompt), CONFIGS[:1], tmp_path, dict(SETTINGS, seed=6))
    task, versions = synthetic_task(model, processor, generate(5, 2), prompt), {"torch": "2.13", "vtprune": "0.1"}
    evaluate(model, task, CONFIGS[:1], tmp_path / "v", dict(SETTINGS, versions=versions))
    with pytest.raises(ValueError, match=r"\(versions: it was made by other code.*\): versions.torch: \"2.13\" "
                                         r"there, \"2.99\" now; resume"):  # a dict names its changed entries only
        evaluate(model, task, CONFIGS[:1], tmp_path / "v", dict(SETTINGS, versions=dict(versions, torch="2.99")))


@pytest.mark.parametrize("then, now, named", [
    # a setting a later vtprune records (or an earlier one did) is a change too, named with its value
    (SETTINGS, dict(SETTINGS, versions={"torch": "2.13"}),
     r'\(versions\) .*: versions: null there, {"torch": "2.13"} now'),
    (dict(SETTINGS, limit=3), SETTINGS, r"\(limit\): limit: 3 there, null now"),
])
def test_a_resume_that_adds_or_drops_a_setting_is_refused_naming_it(tmp_path, then, now, named):
    task = answered_by_its_answer(generate(5, 2))
    evaluate(None, task, RUN[:1], tmp_path, then)
    with pytest.raises(ValueError, match=rf"other settings {named}; resume"):
        evaluate(None, task, RUN[:1], tmp_path, now)


def test_a_method_given_options_is_recorded_under_its_label(tmp_path, monkeypatch):
    """The reports draw a curve per record `method`: clse:score=attn recorded as clse would join clse's curve."""
    monkeypatch.setattr(runner, "_applied", lambda model, config: contextlib.nullcontext(None))
    configs = [Config("random", 64), Config("random", 64, {"seed": 3}, label="random:seed=3")]
    records = evaluate(None, answered_by_its_answer(generate(5, 2)), configs, tmp_path, SETTINGS)
    assert sorted({(r["config"], r["method"]) for r in records}) == [("random:seed=3@64", "random:seed=3"),
                                                                     ("random@64", "random")]


@pytest.mark.parametrize("content, found", [("", "invalid JSON"), ("nope", "invalid JSON"), ("[1]", "a JSON list")])
def test_a_damaged_run_json_is_named_not_a_traceback(tiny_reference, tmp_path, content, found):
    model, processor = tiny_reference
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(ValueError, match=f"run.json: holds {found}.*, not the settings of the run whose results the "
                                         "folder holds.*pass another --out"):
        evaluate(model, synthetic_task(model, processor, generate(5, 2), prompt), CONFIGS[:1], tmp_path, SETTINGS)


def test_summary_normalizes_per_class_to_the_unpruned_model(tmp_path):
    def record(config, method, budget, qclass, correct):
        return {"config": config, "method": method, "budget": budget, "index": 0, "qclass": qclass,
                "answer": "a", "prediction": "a" if correct else "b", "correct": correct, "equivalent_budget": None}

    records = [record("unpruned", "unpruned", None, "ocr", True), record("unpruned", "unpruned", None, "ocr", True),
               record("unpruned", "unpruned", None, "count", True), record("unpruned", "unpruned", None, "count", False),
               record("fastv@64", "fastv", 64, "ocr", True), record("fastv@64", "fastv", 64, "ocr", False),
               record("fastv@64", "fastv", 64, "count", True), record("fastv@64", "fastv", 64, "count", True)]
    rows = {row["config"]: row for row in summarize(records)}
    assert rows["unpruned"]["normalized"] == pytest.approx(100.0)
    assert rows["fastv@64"]["overall"] == pytest.approx(0.75)
    assert rows["fastv@64"]["normalized"] == pytest.approx(100 * (0.5 / 1.0 + 1.0 / 0.5) / 2)
    assert "fastv@64" in markdown_table(list(rows.values()))
    write_reports(list(rows.values()), tmp_path, "t", {})
    assert (tmp_path / "results_accuracy_vs_budget.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["config"] == "unpruned"


def test_a_config_named_twice_is_refused(tiny_reference, tmp_path):
    model, processor = tiny_reference
    with pytest.raises(ValueError, match="named twice: fastv@32"):
        evaluate(model, synthetic_task(model, processor, generate(5, 2), prompt), [Config("fastv", 32), Config("fastv", 32)], tmp_path,
                 SETTINGS)


def test_a_folder_another_run_is_evaluating_into_is_refused(tiny_reference, tmp_path, held_elsewhere):
    model, processor = tiny_reference
    with held_elsewhere(tmp_path), pytest.raises(FolderBusy, match=rf"{tmp_path}.* in use by another run"):
        evaluate(model, synthetic_task(model, processor, generate(5, 2), prompt), CONFIGS[:1], tmp_path, SETTINGS)
    assert not (tmp_path / "results.jsonl").exists()


def test_a_report_of_configs_missing_samples_is_refused(tiny_reference, tmp_path, monkeypatch):
    """Processes of one data-parallel run given other --methods each run their own configs on their own
    samples: the configs are short of samples when all are done, and are not reported on part of them."""
    from vtprune.eval.shards import Shard

    model, processor = tiny_reference
    monkeypatch.setattr(Shard, "wait_for_everyone", lambda self: None)  # the other process, run after this one
    task = synthetic_task(model, processor, generate(5, 3), prompt)
    with pytest.raises(ValueError, match=r"samples missing .*: unpruned \(2 of 3\), random@64 \(2 of 3\); give "
                                         r"each of its 2 processes the same --methods"):
        evaluate(model, task, CONFIGS[:2], tmp_path, SETTINGS, shard=Shard(0, 2))
    evaluate(model, task, CONFIGS[:1], tmp_path, SETTINGS, shard=Shard(1, 2))  # given other --methods
    with pytest.raises(ValueError, match=r"missing after every process finished: random@64 \(2 of 3\); give"):
        evaluate(model, task, CONFIGS[:2], tmp_path, SETTINGS, shard=Shard(0, 2))
    records = evaluate(model, task, CONFIGS[:2], tmp_path, SETTINGS, shard=Shard(1, 2))  # as the run was meant
    assert sorted((r["config"], r["index"]) for r in records) == sorted(
        (c.name, i) for c in CONFIGS[:2] for i in range(3))


def test_a_data_parallel_run_holds_its_folder_against_other_runs(tmp_path, held_elsewhere):
    """A data-parallel run's processes share the folder; while they run, a run of one process is refused, and so
    is another data-parallel run's first process (whatever its process count: its others wait for it at
    evaluate's first barrier). The refusal names a process that holds the folder, not one refused before."""
    with held_elsewhere(tmp_path, rank=0) as first:
        with pytest.raises(FolderBusy, match=f"in use by another run \\(pid {first.pid}\\)"):
            with hold(tmp_path, rank=0):
                pass
        with pytest.raises(FolderBusy, match=f"in use by another run \\(pid {first.pid}\\)"):
            with hold(tmp_path):
                pass
        with hold(tmp_path, rank=1):  # the same run's other process
            pass
    with held_elsewhere(tmp_path) as second:
        with pytest.raises(FolderBusy, match=f"another run \\(pid {second.pid}\\); wait"):  # not earlier holders' too
            with hold(tmp_path, rank=1):
                pass


def test_evaluate_shares_the_folder_with_the_other_processes_of_its_run(tmp_path, held_elsewhere, monkeypatch):
    """For library callers (the command holds the folder itself, as its shard says, before evaluate does)."""
    from vtprune.eval.shards import Shard

    monkeypatch.setattr(Shard, "wait_for_everyone", lambda self: None)  # the other process does not evaluate here
    (tmp_path / runner.SETTINGS_FILE).write_text(json.dumps(SETTINGS))  # as it would have written them first
    with held_elsewhere(tmp_path, rank=0), pytest.raises(ValueError, match=r"unpruned \(1 of 2\)"):
        evaluate(None, answered_by_its_answer(generate(5, 2)), RUN[:1], tmp_path, SETTINGS, shard=Shard(1, 2))


def test_the_lock_of_a_run_that_died_does_not_block(tmp_path, held_elsewhere):
    with held_elsewhere(tmp_path) as other:
        pass  # leaving the block kills the holder without releasing anything itself
    assert other.returncode != 0 and (tmp_path / LOCK_NAME).exists()
    with hold(tmp_path):
        with hold(tmp_path):  # nested holds in one process share the lock
            pass


def test_repeated_records_count_once_and_the_first_wins(tmp_path):
    def record(index, correct):
        return {"config": "fastv@64", "method": "fastv", "budget": 64, "index": index, "qclass": "ocr", "answer": "a",
                "prediction": "a" if correct else "b", "correct": correct}

    path = tmp_path / "results.jsonl"
    lines = [record(0, True), record(1, False), record(0, False), record(1, False), record(2, True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = read_all(tmp_path)
    assert records == [record(0, True), record(1, False), record(2, True)]
    assert summarize(records)[0]["overall"] == pytest.approx(2 / 3)
