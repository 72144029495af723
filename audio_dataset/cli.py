"""The `audiodata` command line: a thin layer over the Python API (build, verify, stats, sources)."""
from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from upath import UPath

from audio_dataset import __version__
from audio_dataset.audio import CLIPPING_POLICIES, FLAC_MAX_RATE, LONG_CLIP_POLICIES, AudioConfig
from audio_dataset.lock import OutputLocked, current_holder
from audio_dataset.redaction import redact
from audio_dataset.source import SourceConfig, SourceError, UserError
from audio_dataset.storage import UnsafeOutput, is_local, location
from clap_model.flags import DefaultsHelpFormatter, add_renamed

if TYPE_CHECKING:
    from audio_dataset.build import BuildOptions
    from audio_dataset.recipe import Recipe


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _sample_rate(text: str) -> int:
    value = _positive_int(text)
    if value > FLAC_MAX_RATE:
        raise argparse.ArgumentTypeError(f"FLAC stores at most {FLAC_MAX_RATE} Hz, got {text}")
    return value


def _contact(text: str) -> str:
    from audio_dataset.optout import check_contact

    try:
        return check_contact(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--contact ")) from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _split_ratios(text: str) -> dict[str, float]:
    ratios = {}
    for part in text.split(","):
        name, value = _key_value(part)
        ratios[name] = float(value)
    if not ratios or any(not math.isfinite(v) or v < 0 for v in ratios.values()) or sum(ratios.values()) <= 0:
        raise argparse.ArgumentTypeError("split ratios must be non-negative numbers, not all zero")
    if abs(sum(ratios.values()) - 1) > 1e-6:  # silently rescaling would give other shares than typed
        raise argparse.ArgumentTypeError(f"split ratios must sum to 1, these sum to {sum(ratios.values()):g}")
    return ratios


def add_build_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build", help="list, download, transcode and shard a source")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help="source name (see `audiodata sources`)")
    what.add_argument("--recipe", metavar="NAME_OR_FILE", help="build every source of a recipe (see `audiodata plan`)")
    p.add_argument("--input", help="folder, CSV/parquet or catalogue the source reads")
    p.add_argument("--out", required=True, type=location, help="output folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--samples-per-shard", type=_positive_int, default=256,
                   help="input items per shard (segmenting may put more samples in a shard)")
    p.add_argument("--limit", type=_positive_int, help="stop listing after N items")
    p.add_argument("--workers", type=_positive_int, help="parallel shard workers (default: CPU count)")
    p.add_argument("--ray-address", help="join a Ray cluster (default: start local Ray)")
    p.add_argument("--sample-rate", type=_sample_rate, default=48_000, help="output sample rate in Hz")
    p.add_argument("--channels", type=int, choices=(1, 2), default=1, help="1 downmixes to mono, 2 keeps stereo")
    p.add_argument("--max-seconds", type=_positive_float, help="clips longer than this follow --long-clips")
    p.add_argument("--long-clips", choices=LONG_CLIP_POLICIES,
                   help="drop, truncate or segment clips over --max-seconds (default drop; segment "
                        "when --segment-seconds is given)")
    p.add_argument("--segment-seconds", type=_positive_float, help="length of consecutive segments")
    p.add_argument("--min-seconds", type=float, default=0.5, help="drop clips shorter than this (seconds)")
    p.add_argument("--min-source-rate", type=int, default=16_000, help="drop clips recorded below this rate (Hz)")
    p.add_argument("--clipping", choices=CLIPPING_POLICIES, default="attenuate",
                   help="a clip whose peak (after resampling) exceeds full scale: attenuate it just enough "
                        "to fit (default; gain_db recorded), or clip it as LAION did (clipped_samples recorded)")
    p.add_argument("--splits", type=_split_ratios, default="train=0.9,valid=0.05,test=0.05", metavar="NAME=RATIO,...",
                   help="split ratios by stable hash of the source id")
    p.add_argument("--base-url", help="override the source's site or API root")
    p.add_argument("--source-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="source-specific option (repeatable)")
    p.add_argument("--exclude", type=Path, action="append", default=[], metavar="FILE",
                   help="file of source ids to exclude (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--contact", type=_contact, metavar="URL_OR_EMAIL",
                   help="how a site can reach you, sent in the User-Agent of every web request")
    p.add_argument("--ignore-opt-out", action="store_true",
                   help="fetch items whose site opts out (robots.txt, X-Robots-Tag, TDM-Rep); "
                        "recorded in provenance.json")
    p.add_argument("--recipe-input", type=_key_value, action="append", default=[], metavar="NAME=PATH",
                   help="with --recipe: the input of one of its sources (repeatable)")
    p.add_argument("--only", help="with --recipe: build only these sources (comma-separated names)")
    p.add_argument("--retry-failed", nargs="?", const="transient", metavar="REASONS",
                   help="on a finished build (the same options): retry the failed items with these reasons "
                        "(comma-separated; `transient`, the default, is timeouts, 5xx, 429, connection "
                        "errors, stalled or cut-off bodies, too_slow, worker_died) into new shards, "
                        "updating the manifest, sizes.json, SHA256SUMS and stats")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from audio_dataset.build import build

    if args.recipe and args.retry_failed is not None:
        raise UserError("--retry-failed goes with --source: retry one source's build in its own --out")
    if args.recipe:
        return run_recipe_build(args)
    if args.recipe_input or args.only:
        raise UserError("--recipe-input and --only go with --recipe")
    if args.retry_failed is not None:
        from audio_dataset.retry import parse_reasons, retry_failed

        retry_failed(build_options(args), parse_reasons(args.retry_failed))
        return 0
    build(build_options(args))
    return 0


def build_options(args: argparse.Namespace) -> BuildOptions:
    """A parsed `audiodata build` command line as BuildOptions (the audio settings checked)."""
    from audio_dataset.build import BuildOptions

    long_clips = args.long_clips or ("segment" if args.segment_seconds else "drop")
    if long_clips == "segment" and not (args.segment_seconds or args.max_seconds):
        raise UserError("--long-clips segment needs --segment-seconds or --max-seconds")
    if long_clips == "truncate" and not args.max_seconds:
        raise UserError("--long-clips truncate needs --max-seconds")
    # Pieces cut shorter than --min-seconds would be dropped (segment) or kept against it (truncate).
    flag, cut_to = ("--segment-seconds", args.segment_seconds) if args.segment_seconds and long_clips == "segment" \
        else ("--max-seconds", args.max_seconds)
    if long_clips != "drop" and cut_to < args.min_seconds:
        raise UserError(f"{flag} {cut_to:g} is below --min-seconds {args.min_seconds:g}")
    audio = AudioConfig(sample_rate=args.sample_rate, channels=args.channels, max_seconds=args.max_seconds,
                        long_clips=long_clips, segment_seconds=args.segment_seconds,
                        min_seconds=args.min_seconds, min_source_rate=args.min_source_rate,
                        clipping=args.clipping)
    options = BuildOptions(
        source=args.source, out=args.out,
        source_config=SourceConfig(input=args.input, base_url=args.base_url, options=dict(args.source_option),
                                   contact=args.contact),
        audio=audio, samples_per_shard=args.samples_per_shard, limit=args.limit, workers=args.workers,
        ray_address=args.ray_address, split_ratios=args.splits, exclude_files=args.exclude,
        progress=not args.no_progress, summary_out=getattr(args, "summary_out", None),
        ignore_opt_out=args.ignore_opt_out,
    )
    return options


# `audiodata build` flags a recipe run takes from the command line; the rest come from the recipe.
RECIPE_RUN_FLAGS = {"recipe", "out", "limit", "workers", "ray_address", "no_progress", "recipe_input", "only",
                    "contact", "ignore_opt_out"}


def run_recipe_build(args: argparse.Namespace) -> int:
    from audio_dataset.recipe import run_recipe

    recipe, out, commands, free = _recipe_commands(args)
    parser = make_parser()
    for name, steps in commands.items():  # a mistake in the recipe stops the run before any source
        for argv in steps:
            _parse_recipe_command(parser, name, argv + free[argv[0]])

    def run_command(argv: list[str]) -> None:
        parsed = parser.parse_args(argv + free[argv[0]])
        parsed.summary_out = out  # its hints name the recipe's OUT, not the source's work folder
        parsed.func(parsed)

    outcomes = run_recipe(recipe, out, commands, run_command)
    for outcome in outcomes:
        detail = f": {outcome.error}" if outcome.error else (f", {outcome.samples} samples" if outcome.samples else "")
        print(f"{outcome.name}: {outcome.status}{detail}")
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed:
        print(f"audiodata: {len(failed)} source(s) failed ({', '.join(failed)}); rerun the same command to "
              "retry them (finished sources are skipped)", file=sys.stderr)
    return 1 if failed else 0


RecipeRun = tuple["Recipe", UPath, dict[str, list[list[str]]], dict[str, list[str]]]


def _recipe_commands(args: argparse.Namespace) -> RecipeRun:
    """(recipe, OUT, source name -> its command lines, command -> flags free to change on a resume)."""
    from audio_dataset.recipe import load_recipe, source_commands

    defaults = make_parser().parse_args(["build", "--recipe", "x", "--out", "x"])
    fixed = sorted(k for k, v in vars(args).items() if k not in RECIPE_RUN_FLAGS and v != getattr(defaults, k))
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise UserError(f"{flags}: set by the recipe with --recipe (edit a copy of it)")
    recipe = load_recipe(args.recipe)
    for name, path in args.recipe_input:
        recipe.source(name).input = os.path.abspath(path) if os.path.exists(path) else path
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else recipe.names
    # --limit changes what is built; the others may differ between a run and its resume.
    pinned = ["--limit", str(args.limit)] if args.limit else []
    shared = ["--no-progress"] if args.no_progress else []
    shared += ["--ray-address", args.ray_address] if args.ray_address else []
    web = (["--contact", args.contact] if args.contact else []) + (["--ignore-opt-out"] if args.ignore_opt_out else [])
    free = {"build": shared + web + (["--workers", str(args.workers)] if args.workers else []), "k2c": shared}
    # Absolute: Ray workers resolve paths in their own working directory.
    out = location(os.path.abspath(args.out.path)) if is_local(args.out) else args.out
    return recipe, out, {n: source_commands(recipe, recipe.source(n), out, pinned) for n in names}, free


def _parse_recipe_command(parser: argparse.ArgumentParser, name: str, argv: list[str]) -> argparse.Namespace:
    import contextlib
    import io

    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            parsed = parser.parse_args(argv)
        if argv[0] == "build":
            build_options(parsed)  # the audio settings' own checks
    except SystemExit:
        reason = message.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1].split(" (see ")[0]
        raise UserError(f"recipe source {name}: {reason}") from None
    except UserError as exc:
        raise UserError(f"recipe source {name}: {exc}") from None
    return parsed


def run_plan(args: argparse.Namespace) -> int:
    from audio_dataset.plan import Assumptions, format_plan, plan_recipe
    from audio_dataset.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    given = {"flac_ratio": args.flac_ratio, "latency": args.latency, "node_gbps": args.node_gbps,
             "transcode_rate": args.transcode_rate, "caption_rate": args.caption_rate}
    assume = Assumptions(**{k: v for k, v in given.items() if v is not None})
    print(format_plan(recipe, plan_recipe(recipe, assume), assume))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from audio_dataset.verify import verify

    _require_output(args.dataset)
    if (holder := current_holder(args.dataset)) is not None:
        print(f"audiodata: warning: {args.dataset} is being written by {holder.describe()}; "
              "verify it again once that finishes", file=sys.stderr)
    report = verify(args.dataset)
    for problem in report.problems:
        print(problem)
    for warning in report.warnings:  # a dataset fit to train on, not yet to publish: exit 0
        print(f"warning: {warning}")
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    if report.warnings:
        verdict += f"; {len(report.warnings)} clip(s) without the credit their licence asks for"
    print(f"verified {report.shards} shard(s), {report.samples} sample(s): {verdict}")
    return 0 if report.ok else 1


def run_stats(args: argparse.Namespace) -> int:
    import json

    from audio_dataset import manifest
    from audio_dataset.recipe import failed_sources
    from audio_dataset.stats import PLOT_FILE, compute_stats, print_summary, stats_png, warn_damaged

    _require_output(args.dataset)
    table = manifest.read_table(args.dataset / manifest.MANIFEST_FILE)
    stats = compute_stats(table)
    failed = failed_sources(args.dataset)
    if args.json:
        print(json.dumps({**stats, "failed_sources": failed}, indent=2))
    else:
        print_summary(stats, out=args.dataset)
        for name, why in failed.items():  # no manifest rows: the table above cannot show them
            print(f"source {name} failed: {why}")
    png, drawn = stats_png(args.dataset, table)
    warn_damaged(args.dataset, drawn.damaged)
    if (plot := _save(png, args.out, args.dataset / PLOT_FILE, "plot")) is not None:
        print(f"plot: {plot}", file=sys.stderr)
    return 0


def _save(data: bytes, given: UPath | None, default: UPath, what: str) -> UPath | None:
    """Write `data` to the --out the user gave, else to `default` in the dataset. A dataset we may not
    write into (read-only) is one line saying so, not an error: what was computed has been printed."""
    from audio_dataset.storage import atomic_write_bytes

    dest = given or default
    try:
        atomic_write_bytes(dest, data)
    except OSError as exc:  # named as the file asked for, not the temp file the atomic write used
        read_only = isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        if given is not None or not read_only:
            raise OSError(exc.errno, exc.strerror or str(exc), str(dest)) from None
        why = os.strerror(exc.errno) if exc.errno else "not writable"
        print(f"audiodata: could not save the {what} in {default.parent} ({why}); give --out FILE to "
              "write it elsewhere", file=sys.stderr)
        return None
    return dest


def run_failures(args: argparse.Namespace) -> int:
    from audio_dataset import manifest
    from audio_dataset.stats import failures, print_failures

    _require_output(args.dataset)
    table = manifest.read_table(args.dataset / manifest.MANIFEST_FILE)
    rows = failures(table, args.reason)
    present = {e for e in table.column("error").to_pylist() if e}
    if unknown := sorted(set(args.reason) - present):
        print(f"audiodata: no item has reason {', '.join(unknown)}; reasons in {args.dataset}: "
              f"{', '.join(sorted(present)) or 'none (every item was kept)'}", file=sys.stderr)
    print_failures(rows)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from audio_dataset.report import REPORT_FILE, report_page

    _require_output(args.dataset)
    page = report_page(args.dataset, n_samples=args.samples)
    if (dest := _save(page, args.out, args.dataset / REPORT_FILE, "report")) is None:
        return 1  # the page is the whole result
    print(dest)
    return 0


def run_attribution(args: argparse.Namespace) -> int:
    from audio_dataset.attribution import print_missing, write_attribution
    from audio_dataset.stats import tsv_cell, warn_damaged

    _require_output(args.dataset)
    result = write_attribution(args.dataset, args.out)
    warn_damaged(args.dataset, result.damaged)
    for split, credits in result.credits.items():
        print(f"{tsv_cell(split)}: {len(credits)} clip(s) to credit")  # a folder's name: inert
    folder = result.written[0].parent if result.written else (args.out or args.dataset)
    print(f"wrote {len(result.written)} file(s) in {folder}")
    print_missing(result)
    if result.missing:  # the files are written; a publisher must fix these first
        print(f"audiodata: {len(result.missing)} clip(s) need credit but have no author or URL", file=sys.stderr)
        return 1
    return 0


def run_sources(args: argparse.Namespace) -> int:
    from audio_dataset.recipe import failed_sources
    from audio_dataset.sources_table import sources_table

    for dataset in args.datasets:  # a mistyped folder would otherwise count as an empty build
        _require_output(dataset)
    print(sources_table(args.datasets))
    for dataset in args.datasets:  # a recipe's failed sources built nothing: the counts above miss them
        for name, why in failed_sources(dataset).items():
            print(f"{dataset}: source {name} failed: {why}")
    return 0


def run_card(args: argparse.Namespace) -> int:
    from audio_dataset.card import CARD_FILE, write_card

    _require_output(args.dataset)
    dest = args.out or args.dataset / CARD_FILE
    write_card(args.dataset, dest, force=args.force)
    print(dest)
    return 0


def _require_output(out: UPath) -> None:
    from audio_dataset.manifest import MANIFEST_FILE

    if not (out / MANIFEST_FILE).exists():
        if not out.exists():
            raise UserError(f"{out} does not exist")
        raise UserError(f"{out} is not a build output (no {MANIFEST_FILE})")


class OneLineParser(argparse.ArgumentParser):
    """Argument mistakes as one line (not the whole usage text): `audiodata build: error: ...`.
    Every subcommand's parser is one too, so every `--help` shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_dataset(p: argparse.ArgumentParser) -> None:
    """The dataset a command reads: the positional DATASET in every command."""
    p.add_argument("dataset", type=location, metavar="DATASET", help="a build output (folder or fsspec URL)")


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="audiodata", description="Build audio-text datasets for CLAP.")
    parser.add_argument("--version", action="version", version=f"audiodata {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_build_parser(subparsers)
    p = subparsers.add_parser("verify", help="decode and check every shard against the manifest")
    _add_dataset(p)
    p.set_defaults(func=run_verify)
    p = subparsers.add_parser("stats", help="dataset figures and a PNG plot")
    _add_dataset(p)
    p.add_argument("--out", type=location, help="where to write the PNG plot (default DATASET/stats.png)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_renamed(p, {"--plot": "--out"})
    p.set_defaults(func=run_stats)
    p = subparsers.add_parser("failures", help="list the items not kept: reason, source id, URL, detail (TSV)")
    _add_dataset(p)
    p.add_argument("--reason", action="append", default=[], metavar="REASON",
                   help="only items with this reason (repeatable; see the summary's `reasons:` line)")
    p.set_defaults(func=run_failures)
    p = subparsers.add_parser("sources", help="list sources with licence, expected and built counts")
    p.add_argument("datasets", type=location, nargs="*", metavar="DATASET", help="build output(s) to count")
    add_renamed(p, {"--out": "the positional DATASET ... (sources reads them)"})
    p.set_defaults(func=run_sources)
    p = subparsers.add_parser("attribution", help="per split, the credit lines (TSV and Markdown) every clip "
                                                  "under CC BY, BY-SA, BY-NC or Sampling+ needs")
    _add_dataset(p)
    p.add_argument("--out", type=location, help="folder for SPLIT.tsv and SPLIT.md (default DATASET/attribution)")
    p.set_defaults(func=run_attribution)
    p = subparsers.add_parser("report", help="a self-contained HTML page: figures, plots, samples to listen to")
    _add_dataset(p)
    p.add_argument("--out", type=location, help="where to write the page (default DATASET/report.html)")
    p.add_argument("--samples", type=_positive_int, default=6,  # report.DEFAULT_SAMPLES, without importing it
                   help="samples shown with audio previews")
    add_renamed(p, {"--out-html": "--out"})
    p.set_defaults(func=run_report)
    p = subparsers.add_parser("card", help="a Hugging Face dataset card (README.md) for a build output")
    _add_dataset(p)
    p.add_argument("--out", type=location, help="where to write the card (default DATASET/README.md)")
    p.add_argument("--force", action="store_true", help="replace a README.md that `audiodata card` did not write")
    p.set_defaults(func=run_card)
    p = subparsers.add_parser("plan", help="items, hours, bytes and wall time a recipe needs, per source")
    p.add_argument("recipe", metavar="RECIPE", help="a shipped recipe name or a recipe .toml file")
    p.add_argument("--flac-ratio", type=_positive_float, help="FLAC size / 16-bit PCM size (default 0.6)")
    p.add_argument("--latency", type=_positive_float, help="seconds per download round trip (default 0.2)")
    p.add_argument("--node-gbps", type=_positive_float, help="each node's download link, Gbit/s (default 1)")
    p.add_argument("--transcode-rate", type=_positive_float,
                   help="seconds of audio a core transcodes per second (bench/transcode.py prints it; "
                        "default the figure in bench/RESULTS.md)")
    p.add_argument("--caption-rate", type=_positive_float,
                   help="30 s windows one GPU recaptions per second (bench/caption.py --device cuda prints it; "
                        "default an estimate: no GPU figure is measured yet)")
    p.set_defaults(func=run_plan)
    _add_k2c(subparsers)
    _add_caption(subparsers)
    _add_curate(subparsers)
    return parser


def _add_caption(subparsers: argparse._SubParsersAction) -> None:
    from audio_dataset.caption.cli import add_cli

    add_cli(subparsers)


def _add_k2c(subparsers: argparse._SubParsersAction) -> None:
    from audio_dataset.k2c.cli import add_cli

    add_cli(subparsers)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a container stop) handled as Ctrl-C: one line, resumable."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_sigterm(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _quiet_stdout() -> None:
    """The reader went away (`audiodata stats | head`): drop what is left, print nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _root_cause(exc: BaseException) -> BaseException:
    """The error a Ray task raised, out of Ray's wrappers (which keep it as `cause`)."""
    seen = 0
    while isinstance(getattr(exc, "cause", None), BaseException) and seen < 8:
        exc, seen = exc.cause, seen + 1  # type: ignore[attr-defined]
    return exc


def _os_error(exc: OSError, out: object) -> int:
    """A full disk fails the run (exit 1; the build removed its temp files, a rerun resumes); other
    OS errors are a path the user named that cannot be read or written (stats or report --out): exit 2."""
    cause = _root_cause(exc)
    error = cause if isinstance(cause, OSError) else exc
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = error.filename or out or "the output"
        print(f"audiodata: error: {error.strerror or 'no space left'} writing {where}; free some space, "
              "then rerun the same command to resume", file=sys.stderr)
        return 1
    where = f": {error.filename}" if error.filename else ""
    message = error.strerror or str(error).strip().splitlines()[-1]
    print(f"audiodata: error: {message}{where}", file=sys.stderr)
    return 1 if error is not exc else 2  # raised inside a worker: the run failed, not the command line

def _add_curate(subparsers: argparse._SubParsersAction) -> None:
    from audio_dataset.curate.cli import add_cli

    add_cli(subparsers)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:  # a caller's own handler (main() called from Python) is back afterwards
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """The command, with every failure as one line and its exit code."""
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at exit as "Exception ignored"
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except UserError as exc:
        print(f"audiodata: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except UnsafeOutput as exc:  # a planted link in the output: the run stops, nothing written through it
        print(f"audiodata: error: {_root_cause(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        return _os_error(exc, getattr(args, "out", None) or getattr(args, "dataset", None))
    except SourceError as exc:
        print(f"audiodata: source failed: {redact(str(exc))}", file=sys.stderr)
        return 1
    except OutputLocked as exc:
        print(f"audiodata: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        how = f" ({signal.Signals(signum).name})" if signum != signal.SIGINT else ""
        print(f"audiodata: interrupted{how}; rerun the same command to resume", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
