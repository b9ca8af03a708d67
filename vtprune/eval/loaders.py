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
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .metrics import MME_SUBTASKS, OCRBENCH_CATEGORIES, TASK_ALIASES

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
}


def load_benchmark(task: str, path: str | Path, limit: int | None = None) -> list[BenchmarkSample]:
    """The samples of `task` from the local copy at `path` (format detected; see the module doc).

    `limit` keeps the first `limit` samples (MME rounds up to finish the last image's question pair, since
    its score needs both). Images are opened lazily: RGB ones are decoded when first read, others are
    converted to RGB now, as lmms-eval's doc_to_visual does.
    """
    spec = _task_spec(task)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, not {limit!r}")
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root} does not exist; pass the folder or file holding your {spec.name} copy")
    tables = _find_tables(root)
    if tables:
        docs = _take(_table_docs(spec, root, tables), limit, spec)
        if spec.name == "gqa":
            docs = _attach_gqa_images(spec, root, tables, docs)
    else:
        reader = _OFFICIAL_READERS[spec.name](root)
        if reader is None:
            raise ValueError(_no_format_message(spec, root))
        docs = _take(reader, limit, spec)
    samples = [_to_sample(spec, doc, where, n) for n, (doc, where) in enumerate(docs)]
    return _with_unique_ids(samples)


def _task_spec(task: str) -> TaskSpec:
    name = TASK_ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _no_format_message(spec: TaskSpec, root: Path) -> str:
    config = f" config {spec.hf_config!r}," if spec.hf_config else ""
    return (f"{root}: no {spec.name} data in a format this loader reads. Accepted: "
            f"(a) parquet files of {spec.hf_dataset} ({config} split {spec.split!r}): a folder of *.parquet "
            f"or one .parquet file; (b) a datasets.save_to_disk folder (state.json + data-*.arrow, or "
            f"dataset_dict.json + split folders); (c) {spec.official_files}")


# ---------------------------------------------------------------------------------------------------------
# where a row came from, for error messages

Doc = dict  # one benchmark row under lmms-eval's column names ("image" may be bytes, _ImageFile, HF struct)


@dataclass(frozen=True)
class _Where:
    file: str  # as the user knows it: relative to the path they gave
    row: str   # "row 17" (0-based table row), "line 18" (1-based text line), "problem '42'" ...
    # (lmms-eval name, name in the file) for readers that rename fields, so errors name what the file has
    renamed: tuple[tuple[str, str], ...] = ()

    def field(self, name: str) -> str:
        return dict(self.renamed).get(name, name)

    def error(self, field: str, problem: str, fix: str) -> ValueError:
        return ValueError(f"{self.file} {self.row}: field {self.field(field)!r} {problem}; {fix}")


def _renamed(obj: dict, where: _Where, names: dict[str, str]) -> tuple[Doc, _Where]:
    """`obj`'s fields under their lmms-eval names (`names`: file name -> lmms-eval name); absent stay absent."""
    doc = {names[k]: v for k, v in obj.items() if k in names}
    return doc, replace(where, renamed=tuple((v, k) for k, v in names.items()))


def _display(file: Path, root: Path) -> str:
    if file == root:
        return file.name
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)


def _take(docs: Iterable[tuple[Doc, _Where]], limit: int | None, spec: TaskSpec) -> list[tuple[Doc, _Where]]:
    out: list[tuple[Doc, _Where]] = []
    for doc, where in docs:
        if limit is not None and len(out) >= limit and not _same_mme_image(spec, out[-1][0], doc):
            break
        out.append((doc, where))
    if hasattr(docs, "close"):
        docs.close()  # let a reader stopped early by `limit` clean up (the MMBench TSV reader resets csv state)
    return out


def _same_mme_image(spec: TaskSpec, previous: Doc, doc: Doc) -> bool:
    # MME scores an image only with both of its questions, so a limit must not split a pair.
    return spec.name == "mme" and doc.get("question_id") is not None \
        and doc.get("question_id") == previous.get("question_id")


def _with_unique_ids(samples: list[BenchmarkSample]) -> list[BenchmarkSample]:
    # MME's two questions share a question_id (the image) and POPE-style ids can repeat across files;
    # the runner keys results by id, so repeated ids get "#1", "#2" ... in file order.
    counts = Counter(s.id for s in samples)
    seen: Counter = Counter()
    out = []
    for s in samples:
        if counts[s.id] > 1:
            seen[s.id] += 1
            s = replace(s, id=f"{s.id}#{seen[s.id]}")
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------
# field checks


def _missing(value) -> bool:
    """A blank cell: None, NaN, or the string "nan" (how pandas-written files spell it)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) \
        or (isinstance(value, str) and value.strip().lower() in ("", "nan"))


def _required(doc: Doc, field: str, where: _Where, expected: str):
    if field not in doc or _missing(doc[field]):
        present = ", ".join(where.field(k) for k in doc if k != "image") or "none"
        state = "is missing" if doc.get(field) is None else "is empty"
        raise where.error(field, state, f"expected {expected} (fields present: {present})")
    return doc[field]


def _text(doc: Doc, field: str, where: _Where, expected: str = "a non-empty string") -> str:
    value = _required(doc, field, where, expected)
    if not isinstance(value, str):
        raise where.error(field, f"is {type(value).__name__} {value!r}", f"expected {expected}")
    return value


def _string_list(doc: Doc, field: str, where: _Where, expected: str) -> list[str]:
    value = _required(doc, field, where, expected)
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise where.error(field, f"is {value!r}", f"expected {expected}")
    out = []
    for a in value:
        if isinstance(a, dict):  # VQA-style annotations: {"answer": ..., "answer_confidence": ...}
            a = a.get("answer")
        if not isinstance(a, str):
            raise where.error(field, f"holds {a!r}", f"expected {expected}")
        out.append(a)
    return out


def _yes_no(doc: Doc, field: str, where: _Where, spelled: str) -> str:
    value = _text(doc, field, where, f"{spelled}")
    if value.strip().lower().replace(".", "") not in ("yes", "no"):
        raise where.error(field, f"is {value!r}", f"expected {spelled}")
    return value


def _integer(doc: Doc, field: str, where: _Where, expected: str) -> int:
    value = _required(doc, field, where, expected)
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise where.error(field, f"is {value!r}", f"expected {expected}") from None


def _optional_id(doc: Doc, field: str) -> str | None:
    value = doc.get(field)
    return None if _missing(value) else str(value)


# ---------------------------------------------------------------------------------------------------------
# per task: question text (lmms-eval 0.7.3 doc_to_text, default kwargs) and reference fields
# Each builder returns (id or None, question, reference).


def _gqa(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    answer = _text(doc, "answer", where, "the gold answer string (GQA's 'answer')")
    return _optional_id(doc, "id"), f"{question}{_SHORT_ANSWER}", {"answer": answer}


def _pope(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    answer = _yes_no(doc, "answer", where, "'yes' or 'no'")
    category = doc.get("category")
    qid = _optional_id(doc, "question_id")
    sid = f"{category}/{qid}" if qid and isinstance(category, str) and category else qid
    return sid, f"{question.strip()}{_SHORT_ANSWER}", {"answer": answer, "category": category}


_MME_REPLACED = " Please answer yes or no."  # mme_doc_to_text drops it when a post prompt is set


def _mme(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    qid = _text(doc, "question_id", where, "the image's id, e.g. 'code_reasoning/0020.png'")
    answer = _yes_no(doc, "answer", where, "'Yes' or 'No'")
    category = doc.get("category") or qid.split("/")[0]
    subtasks = [c for kind in MME_SUBTASKS.values() for c in kind]
    if category not in subtasks:
        raise where.error("category", f"is {category!r}", f"expected an MME subtask: {', '.join(subtasks)}")
    text = question.strip().replace(_MME_REPLACED, "") + _SHORT_ANSWER
    return qid, text, {"question_id": qid, "category": category, "answer": answer}


_MMBENCH_LETTERS = ("A", "B", "C", "D", "E")


def _mmbench(doc: Doc, where: _Where, chinese: bool):
    question = _text(doc, "question", where)
    index = _integer(doc, "index", where, "the integer question index")
    # create_options_prompt: the letters present, in order, whose cell is not blank / "nan"
    options = {k: doc[k] for k in _MMBENCH_LETTERS if doc.get(k) and not _missing_mmbench_cell(doc[k])}
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
                 **{k: (doc.get(k) if not _missing_mmbench_cell(doc.get(k)) else None) for k in "ABCD"},
                 "category": doc.get("category"),
                 "L2-category": doc.get("L2-category", doc.get("l2-category"))}
    return str(index), text, reference


def _missing_mmbench_cell(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == "nan" or value == ""


def _scienceqa(doc: Doc, where: _Where):
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


def _textvqa(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    answers = _string_list(doc, "answers", where, "the list of human answers (10 in TextVQA)")
    # str.capitalize also lowercases the rest of the question: lmms-eval does exactly this.
    return _optional_id(doc, "question_id"), f"{question.capitalize()}{_SHORT_ANSWER}", {"answers": answers}


def _vizwiz(doc: Doc, where: _Where):
    question = _text(doc, "question", where)
    answers = _string_list(doc, "answers", where, "the list of human answers (10 in VizWiz)")
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
    dataset = _text(doc, "dataset", where, "the source dataset name, e.g. 'IIIT5K' or 'HME100k'")
    qtype = _text(doc, "question_type", where, "one of the 10 OCRBench categories")
    categories = [c for group in OCRBENCH_CATEGORIES.values() for c in group]
    if qtype not in categories:
        raise where.error("question_type", f"is {qtype!r}", f"expected one of: {', '.join(categories)}")
    return _optional_id(doc, "id"), question.strip(), {"answer": answers, "dataset": dataset,
                                                        "question_type": qtype}


_BUILDERS: dict[str, Callable[[Doc, _Where], tuple]] = {
    "gqa": _gqa, "pope": _pope, "mme": _mme, "scienceqa_img": _scienceqa, "textvqa": _textvqa,
    "vizwiz": _vizwiz, "ocrbench": _ocrbench,
    "mmbench_en": lambda d, w: _mmbench(d, w, chinese=False),
    "mmbench_cn": lambda d, w: _mmbench(d, w, chinese=True),
}


def _to_sample(spec: TaskSpec, doc: Doc, where: _Where, ordinal: int) -> BenchmarkSample:
    sid, question, reference = _BUILDERS[spec.name](doc, where)
    image = doc.get("image")
    if image is None and spec.name == "scienceqa_img":
        images: tuple = ()  # sqa_doc_to_visual returns [] for a text-only question (ScienceQA-FULL rows)
    else:
        images = (_open_image(image, where),)
    return BenchmarkSample(spec.name, sid if sid is not None else str(ordinal), images, question, reference)


# ---------------------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class _ImageFile:
    path: Path
    field: str  # the row field that named it, for the error message
    hint: str   # where such images are expected to be


def _open_image(value, where: _Where) -> Image.Image:
    data = _image_bytes(value, where)
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        field = value.field if isinstance(value, _ImageFile) else "image"
        raise where.error(field, "is not a readable image", "replace the image with a valid JPEG/PNG") from None
    # RGB images stay undecoded until the processor reads them, so a whole benchmark's pixels are not held
    # at once; other modes are converted now (lmms-eval's doc_to_visual calls .convert("RGB")).
    return image if image.mode == "RGB" else image.convert("RGB")


def _image_bytes(value, where: _Where) -> bytes:
    if isinstance(value, dict):  # an HF Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            value = _ImageFile(Path(value["path"]), "image", "the path stored in the dataset")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, _ImageFile):
        if not value.path.is_file():
            raise where.error(value.field, f"names image {value.path}, which does not exist",
                              f"put the images in {value.hint}")
        return value.path.read_bytes()
    raise where.error("image", "is missing or empty", "every row needs its image (an HF Image struct with bytes)")


# ---------------------------------------------------------------------------------------------------------
# formats (a) and (b): parquet files and save_to_disk arrow files


@dataclass(frozen=True)
class _Table:
    path: Path
    kind: str              # "parquet" or "arrow"
    split: str | None      # the split the file holds, from its name or its save_to_disk folder
    parts: tuple[str, ...]  # folder names between the root and the file (hub config folders among them)


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("reading parquet or save_to_disk copies needs pyarrow: pip install pyarrow") from None
    return pyarrow


_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


def _find_tables(root: Path) -> list[_Table]:
    if root.is_file():
        kinds = {".parquet": "parquet", ".arrow": "arrow"}
        return [_Table(root, kinds[root.suffix], _split_of(root), ())] if root.suffix in kinds else []
    tables = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # skip .cache/huggingface and the like
        here = Path(folder)
        parts = here.relative_to(root).parts
        arrows = sorted(f for f in files if f.endswith(".arrow"))
        if "state.json" in files and arrows:
            tables.extend(_saved_dataset_tables(root, here / "state.json"))
        elif arrows:
            # the datasets cache (~/.cache/huggingface/datasets/<org>___<name>/<config>/...): <name>-<split>-*.arrow
            tables.extend(_Table(here / f, "arrow", _split_of(here / f).rsplit("-", 1)[-1], parts) for f in arrows)
        tables.extend(_Table(here / f, "parquet", _split_of(here / f), parts)
                      for f in sorted(files) if f.endswith(".parquet"))
    return tables


def _split_of(file: Path) -> str:
    if file.stem.isdigit():  # the hub's parquet-converter layout: <config>/<split>/0000.parquet
        return file.parent.name
    m = _SHARD.match(file.stem)  # the usual hub layout: <config or data>/<split>-00000-of-00003.parquet
    return m.group("split") if m else file.stem


def _saved_dataset_tables(root: Path, state_file: Path) -> list[_Table]:
    folder = state_file.parent
    where = _Where(_display(state_file, root), "")
    try:
        state = json.loads(state_file.read_text())
        files = [folder / d["filename"] for d in state.get("_data_files", [])]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{where.file}: not a datasets state.json (no '_data_files' list of filenames); "
                         f"re-save the dataset with save_to_disk") from None
    files = files or sorted(folder.glob("data-*.arrow"))
    # in a DatasetDict folder the split is the folder's name; a lone Dataset records it in state.json
    split = folder.name if (folder.parent / "dataset_dict.json").is_file() else state.get("_split")
    rel = folder.relative_to(root).parts if folder != root else ()
    for f in files:
        if not f.is_file():
            raise ValueError(f"{where.file}: lists data file {f.name}, which does not exist; copy the whole "
                             f"save_to_disk folder")
    return [_Table(f, "arrow", split, rel) for f in files]


def _columns(table: _Table, root: Path) -> list[str]:
    pa = _pyarrow()
    try:
        if table.kind == "parquet":
            return list(pa.parquet.ParquetFile(table.path).schema_arrow.names)
        with pa.OSFile(str(table.path)) as f:
            return list(_arrow_reader(pa, f).schema.names)
    except pa.ArrowException as e:
        raise ValueError(f"{_display(table.path, root)}: not a readable {table.kind} file ({e}); "
                         f"re-download or re-save it") from None


def _arrow_reader(pa, f):
    # save_to_disk writes the Arrow streaming format; accept the random-access file format too
    try:
        return pa.ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        return pa.ipc.open_file(f)


def _rows(table: _Table, root: Path) -> Iterator[tuple[dict, _Where]]:
    pa = _pyarrow()
    name = _display(table.path, root)
    try:
        if table.kind == "parquet":
            batches: Iterable = pa.parquet.ParquetFile(table.path).iter_batches(batch_size=64)
            yield from _batch_rows(batches, name)
        else:
            with pa.OSFile(str(table.path)) as f:
                reader = _arrow_reader(pa, f)
                if hasattr(reader, "get_batch"):  # the random-access file format
                    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                else:
                    batches = reader
                yield from _batch_rows(batches, name)
    except pa.ArrowException as e:
        raise ValueError(f"{name}: not a readable {table.kind} file ({e}); re-download or re-save it") from None


def _batch_rows(batches: Iterable, name: str) -> Iterator[tuple[dict, _Where]]:
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield row, _Where(name, f"row {i}")
            i += 1


def _select(tables: list[_Table], spec: TaskSpec, config: str | None, root: Path) -> list[_Table]:
    """The tables lmms-eval would read: those under the task's config folder (when the copy has config
    folders, as hub snapshots do), then those of its split (when the copy holds several splits)."""
    if config:
        in_config = [t for t in tables if config in t.parts]
        # never read MMBench's cn/ folder for mmbench_en (or the reverse) because en/ was not copied
        siblings = {s.hf_config for s in TASKS.values() if s.hf_dataset == spec.hf_dataset} - {config, None}
        if not in_config and (found := sorted({p for t in tables for p in t.parts} & siblings)):
            raise ValueError(f"{root}: holds {spec.hf_dataset}'s {', '.join(found)} config but not {config!r}, "
                             f"which {spec.name} reads; copy that config's files too")
        tables = in_config or tables
    in_split = [t for t in tables if t.split == spec.split]
    if in_split:
        return in_split
    splits = sorted({t.split for t in tables if t.split})
    if len(splits) > 1:
        raise ValueError(f"{root}: holds splits {', '.join(splits)} but not {spec.split!r}, the split lmms-eval "
                         f"evaluates for {spec.name}; point at the files of that split")
    return tables


def _table_docs(spec: TaskSpec, root: Path, tables: list[_Table]) -> Iterator[tuple[Doc, _Where]]:
    if spec.name == "gqa":
        tables = [t for t in tables if "question" in _columns(t, root)]
        if not tables:
            raise ValueError(f"{root}: no GQA question table (a table with a 'question' column, i.e. "
                             f"{spec.hf_dataset}'s testdev_balanced_instructions)")
    for table in _select(tables, spec, spec.hf_config, root):
        yield from _rows(table, root)


def _attach_gqa_images(spec: TaskSpec, root: Path, tables: list[_Table],
                       docs: list[tuple[Doc, _Where]]) -> list[tuple[Doc, _Where]]:
    # lmms-eval's gqa_process_docs joins testdev_balanced_instructions.imageId to testdev_balanced_images.id
    image_tables = [t for t in tables if {"id", "image"} <= set(cols := _columns(t, root)) and "question" not in cols]
    if not image_tables:
        raise ValueError(f"{root}: GQA's questions and images are separate configs of {spec.hf_dataset}; put "
                         f"testdev_balanced_images' files next to testdev_balanced_instructions' (no table "
                         f"with 'id' and 'image' columns found)")
    wanted = {str(doc.get("imageId")) for doc, _ in docs}
    images = {}
    for table in _select(image_tables, spec, "testdev_balanced_images", root):
        for row, _ in _rows(table, root):
            if str(row.get("id")) in wanted:
                images[str(row["id"])] = row.get("image")
    out = []
    for doc, where in docs:
        image_id = _text(doc, "imageId", where, "the id of the question's image")
        if image_id not in images:
            raise where.error("imageId", f"is {image_id!r}, which no image table row has",
                              "use the testdev_balanced_images split that goes with these questions")
        out.append(({**doc, "image": images[image_id]}, where))
    return out


# ---------------------------------------------------------------------------------------------------------
# format (c): the benchmarks' own files (LLaVA's docs/Evaluation.md layout)
# Each reader returns None when `root` holds none of its files, else an iterator of docs in the lmms-eval
# schema with the image as an _ImageFile.


def _first_file(root: Path, names: Iterable[str], subdirs: Iterable[str] = ("",)) -> Path | None:
    names = list(names)
    if root.is_file():
        return root if root.name in names else None
    for sub in subdirs:
        for name in names:
            if (root / sub / name).is_file():
                return root / sub / name
    return None


def _first_dir(candidates: Iterable[Path]) -> Path:
    candidates = list(candidates)
    return next((d for d in candidates if d.is_dir()), candidates[0])


def _load_json(file: Path, root: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{_display(file, root)} line {e.lineno}: not valid JSON ({e.msg}); re-download the "
                         f"file") from None


def _json_lines(file: Path, root: Path) -> Iterator[tuple[dict, _Where]]:
    """A JSON-lines file (POPE's coco_pope_*.json), or a JSON array holding the same objects."""
    name = _display(file, root)
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = [(obj, f"entry {i}") for i, obj in enumerate(_load_json(file, root))]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((json.loads(line), f"line {n}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name} line {n}: not valid JSON ({e.msg}); each line must be one JSON "
                                     f"object") from None
    for obj, row in rows:
        if not isinstance(obj, dict):
            raise ValueError(f"{name} {row}: holds {type(obj).__name__}, expected a JSON object")
        yield obj, _Where(name, row)


_POPE_SPLITS = ("adversarial", "popular", "random")


def _read_pope(root: Path):
    files = [f for s in _POPE_SPLITS if (f := _first_file(root, [f"coco_pope_{s}.json"], ("", "coco")))]
    if not files:
        return None
    base = files[0].parent
    image_dir = _first_dir([base / "val2014", base.parent / "val2014", base / "images", base])

    def docs():
        for file in files:
            category = file.stem[len("coco_pope_"):]
            for obj, where in _json_lines(file, root):
                image = _text(obj, "image", where, "the COCO image file name")
                doc, where = _renamed(obj, where, {"question_id": "question_id", "text": "question", "label": "answer"})
                doc["category"] = category
                doc["image"] = _ImageFile(image_dir / image, "image", f"{image_dir} (COCO val2014)")
                yield doc, where
    return docs()


def _read_gqa(root: Path):
    file = _first_file(root, ["testdev_balanced_questions.json"], ("", "data"))
    if file is None:
        return None
    image_dir = _first_dir([file.parent / "images", root / "images", root / "data" / "images"])
    questions = _load_json(file, root)
    if not isinstance(questions, dict):
        raise ValueError(f"{_display(file, root)}: holds {type(questions).__name__}, expected GQA's object of "
                         f"question id -> question")

    def docs():
        for qid, q in questions.items():
            where = _Where(_display(file, root), f"question {qid!r}")
            image_id = _text(q, "imageId", where, "the id of the question's image")
            doc, where = _renamed(q, where, {"question": "question", "answer": "answer"})
            doc["id"] = qid
            doc["image"] = _ImageFile(image_dir / f"{image_id}.jpg", "imageId", f"{image_dir}")
            yield doc, where
    return docs()


def _read_textvqa(root: Path):
    file = _first_file(root, ["TextVQA_0.5.1_val.json"])
    if file is None:
        return None
    base = file.parent
    image_dir = _first_dir([base / "train_images", base / "train_val_images" / "train_images", base / "images"])
    data = _load_json(file, root)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{_display(file, root)}: has no 'data' list; expected TextVQA's annotation file")

    def docs():
        for i, q in enumerate(data["data"]):
            where = _Where(_display(file, root), f"data[{i}]")
            image_id = _text(q, "image_id", where, "the image's id (its file name without .jpg)")
            doc, where = _renamed(q, where, {"question_id": "question_id", "question": "question",
                                             "answers": "answers"})
            doc["image"] = _ImageFile(image_dir / f"{image_id}.jpg", "image_id", f"{image_dir}")
            yield doc, where
    return docs()


def _read_scienceqa(root: Path):
    problems_file = _first_file(root, ["problems.json"], ("", "data", "scienceqa"))
    if problems_file is None:
        return None
    base = problems_file.parent
    splits_file = base / "pid_splits.json"
    if not splits_file.is_file():
        raise ValueError(f"{_display(problems_file, root)}: pid_splits.json is missing next to it; copy it from "
                         f"ScienceQA's data/scienceqa folder (it says which problems are the test split)")
    problems = _load_json(problems_file, root)
    splits = _load_json(splits_file, root)
    if not isinstance(splits, dict) or not isinstance(splits.get("test"), list):
        raise ValueError(f"{_display(splits_file, root)}: has no 'test' list of problem ids")
    image_dir = _first_dir([base / "images" / "test", base / "test"])

    def docs():
        for pid in splits["test"]:
            where = _Where(_display(problems_file, root), f"problem {pid!r}")
            if pid not in problems:
                raise ValueError(f"{_display(splits_file, root)}: test id {pid!r} is not in problems.json; use the "
                                 f"two files from the same ScienceQA release")
            p = problems[pid]
            if not p.get("image"):
                continue  # ScienceQA-IMG is the test problems that come with an image
            doc, where = _renamed(p, where, {"question": "question", "choices": "choices", "answer": "answer",
                                             "hint": "hint"})
            doc["id"] = pid
            doc["image"] = _ImageFile(image_dir / pid / p["image"], "image", f"{image_dir}/<pid>/")
            yield doc, where
    return docs()


def _read_vizwiz(root: Path):
    file = _first_file(root, ["val.json"], ("", "Annotations"))
    if file is None:
        return None
    base = file.parent if file.parent.name != "Annotations" else file.parent.parent
    image_dir = _first_dir([base / "val", base / "images"])
    entries = _load_json(file, root)
    if not isinstance(entries, list):
        raise ValueError(f"{_display(file, root)}: holds {type(entries).__name__}, expected VizWiz's list of "
                         f"annotations")

    def docs():
        for i, q in enumerate(entries):
            where = _Where(_display(file, root), f"entry {i}")
            image = _text(q, "image", where, "the image file name")
            doc, where = _renamed(q, where, {"question": "question", "answers": "answers", "answer_type": "category"})
            doc["question_id"] = image
            doc["image"] = _ImageFile(image_dir / image, "image", f"{image_dir}")
            yield doc, where
    return docs()


def _read_ocrbench(root: Path):
    file = _first_file(root, ["OCRBench.json"], ("", "OCRBench"))
    if file is None:
        return None
    image_dir = _first_dir([file.parent / "OCRBench_Images", file.parent.parent / "OCRBench_Images",
                            root / "OCRBench_Images"])
    entries = _load_json(file, root)
    if not isinstance(entries, list):
        raise ValueError(f"{_display(file, root)}: holds {type(entries).__name__}, expected OCRBench's list")

    def docs():
        for i, q in enumerate(entries):
            where = _Where(_display(file, root), f"entry {i}")
            image = _text(q, "image_path", where, "the image path under OCRBench_Images")
            doc, where = _renamed(q, where, {"id": "id", "question": "question", "answers": "answer",
                                             "dataset_name": "dataset", "type": "question_type"})
            doc["image"] = _ImageFile(image_dir / image, "image_path", f"{image_dir}")
            yield doc, where
    return docs()


_MME_RELEASE = "MME_Benchmark_release_version"
_MME_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def _read_mme(root: Path):
    release = root / _MME_RELEASE if (root / _MME_RELEASE).is_dir() else root
    subtasks = [c for kind in MME_SUBTASKS.values() for c in kind]
    present = [c for c in subtasks if (release / c).is_dir()] if release.is_dir() else []
    if not present:
        return None

    def docs():
        for category in present:
            folder = release / category
            # five subtasks keep images/ and questions_answers_YN/ apart; the others mix them in one folder
            qa_dir, image_dir = (folder / "questions_answers_YN", folder / "images") \
                if (folder / "questions_answers_YN").is_dir() else (folder, folder)
            for txt in sorted(qa_dir.glob("*.txt")):
                image = next((image_dir / (txt.stem + s) for s in _MME_IMAGE_SUFFIXES
                              if (image_dir / (txt.stem + s)).is_file()), None)
                name = _display(txt, root)
                if image is None:
                    raise _Where(name, "(every line)").error(
                        "image", f"has no file {txt.stem}.jpg/.png in {image_dir}",
                        "put each question file's image (same name) in that folder")
                for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    where = _Where(name, f"line {n}")
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 2:
                        raise where.error("answer", f"is not the second of two tab-separated fields in {line!r}",
                                          "each line must be 'question<TAB>Yes' or 'question<TAB>No'")
                    yield {"question_id": f"{category}/{image.name}", "question": parts[0],
                           "answer": parts[1].strip(), "category": category,
                           "image": _ImageFile(image, "image", f"{image_dir}")}, where
    return docs()


def _read_mmbench(root: Path, chinese: bool):
    tsv = _mmbench_tsv(root, chinese)
    return None if tsv is None else _mmbench_tsv_docs(tsv, root)


def _mmbench_tsv(root: Path, chinese: bool) -> Path | None:
    if root.is_file():
        return root if root.suffix == ".tsv" else None
    # MMBench ships one TSV per language: mmbench_dev_20230712.tsv and mmbench_dev_cn_20231003.tsv
    def is_cn(f: Path) -> bool:
        return bool(re.search(r"(^|[_\-])cn([_\-.]|$)", f.name.lower()))
    found = [f for f in sorted(root.glob("*.tsv")) + sorted(root.glob("*/*.tsv")) if is_cn(f) == chinese]
    dev = [f for f in found if "dev" in f.name.lower()]
    return (dev or found or [None])[0]


def _mmbench_tsv_docs(tsv: Path, root: Path) -> Iterator[tuple[Doc, _Where]]:
    name = _display(tsv, root)
    images_by_index: dict[str, str] = {}
    old_limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's default 128 KiB cell limit
    try:
        with tsv.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise ValueError(f"{name} line 1: no 'image' column in the header; expected MMBench's TSV "
                                 f"columns index, question, hint, A-D, answer, category, image, ...")
            for i, raw in enumerate(reader):
                where = _Where(name, f"row {i} (line {reader.line_num})")
                # blank cells are NaN to pandas (how MMBench's own code reads the TSV)
                doc = {k: (None if v == "" else v) for k, v in raw.items() if k is not None}
                if "l2-category" in doc:
                    doc["L2-category"] = doc.pop("l2-category")
                doc["image"] = _mmbench_image(doc, images_by_index, where)
                yield doc, where
    finally:
        csv.field_size_limit(old_limit)


def _mmbench_image(doc: Doc, images_by_index: dict[str, str], where: _Where) -> bytes:
    cell = _text(doc, "image", where, "the base64-encoded image")
    if cell.isdigit() and len(cell) < 16:
        # VLMEvalKit's TSVs store a repeated image once; later rows hold the index of the row that has it
        if cell not in images_by_index:
            raise where.error("image", f"refers to row index {cell}, which has no image before this row",
                              "use a TSV where every referenced image appears earlier")
        cell = images_by_index[cell]
    else:
        images_by_index[str(doc.get("index"))] = cell
    try:
        return base64.b64decode(cell, validate=False)
    except (ValueError, TypeError):
        raise where.error("image", "is not valid base64", "re-download the TSV") from None


_OFFICIAL_READERS: dict[str, Callable[[Path], Iterator | None]] = {
    "gqa": _read_gqa, "pope": _read_pope, "mme": _read_mme, "scienceqa_img": _read_scienceqa,
    "textvqa": _read_textvqa, "vizwiz": _read_vizwiz, "ocrbench": _read_ocrbench,
    "mmbench_en": lambda root: _read_mmbench(root, chinese=False),
    "mmbench_cn": lambda root: _read_mmbench(root, chinese=True),
}
