"""Which ops make a method slower than its schedule oracle: two profile_prefill.py JSON files compared.

    python benchmarks/gpu/profile_gap.py out/profile/llava-1.5-7b-tome@192-b16.json \\
        out/profile/llava-1.5-7b-tome@192-replay-b16.json

Prints wall and device-busy time per prefill of each, then the ops whose device time (host time where the
profile has no device) differs most, with their counts: the method's own kernels (its scoring, merges, masks)
and what the engine launches for it, against the replay's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def gap_rows(method: dict, replay: dict, key: str) -> list[tuple[str, float, float, float, float]]:
    """(op, method's count, replay's count, method's time, replay's time) per op, by the time difference, largest
    first (times in ms per prefill, read from `key`: device_us or host_us)."""
    ops = method["ops_per_prefill"].keys() | replay["ops_per_prefill"].keys()
    empty = {"count": 0.0, key: 0.0}
    rows = [(op, method["ops_per_prefill"].get(op, empty)["count"], replay["ops_per_prefill"].get(op, empty)["count"],
             method["ops_per_prefill"].get(op, empty)[key] / 1000, replay["ops_per_prefill"].get(op, empty)[key] / 1000)
            for op in ops]
    return sorted(rows, key=lambda row: abs(row[3] - row[4]), reverse=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method", type=Path, help="profile_prefill.py's JSON of the method")
    parser.add_argument("replay", type=Path, help="... and of the same configuration with --replay")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    method, replay = (json.loads(path.read_text()) for path in (args.method, args.replay))
    on_device = method["summary"]["device_busy_ms_per_prefill"] is not None
    for profile in (method, replay):
        summary = profile["summary"]
        busy = summary["device_busy_ms_per_prefill"]
        print(f"{summary['config']}: wall {summary['wall_ms_per_prefill']:.1f} ms a prefill"
              + (f", device busy {busy:.1f} ms" if busy is not None else ""))
    key = "device_us" if on_device else "host_us"
    print(f"\n| op | calls (method) | calls (replay) | {key[:-3]} ms (method) | (replay) | difference |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for op, calls, replayed_calls, spent, replayed in gap_rows(method, replay, key)[: args.rows]:
        print(f"| {op} | {calls:g} | {replayed_calls:g} | {spent:.2f} | {replayed:.2f} | {spent - replayed:+.2f} |")


if __name__ == "__main__":
    main()
