"""Carry a training run from one lent GPU machine to the next: pack it into parts small enough to come
back through the device tool's $OUT, and unpack them where the next session resumes.

A session's device time (15 minutes, its start included) holds ~10 minutes of training, so the deep
reference model's ~25 minutes take three sessions (benchmarks/reference_training/train_deep_on_gpu.sh).
What travels to a machine is the working tree plus carried folders, 64 MiB in all, and the
tree alone is ~46 MiB: the full training_state.pt (weights and both AdamW moments in float32,
~49 MB for the deep model) cannot go. The hand-off is the weights in float16 (~8 MB; rounding
moves a weight by < 0.05%, far less than one step's update), the auxiliary heads, the step
and the run's settings; the next machine starts the optimizer afresh, its learning rate
ramped up again over train.REWARM_STEPS steps so that Adam's first, sign-like updates are small.

    python -m vtprune.synth.handoff pack RUN DEST      # DEST/handoff.tar.NN, DEST/model.tar.NN
    python -m vtprune.synth.handoff unpack PARTS RUN   # PARTS/handoff.tar.* -> RUN/handoff.pt, ...
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
from pathlib import Path

import torch

from .train import HANDOFF

PART_BYTES = 15 * 2**20  # under the 16 MiB a file that comes back from $OUT may have
RUN_FILES = ("train_log.jsonl", "run_args")  # the log (for the curves) and the command's arguments (to resume)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
               "chat_template.jinja", "tokenizer.json", "tokenizer_config.json")


def compact_state(state: dict) -> dict:
    """A training_state.pt's content without the optimizer, its weights in float16: what train() resumes a hand-off from."""
    return {"model": {key: value.half() if value.is_floating_point() else value for key, value in state["model"].items()},
            "head": state["head"], "relevance": state["relevance"], "step": state["step"], "settings": state.get("settings")}


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_parts(data: bytes, dest: Path, name: str, part_bytes: int = PART_BYTES) -> list[Path]:
    """data as dest/name.00, name.01, ...: each under the size a file from $OUT may have."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(f"{name}.*"):
        old.unlink()
    parts = []
    for number, begin in enumerate(range(0, max(len(data), 1), part_bytes)):
        parts.append(dest / f"{name}.{number:02d}")
        parts[-1].write_bytes(data[begin : begin + part_bytes])
    return parts


def read_parts(folder: Path, name: str) -> bytes:
    parts = sorted(folder.glob(f"{name}.[0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"no {name}.00 in {folder}")
    numbers = [int(part.suffix[1:]) for part in parts]
    if numbers != list(range(len(parts))):
        raise FileNotFoundError(f"{folder}: parts {numbers} of {name}, not a whole run of 00, 01, ...")
    return b"".join(part.read_bytes() for part in parts)


def pack(run: Path, dest: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """The run's hand-off (handoff.tar.NN) and its saved model folder (model.tar.NN, to evaluate or ship) into dest."""
    run, dest = Path(run), Path(dest)
    state = torch.load(run / "training_state.pt", weights_only=False, map_location="cpu")
    buffer = io.BytesIO()
    torch.save(compact_state(state), buffer)
    handoff = {HANDOFF: buffer.getvalue(), **{name: (run / name).read_bytes() for name in RUN_FILES
                                              if (run / name).exists()}}
    model = {name: (run / name).read_bytes() for name in MODEL_FILES if (run / name).exists()}
    return (write_parts(tar_bytes(handoff), dest, "handoff.tar", part_bytes)
            + write_parts(tar_bytes(model), dest, "model.tar", part_bytes))


def unpack(parts: Path, run: Path, name: str = "handoff.tar") -> list[str]:
    """Rebuild parts/name.* into the run folder; returns the names of the files it wrote."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(read_parts(Path(parts), name))) as archive:
        archive.extractall(run, filter="data")
        return archive.getnames()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.synth.handoff", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="RUN's last save -> DEST/handoff.tar.NN and DEST/model.tar.NN")
    packer.add_argument("run", type=Path)
    packer.add_argument("dest", type=Path)
    unpacker = commands.add_parser("unpack", help="PARTS/NAME.* -> RUN/")
    unpacker.add_argument("parts", type=Path)
    unpacker.add_argument("run", type=Path)
    unpacker.add_argument("--name", default="handoff.tar", help="handoff.tar (to resume) or model.tar (the model folder)")
    args = parser.parse_args(argv)
    if args.command == "pack":
        for path in pack(args.run, args.dest):
            print(f"{path} {path.stat().st_size}")
    else:
        print(" ".join(unpack(args.parts, args.run, args.name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
