"""`accelerate launch -m vtprune eval`: two CPU processes share the samples and report the single-process table."""

import json
import socket
import subprocess
import sys

import pytest

from vtprune.eval.records import ResultsFile
from vtprune.eval.shards import Shard, read_all

pytest.importorskip("accelerate")

ARGS = ["eval", "--samples", "12", "--methods", "random,fastv", "--budgets", "64,16", "--batch", "4"]
CONFIGS = 5  # unpruned and two methods at two budgets


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def vtprune_eval(out, processes: int = 1):
    if processes == 1:
        command = [sys.executable, "-m", "vtprune", *ARGS, "--out", str(out)]
    else:
        # --multi_gpu: torchrun's launcher; without a GPU its processes are CPU workers
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()),  # not the default 29500, which another run may hold
                   "-m", "vtprune", *ARGS, "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return json.loads((out / "results.json").read_text())["rows"]


def test_two_processes_report_the_single_process_table_and_resume_without_repeats(tmp_path):
    single = vtprune_eval(tmp_path / "one")
    parallel = vtprune_eval(tmp_path / "two", processes=2)
    assert parallel == single
    shards = [ResultsFile(tmp_path / "two" / f"results.{rank}-of-2.jsonl").read() for rank in range(2)]
    assert [sorted({r["index"] for r in shard}) for shard in shards] == [list(range(0, 12, 2)), list(range(1, 12, 2))]

    # an interruption: the second process lost its last 7 records; a single process finishes the run
    path = tmp_path / "two" / "results.1-of-2.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-7]))
    assert vtprune_eval(tmp_path / "two") == single
    keys = [(r["config"], r["index"]) for r in read_all(tmp_path / "two")]
    assert len(keys) == len(set(keys)) == CONFIGS * 12
    assert len(ResultsFile(tmp_path / "two" / "results.jsonl").read()) == 7  # only what was lost was redone


def test_a_shard_takes_every_nth_sample_and_writes_its_own_file(tmp_path):
    shard = Shard(1, 3)
    assert shard.mine(list(range(8))) == [1, 4, 7]
    assert shard.results(tmp_path).path.name == "results.1-of-3.jsonl"
    assert Shard().results(tmp_path).path.name == "results.jsonl"
