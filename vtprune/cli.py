"""The `vtprune` command: thin parsing and printing around the library."""

from __future__ import annotations

import argparse
import signal
import sys

from rich.console import Console
from rich.table import Table

from . import __version__ as vtprune_version
from . import cli_args

PIPED_TABLE_WIDTH = 240  # the widest a table is printed into a pipe or log (the bench table needs ~190)

piped = not sys.stdout.isatty()
console = Console(soft_wrap=piped, width=PIPED_TABLE_WIDTH if piped else None)  # a log's lines are not broken


def print_table(table: Table) -> None:
    """A table with no cell cut to "…": folded where a terminal is too narrow for it; into a pipe or log, as wide as
    it needs up to PIPED_TABLE_WIDTH, so that its rows stay whole lines."""
    for column in table.columns:
        column.overflow = "fold"
    width = None
    if not console.is_terminal:
        width = console.measure(table, options=console.options.update(max_width=PIPED_TABLE_WIDTH)).maximum
    console.print(table, width=width)


def cmd_methods(args) -> int:
    import vtprune

    table = Table(title="vtprune methods")
    for column in ("method", "acts", "rule", "defaults"):
        table.add_column(column)
    for info in vtprune.methods():
        defaults = ", ".join(f"{k}={v}" for k, v in info.defaults.items()) or "-"
        table.add_row(info.name, info.where, info.summary, defaults)
    print_table(table)
    return 0


def cmd_demo(args) -> int:
    """Pruned greedy generation on a tiny random LLaVA-1.5 with every method, and their stats."""
    import torch

    import vtprune
    from vtprune.api import refusal
    from vtprune.methods import WITHOUT_CHECKPOINT
    from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

    model = tiny_llava(layers=8)
    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(images=1, text_before=6)])
    tokens = int((inputs["input_ids"][1] == model.config.image_token_id).sum())  # one image's
    if args.budget >= tokens:
        raise ValueError(f"--budget {args.budget} keeps all {tokens} visual tokens of the demo's images: nothing would "
                         f"be pruned; give a budget below {tokens}")
    steps = 6
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0)[:, -steps:]
    table = Table(title=f"tiny LLaVA-1.5 (random weights, 8 layers, {tokens} tokens/image), budget {args.budget}")
    for column in ("method", "kept per sample", "equivalent budget", "tokens equal to unpruned"):
        table.add_column(column)
    table.add_row("unpruned", f"[{2 * tokens}, {tokens}]", f"{tokens:.1f}", f"{reference.numel()}/{reference.numel()}")
    for info in vtprune.methods():
        options = WITHOUT_CHECKPOINT.get(info.name, {})
        if (reason := refusal(model, info.name, args.budget, **options)) is not None:
            table.add_row(info.name, f"[yellow]not run: {reason}[/yellow]", "", "")
            continue
        with torch.no_grad(), vtprune.apply(model, info.name, args.budget, **options) as pruner:
            out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0)[:, -steps:]
            stats = pruner.last_stats
        same = int((out == reference).sum())
        table.add_row(info.name, str(stats.kept_per_sample), f"{stats.equivalent_budget:.1f}", f"{same}/{reference.numel()}")
    print_table(table)
    console.print("Random weights: this shows the engine at work, not accuracy.")
    return 0


def cmd_train_reference(args) -> int:
    from pathlib import Path

    from vtprune.synth.train import train

    accuracy = train(Path(args.out), steps=args.steps, batch_size=args.batch, questions_per_image=args.questions,
                     lr=args.lr, eval_every=args.eval_every, eval_samples=args.eval_samples,
                     init=Path(args.init) if args.init else None, device=args.device, workers=args.workers,
                     minutes=args.minutes, depth=args.depth)
    console.print(accuracy)
    return 0


def _digest(path) -> str | None:
    """A short hash of a file, so a resumed run notices when it changed."""
    import hashlib

    if not path.exists():
        return None
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:16]


def _model_id(path) -> str:
    """The checkpoint's folder name and a hash of what makes it answer as it does (every file of the folder: config,
    weights, processor, tokenizer, chat template; not the CLASP table, recorded apart, nor notes), so that a resumed
    run notices another model or template and the same model resumes wherever its folder lives. A file over 64 MiB
    (a weight shard) is hashed by its size and 16 blocks spread over it: reading a 7B checkpoint whole would take
    a minute at every start, and two trainings of one architecture differ in every block."""
    import hashlib

    from vtprune.methods.clasp import CALIBRATION_FILE

    files = sorted(file for file in path.iterdir() if file.is_file() and not file.name.startswith(".")
                   and file.suffix != ".md" and file.name != CALIBRATION_FILE)
    if not files:
        return str(path.resolve())
    digest, block = hashlib.sha256(), 2**20
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= 64 * block:
                digest.update(handle.read())
                continue
            for k in range(16):
                handle.seek(k * (size - block) // 15)
                digest.update(handle.read(block))
    return f"{path.name} {digest.hexdigest()[:16]}"


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from vtprune.eval.calibrate import calibrate_clasp, write_table
    from vtprune.router import CLASSES
    from vtprune.synth import generate
    from vtprune.synth.reference import REFERENCE_DIR, image_tokens, load_reference, prompt_for

    model_path = Path(args.model or REFERENCE_DIR)
    model, processor = load_reference(model_path)
    prompt = prompt_for(processor)
    if args.budget >= (tokens := image_tokens(processor, prompt)):
        raise ValueError(f"--budget {args.budget} keeps all {tokens} visual tokens of each image, where every "
                         f"setting answers alike; give a budget below {tokens}")
    samples = generate(args.seed, args.samples)
    table = calibrate_clasp(model, processor, samples, prompt, args.budget,
                            {"model": model_path.name, "seed": args.seed, "samples": args.samples})
    write_table(table, Path(args.out))
    console.print(table)
    if missing := [name for name in CLASSES if name not in table["classes"]]:
        console.print(f"[yellow]no calibration sample of class {', '.join(missing)} among the {args.samples}: CLASP "
                      "runs those with its defaults (the model's own layer, an even split); raise --samples[/yellow]")
    console.print(f"wrote {args.out}; use it with vtprune.apply(model, 'clasp', budget, calibration='{args.out}')")
    return 0


def cmd_eval(args) -> int:
    """Accuracy vs budget on the synthetic benchmark: unpruned and every method at every budget."""
    from pathlib import Path

    import vtprune
    from vtprune.eval import evaluate
    from vtprune.eval.lock import hold
    from vtprune.eval.published import against_published, published_table
    from vtprune.eval.report import frontier_table, hits_by_config, rich_table, summarize, write_reports
    from vtprune.eval.runner import synthetic_task
    from vtprune.eval.shards import current_shard
    from vtprune.methods import checkpoint_options
    from vtprune.methods.clasp import CALIBRATION_FILE
    from vtprune.synth import generate
    from vtprune.synth.reference import REFERENCE_DIR, image_tokens, load_reference, prompt_for

    specs = args.methods or [cli_args.MethodSpec(m.name, m.name) for m in vtprune.methods()]
    out = Path(args.out)
    shard = current_shard()  # one of several processes under `accelerate launch`, else the only one
    if args.tasks:
        return _eval_benchmarks(args, specs, out, shard)
    with hold(out, shard.lock_rank):  # before the model loads, so that a second run on this folder stops at once
        model_path = Path(args.model or REFERENCE_DIR)
        model, processor = load_reference(model_path)
        if shard.device is not None:
            model.to(shard.device)
        count = args.samples or _resumed_samples(out) or default_samples(1 + len(specs) * len(args.budgets))
        seed = EVAL_SEED if args.seed is None else args.seed
        samples = generate(seed, count)
        prompt = prompt_for(processor)
        configs, refused = runnable_configs(model, specs, args.budgets, checkpoint_options(model_path, processor), shard,
                                            image_tokens=image_tokens(processor, prompt))
        settings = {"task": "synthetic", "model": _model_id(model_path), "seed": seed, "samples": count,
                    "versions": _versions(),
                    "clasp_calibration": _digest(model_path / CALIBRATION_FILE)}
        records = evaluate(model, synthetic_task(model, processor, samples, prompt), configs, out, settings,
                           batch_size=args.batch, shard=shard)
        if not shard.main:  # the first process reports for all
            return 0
        wanted = {c.name for c in configs}
        kept_records = [r for r in records if r["config"] in wanted]
        rows = summarize(kept_records)
        published = against_published(rows, hits_by_config(kept_records))
        title = f"reference model, synthetic VQA (seed {seed}, {count} samples)"
        print_table(rich_table(rows, title))
        print_table(frontier_table(rows, "best at matched compute (eq. budget): no cheaper config answers as well"))
        if published:
            print_table(published_table(published))
        command = _command_line()
        # what is refused, like the command, is the report's, not the run's: adding a method some budget refuses
        # (ToMe@64) to a finished run resumes it
        paths = write_reports(rows, out, title, dict(settings, command=command, **_not_run(refused)), args.report,
                              published)
    console.print(f"wrote {', '.join(str(p) for p in paths)} (per sample: {out}/results*.jsonl)")
    _say_left_out(records, wanted, args.report)
    return 0


def _say_left_out(records: list[dict], wanted: set[str], report: str) -> None:
    """A rerun with fewer --methods reports only its own configs: say which answers in the folder it left out."""
    if left_out := sorted({r["config"] for r in records} - wanted):
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        console.print(f"[yellow]the folder also holds the answers of {shown}, which this report leaves out (it "
                      f"reports this run's --methods at its --budgets): name them there to report them too, or give "
                      f"--report a name other than {report!r} to keep each run's report[/yellow]")


def _resumed_samples(out) -> int | None:
    """The sample count of the synthetic run in `out`, if any: the default shrinks as configs are added, and a
    resume may add configs to a run."""
    import json

    from vtprune.eval.runner import SETTINGS_FILE

    try:
        settings = json.loads((out / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None  # none yet, or broken: the run's own check says so
    count = settings.get("samples") if isinstance(settings, dict) and settings.get("task") == "synthetic" else None
    return count if isinstance(count, int) and count > 0 else None


def _command_line() -> str:
    """This run's command as typed (`vtprune <subcommand> ...`), for its report."""
    import shlex

    return shlex.join(["vtprune", *sys.argv[1:]])


def _not_run(refused: dict) -> dict:
    return {"not_run": refused} if refused else {}


def _eval_benchmarks(args, specs, out, shard) -> int:
    """`vtprune eval --model PATH --tasks ... --data DIR`: the checkpoint on local copies of real benchmarks."""
    import json
    from pathlib import Path

    from vtprune.eval import evaluate
    from vtprune.eval.benchmark_eval import (INTERVAL_NOTE, benchmark_markdown, benchmark_table, benchmark_task,
                                             check_references, data_digests, default_frames, load_tasks,
                                             plot_normalized, summarize_benchmarks)
    from vtprune.eval.generation import load_checkpoint
    from vtprune.eval.lock import hold
    from vtprune.eval.report import not_run_lines
    from vtprune.methods import checkpoint_options
    from vtprune.methods.clasp import CALIBRATION_FILE

    with hold(out, shard.lock_rank):
        model_path = Path(args.model)
        samples = load_tasks(args.tasks, Path(args.data), args.limit)
        scoring = args.scoring or "lmms-eval"
        check_references(samples, scoring)  # before the model loads: a bad row costs seconds, not minutes
        videos = any(s.videos for s in samples)
        if args.frames and not videos:
            raise ValueError(f"--frames: no sample of {', '.join(args.tasks)} has a video; leave it out")
        model, processor = load_checkpoint(model_path)
        if shard.device is not None:
            model.to(shard.device)
        configs, refused = runnable_configs(model, specs, args.budgets, checkpoint_options(model_path, processor), shard,
                                            videos=videos)
        settings = {"tasks": args.tasks, "model": _model_id(model_path), "data": data_digests(args.tasks, Path(args.data), out),
                    "limit": args.limit, "max_new_tokens": args.max_new_tokens, "versions": _versions(),
                    "clasp_calibration": _digest(model_path / CALIBRATION_FILE)}
        frames = args.frames or default_frames(model)
        if videos:
            settings["frames"] = frames
        task = benchmark_task(model, processor, samples, args.max_new_tokens, frames)
        records = evaluate(model, task, configs, out, settings, batch_size=args.batch, shard=shard)
        if not shard.main:
            return 0
        wanted = {c.name for c in configs}
        rows = summarize_benchmarks([r for r in records if r["config"] in wanted], samples, scoring)
        title = f"{model_path.name} on {', '.join(args.tasks)} ({scoring} scoring)"
        print_table(benchmark_table(rows, title))
        command = _command_line()
        report = out / f"{args.report}.json"
        # the scoring rule and what is refused are the report's, not the run's: the answers stand for either rule
        reported = dict(settings, command=command, scoring=scoring, **_not_run(refused), intervals=INTERVAL_NOTE)
        report.write_text(json.dumps({"settings": reported, "rows": rows}, indent=2))
        (out / f"{args.report}.md").write_text(f"# {title}\n\n" + benchmark_markdown(rows) + not_run_lines(reported))
        written = [report, out / f"{args.report}.md"]
        plot = out / f"{args.report}_normalized_vs_budget.png"
        if plot_normalized(rows, plot, title):
            written.append(plot)
        else:  # nor an earlier run's, over the same answers scored otherwise
            plot.unlink(missing_ok=True)
            console.print("no normalized plot: no config has a normalized average (it needs the unpruned config's "
                          "score, above 0, on every task)")
    console.print(f"wrote {', '.join(map(str, written))} (per answer: {out}/results*.jsonl)")
    _say_left_out(records, wanted, args.report)
    return 0


def runnable_configs(model, specs, budgets, needed: dict, shard, videos: bool = False,
                     image_tokens: int | None = None) -> tuple[list, dict[str, str]]:
    """(unpruned and every method at every budget that this model runs, {config: why not} for the rest).

    Bad options fail here, before the first sample, and so do two specs that run alike (random:seed=0 is random);
    a config whose method refuses the model at that budget (ToMe's blocks cannot reach 64 on a 3-layer tower), or
    the samples' `videos`, is reported instead of stopping the run. Where every image has `image_tokens`, so are
    the configs that would repeat another under a new name: a budget that keeps them all (the unpruned row), and a
    method whose options fix each stage's count (clse:keep=...) at all but its first budget.
    """
    from vtprune.api import refusal
    from vtprune.engine.budget import keeps_whole
    from vtprune.eval import Config
    from vtprune.methods import get_method

    kind = "video" if videos else "image"
    fixed, first = {}, {}
    for spec in specs:  # with the checkpoint's options (CLASP's tokenizer), as the configs will run
        method = get_method(spec.method)
        options = method.parse_options({**needed.get(spec.method, {}), **spec.options})
        if (twin := first.setdefault((method.name, options), spec.label)) != spec.label:
            raise ValueError(f"--methods: {spec.label} runs what {twin} runs (the options it leaves out take the "
                             "values those give); give one of them")
        fixed[spec.label] = method.fixed_counts(options, kind)
    configs = [Config(spec.method, b, {**needed.get(spec.method, {}), **spec.options}, spec.label)
               for spec in specs for b in budgets]
    refused, ran = {}, {}  # ran: each label's first config that runs
    for config in configs:
        known = image_tokens is not None
        if known and keeps_whole(config.budget, image_tokens):
            refused[config.name] = f"it keeps all {image_tokens} visual tokens of each image: the unpruned row"
        elif known and fixed[config.label] and config.label in ran:  # one row, not a flat curve of copies
            refused[config.name] = f"its {fixed[config.label]}= fixes each stage's count, so it keeps what " \
                                   f"{ran[config.label]} keeps; give it one budget"
        elif (reason := refusal(model, config.method, config.budget, videos=videos, **config.options)) is not None:
            refused[config.name] = reason
        else:
            ran.setdefault(config.label, config.name)
    for name, reason in refused.items() if shard.main else ():
        console.print(f"[yellow]not run: {name}: {reason}[/yellow]")
    return [Config("unpruned")] + [c for c in configs if c.name not in refused], refused


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"vtprune": vtprune_version, "vtprune_source": _source_digest(), "transformers": transformers.__version__,
            "torch": torch.__version__}


def _source_digest(package=None) -> str:
    """A short hash of vtprune's own code (the .py files of `package`, by default vtprune's folder): a development
    checkout changes it without changing the version, and a run resumed on other code would mix two programs'
    answers in one table."""
    import hashlib
    from pathlib import Path

    package = Path(package or Path(__file__).parent)
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


EVAL_SEED = 2  # the synthetic benchmark's default data seed: held out from training (seed 0) and calibration (4)

# What the default eval may spend, in predictions over all configs: about 3.5 minutes on 2 CPU cores, so that
# `make eval` stays within 5 however many methods are registered (more configs, fewer samples each).
EVAL_PREDICTIONS = 12_000


def default_samples(configs: int) -> int:
    """Samples per config for a default eval of this many configs: 240, fewer (a multiple of the 6 classes, at
    least 60) when the configs would need more than EVAL_PREDICTIONS."""
    return min(240, max(60, EVAL_PREDICTIONS // configs // 6 * 6))


def cmd_score(args) -> int:
    """Score a file of given answers with a benchmark's official metric: no model."""
    import json

    from vtprune.eval.metrics import BadReference, score
    from vtprune.eval.predictions import read_predictions

    predictions, references, lines = read_predictions(args.predictions)
    try:
        result = score(args.task, predictions, references, scoring=args.scoring)
    except BadReference as bad:
        raise ValueError(f"{args.predictions} line {lines[bad.index]}: {bad.task} reference {bad.problem}") from None
    console.print_json(json.dumps(result))
    return 0


def cmd_show(args) -> int:
    """Answer one question about one image or video, unpruned and under a method, and save the kept-token picture."""
    from pathlib import Path

    import vtprune
    from vtprune.eval.generation import batch_inputs, generate_answers, load_checkpoint
    from vtprune.methods import get_method
    from vtprune.show import drawings_of, sample_of
    from vtprune.synth.reference import CHAT_TEMPLATE, REFERENCE_DIR
    from vtprune.viz import kept_token_maps

    model_path = Path(args.model or REFERENCE_DIR)
    model, processor = load_checkpoint(model_path)
    images, videos = sample_of(args.image, model, processor, args.frames)
    # a LLaVA checkpoint saved without a chat template is asked as the reference model was trained (`prompt_for`)
    template = CHAT_TEMPLATE if processor.chat_template is None and model.config.model_type == "llava" else None

    def answer() -> str:
        return generate_answers(model, processor, [args.question], images, max_new_tokens=args.max_new_tokens,
                                videos=videos, chat_template=template)[0]

    unpruned = answer()
    spec = args.method
    options = {**get_method(spec.method).checkpoint_options(model_path, processor), **spec.options}
    with vtprune.apply(model, spec.method, args.budget, **options) as pruner:
        pruned = answer()
        decision = pruner.last_decision
    console.print(f"answer: [bold]{pruned}[/bold] (unpruned: {unpruned})")
    inputs = batch_inputs(processor, [args.question], images, videos, chat_template=template)  # what was answered
    drawings, across = drawings_of(model, processor, inputs, decision)
    out = Path(args.out)
    title = f"{spec.label} @ {args.budget}: \"{args.question}\" -> {pruned} (unpruned: {unpruned})"
    kept_token_maps(drawings, out, title, decision.stage_layers if decision else None, across=across)
    sizes = " and ".join(dict.fromkeys(f"{d.image.width}x{d.image.height}" for d in drawings))
    seen = f"{len(drawings)} frames of {sizes}" if videos else f"{sizes} image{'s' if len(drawings) > 1 else ''}"
    console.print(f"kept tokens drawn in {out}, over the {seen} the model saw")
    return 0


def cmd_bench(args) -> int:
    """Efficiency at real model shapes (a preset's random weights, or a checkpoint's own): prefill, decode,
    throughput, memory, KV cache, FLOPs."""
    from pathlib import Path

    import torch

    from vtprune.bench.run import bench_table, device_name, run_bench, save
    from vtprune.methods import WITHOUT_CHECKPOINT

    dtype = getattr(torch, args.dtype)
    name = device_name(args.device)
    # Prompts are random on a checkpoint too, so CLASP runs as on a preset (one class, no router) rather than
    # routing noise with the checkpoint's tokenizer.
    arch = cli_args.bench_arch(args)
    settings = {"arch": arch, "device_name": name, "dtype": args.dtype, "repeats": args.repeats,
                "warmup": args.warmup, "new_tokens": args.new_tokens, "compiled": args.compile,
                "command": _command_line(), **({"model": str(Path(args.model).resolve())} if args.model else {})}
    folder = Path(args.out) / name
    not_run = {}  # filled before the first configuration runs
    # Saved after every configuration: a run cut short (a time limit on a lent GPU) keeps what it measured.
    results = run_bench(arch, args.methods, args.budgets, args.batch, device=args.device, dtype=dtype,
                        repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens, compiled=args.compile,
                        options=WITHOUT_CHECKPOINT, not_run=not_run, checkpoint=args.model,
                        measured=lambda so_far: save(so_far, folder, dict(settings, **_not_run(not_run))))
    compiled = f", prefill compiled ({args.compile})" if args.compile else ""
    weights = "the checkpoint's weights" if args.model else "random weights"
    print_table(bench_table(results, f"{arch} on {name} ({args.dtype}, {weights}{compiled})"))
    console.print(f"wrote {save(results, folder, dict(settings, **_not_run(not_run)))}")
    return 0


class DefaultsShown(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it says its default itself or has none."""

    def _get_help_string(self, action):
        nothing_to_add = action.default in (None, False, argparse.SUPPRESS) or "default" in action.help
        if nothing_to_add or not action.option_strings:
            return action.help
        return f"{action.help} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for multimodal LLMs")
    parser.add_argument("--version", action="version", version=f"vtprune {vtprune_version}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list the registered methods").set_defaults(run=cmd_methods)
    demo = commands.add_parser("demo", help="pruned generation with every method on a tiny random model")
    demo.add_argument("--budget", type=cli_args.positive_int, default=16, help="visual tokens kept per image")
    demo.set_defaults(run=cmd_demo)
    model_help = "a LLaVA checkpoint folder (default: the shipped reference model)"
    evaluation = commands.add_parser("eval", help="accuracy vs budget: the reference model on the synthetic benchmark, "
                                                  "or a checkpoint of any supported family on real ones (--tasks)")
    evaluation.add_argument("--samples", type=cli_args.positive_int,
                            help="samples per config (spread over the 6 classes); default 240, fewer when the "
                                 "configs would take more than about 3.5 minutes on 2 CPU cores")
    evaluation.add_argument("--methods", type=cli_args.comma_list(cli_args.method_spec),
                            help="comma-separated, each NAME or NAME:key=value:... (e.g. clse:score=attn, "
                            "clse:layers=1/3/5:keep=300/200/60); default: every registered method")
    evaluation.add_argument("--budgets", type=cli_args.comma_list(cli_args.budget), default="192,128,64",
                            help="comma-separated: ints are tokens, x.y fractions")
    evaluation.add_argument("--seed", type=cli_args.non_negative_int,
                            help=f"data seed of the synthetic benchmark (default {EVAL_SEED}; the reference model "
                                 "trained on seed 0)")
    evaluation.add_argument("--out", type=cli_args.writable_folder, default="out/eval",
                            help="results folder; an interrupted run resumes there")
    evaluation.add_argument("--model", type=cli_args.checkpoint,
                            help=f"{model_help}; with --tasks, a checkpoint of any supported family")
    evaluation.add_argument("--batch", type=cli_args.positive_int, default=16,
                            help="samples generated together (left-padded): faster, same answers")
    evaluation.add_argument("--report", type=cli_args.report_name, default="results",
                            help="file name of the table, JSON and plot in --out")
    evaluation.add_argument("--tasks", type=cli_args.comma_list(cli_args.task_name),
                            help="real benchmarks instead of the synthetic one (with --model and --data): "
                                 "comma-separated of gqa, mmbench_en, mmbench_cn, mme, pope, scienceqa_img, textvqa, "
                                 "vizwiz, ocrbench, videomme")
    evaluation.add_argument("--data", type=cli_args.existing_folder,
                            help="folder holding a copy of each task in DATA/<task> (parquet, save_to_disk, or the "
                                 "benchmark's own files)")
    evaluation.add_argument("--scoring", choices=["lmms-eval", "llava"],
                            help="with --tasks: lmms-eval's rules (the default), or LLaVA's evaluation scripts")
    evaluation.add_argument("--limit", type=cli_args.positive_int,
                            help="with --tasks: the first LIMIT samples of each task")
    evaluation.add_argument("--max-new-tokens", type=cli_args.positive_int,
                            help="with --tasks: answer length for every task (default: each task's lmms-eval length)")
    evaluation.add_argument("--frames", type=cli_args.positive_int,
                            help="with --tasks: frames sampled uniformly from each video (default: lmms-eval's for "
                                 "the family, 8 for Video-LLaVA, 32 for the others)")
    evaluation.set_defaults(run=cmd_eval)
    scoring = commands.add_parser("score", help="score given answers with a benchmark's official metric (no model)")
    scoring.add_argument("--task", required=True, type=cli_args.task_name,
                         help="pope, gqa, mme, textvqa, vizwiz, mmbench_en, mmbench_cn, scienceqa_img, ocrbench, videomme")
    scoring.add_argument("--predictions", required=True, type=cli_args.existing_file,
                         help="JSONL: each line the answer as 'prediction' and the benchmark's reference fields")
    scoring.add_argument("--scoring", choices=["lmms-eval", "llava"], default="lmms-eval",
                         help="lmms-eval's rules, or LLaVA's evaluation scripts (most pruning papers)")
    scoring.set_defaults(run=cmd_score)
    show = commands.add_parser("show", help="answer a question under a method and draw the kept tokens")
    show.add_argument("image", type=cli_args.existing_file, metavar="IMAGE_OR_VIDEO",
                      help="a picture, or a video (.mp4, .mov, ...: its frames sampled as `eval` samples them)")
    show.add_argument("question", type=cli_args.question)
    show.add_argument("--method", type=cli_args.method_spec, required=True,
                      help="a method, with options if any (fastv:layer=3), as `eval --methods` takes them")
    show.add_argument("--budget", type=cli_args.budget, default="64",
                      help="visual tokens kept per image (an int), or the fraction of them kept (x.y)")
    show.add_argument("--out", type=cli_args.picture_file, default="kept_tokens.png",
                      help="the kept-token picture (.png, .pdf, .svg, ...)")
    show.add_argument("--model", type=cli_args.checkpoint,
                      help="a checkpoint folder of a supported family, asked through its chat template "
                           "(default: the shipped reference model)")
    show.add_argument("--frames", type=cli_args.positive_int, default=None,
                      help="a video's frames, sampled evenly (default: as `eval` asks the model: 8 for Video-LLaVA, "
                           "32 for the others)")
    show.add_argument("--max-new-tokens", type=cli_args.positive_int, default=1,
                      help="answer length (default 1: the one-word answer the reference model gives; e.g. 32 for a "
                           "chat model's sentence)")
    show.set_defaults(run=cmd_show)
    calibrate = commands.add_parser("calibrate", help="fit a method's per-class settings on a calibration split")
    calibrate.add_argument("--method", required=True, choices=["clasp"], help="only clasp has calibrated settings")
    calibrate.add_argument("--budget", type=cli_args.positive_int, default=64, help="tokens per image at which to fit")
    calibrate.add_argument("--samples", type=cli_args.positive_int, default=600,
                           help="calibration samples (spread over the classes: 100 each by default)")
    calibrate.add_argument("--seed", type=cli_args.non_negative_int, default=4,
                           help="calibration data seed (never an evaluation seed)")
    calibrate.add_argument("--model", type=cli_args.checkpoint, help=model_help)
    calibrate.add_argument("--out", type=cli_args.writable_file, default="out/clasp_calibration.json",
                           help="the calibration file written")
    calibrate.set_defaults(run=cmd_calibrate)
    bench = commands.add_parser("bench", help="what pruning saves at real model shapes (a preset's random weights, "
                                              "or a checkpoint)")
    shapes = bench.add_mutually_exclusive_group()
    shapes.add_argument("--model", type=cli_args.checkpoint,
                        help="a checkpoint folder of any supported family, timed at its own shapes and weights "
                             "(one image a prompt, as the presets of its family) instead of a preset")
    shapes.add_argument("--arch", type=cli_args.arch, default="llava-cpu-small",
                        help="a preset of real shapes with random weights (an unknown name lists them all)")
    bench.add_argument("--methods", type=cli_args.comma_list(cli_args.method_name), default="fastv,clse,clasp,random",
                       help="comma-separated method names, each timed against both oracles")
    bench.add_argument("--budgets", type=cli_args.comma_list(cli_args.token_budget), default="192,128,64",
                       help="comma-separated visual tokens per image")
    bench.add_argument("--batch", type=cli_args.comma_list(cli_args.positive_int), default="1",
                       help="comma-separated batch sizes")
    bench.add_argument("--device", type=cli_args.device, default="cpu", help="cpu, cuda or cuda:N")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="bfloat16 on a GPU")
    bench.add_argument("--repeats", type=cli_args.positive_int, default=20,
                       help="timed prefills per configuration (their median and p10-p90 are shown)")
    bench.add_argument("--warmup", type=cli_args.non_negative_int, default=3, help="untimed prefills before them")
    bench.add_argument("--new-tokens", type=cli_args.at_least(2), default=16,
                       help="decode speed is timed over this many new tokens")
    bench.add_argument("--compile", nargs="?", const="inductor", choices=["inductor", "cudagraphs"],
                       help="every configuration's prefill compiled, segment by segment (vtprune.compile_prefill), "
                            "for batch-1 latency: inductor's kernels in CUDA graphs (the default), or the eager "
                            "kernels in CUDA graphs (cudagraphs: quicker to compile)")
    bench.add_argument("--out", type=cli_args.writable_folder, default="out/bench",
                       help="results go to OUT/DEVICE/bench-ARCH.json")
    bench.add_argument("--replace-committed", action="store_true",
                       help="let --out overwrite a results file committed to git")
    bench.set_defaults(run=cmd_bench)
    trainer = commands.add_parser("train-reference", help="train the reference model on generated samples (resumes)")
    trainer.add_argument("--out", type=cli_args.writable_folder, required=True,
                         help="folder for the checkpoint, its processor and train_log.jsonl")
    trainer.add_argument("--steps", type=cli_args.positive_int, default=2000)
    trainer.add_argument("--batch", type=cli_args.positive_int, default=12, help="images per step")
    trainer.add_argument("--questions", type=cli_args.positive_int, default=2,
                         help="questions asked about each image per step")
    trainer.add_argument("--depth", choices=["shipped", "deep"], default="shipped",
                         help="shipped: 6-layer LM, 3-layer tower, question first, auxiliary attention losses; "
                              "deep: 16-layer LM, 6-layer tower, image first, none (issue 18)")
    trainer.add_argument("--init", type=cli_args.checkpoint,
                         help="start from the weights of another run's folder (fresh optimizer); a shallower "
                              "model is depth up-scaled (each layer repeated in place)")
    trainer.add_argument("--lr", type=cli_args.positive_float, default=1e-3, help="peak learning rate")
    trainer.add_argument("--eval-every", type=cli_args.positive_int, default=250, help="steps between validations")
    trainer.add_argument("--eval-samples", type=cli_args.positive_int, default=240,
                         help="samples per validation")
    trainer.add_argument("--device", type=cli_args.device, help="cpu or cuda (default: cuda when there is one)")
    trainer.add_argument("--workers", type=cli_args.non_negative_int,
                         help="processes that build batches (default: one per spare core)")
    trainer.add_argument("--minutes", type=cli_args.positive_float,
                         help="stop, validated and saved, after this much wall time")
    trainer.set_defaults(run=cmd_train_reference)
    for command in commands.choices.values():  # check_args' usage errors name the command, as argparse's own do
        command.set_defaults(command_parser=command)
        command.formatter_class = DefaultsShown
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every value checked; a bad one exits with a usage line and status 2. Loads no model."""
    args = build_parser().parse_args(argv)
    cli_args.check_args(args.command_parser, args)
    return args


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `timeout`'s stop), raised where the command is, so that it stops as on Ctrl-C:
    progress bars closed, pruners removed, locks freed, what is finished kept, one line said."""


def _terminate(signum, frame):
    raise Terminated


def _raised_by_vtprune(error: BaseException) -> bool:
    """Whether vtprune's own code raised error (its innermost frame is in this package)."""
    from pathlib import Path

    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    return innermost is not None and Path(innermost.tb_frame.f_code.co_filename).is_relative_to(Path(__file__).parent)


def _users_to_fix(error: Exception) -> bool:
    """Whether `error` is the user's to fix, said in one line rather than a traceback: a ValueError vtprune raised
    (it names the bad input and the fix; CheckpointError is one), a folder another run holds, an image PIL cannot
    read. Another library's ValueError (numpy's, torch's) is not: where it came from is the story."""
    from PIL import UnidentifiedImageError

    from vtprune.eval.lock import FolderBusy

    if isinstance(error, ValueError):
        return _raised_by_vtprune(error)
    return isinstance(error, (FolderBusy, UnidentifiedImageError))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)  # first: `--help` and a mistyped option answer without importing torch
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except Exception as error:
        if not _users_to_fix(error):
            raise
        raise SystemExit(f"vtprune {args.command}: error: {error}") from None
    except KeyboardInterrupt as stop:
        kept = INTERRUPTED.get(args.command)
        print(f"vtprune {args.command}: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}"
              + (f"; {kept.format(out=args.out)}" if kept else ""), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)  # as the shell reports it
    finally:
        signal.signal(signal.SIGTERM, previous)


# What an interrupted command keeps, for the line it ends with.
INTERRUPTED = {
    "eval": "the finished answers are saved in {out}: the same command resumes there",
    "bench": "the configurations measured so far are saved under {out}",
    "train-reference": "the same command resumes from the last checkpoint in {out}",
}


if __name__ == "__main__":
    sys.exit(main())
