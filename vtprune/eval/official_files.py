"""Format (c) of `vtprune.eval.loaders`: readers of each benchmark's own release files, laid out as LLaVA's
docs/Evaluation.md has them (`TaskSpec.official_files`). Each reader renames the file's fields to lmms-eval's
column names, so the rest of the loader sees one schema, and points at images as `_ImageFile`s. A reader
returns None when `root` holds none of its files, else an iterator of (doc, where) pairs.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from .fields import Doc, _display, _text, _Where
from .images import _ImageFile
from .metrics import MME_SUBTASKS


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


def _renamed(obj: dict, where: _Where, names: dict[str, str]) -> tuple[Doc, _Where]:
    """`obj`'s fields under their lmms-eval names (`names`: file name -> lmms-eval name); absent stay absent."""
    doc = {names[k]: v for k, v in obj.items() if k in names}
    return doc, replace(where, renamed=tuple((v, k) for k, v in names.items()))


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
    "videomme": lambda root: None,  # Video-MME's own release is the hub's parquet
}
