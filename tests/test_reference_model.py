"""The shipped reference model: loads like any LLaVA checkpoint, is accurate, and answers from its visual tokens."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vtprune
from vtprune.eval.runner import predict
from vtprune.synth import generate
from vtprune.synth.generator import ANSWERS
from vtprune.synth.reference import REFERENCE_DIR, TEST_SEED, load_reference, prompt

pytestmark = pytest.mark.skipif(not (REFERENCE_DIR / "config.json").exists(), reason="no reference model shipped")


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@pytest.fixture(scope="module")
def samples():
    return generate(TEST_SEED, 180)  # 30 per class, a seed no evaluation or calibration uses


def accuracy_by_class(model, processor, samples) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for start in range(0, len(samples), 30):
            chunk = samples[start : start + 30]
            for sample, answer in zip(chunk, predict(model, processor, chunk, prompt)):
                hits.setdefault(sample.qclass, []).append(answer == sample.answer)
    return {c: sum(v) / len(v) for c, v in hits.items()} | {"overall": sum(sum(v) for v in hits.values()) / len(samples)}


def test_it_is_a_small_standard_llava_checkpoint():
    model = LlavaForConditionalGeneration.from_pretrained(REFERENCE_DIR)
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert sum(f.stat().st_size for f in REFERENCE_DIR.iterdir()) <= 16 * 2**20


def test_it_reaches_the_accuracy_target(reference, samples):
    accuracy = accuracy_by_class(*reference, samples)
    assert accuracy["overall"] >= 0.90, accuracy
    assert min(v for k, v in accuracy.items() if k != "overall") >= 0.80, accuracy


def test_it_answers_from_its_visual_tokens(reference, samples):
    """Keeping 4 random visual tokens of 576 leaves the text and little else: accuracy falls near chance."""
    model, processor = reference
    with vtprune.apply(model, "random", 4):
        accuracy = accuracy_by_class(model, processor, samples)
    chance = sum(1 / len(ANSWERS[c]) for c in ANSWERS) / len(ANSWERS)
    assert accuracy["overall"] < chance + 0.25, accuracy


def test_its_chat_template_asks_as_it_was_trained(reference, samples):
    """Generic harnesses (vtprune eval --tasks, the lmms-eval plugin) prompt through the chat template; on the
    reference model that must be the training prompt, so they get its real answers."""
    from vtprune.eval.generation import build_prompt, generate_answers

    model, processor = reference
    assert all(build_prompt(processor, s.question, images=1) == prompt(s.question) for s in samples[:12])
    chunk = samples[:12]
    with torch.no_grad():
        first_tokens = predict(model, processor, chunk, prompt)
    generated = generate_answers(model, processor, [s.question for s in chunk], [[s.image] for s in chunk], 1)
    assert generated == first_tokens


def test_a_resumed_default_eval_keeps_its_sample_count_when_configs_are_added(tmp_path, monkeypatch):
    """The default count shrinks as configs are added; a resume that adds one answers the run's samples for it
    (it was refused as "other settings (samples)", its finished answers stranded)."""
    import json

    from vtprune import cli
    from vtprune.eval.shards import read_all

    monkeypatch.setattr(cli, "EVAL_PREDICTIONS", 240)  # 2 configs: 120 samples each; 3 configs: 78
    out = tmp_path / "out"
    assert cli.main(["eval", "--methods", "random", "--budgets", "64", "--out", str(out)]) == 0
    assert cli.main(["eval", "--methods", "random,uniform", "--budgets", "64", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["samples"] == 120
    counts = {}
    for record in read_all(out):
        counts[record["config"]] = counts.get(record["config"], 0) + 1
    assert counts == {"unpruned": 120, "random@64": 120, "uniform@64": 120}


def test_a_budget_keeping_every_visual_token_is_the_unpruned_row_and_calibrates_nothing(reference, tmp_path):
    """On the reference model's 576 tokens an image, budget 576 (or 1.0, or more) prunes nothing: eval lists it as
    not run instead of a row that repeats the unpruned one under a pruned name, and calibrate, whose every
    setting would then tie, refuses it (it wrote a table of ties)."""
    from types import SimpleNamespace

    from vtprune import cli
    from vtprune.cli_args import method_spec
    from vtprune.synth.reference import image_tokens, prompt_for

    model, processor = reference
    assert image_tokens(processor, prompt_for(processor)) == 576 == model.config.image_seq_length
    configs, refused = cli.runnable_configs(model, [method_spec("fastv")], [64, 576, 1000, 1.0, 0.9995, 0.5], {},
                                            SimpleNamespace(main=True), image_tokens=576)
    assert [c.name for c in configs] == ["unpruned", "fastv@64", "fastv@0.5"]
    assert list(refused) == ["fastv@576", "fastv@1000", "fastv@1.0", "fastv@0.9995"]  # (0.9995 x 576 rounds to all)
    assert all("keeps all 576 visual tokens of each image" in reason for reason in refused.values())
    with pytest.raises(SystemExit, match="--budget 576 keeps all 576 visual tokens of each image"):
        cli.main(["calibrate", "--method", "clasp", "--budget", "576", "--out", str(tmp_path / "table.json")])


def test_vtprune_calibrate_writes_and_prints_its_table(tmp_path, capsys):
    """The command end to end, on 6 samples (one a class): it writes its table and prints it."""
    import json

    from vtprune import cli

    out = tmp_path / "tables" / "table.json"  # a folder not there yet is made
    assert cli.main(["calibrate", "--method", "clasp", "--samples", "6", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["method"] == "clasp" and table["budget"] == 64 and len(table["classes"]) == 6
    printed = capsys.readouterr().out
    assert '"calibration_accuracy"' in printed or "'calibration_accuracy'" in printed
    assert f"wrote {out}" in " ".join(printed.split())
    assert "no calibration sample of class" not in printed


def test_vtprune_calibrate_says_which_classes_its_samples_left_out(tmp_path, capsys):
    from vtprune import cli

    assert cli.main(["calibrate", "--method", "clasp", "--samples", "4", "--out", str(tmp_path / "table.json")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "no calibration sample of class existence, general among the 4: CLASP runs those with its defaults" \
        in printed
