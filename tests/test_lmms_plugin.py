"""The lmms-eval plugin (`lmms-eval --model vtprune`), in the environment `make lmms` builds (lmms-eval needs
torchvision, which the core install leaves out); skipped where lmms_eval is not installed.

End to end: a tiny LLaVA and its processor saved to a folder, a local copy of a POPE-shaped dataset, a task
that is lmms-eval's own POPE task pointed at that copy, and lmms-eval's command line with batch size 2,
offline. Then the model class on its own: batches equal samples alone, stop strings, method options, argument
errors, a video file.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval", reason="the lmms extra is not installed (make lmms builds it)")

from lmms_eval.api.instance import Instance

import vtprune
from vtprune.eval.generation import generate_answers, load_checkpoint
from vtprune.tiny import tiny_llava
from vtprune.tiny_processors import tiny_processor

from .test_generation import chat_template

TASK = "vtprune_tiny_pope"
QUESTIONS = ["is there a dog in the image ?", "is there a red cat ?", "is there a tree ?", "is there a bus ?",
             "is there a car near the tree ?"]


def image(i):
    """Document i's picture (its height varies, so a batch's images differ in size)."""
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (40 + 10 * i, 90, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaVA and its stock processor (with a chat template) saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    model = tiny_llava()
    processor = tiny_processor(model)
    processor.chat_template = chat_template(processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pope_task(tmp_path_factory):
    """A folder for --include_path holding TASK: lmms-eval's POPE (prompt, metrics) over a local copy of 5
    samples saved with `datasets`, so nothing is downloaded."""
    import datasets

    root = tmp_path_factory.mktemp("lmms-task")
    rows = {"question_id": [str(i) for i in range(len(QUESTIONS))], "question": QUESTIONS,
            "answer": ["yes", "no", "yes", "no", "yes"], "image": [image(i) for i in range(len(QUESTIONS))]}
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(root / "data")
    pope = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        f"include: {pope}\ntask: {TASK}\ndataset_path: {root / 'data'}\ndataset_kwargs:\n  load_from_disk: true\n")
    return root


def test_lmms_eval_runs_the_plugin_end_to_end(checkpoint, pope_task, tmp_path):
    """`lmms-eval --model vtprune ... --batch_size 2` on the local task answers and scores every sample."""
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "vtprune",
               "--model_args", f"pretrained={checkpoint},method=fastv,budget=8,max_new_tokens=4",
               "--tasks", TASK, "--include_path", str(pope_task / "tasks"), "--batch_size", "2",
               "--device", "cpu", "--output_path", str(out), "--log_samples"]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **offline})
    log = run.stdout[-3000:] + run.stderr[-3000:]
    # lmms-eval logs an evaluation's error and still exits 0: its results file is the proof
    assert run.returncode == 0 and list(out.rglob("*_results.json")), log
    table = [line for line in run.stdout.splitlines() if line.startswith(("|", "vtprune ("))]
    print("\n$ " + " ".join(command), *table, sep="\n")  # what lmms-eval printed, for `make lmms`
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    assert results["results"][TASK]["pope_accuracy,none"] is not None
    assert results["n-samples"][TASK]["effective"] == len(QUESTIONS)
    samples = [json.loads(line) for line in next(out.rglob(f"*_samples_{TASK}.jsonl")).read_text().splitlines()]
    assert sorted(int(s["doc_id"]) for s in samples) == list(range(len(QUESTIONS)))
    samples.sort(key=lambda sample: int(sample["doc_id"]))
    print("answers:", [sample["filtered_resps"] for sample in samples])
    # each answer is the one vtprune gives that prompt alone, pruned the same way
    model, processor = load_checkpoint(checkpoint)
    with vtprune.apply(model, "fastv", 8):
        alone = [generate_answers(model, processor, [sample["input"]], [[image(i)]], max_new_tokens=4)[0]
                 for i, sample in enumerate(samples)]
    assert [sample["filtered_resps"] for sample in samples] == alone


# The model class on its own, fed Instances as lmms-eval's evaluator builds them.

DOCS = [{"question": q, "image": image(i)} for i, q in enumerate(QUESTIONS)]
DOCS.append({"question": "is there a dog near the tree", "image": None})  # text alone


def visuals(doc):
    return [doc["image"]] if doc["image"] is not None else []


def request(task, doc_id, question, settings, doc_to_visual):
    """A generate_until request as lmms-eval's tasks build them."""
    return Instance("generate_until", (question, dict(settings), doc_to_visual, doc_id, task, "test"), idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def requests(doc_ids, settings):
    return [request("docs", i, DOCS[i]["question"], settings, visuals) for i in doc_ids]


def plugin(checkpoint, **model_args):
    from vtprune.integrations.lmms_eval import Vtprune

    model = Vtprune(pretrained=str(checkpoint), **{"device": "cpu", **model_args})
    model.task_dict = {"docs": {"test": DOCS}}
    return model


def test_batches_answer_what_samples_alone_answer_in_request_order(checkpoint):
    model = plugin(checkpoint, method="fastv", budget=8, batch_size=4)
    settings = {"max_new_tokens": 3, "until": []}
    batched = model.generate_until(requests(range(len(DOCS)), settings))
    model.batch_size = 1
    assert batched == [model.generate_until(requests([i], settings))[0] for i in range(len(DOCS))]
    assert model.pruner.last_stats is not None


def test_answers_stop_at_the_tasks_stop_strings(checkpoint):
    model = plugin(checkpoint, batch_size=2)
    full = model.generate_until(requests([0, 1], {"max_new_tokens": 4}))
    stops = [answer.split()[1] for answer in full]  # each answer's second word
    cut = model.generate_until(requests([0, 1], {"max_new_tokens": 4, "until": stops}))
    assert all(not stop_found_in(answer, stops) for answer in cut)
    assert all(answer_full.startswith(answer) for answer, answer_full in zip(cut, full))


def test_answers_reach_lmms_evals_response_cache_and_the_bar_counts_batches(checkpoint, monkeypatch):
    """lmms-eval's --use_cache stores each answer through the model's cache_hook; the progress bar counts batches."""
    from vtprune.integrations import lmms_eval as plugin_module

    model = plugin(checkpoint, batch_size=2)
    cached, bars = [], []
    model.cache_hook = SimpleNamespace(add_partial=lambda kind, request, answer: cached.append((kind, request, answer)))

    class Bar:
        def __init__(self, total, **options):
            self.total, self.done = total, 0
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            pass

    monkeypatch.setattr(plugin_module, "tqdm", Bar)
    answers = model.generate_until(requests(range(3), {"max_new_tokens": 2}))
    assert sorted(cached) == sorted(("generate_until", (DOCS[i]["question"], {"max_new_tokens": 2}), answers[i])
                                    for i in range(3))
    assert [(bar.total, bar.done) for bar in bars] == [(2, 2)]


def stop_found_in(answer, stops):
    return any(stop in answer for stop in stops)


def test_the_entry_point_names_the_plugin():
    from lmms_eval.models import get_model

    from vtprune.integrations.lmms_eval import Vtprune

    assert get_model("vtprune") is Vtprune


def test_method_options_take_vtprune_evals_spelling(checkpoint):
    from vtprune.integrations.lmms_eval import typed_options

    assert typed_options("clse", {"score": "attn"}) == {"score": "attn"}
    model = plugin(checkpoint, method="pdrop", budget=0.5, layers="1/2")
    assert model.pruner.method.options.layers == (1, 2)


def test_model_args_override_the_options_the_checkpoint_supplies(checkpoint, tmp_path):
    """CLASP reads the calibration table beside a checkpoint unless model_args name another."""
    from vtprune.methods.clasp import CALIBRATION_FILE

    folder = tmp_path / "calibrated"
    shutil.copytree(checkpoint, folder)
    beside, mine = folder / CALIBRATION_FILE, tmp_path / "mine.json"
    for table, split in ((beside, 0.25), (mine, 0.75)):
        table.write_text(json.dumps({"classes": {"count": {"fusion": None, "split": split}}}))
    assert plugin(folder, method="clasp", budget=8).pruner.method.options.calibration == str(beside)
    assert plugin(folder, method="clasp", budget=8, calibration=str(mine)).pruner.method.options.calibration == str(mine)


@pytest.mark.parametrize("model_args, error", [
    ({"method": "fastv"}, "needs a budget"),
    ({"budget": 8}, "budget=8 needs a method"),
    ({"batch_size": "auto"}, "fixed --batch_size"),
    ({"revision": "main"}, "unknown model_args revision: vtprune's lmms-eval model takes pretrained"),
    ({"dtype": "bf16"}, "dtype=bf16 is not one of auto, bfloat16"),
    # lmms-eval's parser hands 0 over as 0, -3 as -3.0 and abc as 'abc'; --batch_size as typed
    ({"batch_size": "0"}, "batch_size=0 must be a whole number >= 1 .*fixed --batch_size N"),
    ({"batch_size": "-2"}, "batch_size=-2 must be a whole number >= 1"),
    ({"max_frames": 0}, "max_frames=0 must be a whole number >= 1 .frames sampled"),
    ({"max_frames": -3.0}, "max_frames=-3.0 must be a whole number >= 1"),
    ({"max_frames": 2.5}, "max_frames=2.5 must be a whole number >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be a whole number >= 1 .*leave it out for each task's own"),
    ({"max_new_tokens": -5.0}, "max_new_tokens=-5.0 must be a whole number >= 1"),
    ({"max_new_tokens": "abc"}, "max_new_tokens=abc must be a whole number >= 1"),
    ({"max_new_tokens": True}, "max_new_tokens=True must be a whole number >= 1"),
    ({"chat_template": "/nonexistent.jinja"}, "chat_template=/nonexistent.jinja cannot be read .*Jinja chat template"),
    ({"device": "bogus"}, "device=bogus is not a device torch knows: give cpu, cuda"),
    ({"device": "cuda:4096"}, "device=cuda:4096: this machine has .* CUDA device.*or device=cpu"),
])
def test_bad_model_args_fail_clearly(checkpoint, model_args, error):
    with pytest.raises(ValueError, match=error):
        plugin(checkpoint, **model_args)


@pytest.mark.parametrize("asked, own, expected", [
    (None, "cuda:3", "cuda:3"),  # accelerate's, each process its own
    ("cuda", "cuda:3", "cuda:3"),  # a kind only: not every process on cuda:0
    ("cuda:1", "cuda:3", "cuda:1"),  # the one named
    ("cpu", "cuda:3", "cpu"),
    ("cuda", "cpu", "cuda"),  # accelerate chose the CPU: the user's kind wins
])
def test_each_process_runs_where_asked_or_on_its_own_device(asked, own, expected):
    from vtprune.integrations.lmms_eval import process_device

    assert process_device(None if asked is None else torch.device(asked), torch.device(own)) == torch.device(expected)


@pytest.mark.parametrize("asked, settings, model_type, expected", [
    (None, {}, "qwen2_vl", 128), (None, {}, "qwen2_5_vl", 32768), (None, {}, "llava_next", 1024),  # the family's
    (None, {"max_new_tokens": 7}, "qwen2_vl", 7),  # the task's
    (5, {"max_new_tokens": 7}, "llava", 5),  # model_args' max_new_tokens
])
def test_answer_lengths_are_the_tasks_else_the_familys_lmms_eval_models(asked, settings, model_type, expected):
    from vtprune.integrations.lmms_eval import Vtprune

    plugin = SimpleNamespace(max_new_tokens=asked, model=SimpleNamespace(config=SimpleNamespace(model_type=model_type)))
    assert Vtprune.max_new_tokens_for(plugin, settings) == expected


@pytest.mark.parametrize("settings, model_type, expected", [
    ({"until": ["\n"]}, "llava", {"do_sample": False, "num_beams": 1}),
    ({"temperature": 0.7, "top_p": 0.9}, "llava", {"do_sample": True, "num_beams": 1, "temperature": 0.7, "top_p": 0.9}),
    ({"do_sample": True, "num_beams": 2}, "qwen2_vl", {"do_sample": False, "num_beams": 2}),  # temperature decides
    ({"do_sample": True}, "llava_onevision", {"do_sample": True, "num_beams": 1, "temperature": 1.0}),
    ({"do_sample": False, "temperature": 0.2}, "llava_onevision", {"do_sample": False, "num_beams": 1}),
    ({"temperature": 0.7, "num_beams": 3}, "video_llava", {"do_sample": False, "num_beams": 1}),  # always greedy
])
def test_a_tasks_decoding_settings_are_read_as_the_familys_lmms_eval_model_reads_them(settings, model_type, expected):
    """llava_hf (LLaVA-1.5, NeXT), qwen2_vl and qwen2_5_vl sample where the temperature is above 0;
    llava_onevision where do_sample is set; video_llava passes a temperature without do_sample: greedy."""
    from vtprune.integrations.lmms_eval import decoding

    assert decoding(settings, model_type) == expected


def test_the_tasks_sampling_and_beams_reach_generate(checkpoint, monkeypatch):
    """What `decoding` says is what generate is called with, and sampling changes the answers."""
    import torch
    from transformers import GenerationMixin

    called, original = [], GenerationMixin.generate

    def spy(self, *args, **kwargs):
        called.append({key: kwargs.get(key) for key in ("do_sample", "num_beams", "temperature", "top_p")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)  # before apply(), which wraps the model's generate
    model = plugin(checkpoint, method="fastv", budget=8, batch_size=2)
    model.generate_until(requests([0, 1], {"temperature": 5.0, "top_p": 0.9, "max_new_tokens": 6}))
    model.generate_until(requests([0, 1], {"num_beams": 3, "max_new_tokens": 6}))
    assert called == [{"do_sample": True, "num_beams": 1, "temperature": 5.0, "top_p": 0.9},
                      {"do_sample": False, "num_beams": 3, "temperature": None, "top_p": None}]
    greedy = model.generate_until(requests([0, 1], {"max_new_tokens": 6}))
    torch.manual_seed(0)
    assert model.generate_until(requests([0, 1], {"temperature": 5.0, "max_new_tokens": 6})) != greedy


def test_a_video_task_on_a_checkpoint_without_video_is_refused(checkpoint, tmp_path):
    """LLaVA-1.5's processor drops videos: it would answer from the question alone, as unpruned as pruned."""
    model = plugin(checkpoint, method="fastv", budget=8)
    model.task_dict = {"videos": {"test": [{"videos": [str(write_video(tmp_path / "clip.mp4", frames=4))]}]}}
    with pytest.raises(ValueError, match="videos asks about videos, but this checkpoint's processor"):
        model.generate_until([request("videos", 0, "what happens ?", {"max_new_tokens": 2}, lambda d: d["videos"])])


def test_clean_frees_a_pruned_model(checkpoint):
    """lmms-eval's clean() deletes the model to free its memory for a judge; the pruner must not keep it alive."""
    import gc
    import weakref

    model = plugin(checkpoint, method="fastv", budget=8)
    alive = weakref.ref(model.model)
    model.clean()
    gc.collect()
    assert alive() is None and model.pruner is None


def test_loglikelihood_tasks_are_refused_clearly(checkpoint):
    with pytest.raises(NotImplementedError, match="log-likelihood"):
        plugin(checkpoint).loglikelihood([])


def test_counts_come_as_lmms_eval_parses_them(checkpoint):
    """model_args "max_new_tokens=4,max_frames=2.0" arrive as 4 and 2.0, --batch_size 2 as "2": each is read as
    the whole number it spells."""
    model = plugin(checkpoint, batch_size="2", max_new_tokens=4, max_frames=2.0)
    assert (model.batch_size, model.max_new_tokens, model.max_frames) == (2, 4, 2)
    assert model.max_new_tokens_for({"max_new_tokens": 9}) == 4


def test_a_tasks_video_file_is_answered_from_its_frames(tmp_path):
    """A doc_to_visual giving a video file's path (as lmms-eval's video tasks do): max_frames frames of it reach
    the model as one video, beside a text-only sample in the same batch."""
    from vtprune.integrations.lmms_eval import Vtprune
    from vtprune.tiny import tiny_video_llava

    model = tiny_video_llava()
    processor = tiny_processor(model)
    processor.chat_template = chat_template(processor)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    docs = [{"question": "what happens first ?", "videos": [str(write_video(tmp_path / "clip.mp4", frames=12))]},
            {"question": "is there a dog", "videos": []}]
    plugin = Vtprune(pretrained=str(tmp_path / "model"), device="cpu", method="fastv", budget=8, batch_size=2,
                     max_frames=4)
    plugin.task_dict = {"videos": {"test": docs}}
    asked = [request("videos", i, doc["question"], {"max_new_tokens": 3}, lambda doc: doc["videos"])
             for i, doc in enumerate(docs)]
    assert len(plugin.generate_until(asked)) == 2
    stats = plugin.pruner.last_stats
    assert stats.images_per_sample == [1, 0]
    frame_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert stats.visual_tokens_per_sample == [4 * frame_tokens, 0]


def write_video(path, frames):
    import av

    with av.open(str(path), "w") as video:
        stream = video.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            pixels = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            video.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        video.mux(stream.encode())  # flush the encoder
    return path
