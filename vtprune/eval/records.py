"""Per-sample results, appended to a JSONL file as they come, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

REQUIRED = ("config", "index", "prediction")  # the synthetic eval adds qclass, answer, correct; benchmarks task, id


class MalformedResults(ValueError):
    pass


class ResultsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self, check: Callable[[dict], str | None] = lambda record: None) -> list[dict]:
        """Every record so far, in file order (`shards.read_all` drops repeats); a line that is not a complete record,
        or one `check` finds a problem with, is an error naming it, except an unterminated last line: a write an
        interruption cut short, which `repair_tail` drops when this file's process resumes (another process, or a
        resume with another number of them, reads past it)."""
        if not self.path.exists():
            return []
        records = []
        with self.path.open() as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    if not line.endswith("\n") and not handle.read():  # the last line, cut short
                        break
                    raise MalformedResults(
                        f"{self.path}:{number}: not valid JSON ({error.msg}); fix or delete that line, "
                        "or start a new run with another --out"
                    ) from None
                missing = [key for key in REQUIRED if key not in record] if isinstance(record, dict) else list(REQUIRED)
                if missing:
                    raise MalformedResults(
                        f"{self.path}:{number}: a result record needs {', '.join(missing)}; fix or delete that line, "
                        "or start a new run with another --out"
                    )
                if (problem := check(record)) is not None:
                    raise MalformedResults(f"{self.path}:{number}: {problem}; delete that line (a resume computes its "
                                           "sample again), or start a new run with another --out")
                records.append(record)
        return records

    def repair_tail(self) -> None:
        """Mend the last line an interruption may have cut short: end it if it is whole, drop it if not."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        # In place, never rewritten whole: an interruption now loses at most the cut line, not the file.
        try:
            json.loads(data[cut:])
        except json.JSONDecodeError:
            os.truncate(self.path, cut)
        else:
            with self.path.open("ab") as handle:
                handle.write(b"\n")

    def append(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))
            handle.flush()
