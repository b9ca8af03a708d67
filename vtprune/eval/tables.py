"""Formats (a) and (b) of `vtprune.eval.loaders`: finding the Parquet and Arrow tables under a folder (hub
snapshots, folders of parquet files, ``datasets.save_to_disk`` folders, the datasets cache) with the split
and config folders each belongs to, and reading their rows with pyarrow alone. It knows file layouts, not
tasks: which of the tables a task reads is decided in `loaders`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .fields import _display, _Where


@dataclass(frozen=True)
class _Table:
    path: Path
    kind: str              # "parquet" or "arrow"
    split: str | None      # the split the file holds, from its name or its save_to_disk folder
    parts: tuple[str, ...]  # folder names between the root and the file (hub config folders among them)
    shard: tuple[int, int] | None = None  # (index, count) of a <split>-00000-of-00003 file


def _shard_of(file: Path) -> tuple[int, int] | None:
    m = _SHARD.match(file.stem)
    return (int(m.group("index")), int(m.group("count"))) if m else None


def _check_shards(tables: list[_Table], root: Path) -> None:
    """Refuse a split whose numbered shards are not each there exactly once: a missing one would score part of
    the benchmark as if it were all of it, a copy (a backup folder) would score its rows twice."""
    found: dict[tuple, list[_Table]] = {}
    for table in tables:
        if table.shard is not None:
            found.setdefault((table.split, table.shard[1]), []).append(table)
    for (split, count), shards in found.items():
        have = [t.shard[0] for t in shards]
        for index in sorted({i for i in have if have.count(i) > 1}):
            copies = ", ".join(_display(t.path, root) for t in shards if t.shard[0] == index)
            raise ValueError(f"{root}: shard {index} of {count} of split {split!r} is there more than once "
                             f"({copies}); remove the extra copies")
        missing = sorted(set(range(count)) - set(have))
        if missing:
            names = ", ".join(f"{split}-{i:05d}-of-{count:05d}" for i in missing)
            raise ValueError(f"{root}: split {split!r} has {len(have)} of its {count} shards ({names} missing), "
                             f"so the benchmark would be scored on part of its rows; copy every shard")


def _pyarrow():
    """pyarrow with its parquet and ipc modules, imported when a copy is first read (not by every command)."""
    import pyarrow
    import pyarrow.ipc  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    return pyarrow


# <split>-00000-of-00003, some snapshots with a hash after it (lmms-lab/MME's test-00000-of-00004-a25dbe3b44c4fda6)
_SHARD = re.compile(r"^(?P<split>.+?)-(?P<index>\d{5})-of-(?P<count>\d{5})(?:-[0-9a-f]+)?$")


def _find_tables(root: Path) -> list[_Table]:
    if root.is_file():
        kinds = {".parquet": "parquet", ".arrow": "arrow"}
        return [_Table(root, kinds[root.suffix], _split_of(root), (), _shard_of(root))] if root.suffix in kinds else []
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
        tables.extend(_Table(here / f, "parquet", _split_of(here / f), parts, _shard_of(here / f))
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
