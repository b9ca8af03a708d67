"""One run at a time per results folder.

Two runs appending to the same results.jsonl would each evaluate every sample the other
had not yet written, so both finish with every sample twice. The locks are flocks on files in
the folder: the OS releases them when their process ends, however it ends, so a crashed run
never leaves the folder blocked. A run of one process holds the folder's lock alone; the
processes of a data-parallel run share it, and each holds its rank's lock alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".vtprune.lock"


class FolderBusy(RuntimeError):
    pass


_held: set[Path] = set()  # folders this process holds


@contextlib.contextmanager
def hold(folder: str | Path, rank: int | None = None) -> Iterator[None]:
    """Hold `folder` (created if need be) for this process, or raise FolderBusy naming it.

    A run of one process holds the folder's lock alone. The processes of a data-parallel run (`rank`: this
    one's) share it, each holding its rank's lock alone: while they run, a run of one process is refused, and
    so is another data-parallel run's first process (whatever their number), which its other processes wait
    for before they evaluate anything (evaluate's first barrier), so they stop with it. Nested holds of one
    folder in one process share the lock: the command holds it across the evaluation and its reports, and
    evaluate() holds it again for library callers.
    """
    folder = Path(folder).resolve()
    if folder in _held:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:
        if rank is None:
            locks.enter_context(_locked(folder / LOCK_NAME, fcntl.LOCK_EX))
        else:
            locks.enter_context(_locked(folder / LOCK_NAME, fcntl.LOCK_SH))
            locks.enter_context(_locked(folder / f".vtprune.rank-{rank}.lock", fcntl.LOCK_EX))
        with (folder / LOCK_NAME).open("a") as named:  # once every lock is held: the refusal names a live run
            named.truncate(0)
            named.write(f"{os.getpid()}\n")
        _held.add(folder)
        try:
            yield
        finally:
            _held.discard(folder)


@contextlib.contextmanager
def _locked(path: Path, mode: int) -> Iterator[None]:
    handle = path.open("a+")
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        holder = (path.parent / LOCK_NAME).read_text().strip()
        raise FolderBusy(
            f"{path.parent} is in use by another run{f' (pid {holder})' if holder else ''}; "
            "wait for it to finish, or pass another --out"
        ) from None
    # The file stays when released: deleting it would let a third run lock a new file while a second holds the old one.
    try:
        yield
    finally:
        handle.close()
