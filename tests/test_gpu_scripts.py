"""The scripts a GPU session runs (benchmarks/gpu/), rehearsed on the CPU: device minutes are few, so a script
that breaks there wastes them."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_method_and_its_replay_are_profiled_and_compared(tmp_path, capsys):
    script("profile_prefill").main(["--arch", "llava-cpu-small", "--method", "random,fastv", "--budget", "64",
                                    "--replay", "--warmup", "1", "--prefills", "1", "--out", str(tmp_path)])
    saved = sorted(path.name for path in tmp_path.glob("*.json"))
    assert saved == [f"llava-cpu-small-{config}-b1.json" for config in
                     ("fastv@64", "fastv@64-replay", "random@64", "random@64-replay")]
    method, replay = (json.loads((tmp_path / f"llava-cpu-small-fastv@64{tail}-b1.json").read_text())
                      for tail in ("", "-replay"))
    assert method["summary"]["config"] == "fastv@64" and replay["summary"]["config"] == "fastv@64-replay"
    assert method["ops_per_prefill"]["aten::mm"]["count"] > 0
    capsys.readouterr()
    script("profile_gap").main([str(tmp_path / "llava-cpu-small-fastv@64-b1.json"),
                                str(tmp_path / "llava-cpu-small-fastv@64-replay-b1.json"), "--rows", "5"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("fastv@64: wall") and printed[1].startswith("fastv@64-replay: wall")
    assert len([line for line in printed if line.startswith("| aten::")]) == 5


def test_the_gap_rows_are_ordered_by_the_difference_and_take_ops_missing_on_one_side():
    gap_rows = script("profile_gap").gap_rows
    method = {"ops_per_prefill": {"a": {"count": 2, "device_us": 1000}, "b": {"count": 1, "device_us": 5000}}}
    replay = {"ops_per_prefill": {"a": {"count": 2, "device_us": 3000}, "c": {"count": 4, "device_us": 500}}}
    assert gap_rows(method, replay, "device_us") == [("b", 1, 0, 5.0, 0.0), ("a", 2, 2, 1.0, 3.0),
                                                     ("c", 0, 4, 0.0, 0.5)]


def test_the_input_oracle_is_profiled_beside_the_unpruned_prefill(tmp_path, monkeypatch):
    """The oracle's profile is of a whole prefill (as many matrix products as the unpruned one's: the same layers)
    fed its own, shorter prompt (bench.measure.input_oracle's, whose truncation tests/test_bench.py checks)."""
    from vtprune.bench import measure

    fed = []
    original = measure.oracle_inputs
    monkeypatch.setattr(measure, "oracle_inputs", lambda *args: fed.append(args[3]) or original(*args))
    script("profile_prefill").main(["--arch", "llava-cpu-small", "--method", "unpruned,oracle", "--budget", "64",
                                    "--warmup", "1", "--prefills", "1", "--out", str(tmp_path)])
    unpruned, oracle = (json.loads((tmp_path / f"llava-cpu-small-{config}-b1.json").read_text())
                        for config in ("unpruned", "oracle@64"))
    assert oracle["summary"]["config"] == "oracle@64" and unpruned["summary"]["config"] == "unpruned"
    assert fed == [64]
    assert oracle["ops_per_prefill"]["aten::mm"]["count"] == unpruned["ops_per_prefill"]["aten::mm"]["count"] > 0


@pytest.mark.parametrize("method", ["unpruned", "oracle"])
def test_replaying_what_has_no_decision_is_refused(method):
    with pytest.raises(SystemExit):
        script("profile_prefill").main(["--method", method, "--replay"])
