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

from .fields import Doc, _display, _integer, _text, _Where, first_non_utf8, utf16
from .images import _ImageFile
from .metrics import MME_SUBTASKS, POPE_SPLITS


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


def _read_text(file: Path, root: Path) -> str:
    """The file's text; a file that is not UTF-8 (the benchmarks ship UTF-8) is named with its first bad line. A
    byte-order mark (what editors on Windows put first) is dropped, as it is no part of the text."""
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(file, root) from None


def _not_utf8(file: Path, root: Path) -> ValueError:
    # found again in the whole file: a streaming decoder's position is within whatever chunk it was given
    data = file.read_bytes()
    if utf16(data):
        return ValueError(f"{_display(file, root)}: is UTF-16 (it starts with UTF-16's byte-order mark), not UTF-8 as "
                          f"the benchmark's files are; convert it (iconv -f utf-16 -t utf-8) or re-download it")
    found = first_non_utf8(data)
    if found is None:
        return ValueError(f"{_display(file, root)}: not UTF-8; re-download it, or convert it to UTF-8")
    line, offset, byte = found
    return ValueError(f"{_display(file, root)} line {line} (byte {offset} of the file): not UTF-8 (byte {byte:#04x}); "
                      f"the benchmark's files are UTF-8: re-download it, or convert it (e.g. iconv -f latin1 -t utf-8)")


def _load_json(file: Path, root: Path):
    text = _read_text(file, root)
    if not text.strip():
        raise ValueError(f"{_display(file, root)}: is empty; re-download the file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{_display(file, root)} line {e.lineno}: not valid JSON ({e.msg}); re-download the "
                         f"file") from None


def _entries(value, file: Path, root: Path, kind: type, what: str):
    """`value` if it is a non-empty `kind` (the file's list or object of entries), else an error naming the file:
    an empty one would silently score nothing, or leave its part of the benchmark out."""
    if not isinstance(value, kind):
        raise ValueError(f"{_display(file, root)}: holds {type(value).__name__}, expected {what}; re-download "
                         f"the file")
    if not value:
        raise ValueError(f"{_display(file, root)}: holds no entries, expected {what}; re-download the file")
    return value


def _json_object(value, where: _Where, what: str) -> dict:
    """The check every reader makes on one entry of its file: it must be a JSON object."""
    if not isinstance(value, dict):
        raise ValueError(f"{where.file} {where.row}: holds {type(value).__name__} {value!r:.60}, expected "
                         f"a JSON object ({what}); fix or re-download the file")
    return value


def _json_lines(file: Path, root: Path) -> Iterator[tuple[dict, _Where]]:
    """A JSON-lines file (POPE's coco_pope_*.json), or a JSON array holding the same objects."""
    name = _display(file, root)
    text = _read_text(file, root)
    if not text.strip():
        raise ValueError(f"{name}: is empty, expected one JSON object per line; re-download the file")
    if text.lstrip().startswith("["):
        rows = [(obj, f"entry {i}") for i, obj in
                enumerate(_entries(_load_json(file, root), file, root, list, "a list of question objects"))]
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
        where = _Where(name, row)
        yield _json_object(obj, where, "a question"), where


def _renamed(obj: dict, where: _Where, names: dict[str, str]) -> tuple[Doc, _Where]:
    """`obj`'s fields under their lmms-eval names (`names`: file name -> lmms-eval name); absent stay absent."""
    doc = {names[k]: v for k, v in obj.items() if k in names}
    return doc, replace(where, renamed=tuple((v, k) for k, v in names.items()), read=tuple(map(str, obj)))


def _read_pope(root: Path):
    found = {s: _first_file(root, [f"coco_pope_{s}.json"], ("", "coco")) for s in POPE_SPLITS}
    files = [f for f in found.values() if f]
    if not files:
        return None
    if missing := [f"coco_pope_{s}.json" for s, f in found.items() if f is None]:
        raise ValueError(f"{root}: has {', '.join(f.name for f in files)} but not {', '.join(missing)}; POPE's score "
                         f"is the mean over its three splits, so point at the folder holding all three files")
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
    questions = _entries(_load_json(file, root), file, root, dict, "GQA's object of question id -> question")

    def docs():
        for qid, q in questions.items():
            where = _Where(_display(file, root), f"question {qid!r}")
            q = _json_object(q, where, "a question with imageId, question and answer")
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
    entries = _entries(data["data"], file, root, list, "TextVQA's 'data' list of questions")

    def docs():
        for i, q in enumerate(entries):
            where = _Where(_display(file, root), f"data[{i}]")
            q = _json_object(q, where, "a question with image_id, question and answers")
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
    problems = _entries(_load_json(problems_file, root), problems_file, root, dict,
                        "ScienceQA's object of problem id -> problem")
    splits = _load_json(splits_file, root)
    if not isinstance(splits, dict) or not isinstance(splits.get("test"), list) or not splits["test"]:
        raise ValueError(f"{_display(splits_file, root)}: has no 'test' list of problem ids; copy it from ScienceQA's "
                         f"data/scienceqa folder")
    image_dir = _first_dir([base / "images" / "test", base / "test"])

    def docs():
        with_image = 0
        for pid in map(str, splits["test"]):  # JSON keys are strings: an id written as a number names the same key
            where = _Where(_display(problems_file, root), f"problem {pid!r}")
            if pid not in problems:
                raise ValueError(f"{_display(splits_file, root)}: test id {pid!r} is not in problems.json; use the "
                                 f"two files from the same ScienceQA release")
            p = _json_object(problems[pid], where, "a problem with question, choices, answer and image")
            if not p.get("image"):
                continue  # ScienceQA-IMG is the test problems that come with an image
            with_image += 1
            image = _text(p, "image", where, "the image's file name, e.g. 'image.png' (null: no image)")
            doc, where = _renamed(p, where, {"question": "question", "choices": "choices", "answer": "answer",
                                             "hint": "hint"})
            doc["id"] = pid
            doc["image"] = _ImageFile(image_dir / pid / image, "image", f"{image_dir}/<pid>/")
            yield doc, where
        if not with_image:
            raise ValueError(f"{_display(problems_file, root)}: none of the {len(splits['test'])} test problems "
                             f"{_display(splits_file, root)} lists has an image, and ScienceQA-IMG is those that do; "
                             f"use ScienceQA's full problems.json (its 'image' fields name each problem's image)")
    return docs()


def _read_vizwiz(root: Path):
    file = _first_file(root, ["val.json"], ("", "Annotations"))
    if file is None:
        return None
    base = file.parent if file.parent.name != "Annotations" else file.parent.parent
    image_dir = _first_dir([base / "val", base / "images"])
    entries = _entries(_load_json(file, root), file, root, list, "VizWiz's list of annotations")

    def docs():
        for i, q in enumerate(entries):
            where = _Where(_display(file, root), f"entry {i}")
            q = _json_object(q, where, "an annotation with image, question and answers")
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
    entries = _entries(_load_json(file, root), file, root, list, "OCRBench's list of questions")

    def docs():
        for i, q in enumerate(entries):
            where = _Where(_display(file, root), f"entry {i}")
            q = _json_object(q, where, "a question with image_path, question, answers, dataset_name and type")
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
    if missing := [c for c in subtasks if c not in present]:
        raise ValueError(f"{_display(release, root)}: has no folder for MME subtask{'s' * (len(missing) > 1)} "
                         f"{', '.join(missing)}; MME's scores sum all 14 subtasks, so copy MME's whole release")

    # five subtasks keep images/ and questions_answers_YN/ apart; the others mix them in one folder
    folders = {c: (release / c / "questions_answers_YN", release / c / "images")
               if (release / c / "questions_answers_YN").is_dir() else (release / c, release / c) for c in present}
    if empty := [c for c, (qa_dir, _) in folders.items() if not any(qa_dir.glob("*.txt"))]:
        raise ValueError(f"{_display(release, root)}: the folder of MME subtask{'s' * (len(empty) > 1)} "
                         f"{', '.join(empty)} holds no question files (*.txt); MME's scores sum all 14 subtasks, so "
                         "copy MME's whole release")

    def docs():
        for category, (qa_dir, image_dir) in folders.items():
            for txt in sorted(qa_dir.glob("*.txt")):
                image = next((image_dir / (txt.stem + s) for s in _MME_IMAGE_SUFFIXES
                              if (image_dir / (txt.stem + s)).is_file()), None)
                name = _display(txt, root)
                if image is None:
                    raise _Where(name, "(every line)").error(
                        "image", f"has no file {txt.stem}.jpg/.png in {image_dir}",
                        "put each question file's image (same name) in that folder")
                lines = [(n, line) for n, line in enumerate(_read_text(txt, root).splitlines(), 1) if line.strip()]
                if not lines:  # its image would silently drop out of the subtask's score
                    raise ValueError(f"{name}: is empty, so image {image.name} has no questions; restore its two "
                                     f"'question<TAB>Yes/No' lines from MME's release")
                for n, line in lines:
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
        with tsv.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not reader.fieldnames:
                raise ValueError(f"{name}: is empty; re-download MMBench's TSV")
            if "image" not in reader.fieldnames:
                raise ValueError(f"{name} line 1: no 'image' column in the header; expected MMBench's TSV "
                                 f"columns index, question, hint, A-D, answer, category, image, ...")
            start = reader.line_num + 1  # a row's first line (a quoted cell may span lines)
            for i, raw in enumerate(reader):
                where = _Where(name, f"row {i} (line {start})")
                _check_field_count(raw, len(reader.fieldnames), where, reader.line_num - start)
                start = reader.line_num + 1
                # blank cells are NaN to pandas (how MMBench's own code reads the TSV)
                doc = {k: (None if v == "" else v) for k, v in raw.items()}
                _integer(doc, "index", where, "the integer question index")  # the key later rows' images refer to
                doc["image"] = _mmbench_image(doc, images_by_index, where)
                yield doc, where
            if reader.line_num <= 1:
                raise ValueError(f"{name}: has its header but no rows; re-download MMBench's TSV")
    except UnicodeDecodeError:
        raise _not_utf8(tsv, root) from None
    finally:
        csv.field_size_limit(old_limit)


def _check_field_count(raw: dict, expected: int, where: _Where, extra_lines: int) -> None:
    """A row of another number of fields than the header has its cells under the wrong columns (pandas, which
    MMBench's code reads the TSV with, refuses it); csv.DictReader puts the surplus under None, or None for each
    cell missing. A quote left open swallows the tabs and lines after it, up to the next quote."""
    count = expected + len(raw.get(None, ())) - sum(v is None for k, v in raw.items() if k is not None)
    if count == expected:
        return
    cause = (f"; a quote (\") in it is not closed, so the {extra_lines} line{'s' * (extra_lines > 1)} after it were "
             f"read as part of it" if extra_lines else "")
    raise ValueError(f"{where.file} {where.row}: has {count} tab-separated fields, but the header has {expected}"
                     f"{cause}; fix the row (a tab inside a cell must be in a quoted cell), or re-download the TSV")


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
