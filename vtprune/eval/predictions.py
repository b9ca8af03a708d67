"""A predictions file for `vtprune score`: one JSON object a line, its `prediction` beside the reference fields."""

from __future__ import annotations

import io
import json
from pathlib import Path

from .fields import first_non_utf8


def read_predictions(path: str | Path) -> tuple[list[str], list[dict], list[int]]:
    """(predictions, references, each row's line number) from a JSONL file; a malformed line raises ValueError
    naming the file and line."""
    predictions, references, numbers = [], [], []
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
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
            prediction = row.pop("prediction")
            if prediction is not None and not isinstance(prediction, str):
                raise ValueError(f"{path} line {number}: field 'prediction' must be a string; got {prediction!r}")
            predictions.append(prediction)
            references.append(row)
            numbers.append(number)
    if not predictions:
        raise ValueError(f"{path}: no predictions")
    return predictions, references, numbers
