"""clap-eval: retrieval and zero-shot evaluation of a checkpoint (ours or LAION-CLAP's); with
--suite, a benchmark suite's tasks under each reference's protocol (clap_model.benchmark).

torch and the data loader load inside the functions, after clap-eval has parsed its arguments:
`--help` and mistakes answer at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clap_model import files
from clap_model.cli_common import Stop, load_modules, run_command
from clap_model.config import ModelConfig, UsageError, error_line, get_preset
from clap_model.inputs import check_named
from clap_model.params import eval_parser
from clap_model.suites import Prompts, Suite

if TYPE_CHECKING:
    import torch

    from clap_model.clap import CLAP
    from clap_model.data import AudioSpec, ShardDataset
    from clap_model.text import Tokenize

PROG = "clap-eval"


def audio_spec(cfg: ModelConfig, truncating: str | None, filling: str, max_fusion_seconds: float) -> AudioSpec:
    from clap_model.data import AudioSpec, DataError

    truncating = truncating or ("fusion" if cfg.enable_fusion else "rand_trunc")
    if (truncating == "fusion") != cfg.enable_fusion:
        raise DataError("--data-truncating fusion needs a fusion model (e.g. htsat-tiny-roberta-fusion), "
                        "and a fusion model needs --data-truncating fusion")
    return AudioSpec(cfg.audio.sample_rate, cfg.audio.clip_samples, truncating, filling,
                     int(max_fusion_seconds * cfg.audio.sample_rate))


def check_eval_args(args: argparse.Namespace) -> None:
    """The evaluation arguments' mistakes, found before training rather than after its first epoch."""
    from clap_model.inputs import expand_datasets  # no torch: clap-eval says these before it loads

    for pattern in (args.val_data, args.zeroshot_data):
        if pattern:
            expand_datasets(pattern)  # raises on a pattern naming no shards or a missing local shard
    try:
        prompt = args.zeroshot_template.format("CLASS")
    except (KeyError, IndexError, ValueError):
        prompt = ""
    if "CLASS" not in prompt:  # without the class name every prompt is the same sentence
        raise UsageError(f"--zeroshot-template needs one {{}} for the class name: {args.zeroshot_template!r}")


def val_datasets(spec: str) -> list[tuple[str, str]]:
    """(name, pattern) per `::`-separated dataset, a build's folder one per split. Retrieval ranks
    within one dataset, so each is scored on its own, named as LAION-CLAP names them: the two
    folders above the shards (`data/clotho/test/{0..3}.tar` -> `clotho-test`); one dataset alone
    goes unnamed."""
    from clap_model.inputs import DATASET_SEPARATOR, split_folders

    found: list[tuple[str, str]] = []  # (pattern, the folder its shards are in)
    for part in (part.strip() for part in spec.split(DATASET_SEPARATOR)):
        folders = split_folders(part, train=False) if part else []
        found += [(part, part.rpartition("/")[0])] if folders is None else [(str(f), str(f)) for f in folders]
    if len(found) < 2:
        return [("", pattern) for pattern, _ in found]
    patterns = [pattern for pattern, _ in found]
    names = ["-".join(part for part in directory.split("/")[-2:] if part) for _, directory in found]
    if len(set(names)) < len(names) or not all(names):
        names = [f"{name or 'val'}-{index}" for index, name in enumerate(names)]
    return list(zip(names, patterns))


def eval_dataset(pattern: str, spec: AudioSpec, tokenize: Tokenize, batch_size: int,
                 label_field: str | None = None) -> ShardDataset:
    from clap_model.data import LoaderConfig, ShardDataset, ShardSet

    shards = ShardSet.from_spec(pattern)
    cfg = LoaderConfig(batch_size=batch_size, audio=spec, label_field=label_field, train=False)
    return ShardDataset(shards, cfg, tokenize)


def run_evaluations(model: CLAP, args: argparse.Namespace, spec: AudioSpec, tokenize: Tokenize,
                    device: torch.device, precision: str) -> dict[str, float]:
    """Retrieval on --val-data and zero-shot on --zeroshot-data, whichever are given."""
    from clap_model.data import make_loader
    from clap_model.train import evaluate_retrieval, evaluate_zeroshot

    metrics: dict[str, float] = {}
    workers = min(args.workers, 2)
    for name, pattern in val_datasets(args.val_data or ""):
        dataset = eval_dataset(pattern, spec, tokenize, args.batch_size)
        found = evaluate_retrieval(model, make_loader(dataset, workers), device, precision)
        metrics.update({f"{name}/{key}" if name else key: value for key, value in found.items()})
    if args.zeroshot_data:
        dataset = eval_dataset(args.zeroshot_data, spec, tokenize, args.batch_size, args.zeroshot_label_field)
        classes = [c.strip() for c in args.zeroshot_classes.split(",")] if args.zeroshot_classes else None
        metrics.update(evaluate_zeroshot(model, make_loader(dataset, workers), tokenize, classes,
                                         args.zeroshot_template, device, precision))
    return metrics


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from clap_model import checkpoint as ckpt
    from clap_model.data import DataError
    from clap_model.metrics import format_metrics
    from clap_model.text import Tokenize

    if not (args.val_data or args.zeroshot_data):
        raise DataError("nothing to evaluate: give --val-data and/or --zeroshot-data")
    check_eval_args(args)
    if args.model:
        get_preset(args.model)  # a misspelt preset is an error even when the checkpoint carries its config
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    checkpoint = ckpt.read(args.checkpoint, args.max_checkpoint_bytes)
    cfg = ckpt.model_config_of(checkpoint, args.model, args.text_model)
    spec = audio_spec(cfg, args.data_truncating, args.data_filling, args.max_fusion_seconds)
    tokenize = Tokenize(cfg.text)  # before the model is built: a missing tokenizer is one quick line
    model = ckpt.model_from(checkpoint, cfg).to(device)
    del checkpoint
    metrics = run_evaluations(model, args, spec, tokenize, device, precision)
    print(f"eval {Path(args.checkpoint).name}: {format_metrics(metrics)}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda stop: _main(argv, stop))


@dataclass
class SuiteRun:
    """What the command line asked of a suite run, checked before torch loads."""

    suite: Suite
    data_root: Path
    out: Path
    prompts: Prompts | None


def check_suite_args(args: argparse.Namespace) -> SuiteRun | None:
    """The suite options' mistakes (a bad suite or templates file, a missing data root, options that
    do not go together) as one UsageError, before anything heavy loads. None without --suite."""
    from clap_model.suites import load_prompts, load_suite

    if args.suite is None:
        for flag, given in (("--data-root", args.data_root), ("--templates", args.templates),
                            ("--reference", args.reference), ("--crop random", args.crop == "random"),
                            ("--repeats", args.repeats != 1)):
            if given:
                raise UsageError(f"{flag} goes with --suite")
        return None
    if args.val_data or args.zeroshot_data:
        raise UsageError("--suite scores its own tasks: give it without --val-data and --zeroshot-data")
    if args.repeats < 1 or (args.repeats > 1 and args.crop != "random"):
        raise UsageError("--repeats needs --crop random (a fixed crop gives the same numbers every run) "
                         "and must be at least 1")
    suite = load_suite(args.suite)
    if not args.data_root:
        raise UsageError("--suite needs --data-root, the folder holding the benchmarks' builds")
    data_root = Path(args.data_root)
    if not data_root.is_dir():
        raise UsageError(f"--data-root {data_root}: no such folder")
    prompts = load_prompts(args.templates) if args.templates else None
    out = Path(args.out or f"eval-{suite.name}")
    files.check_target(out, folder=True)
    for name in RESULT_FILES:
        files.check_target(out / name)
    return SuiteRun(suite, data_root, out, prompts)


RESULT_FILES = ("results.json", "results.md", "results.csv")


def _run_suite(args: argparse.Namespace, run: SuiteRun) -> int:
    import torch

    from clap_model import benchmark
    from clap_model import checkpoint as ckpt
    from clap_model.cli_common import version
    from clap_model.suite_results import TABLES, csv_table, markdown_table
    from clap_model.text import Tokenize

    if args.model:
        get_preset(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    model = ckpt.load_model(args.checkpoint, args.model, args.text_model, args.max_checkpoint_bytes).to(device)
    tokenize = Tokenize(model.cfg.text)
    opts = benchmark.Options(crop=args.crop, seed=args.seed, repeats=args.repeats, batch_size=args.batch_size,
                             workers=min(args.workers, 4), device=device, precision=precision,
                             max_fusion_seconds=args.max_fusion_seconds, prompts=run.prompts,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    results, skipped = benchmark.run_suite(model, tokenize, run.suite, run.data_root, opts)
    document = benchmark.results_document(run.suite, results, skipped, model, args.checkpoint, args.reference,
                                          opts, version())
    files.make_folder(run.out)
    texts = {"results.json": json.dumps(document, indent=2, sort_keys=False) + "\n",
             "results.md": markdown_table(document), "results.csv": csv_table(document)}
    for name, text in texts.items():
        with files.replacing(run.out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    print(TABLES[args.table](document), end="", flush=True)
    print(f"{PROG}: {len(results)} task(s) scored, {len(skipped)} skipped; results in {run.out}/",
          file=sys.stderr, flush=True)
    return 0 if results else 1


def _print_results(args: argparse.Namespace) -> int:
    from clap_model.suite_results import TABLES, read_results

    print(TABLES[args.table](read_results(args.results)), end="")
    return 0


def _main(argv: list[str] | None, stop: Stop) -> int:
    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        print(f"{PROG}: error: --batch-size must be positive and --workers non-negative", file=sys.stderr)
        return 2
    try:
        if args.results:
            return _print_results(args)
        if not args.checkpoint:
            parser.error("the following arguments are required: --checkpoint")
        suite_run = check_suite_args(args)
        if suite_run is None:
            check_eval_args(args)  # before torch: the arguments, then the names of model and checkpoint
        check_named(args.model, checkpoints=(args.checkpoint,))
    except (UsageError, OSError) as exc:
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    load_modules(stop, "clap_model.checkpoint", "clap_model.train", "clap_model.data")
    try:
        if suite_run is not None:
            return _run_suite(args, suite_run)
        if args.out:  # before the run: a name that will be refused is said at once
            files.check_target(Path(args.out))
        metrics = _evaluate(args)
        if args.out:
            with files.replacing(Path(args.out)) as tmp:
                tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    except (UsageError, OSError) as exc:
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
