"""A checkpoint whose config does not describe its weights is refused by name, never evaluated half-random."""

import json

import pytest

from vtprune import cli
from vtprune.eval import runner
from vtprune.synth.reference import CheckpointError, load_llava, load_reference
from vtprune.tiny import tiny_llava


@pytest.fixture
def checkpoint(tmp_path):
    """A saved 6-layer tiny LLaVA, and a function that rewrites its config.json."""
    path = tmp_path / "model"
    tiny_llava(layers=6).save_pretrained(path)

    def edit(change):
        config = json.loads((path / "config.json").read_text())
        change(config)
        (path / "config.json").write_text(json.dumps(config))
        return path

    return path, edit


def layers(n):
    return lambda config: config["text_config"].update(num_hidden_layers=n)


def test_a_matching_checkpoint_loads(checkpoint):
    path, _ = checkpoint
    assert load_llava(path).config.text_config.num_hidden_layers == 6


@pytest.mark.parametrize("change, message", [
    (layers(4), r"18 stored weights the config has no place for: model\.language_model\.layers\.4\..*\(18 in all\)"),
    (layers(8), r"18 weights the config declares are missing: model\.language_model\.layers\.6\..*\(18 in all\)"),
    (lambda config: config["text_config"].update(intermediate_size=96),
     r"weights of another shape .*mlp.*\(128, 64\) vs \(96, 64\)"),
    (lambda config: config.update(model_type="llama"), r"declares model_type 'llama'.*LLaVA"),
])
def test_a_config_that_does_not_describe_the_weights_is_refused(checkpoint, change, message):
    _, edit = checkpoint
    with pytest.raises(CheckpointError, match=message):
        load_reference(edit(change))


def test_eval_refuses_such_a_checkpoint_in_one_line_without_evaluating(checkpoint, tmp_path, monkeypatch):
    _, edit = checkpoint
    monkeypatch.setattr(runner, "_evaluate", lambda *args: pytest.fail("evaluated a half-loaded checkpoint"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["eval", "--model", str(edit(layers(4))), "--out", str(tmp_path / "out"), "--samples", "1"])
    message = str(exit.value.code)
    assert message.startswith("vtprune eval: error: ") and "does not match its config.json" in message
    assert "\n" not in message


def test_eval_refuses_a_checkpoint_of_another_model_type_before_loading(checkpoint, tmp_path, capsys):
    _, edit = checkpoint
    with pytest.raises(SystemExit) as exit:
        cli.main(["eval", "--model", str(edit(lambda config: config.update(model_type="qwen2_vl"))),
                  "--out", str(tmp_path / "out")])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "declares model_type 'qwen2_vl'" in error and "the synthetic benchmark runs LLaVA checkpoints" in error


def truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


@pytest.mark.parametrize("damage, message", [
    (lambda path, edit: edit(layers(8)), "18 weights the config declares are missing"),
    (lambda path, edit: (path / "model.safetensors").unlink(), "cannot read the checkpoint's weights"),
    (lambda path, edit: truncate(path), "cannot read the checkpoint's weights"),
])
def test_a_benchmark_checkpoint_that_does_not_load_whole_is_refused(checkpoint, damage, message):
    """The real-benchmark path (`--model PATH --tasks ...`) loads any family: it refuses as the reference path does,
    where transformers only printed its MISSING table and evaluated random weights."""
    from vtprune.eval.generation import load_checkpoint

    damage(*checkpoint)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(checkpoint[0])


def test_a_checkpoint_saved_without_its_processor_is_a_one_line_error(tmp_path):
    """show, calibrate and the synthetic eval load a LLaVA folder as eval --tasks does: no traceback."""
    from vtprune.tiny import tiny_llava

    from PIL import Image

    tiny_llava().save_pretrained(tmp_path / "model")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for argv in (["show", str(tmp_path / "x.png"), "q", "--method", "clse", "--model", str(tmp_path / "model")],
                 ["eval", "--model", str(tmp_path / "model"), "--methods", "random", "--budgets", "8", "--samples", "6",
                  "--out", str(tmp_path / "out")]):
        with pytest.raises(SystemExit, match="cannot load the checkpoint's processor .*; save it beside the model"):
            cli.main(argv)


def test_a_processor_needing_a_missing_package_is_a_one_line_error(tmp_path, monkeypatch):
    """Qwen2-VL's, Video-LLaVA's and OneVision's stock processors import torchvision (for their video processor)
    even for image tasks; an environment without it gets the package named, not an ImportError's traceback."""
    import transformers

    from vtprune.synth.reference import load_processor

    def needs_torchvision(*args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    with pytest.raises(CheckpointError, match="needs a package this environment lacks .*Torchvision.*install it"):
        load_processor(tmp_path)


def test_demo_lists_a_method_refusing_the_budget_and_runs_the_others(capsys):
    """ToMe's five blocks cannot merge 64 patches down to 1: a row says so, as vtprune eval lists it."""
    assert cli.main(["demo", "--budget", "1"]) == 0
    out = capsys.readouterr().out
    assert "not run: tome cannot merge 64 patches down to 1" in out and "unpruned" in out
    assert "random weights" in out and out.count("/12") >= 16  # every other method generated its 12 tokens


def test_demo_refuses_a_budget_that_prunes_nothing():
    with pytest.raises(SystemExit, match="--budget 64 keeps all 64 visual tokens of the demo's images: nothing would "
                                         "be pruned; give a budget below 64"):
        cli.main(["demo", "--budget", "64"])
