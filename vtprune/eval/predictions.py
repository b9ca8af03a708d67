"""A predictions file for `vtprune score`: one JSON object a line, its `prediction` beside the reference fields."""

from __future__ import annotations

import io
import json
from pathlib import Path

from .fields import first_non_utf8, utf16


# The fields that name a benchmark's question (or, MME's question_id, its image): two lines alike in them and all
# else are one answer given twice.
ID_FIELDS = {"question_id", "questionId", "id", "index", "pid"}


def read_predictions(path: str | Path) -> tuple[list[str], list[dict], list[int]]:
    """(predictions, references, each row's line number) from a JSONL file; a malformed line raises ValueError
    naming the file and line."""
    predictions, references, numbers = [], [], []
    first_of: dict[str, int] = {}  # a line with an id, as written, -> its first line number
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if utf16(data):
            raise ValueError(f"{path}: is UTF-16 (it starts with UTF-16's byte-order mark, as Windows PowerShell's `>` "
                             "writes), not UTF-8 as JSON Lines is; save it as UTF-8 (iconv -f utf-16 -t utf-8, or "
                             "PowerShell's Out-File -Encoding utf8)") from None
        line, _, byte = first_non_utf8(data)
        raise ValueError(f"{path} line {line}: byte {byte:#04x} is not UTF-8; save the file as UTF-8 (JSON Lines is "
                         "UTF-8)") from None
    with io.StringIO(text, newline=None) as lines:  # newlines read as open() reads them
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not a JSON object ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number}: not a JSON object")
            if "prediction" not in row:
                raise ValueError(f"{path} line {number}: no 'prediction' field (the model's answer)")
            if ID_FIELDS & row.keys():  # (lines without an id may be alike and still be other questions)
                whole = json.dumps(row, sort_keys=True)
                if whole in first_of:
                    raise ValueError(f"{path} line {number}: repeats line {first_of[whole]} whole (id, answer and "
                                     "prediction), so it would be scored twice; remove the copy")
                first_of[whole] = number
            prediction = row.pop("prediction")
            if prediction is not None and not isinstance(prediction, str):
                raise ValueError(f"{path} line {number}: field 'prediction' must be a string; got {prediction!r}")
            predictions.append(prediction)
            references.append(row)
            numbers.append(number)
    if not predictions:
        raise ValueError(f"{path}: no predictions")
    return predictions, references, numbers
