"""Loaders for local copies of the real benchmarks, in the formats people actually have on disk.

`load_benchmark(task, path)` finds the format under `path` and returns `BenchmarkSample`s whose ``question``
is the text lmms-eval 0.7.3 asks for the task with its default prompt (``doc_to_text`` with the
``default`` ``lmms_eval_specific_kwargs``) and whose ``reference`` holds exactly the fields
`vtprune.eval.metrics.score` reads for the task. Accepted formats:

(a) lmms-eval / HF-datasets parquet copies (a hub snapshot folder, a folder of ``*.parquet`` or one file),
    with the column names of the datasets lmms-eval 0.7.3 reads (`TaskSpec.hf_dataset`). Where a snapshot
    holds several configs or splits, the ones lmms-eval evaluates are picked (e.g. MMBench ``en/dev-*``).
(b) ``datasets.save_to_disk`` folders (``state.json`` + ``data-*.arrow``, or ``dataset_dict.json`` + split
    folders), read with pyarrow directly, without the ``datasets`` package.
(c) the benchmark's own files as LLaVA's evaluation docs use them (`TaskSpec.official_files`).

Every format is first turned into rows ("docs") with the lmms-eval column names, so the prompt and the
reference of a task are built by one function whatever the format. Any malformed input raises ValueError
naming the file, the row and the field, and saying how to fix it.

The formats are read by `tables` ((a) and (b)) and `official_files` ((c)); `fields` checks a row's fields and
`images` opens its image. This module holds the task table, picks what each task reads, and builds its samples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from .fields import Doc, _display, _integer, _missing, _optional_id, _string_list, _text, _Where, _yes_no, listed_option
from .images import _open_image
from .metrics import (MME_SUBTASKS, OCRBENCH_CATEGORIES, POPE_SPLITS, TASK_ALIASES, VIDEOMME_DURATIONS,
                      canonical_task, pope_split_problem)
from .official_files import _OFFICIAL_READERS
from .tables import _check_shards, _columns, _find_tables, _rows, _Table

__all__ = ["BenchmarkSample", "TaskSpec", "TASKS", "load_benchmark"]


# ---------------------------------------------------------------------------------------------------------
# public types and the task table


@dataclass(frozen=True)
class BenchmarkSample:
    task: str
    id: str
    images: tuple[Image.Image, ...]
    question: str    # the text the model is asked: lmms-eval 0.7.3's doc_to_text with the default prompt
    reference: dict  # the fields metrics.score needs for this task
    source: str = ""  # where its row is: "file row N" / "file line N", for errors that concern the row
    videos: tuple[Path, ...] = ()  # video files, read into frames when the question is asked (`videos.py`)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    max_new_tokens: int         # lmms-eval 0.7.3's generation_kwargs for the task
    stop: tuple[str, ...]       # generation_kwargs "until" strings, if the task sets any
    hf_dataset: str             # what lmms-eval loads (its yaml's dataset_path, lmms-lab-encoder mirrors lmms-lab)
    hf_config: str | None       # the config folder inside a hub snapshot, if the dataset has several
    split: str                  # the split lmms-eval evaluates
    official_files: str         # format (c): the benchmark's own files, as LLaVA's Evaluation.md lays them out


# lmms-eval's default post prompts (the `default` entry of each yaml's lmms_eval_specific_kwargs).
_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
_VIZWIZ_POST = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + _SHORT_ANSWER
_OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
_MMBENCH_CN_POST = "\n请直接使用所提供的选项字母作为答案回答。"
# en_utils and cn_utils both read mmbench.yaml's sys_prompt, so the CN prompt lists options in English too.
_MMBENCH_OPTIONS_HEADER = "There are several options:"
# textvqa and vizwiz set only "until"; lmms-eval's llava / llava_hf models then generate up to 1024 tokens.
_LMMS_MODEL_DEFAULT_MAX_NEW_TOKENS = 1024

TASKS: dict[str, TaskSpec] = {
    "gqa": TaskSpec(
        "gqa", "GQA testdev-balanced: compositional questions on scene images, exact-match accuracy",
        16, (), "lmms-lab/GQA", "testdev_balanced_instructions", "testdev",
        "testdev_balanced_questions.json (GQA's question file, also under data/) + images/<imageId>.jpg"),
    "mmbench_en": TaskSpec(
        "mmbench_en", "MMBench-EN dev: multiple-choice perception and reasoning, circular accuracy",
        1024, ("ASSISTANT:",), "lmms-lab/MMBench", "en", "dev",
        "mmbench_dev_20230712.tsv (MMBench's TSV with base64 images)"),
    "mmbench_cn": TaskSpec(
        "mmbench_cn", "MMBench-CN dev: the Chinese MMBench, circular accuracy",
        256, (), "lmms-lab/MMBench", "cn", "dev",
        "mmbench_dev_cn_20231003.tsv (MMBench's TSV with base64 images)"),
    "mme": TaskSpec(
        "mme", "MME: yes/no perception and cognition questions, two per image, acc + acc+ per subtask",
        16, (), "lmms-lab/MME", None, "test",
        "MME_Benchmark_release_version/<subtask>/ (images with question .txt files, or images/ + "
        "questions_answers_YN/)"),
    "pope": TaskSpec(
        "pope", "POPE: object-hallucination yes/no questions on COCO val2014 (adversarial/popular/random), F1",
        128, (), "lmms-lab/POPE", None, "test",
        "coco/coco_pope_{adversarial,popular,random}.json (POPE's JSON lines) + val2014/ images"),
    "scienceqa_img": TaskSpec(
        "scienceqa_img", "ScienceQA-IMG: the test questions of ScienceQA that come with an image, accuracy",
        16, (), "lmms-lab/ScienceQA", "ScienceQA-IMG", "test",
        "problems.json + pid_splits.json + images/test/<pid>/image.png"),
    "textvqa": TaskSpec(
        "textvqa", "TextVQA val: questions about text in images, VQA accuracy",
        _LMMS_MODEL_DEFAULT_MAX_NEW_TOKENS, ("ASSISTANT:",), "lmms-lab/textvqa", None, "validation",
        "TextVQA_0.5.1_val.json + train_images/<image_id>.jpg"),
    "vizwiz": TaskSpec(
        "vizwiz", "VizWiz-VQA val: questions from blind users' photos, some unanswerable, VQA accuracy",
        _LMMS_MODEL_DEFAULT_MAX_NEW_TOKENS, ("ASSISTANT:",), "lmms-lab/VizWiz-VQA", None, "val",
        "Annotations/val.json (VizWiz's annotation file) + val/ images"),
    "ocrbench": TaskSpec(
        "ocrbench", "OCRBench: 1000 OCR questions in 10 categories, one point per matched answer",
        128, (), "echo840/OCRBench", None, "test",
        "OCRBench.json (also under OCRBench/) + OCRBench_Images/"),
    "videomme": TaskSpec(
        "videomme", "Video-MME: multiple-choice questions on short, medium and long videos, accuracy",
        16, (), "lmms-lab/Video-MME", None, "test",
        "the hub's parquet (videomme/test-*.parquet) + data/<videoID>.mp4 (the videos of its zip files)"),
}


def load_benchmark(task: str, path: str | Path, limit: int | None = None) -> list[BenchmarkSample]:
    """The samples of `task` from the local copy at `path` (format detected; see the module doc).

    `limit` keeps the first `limit` samples, and every other sample of the scoring units they belong to, since
    the score needs them whole: MME rounds up to finish the last image's question pair, MMBench adds every
    rotation of each question kept. Every image is decoded once now, so that one cut short or corrupt is an error
    naming its row before any answer; RGB ones are then kept undecoded until first read (a benchmark's pixels can
    run to tens of GB), others are converted to RGB now, as lmms-eval's doc_to_visual does.
    """
    spec = _task_spec(task)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, not {limit!r}")
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root} does not exist; pass the folder or file holding your {spec.name} copy")
    others = _other_benchmarks(spec)
    if root.is_dir() and root.name in others:
        raise ValueError(f"{root}: is named after task {root.name}, not {spec.name}; put {spec.name}'s copy in "
                         f"its own folder (DATA/{spec.name}) and pass that")
    found = _find_tables(root)
    # a folder named after another benchmark (DATA/mme when the one-task DATA itself is read) is never this one's
    tables = [t for t in found if not others & set(t.parts)]
    if tables:
        docs = _take(_table_docs(spec, root, tables), limit, spec)
        if spec.name == "gqa":
            docs = _attach_gqa_images(spec, root, tables, docs)
        if spec.name == "videomme":
            docs = [({**doc, "video": _videomme_video(doc, where, root)}, where) for doc, where in docs]
    else:
        reader = _OFFICIAL_READERS[spec.name](root)
        if reader is None:
            skipped = sorted({p for t in found for p in t.parts} & others)
            note = (f" ({', '.join(f'{p}/' for p in skipped)} under it: named after another task, which "
                    f"{spec.name} never reads)" if skipped else "")
            raise ValueError(_no_format_message(spec, root) + note)
        docs = _take(reader, limit, spec)
        if not docs:
            raise ValueError(f"{root}: its {spec.name} files hold no questions; re-download them")
    samples = [_to_sample(spec, doc, where, n) for n, (doc, where) in enumerate(docs)]
    if spec.name.startswith("mmbench"):
        _check_rotations(samples, [doc for doc, _ in docs])
    return _with_unique_ids(samples)


def _task_spec(task: str) -> TaskSpec:
    return TASKS[canonical_task(task)]


def _other_benchmarks(spec: TaskSpec) -> set[str]:
    """The names (tasks and aliases) of the other benchmarks; mmbench_en and mmbench_cn are one dataset, told apart
    by its config folders (en/, cn/), but a folder named for the other language is never this one's."""
    names = {**{t: t for t in TASKS}, **TASK_ALIASES}
    others = {n for n, t in names.items() if TASKS[t].hf_dataset != spec.hf_dataset}
    language = {"mmbench_en": {"mmbench_cn", "mmbench_cn_dev"}, "mmbench_cn": {"mmbench_en", "mmbench_en_dev"}}
    return others | language.get(spec.name, set())


def _no_format_message(spec: TaskSpec, root: Path) -> str:
    config = f"config {spec.hf_config!r}, " if spec.hf_config else ""
    return (f"{root}: no {spec.name} data in a format this loader reads. Accepted: "
            f"(a) parquet files of {spec.hf_dataset} ({config}split {spec.split!r}): a folder of *.parquet "
            f"or one .parquet file; (b) a datasets.save_to_disk folder (state.json + data-*.arrow, or "
            f"dataset_dict.json + split folders); (c) {spec.official_files}")


def _take(docs: Iterable[tuple[Doc, _Where]], limit: int | None, spec: TaskSpec) -> list[tuple[Doc, _Where]]:
    out: list[tuple[Doc, _Where]] = []
    kept: set = set()  # the scoring units of the first `limit` rows
    for doc, where in docs:
        unit = _unit(spec, doc)
        if limit is None or len(out) < limit:
            kept.add(unit)
        elif unit is None or unit not in kept:
            if not spec.name.startswith("mmbench"):
                break
            continue  # MMBench lists every original question before the rotations: read on to the end
        out.append((doc, where))
    if hasattr(docs, "close"):
        docs.close()  # let a reader stopped early by `limit` clean up (the MMBench TSV reader resets csv state)
    return out


def _unit(spec: TaskSpec, doc: Doc):
    """What the score needs whole, so a limit must not split it: an MME image (its two questions), an MMBench
    question (its rotations, index % 1,000,000). None for the other tasks, or a row whose field is unusable (its
    builder then says why)."""
    if spec.name == "mme":
        return doc.get("question_id")
    if spec.name.startswith("mmbench"):
        try:
            return int(doc.get("index")) % _MMBENCH_ROTATION
        except (TypeError, ValueError):
            return None
    return None


_MMBENCH_ROTATION = 1_000_000  # rotation k of MMBench question q has index q + k x 1,000,000


def _check_rotations(samples: list[BenchmarkSample], docs: list[Doc]) -> None:
    """MMBench's circular evaluation asks a question with n options n times, its options rotated (index
    q + k x 1,000,000, k = 0..n-1, in MMBench's dev files), and counts it right only if every rotation is: with a
    rotation missing it silently becomes a plain multiple-choice score, and two questions that share an index
    would be merged into one. So each question's rows must be exactly its n rotations of one question."""
    questions: dict[int, list[tuple[BenchmarkSample, Doc]]] = {}
    for sample, doc in zip(samples, docs):
        questions.setdefault(sample.reference["index"] % _MMBENCH_ROTATION, []).append((sample, doc))
    for q, rows in questions.items():
        first, first_doc = rows[0]
        by_index: dict[int, BenchmarkSample] = {}
        for sample, doc in rows:
            index = sample.reference["index"]
            if index in by_index:
                raise ValueError(f"{sample.source}: has index {index}, as {by_index[index].source} has; every MMBench "
                                 f"row has its own index (these are two questions sharing one, or a row copied "
                                 f"twice): give each question its own index, or remove the copy")
            by_index[index] = sample
            if doc["question"] != first_doc["question"] or _options(sample) != _options(first):
                raise ValueError(f"{sample.source}: its index {index} makes it a rotation of question {q} "
                                 f"({first.source}), but its question or options differ; give each question its "
                                 f"own index")
        n = len(_options(first))
        expected = {q + k * _MMBENCH_ROTATION for k in range(n)}
        if set(by_index) != expected:
            sources = "; ".join(s.source for s, _ in rows)
            missing = sorted(expected - set(by_index))
            problem = (f"index {', '.join(map(str, missing))} missing" if missing else
                       f"index {', '.join(map(str, sorted(set(by_index) - expected)))} beyond its {n} rotations")
            raise ValueError(f"{sources}: MMBench question {q} has {n} options, so circular evaluation needs its {n} "
                             f"rotations (index {q} + k x 1,000,000, k = 0..{n - 1}), but has {problem}; use the "
                             f"complete dev file (every rotation of every question)")


def _options(sample: BenchmarkSample) -> list[str]:
    return sorted(str(sample.reference[k]) for k in "ABCD" if sample.reference.get(k) is not None)


def _with_unique_ids(samples: list[BenchmarkSample]) -> list[BenchmarkSample]:
    # MME's two questions share a question_id (the image) and POPE-style ids can repeat across files;
    # the runner keys results by id, so repeated ids get "#1", "#2" ... in file order. A row that repeats an
    # earlier one's id and question is a copy, which would count twice, or contradicts it (another answer),
    # which would score one of the two wrong whatever the model says: both refused.
    counts = Counter(s.id for s in samples)
    seen: Counter = Counter()
    first: dict[tuple, BenchmarkSample] = {}
    out = []
    for s in samples:
        if counts[s.id] > 1:
            key = (s.id, s.question)
            if key in first:
                other = first[key]
                if repr(other.reference) == repr(s.reference):
                    raise ValueError(f"{s.source}: repeats {other.source} (same id {s.id!r}, question and "
                                     f"answer), so it would be scored twice; remove the copy")
                differ = ", ".join(f"{k} {other.reference.get(k)!r} there, {s.reference.get(k)!r} here"
                                   for k in {**other.reference, **s.reference}
                                   if repr(other.reference.get(k)) != repr(s.reference.get(k)))
                raise ValueError(f"{s.source}: has the id {s.id!r} and question of {other.source} but not its "
                                 f"answer ({differ}), so one of the two is wrong; keep the right one")
            first[key] = s
            seen[s.id] += 1
            s = replace(s, id=f"{s.id}#{seen[s.id]}")
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------
# formats (a) and (b): the tables lmms-eval reads for a task


# The configs of the datasets with several, so that a copy of another config (ScienceQA-FULL for
# ScienceQA-IMG, GQA's testdev_all for testdev_balanced, MMBench's cn for en) is refused, not scored in its place.
_CONFIGS = {
    "lmms-lab/MMBench": {"en", "cn", "cc"},
    "lmms-lab/ScienceQA": {"ScienceQA-FULL", "ScienceQA-IMG"},
    "lmms-lab/GQA": {f"{split}_{kind}_{part}" for split in ("challenge", "submission", "test", "testdev", "train", "val")
                     for kind in ("all", "balanced") for part in ("images", "instructions")},
}
# Split names the hub uses; a copy holding only another one of these is refused (a file named otherwise, e.g.
# my_copy.parquet, says nothing of its split and is read).
_SPLITS = {"train", "validation", "val", "test", "testdev", "dev", "challenge", "submission"}


def _select(tables: list[_Table], spec: TaskSpec, config: str | None, root: Path) -> list[_Table]:
    """The tables lmms-eval would read: those under the task's config folder (when the copy has config
    folders, as hub snapshots do), then those of its split (when the copy holds several splits)."""
    if config:
        in_config = [t for t in tables if config in t.parts]
        others = _CONFIGS.get(spec.hf_dataset, set()) - {config}
        if not in_config and (found := sorted({p for t in tables for p in t.parts} & others)):
            raise ValueError(f"{root}: holds {spec.hf_dataset}'s {', '.join(found)} config but not {config!r}, "
                             f"which {spec.name} reads; copy that config's files too")
        tables = in_config or tables
    in_split = [t for t in tables if t.split == spec.split or {t.split, spec.split} == {"val", "validation"}]
    splits = sorted({t.split for t in tables if t.split})
    if not in_split and (len(splits) > 1 or set(splits) & _SPLITS):
        raise ValueError(f"{root}: holds split{'s' * (len(splits) > 1)} {', '.join(splits)} but not {spec.split!r}, "
                         f"the split lmms-eval evaluates for {spec.name}; point at the files of that split")
    selected = in_split or tables
    _check_shards(selected, root)
    return selected


def _table_docs(spec: TaskSpec, root: Path, tables: list[_Table]) -> Iterator[tuple[Doc, _Where]]:
    if spec.name == "gqa":
        tables = [t for t in tables if "question" in _columns(t, root)]
        if not tables:
            raise ValueError(f"{root}: no GQA question table (a table with a 'question' column, i.e. "
                             f"{spec.hf_dataset}'s testdev_balanced_instructions)")
    selected = _select(tables, spec, spec.hf_config, root)
    empty = True
    for table in selected:
        for row in _rows(table, root):
            empty = False
            yield row
    if empty:  # else the run fails only after loading the model, on "no predictions to score"
        raise ValueError(f"{', '.join(_display(t.path, root) for t in selected)}: no rows (an empty table); "
                         f"re-download or re-save {spec.name}'s copy")


def _attach_gqa_images(spec: TaskSpec, root: Path, tables: list[_Table],
                       docs: list[tuple[Doc, _Where]]) -> list[tuple[Doc, _Where]]:
    # lmms-eval's gqa_process_docs joins testdev_balanced_instructions.imageId to testdev_balanced_images.id
    image_tables = [t for t in tables if {"id", "image"} <= set(cols := _columns(t, root)) and "question" not in cols]
    if not image_tables:
        raise ValueError(f"{root}: GQA's questions and images are separate configs of {spec.hf_dataset}; put "
                         f"testdev_balanced_images' files next to testdev_balanced_instructions' (no table "
                         f"with 'id' and 'image' columns found)")
    wanted = {str(doc.get("imageId")) for doc, _ in docs}
    images, found_at = {}, {}
    for table in _select(image_tables, spec, "testdev_balanced_images", root):
        for row, where in _rows(table, root):
            image_id = str(row.get("id"))
            if image_id not in wanted:
                continue
            if image_id in images and row.get("image") != images[image_id]:  # which one the questions are about?
                raise where.error("id", f"is {image_id!r}, as {found_at[image_id]} has, with another image",
                                  "give each image its own id (use the testdev_balanced_images files as released)")
            images[image_id], found_at[image_id] = row.get("image"), f"{where.file} {where.row}"
    out = []
    for doc, where in docs:
        image_id = _text(doc, "imageId", where, "the id of the question's image")
        if image_id not in images:
            raise where.error("imageId", f"is {image_id!r}, which no image table row has",
                              "use the testdev_balanced_images split that goes with these questions")
        out.append(({**doc, "image": images[image_id]}, where))
    return out


def _videomme_video(doc: Doc, where: _Where, root: Path) -> Path:
    # videomme_doc_to_visual: <copy>/data/<videoID>.mp4, else .MP4, else .mkv
    video_id = _text(doc, "videoID", where, "the id of the question's video")
    # the copy's folder; given the parquet file itself, its folder or (hub layout: videomme/test-*.parquet) the
    # snapshot's, whichever holds data/; given the snapshot's videomme/ folder (what DATA/videomme names when DATA is
    # the snapshot), the snapshot's
    folders = [root / "data", root.parent / "data"] if root.is_dir() else [root.parent / "data",
                                                                            root.parent.parent / "data"]
    folder = next((f for f in folders if f.is_dir()), folders[0])
    for name in (f"{video_id}.mp4", f"{video_id}.MP4", f"{video_id}.mkv"):
        if (folder / name).is_file():
            return folder / name
    raise where.error("videoID", f"is {video_id!r}, but {folder / (video_id + '.mp4')} does not exist",
                      "unzip Video-MME's videos into data/ beside the parquet files")


# ---------------------------------------------------------------------------------------------------------
# per task: question text (lmms-eval 0.7.3 doc_to_text, default kwargs) and reference fields
# Each builder returns (id or None, question, reference).


def _gqa(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    answer = _text(doc, "answer", where, "the gold answer string (GQA's 'answer')")
    return _optional_id(doc, "id"), f"{question}{_SHORT_ANSWER}", {"answer": answer}


def _pope(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    answer = _yes_no(doc, "answer", where, "'yes' or 'no'", period=False)  # POPE's scorers take the bare word
    category = doc.get("category")
    if not _missing(category) and (problem := pope_split_problem(category)) is not None:
        raise where.error("category", problem, f"expected {', '.join(POPE_SPLITS)}: point pope at POPE's copy")
    qid = _optional_id(doc, "question_id")
    sid = f"{category}/{qid}" if qid and isinstance(category, str) and category else qid
    return sid, f"{question.strip()}{_SHORT_ANSWER}", {"answer": answer, "category": category}


_MME_SUBTASK_NAMES = [c for kind in MME_SUBTASKS.values() for c in kind]
_MME_REPLACED = " Please answer yes or no."  # mme_doc_to_text drops it when a post prompt is set


def _mme(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    qid = _text(doc, "question_id", where, "the image's id, e.g. 'code_reasoning/0020.png'")
    answer = _yes_no(doc, "answer", where, "'Yes' or 'No'", period=True)  # MME's scorers drop the period
    category = doc.get("category") or qid.split("/")[0]
    if category not in _MME_SUBTASK_NAMES:
        raise where.error("category", f"is {category!r}", f"expected an MME subtask: {', '.join(_MME_SUBTASK_NAMES)}")
    text = question.strip().replace(_MME_REPLACED, "") + _SHORT_ANSWER
    return qid, text, {"question_id": qid, "category": category, "answer": answer}


_MMBENCH_LETTERS = ("A", "B", "C", "D", "E")


def _mmbench(doc: Doc, where: _Where, chinese: bool):
    question = _text(doc, "question", where)
    index = _integer(doc, "index", where, "the integer question index")
    # create_options_prompt: the letters present, in order, whose cell is not blank / "nan"
    options = {k: doc[k] for k in _MMBENCH_LETTERS if listed_option(doc.get(k))}
    if not options:
        raise where.error("A", "and the other option columns are all empty", "expected option texts in A-D")
    answer = _text(doc, "answer", where, f"the gold option letter, one of {', '.join(options)} (MMBench's "
                                         "test split has no answers: use dev)")
    if answer.strip() not in options:
        raise where.error("answer", f"is {answer!r}", f"expected one of its option letters {', '.join(options)}")
    listing = "\n".join(f"{k}. {v}" for k, v in options.items())
    hint = doc.get("hint")
    # en_utils skips a hint that is NaN or the string "nan"; cn_utils only skips NaN (pd.notna).
    has_hint = hint is not None and not (isinstance(hint, float) and math.isnan(hint)) \
        and (chinese or hint != "nan")
    body = f"{question} {_MMBENCH_OPTIONS_HEADER}\n{listing}"
    if has_hint:
        body = f"{hint} {body}"
    # doc_to_text appends "\n" + post_prompt and the post prompt starts with "\n": two newlines, as lmms-eval.
    text = f"{body}\n{_MMBENCH_CN_POST if chinese else _OPTION_LETTER}"
    reference = {"index": index, "answer": answer.strip(),
                 **{k: (doc.get(k) if listed_option(doc.get(k)) else None) for k in "ABCD"},
                 "category": doc.get("category"),
                 "L2-category": doc.get("L2-category", doc.get("l2-category"))}
    return str(index), text, reference


def _scienceqa(doc: Doc, where: _Where):
    if _missing(doc.get("image")):
        raise where.error("image", "is missing", "ScienceQA-IMG's questions all come with an image (a text-only "
                          "one is ScienceQA-FULL's); point at the ScienceQA-IMG config's files")
    question = _text(doc, "question", where)
    choices = _string_list(doc, "choices", where, "a non-empty list of option texts")
    answer = _integer(doc, "answer", where, f"the gold option's 0-based index (0..{len(choices) - 1})")
    if not 0 <= answer < len(choices):
        raise where.error("answer", f"is {answer}", f"expected an index into its {len(choices)} choices")
    hint = doc.get("hint") or ""
    context = f"Context: {hint}\n" if hint else ""
    listing = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
    text = f"{context}{question}\n{listing}{_OPTION_LETTER}"
    return _optional_id(doc, "id"), text, {"choices": choices, "answer": answer}


# Columns only one of the two VQA-accuracy benchmarks has (lmms-lab's tables), which otherwise look alike: a copy
# of one under the other's name would be read, asked with the other's prompt and scored by the same rule.
_TEXTVQA_ONLY = ("ocr_tokens", "image_classes", "set_name")
_VIZWIZ_ONLY = ("category",)


def _refuse_the_others_copy(doc: Doc, where: _Where, task: str, other: str, columns: tuple[str, ...]) -> None:
    found = [column for column in columns if column in doc]
    if found:
        raise where.error(found[0], f"is a column of {other}'s rows, not {task}'s",
                          f"this looks like a copy of {other}: point {task} at its own files")


def _answers(doc: Doc, where: _Where, expected: str) -> list[str]:
    """The human answers of a VQA-accuracy question; all of them blank would score every answer 0 (not refused
    one by one: a blank answer among others is a worker's, and the official rule counts it)."""
    answers = _string_list(doc, "answers", where, expected)
    if not any(a.strip() for a in answers):
        raise where.error("answers", f"holds only blank answers ({answers!r:.60})", f"expected {expected}")
    return answers


def _textvqa(doc: Doc, where: _Where):
    _refuse_the_others_copy(doc, where, "TextVQA", "VizWiz-VQA", _VIZWIZ_ONLY)
    question = _text(doc, "question", where)
    answers = _answers(doc, where, "the list of human answers (10 in TextVQA)")
    # str.capitalize also lowercases the rest of the question: lmms-eval does exactly this.
    return _optional_id(doc, "question_id"), f"{question.capitalize()}{_SHORT_ANSWER}", {"answers": answers}


def _vizwiz(doc: Doc, where: _Where):
    _refuse_the_others_copy(doc, where, "VizWiz-VQA", "TextVQA", _TEXTVQA_ONLY)
    question = _text(doc, "question", where)
    answers = _answers(doc, where, "the list of human answers (10 in VizWiz)")
    reference = {"answers": answers}
    category = doc.get("category")
    if isinstance(category, str) and category:
        reference["category"] = category
    return _optional_id(doc, "question_id"), f"{question.capitalize()}{_VIZWIZ_POST}", reference


def _ocrbench(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    answer = doc.get("answer")
    if isinstance(answer, str) and answer:
        answers: str | list[str] = answer
    else:
        answers = _string_list(doc, "answer", where, "the accepted answer string(s)")
    if any(not a.strip() for a in ([answers] if isinstance(answers, str) else answers)):
        raise where.error("answer", f"holds a blank answer ({answers!r}), which the substring rule matches in "
                                    "every prediction", "expected the accepted answer string(s)")
    dataset = _text(doc, "dataset", where, "the source dataset name, e.g. 'IIIT5K' or 'HME100k'")
    qtype = _text(doc, "question_type", where, "one of the 10 OCRBench categories")
    categories = [c for group in OCRBENCH_CATEGORIES.values() for c in group]
    if qtype not in categories:
        raise where.error("question_type", f"is {qtype!r}", f"expected one of: {', '.join(categories)}")
    return _optional_id(doc, "id"), question.strip(), {"answer": answers, "dataset": dataset,
                                                        "question_type": qtype}


_VIDEOMME_OPTIONS = ("Select the best answer to the following multiple-choice question based on the video and the "
                     "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")


def _videomme(doc: Doc, where: _Where):
    # videomme_doc_to_text (the same file from lmms-eval v0.7.2 to commit 75571cf): its option prompt
    # (which names subtitles even without them), the question, the options as given ("A. ..."), then the
    # default post prompt, which starts with its own newline
    question = _text(doc, "question", where)
    options = _string_list(doc, "options", where, "the list of 4 options, e.g. 'A. red'")
    answer = _text(doc, "answer", where, "the gold option letter A-D")
    if answer.strip() not in ("A", "B", "C", "D"):
        raise where.error("answer", f"is {answer!r}", "expected an option letter A-D")
    if "ABCD".index(answer.strip()) >= len(options):  # no answer could be right
        raise where.error("answer", f"is {answer.strip()!r}, but the row has {len(options)} options",
                          f"expected one of its option letters {', '.join('ABCD'[:len(options)])}")
    duration = _text(doc, "duration", where, "short, medium or long")
    if duration not in VIDEOMME_DURATIONS:
        raise where.error("duration", f"is {duration!r}", f"expected one of {', '.join(VIDEOMME_DURATIONS)}")
    listing = "\n".join(options)
    text = f"{_VIDEOMME_OPTIONS}\n{question}\n{listing}\n{_OPTION_LETTER}"
    reference = {"answer": answer.strip(), "duration": duration, "domain": doc.get("domain"),
                 "task_type": doc.get("task_type"), "videoID": doc["videoID"]}
    return _optional_id(doc, "question_id"), text, reference


_BUILDERS: dict[str, Callable[[Doc, _Where], tuple]] = {
    "gqa": _gqa, "pope": _pope, "mme": _mme, "scienceqa_img": _scienceqa, "textvqa": _textvqa,
    "vizwiz": _vizwiz, "ocrbench": _ocrbench, "videomme": _videomme,
    "mmbench_en": lambda d, w: _mmbench(d, w, chinese=False),
    "mmbench_cn": lambda d, w: _mmbench(d, w, chinese=True),
}


def _to_sample(spec: TaskSpec, doc: Doc, where: _Where, ordinal: int) -> BenchmarkSample:
    sid, question, reference = _BUILDERS[spec.name](doc, where)
    image, videos = doc.get("image"), ()
    if spec.name == "videomme":
        images: tuple = ()
        videos = (doc["video"],)
    else:
        images = (_open_image(image, where),)
    return BenchmarkSample(spec.name, sid if sid is not None else str(ordinal), images, question, reference,
                           f"{where.file} {where.row}", videos)
