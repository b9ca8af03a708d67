"""The `vtprune` command's argument checks: every value is checked before any model loads.

A type function raises argparse.ArgumentTypeError, which argparse turns into one usage
line naming the flag, and exit status 2; `check_args` does the checks that need more
than one flag (method options against the checkpoint's depth, a committed file in --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import tempfile
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

Invalid = argparse.ArgumentTypeError


def at_least(low: int):
    """A type for an int >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise Invalid(f"{text!r} is not an int; give a whole number >= {low}") from None
        if value < low:
            raise Invalid(f"{value} is too small; give a whole number >= {low}")
        return value

    parse.__name__ = f"int >= {low}"  # how argparse names the type in its own messages
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise Invalid(f"{text!r} is not a number; give a number > 0") from None
    if not (math.isfinite(value) and value > 0):
        raise Invalid(f"{text!r} is not allowed; give a finite number > 0")
    return value


def budget(text: str) -> int | float:
    """Visual tokens kept per image (an int >= 1) or the fraction kept (a number in (0, 1]), as apply() takes."""
    from vtprune.engine import check_budget

    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise Invalid(f"{text!r} is not a budget; give an int >= 1 (tokens per image) "
                          "or a fraction in (0, 1] such as 0.25") from None
    try:
        return check_budget(value)
    except ValueError as error:
        raise Invalid(str(error)) from None


def token_budget(text: str) -> int:
    """A budget in tokens: the bench's oracle feeds exactly that many visual tokens, so fractions have no meaning."""
    value = budget(text)
    if isinstance(value, float):
        raise Invalid(f"{text!r}: bench budgets are visual tokens per image, ints >= 1 (fractions are for eval)")
    return value


def comma_list(item):
    """A type for a comma-separated list of `item`s, spaces around them dropped; empty and repeated items refused."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if "" in parts:
            raise Invalid(f"{text!r} has an empty item; separate items with single commas")
        values = [item(part) for part in parts]
        keys = [str(getattr(value, "label", value)) for value in values]  # as reports name them: 64 and 64.0 differ
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise Invalid(f"{', '.join(repeated)} given twice in {text!r}; give each once")
        return values

    parse.__name__ = f"list of {item.__name__}"  # how argparse names the type in its own messages
    return parse


def path_type(check):
    """A type from a check of a path, which also refuses text that is no path at all (a NUL byte, a name too long)."""

    @functools.wraps(check)
    def parse(text: str) -> str:
        if "\x00" in text:  # pathlib's exists() and is_dir() answer False for it; resolve() and open() raise later
            raise Invalid(f"{text!r} is not a usable path (it holds a NUL character)")
        try:
            return check(text)
        except (OSError, ValueError) as error:
            raise Invalid(f"{text!r} is not a usable path ({error})") from None

    return parse


# The longest name a report adds to its own (report.py, cli.py): a name that fits alone but not with it would
# fail only when the report is written, after every answer.
REPORT_SUFFIX = "_normalized_vs_budget.png"


def file_name(text: str) -> str:
    """A bare file name: the file goes into --out."""
    separators = {os.sep, os.altsep or os.sep}
    if not text or text in (".", "..") or any(s in text for s in separators):
        raise Invalid(f"{text!r} must be a plain file name (no folders); it is written inside --out")
    if "\x00" in text:
        raise Invalid(f"{text!r} is not a usable file name (it holds a NUL character)")
    if len(os.fsencode(text + REPORT_SUFFIX)) > 255:
        raise Invalid(f"{text[:40]!r}... is too long: with {REPORT_SUFFIX!r} it passes the 255 bytes a file name "
                      "may have")
    return text


def report_name(text: str) -> str:
    """--report: a file name that leaves the run's own files alone."""
    from vtprune.eval.runner import SETTINGS_FILE

    file_name(text)
    if Path(text).suffix.lower() in (".json", ".jsonl", ".md", ".png", ".csv"):
        raise Invalid(f"{text!r}: --report names the reports, which add their own suffixes ({Path(text).stem}.json, "
                      f"{Path(text).stem}.md, ...); give {Path(text).stem!r}")
    if f"{text}.json" == SETTINGS_FILE:
        raise Invalid(f"{text!r} would write the report over {SETTINGS_FILE}, the settings a resume is checked "
                      "against; pick another name")
    return text


@path_type
def picture_file(text: str) -> str:
    """A picture's path, in a format matplotlib writes (named by its suffix)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(text).name.lower().lstrip(".") in formats:  # ".png": a suffix alone, which Path reads as a name
        raise Invalid(f"{text!r} is a suffix without a name; e.g. kept_tokens{Path(text).name}")
    if Path(text).suffix.lower().lstrip(".") not in formats:
        raise Invalid(f"{text!r}: a picture is written as one of {', '.join('.' + f for f in sorted(formats))}; "
                      "end the name with one")
    return writable_file(text)


@path_type
def writable_folder(text: str) -> str:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise Invalid(f"{text!r} is a file, not a folder")
    _check_writable(path, text)
    return text


@path_type
def writable_file(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        raise Invalid(f"{text!r} is a folder; give a file path")
    _check_writable(path.parent, text)
    return text


def _check_writable(folder: Path, text: str) -> None:
    """The folder can be written, or created inside its nearest existing ancestor."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise Invalid(f"cannot write {text!r}: {existing} is a file, not a folder")
    # Trying is the only honest test: root passes os.access everywhere, /proc included.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise Invalid(f"cannot write {text!r}: {existing} does not take new files ({error.strerror})") from None


def question(text: str) -> str:
    if not text.strip():
        raise Invalid("the question is empty; ask one, e.g. \"what colour is the triangle ?\"")
    return text


@path_type
def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise Invalid(f"no file {text!r}")
    return text


@path_type
def existing_folder(text: str) -> str:
    if Path(text).is_file():
        raise Invalid(f"{text!r} is a file; give the folder holding it")
    if not Path(text).is_dir():
        raise Invalid(f"no folder {text!r}")
    return text


@path_type
def checkpoint(text: str) -> str:
    """A checkpoint folder of a supported family (its config only: the weights are checked as they load)."""
    if not Path(text).is_dir():
        raise Invalid(f"no folder {text!r}" if not Path(text).exists() else
                      f"{text!r} is a file; give the checkpoint's folder (the one holding config.json)")
    file = Path(text) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise Invalid(f"no config.json in {text}: not a checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as error:
        raise Invalid(f"{file} is not valid JSON ({error})") from None
    from vtprune.adapters import supported_models

    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not set(architectures or ()) & set(supported_models()):
        raise Invalid(f"{file} declares architectures {architectures!r}; vtprune supports "
                      f"{', '.join(supported_models())}")
    return text


def task_name(text: str) -> str:
    from vtprune.eval.metrics import canonical_task

    try:
        return canonical_task(text)
    except ValueError as problem:
        raise Invalid(str(problem)) from None


def method_name(text: str) -> str:
    from vtprune.methods import get_method

    if ":" in text:
        raise Invalid(f"{text!r}: this command takes method names without options (name:option=value is for "
                      "`vtprune eval --methods` and `vtprune show --method`)")
    try:
        get_method(text)
    except ValueError as error:
        raise Invalid(str(error)) from None
    return text


def arch(text: str) -> str:
    from vtprune.bench.presets import PRESETS
    from vtprune.methods import did_you_mean

    if text not in PRESETS:
        raise Invalid(f"unknown arch {text!r}{did_you_mean(text, PRESETS)}; presets: {', '.join(sorted(PRESETS))}")
    return text


def device(text: str) -> str:
    import torch

    try:
        kind = torch.device(text).type
    except (RuntimeError, ValueError):
        raise Invalid(f"{text!r} is not a device; give cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise Invalid(f"{text!r}: this machine has no CUDA device")
    if kind not in ("cpu", "cuda"):
        raise Invalid(f"{text!r}: vtprune runs on cpu or cuda")
    return text


@dataclass(frozen=True)
class MethodSpec:
    """One --methods item: `clse:score=attn` is method clse with options {'score': 'attn'}, reported as its label."""

    label: str
    method: str
    options: dict = field(default_factory=dict, hash=False, compare=False)


def method_spec(text: str) -> MethodSpec:
    """NAME or NAME:key=value:..., each value converted to the type the method's Options declare."""
    from vtprune.methods import get_method, did_you_mean

    name, *pairs = (part.strip() for part in text.split(":"))
    method = get_method(method_name(name))
    hints = typing.get_type_hints(method.Options)
    options, spelled = {}, [name]
    for pair in pairs:
        key, sep, value = (part.strip() for part in pair.partition("="))
        spelled.append(f"{key}={value}")
        if not sep or not key:
            raise Invalid(f"{text}: option {pair!r} needs the form key=value")
        if key not in hints:
            raise Invalid(f"{text}: {name} has no option {key!r}{did_you_mean(key, hints)}; its options are: "
                          f"{', '.join(hints) or 'none'}")
        if key in options:
            raise Invalid(f"{text}: option {key!r} given twice")
        try:
            options[key] = coerce(value, hints[key])
        except ValueError as error:
            raise Invalid(f"{text}: {key} {error}") from None
    try:
        method.parse_options({**method.without_checkpoint, **options})  # the method's own checks of its options
    except (TypeError, ValueError) as error:
        raise Invalid(f"{text}: {error}") from None
    return MethodSpec(":".join(spelled), name, options)  # spaces dropped: "clse: score=attn" resumes "clse:score=attn"


def coerce(text: str, hint):
    """`text` as a value of the type `hint`, or ValueError saying what the type takes."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if type(None) in members and text.lower() == "none":
        return None
    for member in members:
        if member is not type(None):
            try:
                return _coerce_one(text, member)
            except ValueError:
                pass
    spelled = [_describe(m) for m in members if m is not type(None) and _describe(m)]
    if not spelled:  # a callable, a tokenizer: Python only
        raise ValueError("cannot be given on the command line (a Python object: pass it to vtprune.apply)")
    raise ValueError(f"takes {' or '.join(spelled + ['none'] * (type(None) in members))}; got {text!r}")


def _coerce_one(text: str, hint):
    if hint is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError
        return text.lower() == "true"
    if hint is int:
        return int(text)
    if hint is float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value
    if hint in (str, Path):
        return hint(text)
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        return tuple(_coerce_one(part, typing.get_args(hint)[0]) for part in text.split("/"))
    raise ValueError  # a tokenizer, a callable, a dict: nothing the command line can spell


def _describe(hint) -> str:
    names = {bool: "true or false", int: "an int", float: "a finite number", str: "text", Path: "a path",
             type(None): "none"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        item = _describe(typing.get_args(hint)[0]).removeprefix("an ").removeprefix("a ")
        return f"{item}s separated by / (e.g. 2/6/15)"
    return ""  # a tokenizer, a callable, a dict


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks that need more than one flag, as usage errors (exit status 2)."""
    for action in parser._actions:
        # Python 3.11's argparse drops a value of '--' ("--out=--") and stores [] unconverted: no type check ran
        if action.option_strings and action.nargs is None and getattr(args, action.dest, None) == []:
            parser.error(f"{'/'.join(action.option_strings)} needs a value ('--' is not one)")
    if args.command == "eval" and (args.tasks is None) != (args.data is None):
        parser.error("--tasks and --data go together: the benchmarks to run and the folder holding a copy of each")
    if args.command == "eval" and not args.tasks:
        given = [flag for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                                          ("--frames", args.frames), ("--scoring", args.scoring)) if value is not None]
        if given:
            parser.error(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for real benchmarks (--tasks, "
                         "--data); the synthetic benchmark's settings are --samples and --seed")
    if args.command == "eval" and args.tasks:
        given = [flag for flag, value in (("--samples", args.samples), ("--seed", args.seed)) if value is not None]
        if given:
            parser.error(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for the synthetic benchmark; "
                         "with --tasks, --limit takes each task's first samples")
    if args.command == "eval" and _is_model_folder(args.out, args.model):
        parser.error("--out is the checkpoint's folder: the run's files would change what identifies the model, and "
                     "a resume would be refused as another model's; pass another folder (one inside it will do)")
    if args.command == "bench" and args.compile == "cudagraphs" and args.device == "cpu":
        parser.error("--compile cudagraphs records CUDA graphs, which need --device cuda; on the CPU, --compile "
                     "(inductor) compiles the prefill")
    if args.command == "eval" and args.tasks and args.model is None:
        parser.error("--tasks needs --model: the checkpoint to evaluate (the reference model knows only the "
                     "synthetic benchmark's words)")
    if args.command == "calibrate" or (args.command == "eval" and not args.tasks):
        _check_llava(parser, args)
    if args.command in ("eval", "show", "calibrate") and args.model is None:
        from vtprune.synth.reference import REFERENCE_DIR, CheckpointError, read_config

        try:
            read_config(REFERENCE_DIR)
        except CheckpointError as error:
            parser.error(f"the shipped reference model is missing or broken ({error}); "
                         "reinstall vtprune or pass --model")
    if args.command == "show" and Path(args.out).resolve() == Path(args.image).resolve():
        parser.error("--out names the picture asked about, which the drawing would replace; pass another --out")
    if args.command == "eval":
        _check_methods_fit(parser, args)
    if args.command == "bench":
        _check_bench_out(parser, args)


def _is_model_folder(out: str, model: str | None) -> bool:
    from vtprune.synth.reference import REFERENCE_DIR

    return Path(out).resolve() == Path(model or REFERENCE_DIR).resolve()


def _check_llava(parser, args) -> None:
    """The synthetic benchmark's commands run a LLaVA checkpoint like the reference model."""
    if args.model is None:
        return
    from vtprune.synth.reference import CheckpointError, read_config

    try:
        read_config(Path(args.model))
    except CheckpointError as error:
        where = "the synthetic benchmark runs LLaVA checkpoints; real benchmarks: --tasks, --data" \
            if args.command == "eval" else f"{args.command} runs LLaVA checkpoints"
        parser.error(f"{error} ({where})")


def _check_methods_fit(parser, args) -> None:
    """Stage layers that the checkpoint's depth cannot hold (clse:layers=9 on 6 layers), and vision layers its tower
    cannot (visionzip:layer=-9 on 3), fail here, not after loading."""
    from vtprune.methods import ModelInfo, get_method
    from vtprune.synth.reference import REFERENCE_DIR

    config = json.loads((Path(args.model or REFERENCE_DIR) / "config.json").read_text())
    text_config = config.get("text_config", config)  # Qwen2-VL's older configs keep the LM's fields at the top
    depth = text_config.get("num_hidden_layers") if isinstance(text_config, dict) else None
    if not isinstance(depth, int):
        return  # the config leaves the depth to transformers' defaults; apply() checks it after loading
    tower = (config.get("vision_config") or {}).get("num_hidden_layers")
    info = ModelInfo("llava", depth)
    for spec in args.methods or []:
        method = get_method(spec.method)
        try:
            instance = method(method.parse_options({**method.without_checkpoint, **spec.options}))
            instance.check_model(info)
            if isinstance(tower, int):
                instance.check_vision_layers(info, tower)
        except ValueError as error:
            parser.error(f"argument --methods: {spec.label}: {error}")


def bench_arch(args) -> str:
    """The name `vtprune bench` gives its results: the preset's, or a checkpoint's folder prefixed so that its results
    file is no preset's (a folder may be called llava-1.5-7b)."""
    return f"model-{Path(args.model).resolve().name}" if args.model else args.arch


def _check_bench_out(parser, args) -> None:
    from vtprune.bench.run import device_name, result_file

    path = result_file(Path(args.out) / device_name(args.device), bench_arch(args))
    if path.exists() and not args.replace_committed and tracked_by_git(path):
        parser.error(f"argument --out: {path} is committed to git; pass --replace-committed to overwrite it, "
                     "or give another --out")


def tracked_by_git(path: Path) -> bool:
    try:
        found = subprocess.run(["git", "-C", str(path.parent), "ls-files", "--error-unmatch", "--", path.name],
                               capture_output=True)
    except OSError:  # no git here: nothing can be tracked
        return False
    return found.returncode == 0
