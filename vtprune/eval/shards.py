"""Data-parallel evaluation: which process evaluates which samples, and where it writes them.

Under `accelerate launch --multi_gpu --num_processes N -m vtprune eval ...` (GPUs; on a machine
without one, N CPU processes, gloo) each process takes the
sample indices congruent to its rank and appends to its own results file; the reports read
every results file of the folder. A resumed run skips what any file holds, so a run resumed
with another number of processes neither loses nor repeats a sample. A plain `vtprune eval`
is the one shard of one process, writing results.jsonl as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .records import ResultsFile


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    processes: int = 1
    device: str | None = None  # where accelerate puts this process's model (None: where it was loaded)

    def mine(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.processes == self.rank]

    @property
    def main(self) -> bool:
        return self.rank == 0

    def results(self, folder: Path) -> ResultsFile:
        name = "results.jsonl" if self.processes == 1 else f"results.{self.rank}-of-{self.processes}.jsonl"
        return ResultsFile(Path(folder) / name)

    @property
    def lock_rank(self) -> int | None:
        """What `lock.hold` takes: this process's rank in a data-parallel run, None alone."""
        return None if self.processes == 1 else self.rank

    def wait_for_everyone(self) -> None:
        if self.processes > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()  # the state current_shard made


def current_shard() -> Shard:
    """This process's shard: from accelerate's state when it launched several processes, else the only one."""
    import torch
    from accelerate import PartialState

    # On a machine without a GPU, processes started by `accelerate launch --multi_gpu` (torchrun) are CPU workers
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return Shard()
    return Shard(state.process_index, state.num_processes, str(state.device))


def read_all(folder: Path, check: Callable[[dict], str | None] = lambda record: None) -> list[dict]:
    """Every record of the folder's results files (results.jsonl and each process's), one per (config, index)
    (the index runs over every task's samples): of repeats, the first in file order wins, files in name order.
    A run skips what its folder already holds, so the first is the one every resume has counted (repeats come
    from runs that shared a folder before folders were locked, or from a resume with another process count).

    `check` says what is wrong with a record, if anything (the run's, `runner`): such a record is an error naming
    its file and line, since skipping it would lose a sample silently and counting it would score it wrongly."""
    records, seen = [], set()
    for path in sorted(Path(folder).glob("results*.jsonl")):
        for record in ResultsFile(path).read(check):
            key = json.dumps([record["config"], record["index"]])  # hashable whatever the JSON holds
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


