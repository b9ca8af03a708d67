"""The command checks every value before it loads a model: a bad one is one usage line and exit status 2."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtprune import cli
from vtprune.synth import reference


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    monkeypatch.setattr(reference, "load_reference", lambda *a, **k: pytest.fail("a model loaded"))


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.parse(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["eval", "--samples", "0"], "--samples: 0 is too small; give a whole number >= 1"),
    (["eval", "--samples=-5"], "--samples: -5 is too small"),
    (["eval", "--batch", "0"], "--batch: 0 is too small"),
    (["eval", "--seed=-1"], "--seed: -1 is too small; give a whole number >= 0"),
    (["eval", "--budgets", "abc"], "--budgets: 'abc' is not a budget; give an int >= 1"),
    (["eval", "--budgets", "64,"], "--budgets: '64,' has an empty item"),
    (["eval", "--budgets", "64,64"], "--budgets: 64 given twice"),
    (["eval", "--budgets", "1.5"], r"--budgets: .*\(0, 1\].*1\.5"),
    (["bench", "--budgets", "0.25"], "--budgets: '0.25': bench budgets are visual tokens per image, ints >= 1"),
    (["bench", "--arch", "llava-1.5-7"], r"unknown arch 'llava-1.5-7' \(did you mean 'llava-1.5-7b'\?\); presets: "),
    (["bench", "--batch", "1,0"], "--batch: 0 is too small"),
    (["bench", "--methods", "clse:score=attn"], r"takes method names without options \(name:option=value is"),
    (["eval", "--methods", "clse:layers=1"], "--methods: clse:layers=1: clse's default keep counts are for 3 stages"),
    (["eval", "--methods", "clse:layers=a/b"], "--methods: clse:layers=a/b: layers takes ints separated by /"),
    (["eval", "--methods", "clse:keep=0/0/0"], "clse keep counts must each be >= 1"),
    (["eval", "--methods", "clse:keep=-1/-2/-3"], "clse keep counts must each be >= 1"),
    (["eval", "--methods", "random:seed=abc"], "--methods: random:seed=abc: seed takes an int; got 'abc'"),
    (["eval", "--methods", "clse:slice_kv=maybe"], "slice_kv takes true or false or none; got 'maybe'"),
    (["eval", "--methods", "clse:tau=nan"], "tau takes a finite number; got 'nan'"),
    (["eval", "--methods", "fastv:layer=6"], r"fastv:layer=6: method 'fastv' would act before decoder layer 6 \(on an "
                                             r"image\)"),
    (["eval", "--methods", "visionzip:layer=-9"], r"visionzip:layer=-9: method 'visionzip' reads vision layers \[-9\], "
                                                  r"but the image tower has 3 layers"),
    (["eval", "--methods", "hired:early_layer=5"], r"method 'hired' reads vision layers \[5\]"),
    (["eval", "--methods", "fastv:k=3"], "fastv has no option 'k'; its options are: layer"),
    (["eval", "--methods", "fastv:layr=3"], r"fastv has no option 'layr' \(did you mean 'layer'\?\); its options are: "
                                            "layer"),
    (["eval", "--methods", "visionzp"], r"--methods: unknown method 'visionzp' \(did you mean 'visionzip'\?\)"),
    (["eval", "--methods", "clasp:tokenizer=x"], "tokenizer cannot be given on the command line"),
    (["eval", "--methods", "clasp:router=x"], r"router cannot be given on the command line \(a Python object: pass "
                                              r"it to vtprune.apply\)"),
    (["eval", "--methods", "clasp:layers=1/2:multipliers=1/2"], r"clasp's multipliers must not grow from stage to "
                                                                r"stage .*got \(1.0, 2.0\)"),
    (["eval", "--methods", "random,random"], "--methods: random given twice"),
    (["eval", "--methods", "bogus"], "--methods: unknown method 'bogus'; registered methods: clasp"),
    (["eval", "--report", "sub/results"], "--report: 'sub/results' must be a plain file name"),
    (["eval", "--model", "/nonexistent"], "--model: no folder '/nonexistent'"),
    (["eval", "--model", __file__], r"--model: .*test_cli.py' is a file; give the checkpoint's folder"),
    (["eval", "--model", str(Path(__file__).parent)], "--model: no config.json in"),
    (["eval", "--methods", "unpruned"], r"unknown method 'unpruned': the unpruned model is no method \(`vtprune eval` "
                                        "runs its unpruned row"),
    (["show", __file__, "what?", "--method", "fastv,clse"], "unknown method 'fastv,clse': one method here"),
    (["show", __file__, "  ", "--method", "random"], "question: the question is empty"),
    (["show", __file__, "what?", "--method", "random", "--out", ".png"], "'.png' is a suffix without a name"),
    (["eval", "--report", "results.json"], "--report: 'results.json': --report names the reports, which add their own "
                                           r"suffixes .*; give 'results'"),
    (["show", __file__, "what?", "--method", "bogus"], "--method: unknown method 'bogus'"),
    (["show", "no-such.png", "what?", "--method", "random"], "IMAGE_OR_VIDEO: no file 'no-such.png'"),
    (["calibrate", "--method", "fastv"], "--method: invalid choice: 'fastv'"),
    (["bench", "--new-tokens", "1"], "--new-tokens: 1 is too small; give a whole number >= 2"),
    (["eval", "--report", "run"], "--report: 'run' would write the report over run.json"),
    (["show", __file__, "what?", "--method", "random", "--out", "kept.txt"],
     r"--out: 'kept.txt': a picture is written as one of .*\.png.*; end the name with one"),
    (["train-reference", "--out", "x", "--lr", "0"], "--lr: '0' is not allowed; give a finite number > 0"),
    (["train-reference", "--out", "x", "--minutes", "inf"], "--minutes: 'inf' is not allowed"),
    (["bench", "--device", "meta"], "--device: 'meta': vtprune runs on cpu or cuda"),
    (["eval", "--data", __file__], "--data: .*test_cli.py' is a file; give the folder holding it"),
    (["eval", "--data", "/nonexistent"], "--data: no folder '/nonexistent'"),
    (["show", str(Path(__file__).parent), "what?", "--method", "random"], "IMAGE_OR_VIDEO: no file"),
    (["calibrate", "--out", str(Path(__file__).parent)], "--out: .* is a folder; give a file path"),
    (["eval", "--methods", "clse:score"], "--methods: clse:score: option 'score' needs the form key=value"),
    (["eval", "--methods", "random:seed=1:seed=2"], "--methods: random:seed=1:seed=2: option 'seed' given twice"),
])
def test_a_bad_value_is_a_usage_line_naming_it(argv, message, capsys):
    line = usage_error(argv, capsys)
    assert line.startswith(f"vtprune {argv[0]}: error: argument ")
    assert re.search(message, line), line


@pytest.mark.parametrize("argv", [
    ["eval", "--methods", "clse,clse:score=attn"],  # one method, two configs: only a repeated label is a repeat
    ["show", __file__, "what?", "--method", "random", "--out", "KEPT.PNG"],  # matplotlib names its formats lower case
])
def test_a_good_value_that_resembles_a_bad_one_parses(argv):
    cli.parse(argv)


def test_show_will_not_draw_over_the_picture_it_asks_about(tmp_path, capsys):
    picture = tmp_path / "photo.png"
    picture.write_bytes(b"")
    line = usage_error(["show", str(picture), "what?", "--method", "random", "--out", str(picture)], capsys)
    assert line.endswith("--out names the picture asked about, which the drawing would replace; pass another --out")
    cli.parse(["show", str(picture), "what?", "--method", "random", "--out", str(tmp_path / "kept.png")])


def test_an_out_that_cannot_be_written_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "--out: cannot write" in usage_error(["eval", "--out", str(tmp_path / "file" / "run")], capsys)
    assert "--out: " in usage_error(["bench", "--out", str(tmp_path / "file")], capsys)
    image = tmp_path / "image.png"
    image.write_bytes(b"")
    for command in (["eval", "--out", "/proc/vtprune-run"], ["bench", "--out", "/proc/vtprune-run"],
                    ["show", str(image), "what ?", "--out", "/proc/vtprune/kept.png"]):
        assert "does not take new files" in usage_error(command, capsys)  # even for root, who passes os.access
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "does not take new files" in usage_error(["eval", "--out", str(locked / "run")], capsys)


def test_spaces_around_list_items_are_accepted():
    args = cli.parse(["eval", "--methods", "random, fastv", "--budgets", " 64, 0.25"])
    assert [spec.method for spec in args.methods] == ["random", "fastv"]
    assert args.budgets == [64, 0.25]


def test_method_options_get_the_types_their_method_declares():
    args = cli.parse(["eval", "--methods", "clse:layers=1/3/5:keep=300/200/60:slice_kv=false,random:seed=3,"
                      "clasp:question_class=ocr:split=0.5:progressive=true:multipliers=1.5/1/0.5"])
    clse, random, clasp = args.methods
    assert clse.label == "clse:layers=1/3/5:keep=300/200/60:slice_kv=false"
    assert clse.options == {"layers": (1, 3, 5), "keep": (300, 200, 60), "slice_kv": False}
    assert random.options == {"seed": 3}
    assert clasp.options == {"question_class": "ocr", "split": 0.5, "progressive": True, "multipliers": (1.5, 1.0, 0.5)}
    # spelled as Python prints them, too
    clse, clasp = cli.parse(["eval", "--methods", "clse:slice_kv=None,clasp:progressive=True"]).methods
    assert clse.options == {"slice_kv": None} and clasp.options == {"progressive": True}


def test_cuda_is_refused_on_a_machine_without_it(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = usage_error(["bench", "--device", "cuda:0"], capsys)
    assert line.endswith("--device: 'cuda:0': this machine has no CUDA device")


FLAGS = {
    "eval": ["--samples", "--batch", "--seed", "--budgets", "--methods", "--report", "--out", "--model"],
    "bench": ["--budgets", "--batch", "--methods", "--arch", "--model", "--repeats", "--warmup", "--new-tokens",
              "--out"],
    "show": ["--method", "--budget", "--out"],
}
# Text near the grammar of the values (digits, separators, option names), so that parses succeed too.
VALUES = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.,:=/- eE", max_size=12),
    st.lists(st.sampled_from(["clse", "random", "fastv", "clasp", "layers=", "keep=", "seed=", "score=attn", "1/3",
                              "2", "0.5", ":", ",", "none", "true", "out", "64"]), max_size=6).map("".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(FLAGS)), data=st.data(), value=VALUES)
def test_any_text_for_a_flag_is_a_usage_error_or_a_valid_parse(command, data, value, capsys):
    flag = data.draw(st.sampled_from(FLAGS[command]))
    argv = [command] + ([__file__, "what?", "--method", "random"] if command == "show" else []) + [f"{flag}={value}"]
    try:
        cli.parse(argv)
    except SystemExit as exit:
        assert exit.code == 2
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command, flag", [(command, flag) for command in sorted(FLAGS) for flag in FLAGS[command]])
def test_a_nul_character_is_a_usage_error(command, flag, capsys):
    """(Found by the property test above: `eval --out=\x00` passed the folder check, whose pathlib calls answer
    False for it, and then raised ValueError from resolve().)"""
    argv = [command] + ([__file__, "what?", "--method", "random"] if command == "show" else []) + [f"{flag}=\x00"]
    with pytest.raises(SystemExit) as exit:
        cli.parse(argv)
    assert exit.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_report_name_too_long_for_its_files_is_refused(capsys):
    """Refused at the start, not when the report is written after every answer."""
    with pytest.raises(SystemExit):
        cli.parse(["eval", "--report", "r" * 240])
    assert "is too long: with '_normalized_vs_budget.png' it passes the 255 bytes" in capsys.readouterr().err
    assert cli.parse(["eval", "--report", "r" * 230]).report == "r" * 230


@pytest.mark.parametrize("command, flag", [(command, flag) for command in sorted(FLAGS) for flag in FLAGS[command]])
def test_a_double_dash_value_is_a_usage_error(command, flag, capsys):
    """Python 3.11's argparse stores [] for "--flag=--", skipping the flag's type: it must still be refused."""
    argv = [command] + ([__file__, "what?", "--method", "random"] if command == "show" else []) + [f"{flag}=--"]
    with pytest.raises(SystemExit) as exit:
        cli.parse(argv)
    assert exit.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_bench_writes_outside_the_committed_results_by_default():
    out = Path(cli.parse(["bench"]).out)
    assert not out.is_absolute() and out.parts[0] == "out"  # /out/ is in .gitignore


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_bench_will_not_overwrite_a_committed_result_unless_told(tmp_path, capsys):
    from vtprune.bench.run import device_name

    committed = tmp_path / device_name("cpu") / "bench-llava-cpu-small.json"
    committed.parent.mkdir()
    committed.write_text("{}")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert cli.parse(["bench", "--out", str(tmp_path)])  # an untracked result is the user's to replace

    subprocess.run(["git", "-C", str(tmp_path), "add", str(committed.relative_to(tmp_path))], check=True)
    line = usage_error(["bench", "--out", str(tmp_path)], capsys)
    assert f"--out: {committed} is committed to git" in line and "--replace-committed" in line
    assert cli.parse(["bench", "--out", str(tmp_path), "--replace-committed"]).replace_committed
    assert cli.parse(["bench", "--out", str(tmp_path), "--arch", "qwen2-vl-cpu-small"])  # no file there yet

    # a checkpoint's results are its folder's file: the preset's committed one is not in the way, its own is
    from vtprune.synth.reference import REFERENCE_DIR

    checkpoint = ["bench", "--out", str(tmp_path), "--model", str(REFERENCE_DIR)]
    assert cli.parse(checkpoint)
    own = committed.parent / f"bench-model-{REFERENCE_DIR.resolve().name}.json"
    own.write_text("{}")
    subprocess.run(["git", "-C", str(tmp_path), "add", str(own.relative_to(tmp_path))], check=True)
    assert f"--out: {own} is committed to git" in usage_error(checkpoint, capsys)


def test_a_second_eval_on_the_same_out_stops_before_loading(tmp_path, held_elsewhere):
    with held_elsewhere(tmp_path), pytest.raises(SystemExit) as exit:
        cli.main(["eval", "--out", str(tmp_path), "--samples", "1"])
    message = str(exit.value.code)
    assert message.startswith("vtprune eval: error: ") and "\n" not in message
    assert str(tmp_path) in message and "in use by another run" in message


@pytest.mark.parametrize("argv, message", [
    (["eval", "--scoring", "llava"], "--scoring is for real benchmarks (--tasks, --data)"),  # it would score nothing
    (["eval", "--model", str(reference.REFERENCE_DIR), "--out", str(reference.REFERENCE_DIR)],
     "--out is the checkpoint's folder"),  # the run's files would change the model's identity: no resume
    (["eval", "--out", str(reference.REFERENCE_DIR)], "--out is the checkpoint's folder"),  # the default model's
    (["bench", "--compile", "cudagraphs"], "--compile cudagraphs records CUDA graphs, which need --device cuda"),
    (["eval", "--data", str(Path(__file__).parent)], "--tasks and --data go together"),  # the synthetic run, data unread
    (["eval", "--tasks", "pope", "--data", str(Path(__file__).parent)], "--tasks needs --model"),
])
def test_flags_that_would_do_nothing_or_harm_together_are_refused(argv, message, capsys):
    assert message in usage_error(argv, capsys)


def test_an_interrupted_command_says_what_it_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    assert cli.main(["eval", "--samples", "6", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == f"vtprune eval: interrupted; the finished answers are saved in {tmp_path}: the same " \
                          "command resumes there"


def test_a_terminated_command_stops_as_an_interrupted_one_and_exits_143(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's stop, `timeout`) reaches the command as Ctrl-C does: its cleanups run and it says what
    it kept; the handler is the caller's again afterwards."""
    import signal

    cleaned = []

    def terminated(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_bench", terminated)
    assert cli.main(["bench", "--out", str(tmp_path)]) == 143
    assert cleaned and signal.getsignal(signal.SIGTERM) is before
    assert capsys.readouterr().err.strip() == f"vtprune bench: terminated; the configurations measured so far are " \
                                              f"saved under {tmp_path}"


def test_spaces_inside_a_method_spec_do_not_make_another_config():
    assert cli.parse(["eval", "--methods", "clse : score = attn"]).methods[0].label == "clse:score=attn"


def test_default_eval_spends_a_bounded_number_of_predictions_however_many_methods():
    from vtprune.cli import EVAL_PREDICTIONS, default_samples

    assert default_samples(48) == 240  # today's default: every registered method at 3 budgets
    for configs in (60, 100, 150):
        samples = default_samples(configs)
        assert samples % 6 == 0 and samples < 240 and samples * configs <= EVAL_PREDICTIONS
    assert default_samples(10_000) == 60  # a floor, so that a class still has 10 samples


def test_score_rates_given_answers_by_either_rule_without_a_model(tmp_path, capsys):
    import json

    rows = [("Yes.", "yes"), ("no", "no"), ("yes", "no"), ("No, there is not.", "no")]
    path = tmp_path / "pope.jsonl"
    path.write_text("".join(json.dumps({"prediction": p, "answer": a, "category": "random", "question_id": i}) + "\n"
                            for i, (p, a) in enumerate(rows)))
    scores = {}
    for rule in ("lmms-eval", "llava"):
        assert cli.main(["score", "--task", "pope", "--predictions", str(path), "--scoring", rule]) == 0
        scores[rule] = json.loads(capsys.readouterr().out)
    # lmms-eval reads only a bare yes/no ("Yes." and "No, there is not." are neither); LLaVA's rule reads them
    assert scores["lmms-eval"]["accuracy"] == 0.25 and scores["llava"]["accuracy"] == 0.75


def test_score_names_the_line_of_a_malformed_predictions_file(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prediction": "yes", "answer": "yes", "category": "random"}\n{"answer": "no"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl line 2: no 'prediction' field"):
        cli.main(["score", "--task", "pope", "--predictions", str(path)])
    # a reference the metric refuses is named by its line (blank lines counted)
    path.write_text('{"prediction": "yes", "answer": "yes", "category": "random"}\n\n'
                    '{"prediction": "no", "label_typo": "no", "category": "random"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl line 3: pope reference has no field 'answer' or 'label'"):
        cli.main(["score", "--task", "pope", "--predictions", str(path)])
    # a line with an id given twice whole would count twice; lines without an id may be other questions alike
    line = '{"prediction": "yes", "answer": "yes", "category": "random", "question_id": 7}\n'
    path.write_text(line + '\n' + line)
    with pytest.raises(SystemExit, match=r"bad.jsonl line 3: repeats line 1 whole .*; remove the copy"):
        cli.main(["score", "--task", "pope", "--predictions", str(path)])
    path.write_text(line.replace('"yes",', '"no",', 1) + line)
    assert cli.main(["score", "--task", "pope", "--predictions", str(path)]) == 0
    path.write_text('{"prediction": "yes", "answer": "yes", "category": "random"}\n' * 2)
    assert cli.main(["score", "--task", "pope", "--predictions", str(path)]) == 0
    with pytest.raises(SystemExit):  # refused before the file is read
        cli.main(["score", "--task", "popee", "--predictions", str(tmp_path / "absent.jsonl")])
    assert re.search(r"unknown task 'popee' \(did you mean 'pope'\?\); valid: .*pope", capsys.readouterr().err)


@pytest.mark.parametrize("spec", ["clse:keep=30/20/10", "sparsevlm:counts=30/20/10", "pdrop:ratios=0.5/0.25/0.125"])
def test_a_method_whose_options_fix_its_counts_runs_at_one_budget(spec):
    """Such options keep the same tokens at every budget below an image's tokens (checked here), which eval listed
    as a flat curve of identical configs named by different budgets: where images' sizes are known, it runs at the
    first, the others are listed as not run; where they are not (real benchmarks, Qwen's sizes), a budget may keep
    some images whole and not others, and every budget runs."""
    from types import SimpleNamespace

    import torch

    import vtprune
    from vtprune.cli_args import method_spec
    from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

    model = tiny_llava()  # 64 visual tokens an image
    parsed = method_spec(spec)
    inputs = tiny_inputs(model, [SampleLayout(images=1)])
    kept = []
    for budget in (32, 16):
        with torch.no_grad(), vtprune.apply(model, parsed.method, budget, **parsed.options) as pruner:
            model(**inputs)
            kept.append(pruner.last_decision.kept)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*kept))  # the premise: the budget changes nothing
    shard = SimpleNamespace(main=True)
    configs, refused = cli.runnable_configs(model, [parsed], [64, 32, 16, 1.0], {}, shard, image_tokens=64)
    assert [c.name for c in configs] == ["unpruned", f"{spec}@32"]  # 64 and 1.0 keep every token: not a copy of 32
    assert list(refused) == [f"{spec}@64", f"{spec}@16", f"{spec}@1.0"]
    assert f"so it keeps what {spec}@32 keeps" in refused[f"{spec}@16"]
    configs, refused = cli.runnable_configs(model, [parsed], [64, 32, 16], {}, shard)
    assert not refused and len(configs) == 4  # sizes unknown: each budget may keep other images whole
    _, refused = cli.runnable_configs(model, [method_spec("clse")], [32, 16], {}, shard, image_tokens=64)
    assert not refused  # the budget sets the counts


def test_two_method_specs_that_run_alike_are_refused_and_those_that_differ_run():
    """random:seed=0 is random (computed twice under two names); clasp routes each question through the
    checkpoint's tokenizer, so clasp:question_class=general runs otherwise, though it is the command line's
    stand-in for a model without one."""
    from types import SimpleNamespace

    from vtprune.cli_args import method_spec
    from vtprune.tiny import tiny_llava
    from vtprune.tiny_processors import tiny_tokenizer

    model, shard = tiny_llava(), SimpleNamespace(main=True)
    specs = [method_spec(s) for s in ("random", "clse", "random:seed=0")]
    with pytest.raises(ValueError, match="--methods: random:seed=0 runs what random runs"):
        cli.runnable_configs(model, specs, [16], {}, shard)
    specs = [method_spec(s) for s in ("clasp", "clasp:question_class=general")]
    configs, _ = cli.runnable_configs(model, specs, [16], {"clasp": {"tokenizer": tiny_tokenizer()}}, shard)
    assert [c.name for c in configs] == ["unpruned", "clasp@16", "clasp:question_class=general@16"]


WIDE_ROW = ("clse_m@192", "2610.2 (2470.3-2805.6)", "1.19x!", "vs schedule oracle")


def _wide_table(copies: int):
    from rich.table import Table

    table = Table(title="bench")
    for column in ("config", "prefill ms (p10-p90)", "vs input oracle", "vs schedule oracle") * copies:
        table.add_column(column)
    table.add_row(*WIDE_ROW * copies)
    return table


def test_a_table_printed_into_a_log_keeps_its_rows_whole(capsys):
    """Into a pipe (here pytest's capture), a table is as wide as it needs: no cell cut to "…", no row wrapped."""
    cli.print_table(_wide_table(2))  # 170 characters wide
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "clse_m@192" in line)
    assert all(row.count(cell) == 2 for cell in WIDE_ROW) and "…" not in "".join(lines)


def test_a_table_in_a_narrow_terminal_folds_its_cells_instead_of_cutting_them(monkeypatch):
    from io import StringIO

    from rich.console import Console

    terminal = Console(file=StringIO(), width=40, force_terminal=True, color_system=None)
    monkeypatch.setattr(cli, "console", terminal)
    cli.print_table(_wide_table(1))
    out = terminal.file.getvalue()
    assert "…" not in out and "2805" in out.replace("│", "").replace(" ", "").replace("\n", "")


def test_each_options_help_says_its_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "fractions (default: 192,128,64)" in text and "resumes there (default: out/eval)" in text
    assert "(default 2; the reference model trained on seed 0)" in text and "(default: 2)" not in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_rerun_with_fewer_configs_names_the_answers_its_report_leaves_out(capsys):
    records = [{"config": name} for name in ("unpruned", "fastv@64", "clse@64", "clse@64", "random@64")]
    cli._say_left_out(records, {"unpruned", "fastv@64"}, "results")
    said = " ".join(capsys.readouterr().out.split())
    assert "also holds the answers of clse@64, random@64, which this report leaves out" in said
    assert "other than 'results'" in said
    cli._say_left_out(records, {"unpruned", "fastv@64", "clse@64", "random@64"}, "results")
    assert capsys.readouterr().out == ""


def test_a_value_error_from_another_library_keeps_its_traceback(tmp_path, monkeypatch):
    """vtprune's own ValueErrors name the bad input and its fix: one line. One raised inside numpy or torch is a
    bug to trace, not a message for the user: it propagates whole."""
    import numpy as np

    monkeypatch.setattr(cli, "cmd_bench", lambda args: np.zeros(2).reshape(3))
    with pytest.raises(ValueError, match="cannot reshape"):
        cli.main(["bench", "--out", str(tmp_path)])
    from vtprune.methods import get_method

    monkeypatch.setattr(cli, "cmd_bench", lambda args: get_method("fastvv"))
    with pytest.raises(SystemExit, match="vtprune bench: error: unknown method 'fastvv'"):
        cli.main(["bench", "--out", str(tmp_path)])
