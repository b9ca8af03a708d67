"""Where a benchmark row came from, and checks on its fields, so that every loader error names the file, the row
and the field (as the file spells it) and says how to fix it. A row ("doc") is a dict under lmms-eval's column
names whatever format it was read from; its `_Where` travels with it from the reader that found it to the
builder that checks it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


Doc = dict  # one benchmark row under lmms-eval's column names ("image" may be bytes, _ImageFile, HF struct)


@dataclass(frozen=True)
class _Where:
    file: str  # as the user knows it: relative to the path they gave
    row: str   # "row 17" (0-based table row), "line 18" (1-based text line), "problem '42'" ...
    # (lmms-eval name, name in the file) for readers that rename fields, so errors name what the file has
    renamed: tuple[tuple[str, str], ...] = ()
    read: tuple[str, ...] = ()  # the fields the file's row has, where a renaming reader keeps only some of them

    def field(self, name: str) -> str:
        return dict(self.renamed).get(name, name)

    def error(self, field: str, problem: str, fix: str) -> ValueError:
        return ValueError(f"{self.file} {self.row}: field {self.field(field)!r} {problem}; {fix}")


def _display(file: Path, root: Path) -> str:
    if file == root:
        return file.name
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)


def _missing(value) -> bool:
    """A blank cell: None, NaN, or the string "nan" (how pandas-written files spell it)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) \
        or (isinstance(value, str) and value.strip().lower() in ("", "nan"))


def listed_option(value) -> bool:
    """Whether lmms-eval's MMBench prompt lists an option cell (`create_options_prompt`: truthy, not NaN, not the
    string "nan"; a cell of spaces or "NaN" is listed). The scorer's options are the same ones."""
    return bool(value) and not (isinstance(value, float) and math.isnan(value)) and value != "nan"


def _required(doc: Doc, field: str, where: _Where, expected: str):
    if field not in doc or _missing(doc[field]):
        present = ", ".join(where.read or [where.field(k) for k in doc if k != "image"]) or "none"
        state = "is missing" if field not in doc else "is null" if doc[field] is None else "is empty"
        raise where.error(field, state, f"expected {expected} (fields present: {present})")
    return doc[field]


def _text(doc: Doc, field: str, where: _Where, expected: str = "a non-empty string") -> str:
    value = _required(doc, field, where, expected)
    if not isinstance(value, str):
        raise where.error(field, f"is {type(value).__name__} {value!r}", f"expected {expected}")
    return value


class NotAStringList(ValueError):
    """The value is not a list (or tuple) of strings, or is empty where it may not be: str() says "is <value>"."""


class NotAString(ValueError):
    """An entry of the list is not a string: str() says "holds <entry>"."""


def string_list(value, empty: bool = False) -> list[str]:
    """value as a list of strings, non-empty unless `empty`: a list or tuple whose VQA-style entries
    ({"answer": ..., "answer_confidence": ...}) count as their answer. The loaders and the metrics read alike."""
    if not isinstance(value, (list, tuple)) or not (value or empty):
        raise NotAStringList(f"is {value!r}")
    out = []
    for a in value:
        if isinstance(a, Mapping):
            a = a.get("answer")
        if not isinstance(a, str):
            raise NotAString(f"holds {a!r}")
        out.append(a)
    return out


def first_non_utf8(data: bytes) -> tuple[int, int, int] | None:
    """(line, offset in the file, the byte) of data's first byte that is not UTF-8; None where all of it is. The
    loaders and `vtprune score` name a file's bad line alike."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return data.count(b"\n", 0, error.start) + 1, error.start, data[error.start]
    return None


def utf16(data: bytes) -> bool:
    """Whether data starts with UTF-16's byte-order mark: what Windows PowerShell's `>` writes, and Notepad's
    "Unicode" encoding. Such a file is not UTF-8 from its first byte, and latin-1 is not what it is."""
    return data[:2] in (b"\xff\xfe", b"\xfe\xff")


def integer(value) -> int:
    """value as an integer: an int, an integral float (a pandas column) or a string of digits; neither a bool nor
    a fraction is one (ValueError)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{value!r} is not an integer")
    try:
        return int(value)
    except TypeError:
        raise ValueError(f"{value!r} is not an integer") from None


def _string_list(doc: Doc, field: str, where: _Where, expected: str) -> list[str]:
    value = _required(doc, field, where, expected)
    try:
        return string_list(value)
    except ValueError as problem:
        raise where.error(field, str(problem), f"expected {expected}") from None


def _yes_no(doc: Doc, field: str, where: _Where, spelled: str, period: bool) -> str:
    """The field as a yes/no answer; `period`: "Yes." counts (as the task's scorers read it)."""
    value = _text(doc, field, where, f"{spelled}")
    word = value.strip().lower()
    if (word.replace(".", "") if period else word) not in ("yes", "no"):
        raise where.error(field, f"is {value!r}", f"expected {spelled}")
    return value


def _integer(doc: Doc, field: str, where: _Where, expected: str) -> int:
    value = _required(doc, field, where, expected)
    try:
        return integer(value)
    except ValueError:
        raise where.error(field, f"is {value!r}", f"expected {expected}") from None


def _optional_id(doc: Doc, field: str) -> str | None:
    value = doc.get(field)
    return None if _missing(value) else str(value)
