"""The `audiodata` command line: a thin layer over the Python API (build, verify, stats, sources)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn

from upath import UPath

from audio_dataset import __version__
from audio_dataset.audio import FLAC_MAX_RATE, LONG_CLIP_POLICIES, AudioConfig
from audio_dataset.source import SourceConfig, SourceError, UserError
from audio_dataset.storage import location


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
    return ratios


def add_build_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build", help="list, download, transcode and shard a source")
    p.add_argument("--source", required=True, help="source name (see `audiodata sources`)")
    p.add_argument("--input", help="folder, CSV/parquet or catalogue the source reads")
    p.add_argument("--out", required=True, type=location, help="output folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--samples-per-shard", type=_positive_int, default=256,
                   help="input items per shard (segmenting may put more samples in a shard)")
    p.add_argument("--limit", type=_positive_int, help="stop listing after N items")
    p.add_argument("--workers", type=_positive_int, help="parallel shard workers (default: CPU count)")
    p.add_argument("--ray-address", help="join a Ray cluster (default: start local Ray)")
    p.add_argument("--sample-rate", type=_sample_rate, default=48_000)
    p.add_argument("--channels", type=int, choices=(1, 2), default=1, help="1 downmixes to mono, 2 keeps stereo")
    p.add_argument("--max-seconds", type=_positive_float, help="clips longer than this follow --long-clips")
    p.add_argument("--long-clips", choices=LONG_CLIP_POLICIES,
                   help="drop, truncate or segment clips over --max-seconds (default drop; segment "
                        "when --segment-seconds is given)")
    p.add_argument("--segment-seconds", type=_positive_float, help="length of consecutive segments")
    p.add_argument("--min-seconds", type=float, default=0.5, help="drop clips shorter than this")
    p.add_argument("--min-source-rate", type=int, default=16_000, help="drop clips recorded below this rate")
    p.add_argument("--splits", type=_split_ratios, default="train=0.9,valid=0.05,test=0.05",
                   help="split ratios by stable hash of the source id")
    p.add_argument("--base-url", help="override the source's site or API root")
    p.add_argument("--source-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="source-specific option (repeatable)")
    p.add_argument("--exclude", type=Path, action="append", default=[], metavar="FILE",
                   help="file of source ids to exclude (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from audio_dataset.build import BuildOptions, build

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
                        min_seconds=args.min_seconds, min_source_rate=args.min_source_rate)
    options = BuildOptions(
        source=args.source, out=args.out,
        source_config=SourceConfig(input=args.input, base_url=args.base_url, options=dict(args.source_option)),
        audio=audio, samples_per_shard=args.samples_per_shard, limit=args.limit, workers=args.workers,
        ray_address=args.ray_address, split_ratios=args.splits, exclude_files=args.exclude,
        progress=not args.no_progress,
    )
    build(options)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from audio_dataset.verify import verify

    _require_output(args.out)
    report = verify(args.out)
    for problem in report.problems:
        print(problem)
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"verified {report.shards} shard(s), {report.samples} sample(s): {verdict}")
    return 0 if report.ok else 1


def run_stats(args: argparse.Namespace) -> int:
    import json

    from audio_dataset import manifest
    from audio_dataset.stats import PLOT_FILE, compute_stats, plot_stats, print_summary

    _require_output(args.out)
    table = manifest.read_table(args.out / manifest.MANIFEST_FILE)
    stats = compute_stats(table)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print_summary(stats)
    plot = args.plot or args.out / PLOT_FILE
    plot_stats(args.out, table, plot)
    print(f"plot: {plot}", file=sys.stderr)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from audio_dataset.report import write_report

    _require_output(args.out)
    print(write_report(args.out, args.out_html, n_samples=args.samples))
    return 0


def run_sources(args: argparse.Namespace) -> int:
    from audio_dataset.sources_table import sources_table

    for out in args.out:  # a mistyped --out would otherwise count as an empty build
        _require_output(out)
    print(sources_table(args.out))
    return 0


def _require_output(out: UPath) -> None:
    from audio_dataset.manifest import MANIFEST_FILE

    if not (out / MANIFEST_FILE).exists():
        raise UserError(f"{out} is not a build output (no {MANIFEST_FILE})")


class OneLineParser(argparse.ArgumentParser):
    """Argument mistakes as one line (not the whole usage text): `audiodata build: error: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="audiodata", description="Build audio-text datasets for CLAP.")
    parser.add_argument("--version", action="version", version=f"audiodata {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_build_parser(subparsers)
    p = subparsers.add_parser("verify", help="decode and check every shard against the manifest")
    p.add_argument("out", type=location)
    p.set_defaults(func=run_verify)
    p = subparsers.add_parser("stats", help="dataset figures and a PNG plot")
    p.add_argument("out", type=location)
    p.add_argument("--plot", type=location, help="where to write the PNG (default OUT/stats.png)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run_stats)
    p = subparsers.add_parser("sources", help="list sources with licence, expected and built counts")
    p.add_argument("--out", type=location, action="append", default=[], help="build output(s) to count")
    p.set_defaults(func=run_sources)
    p = subparsers.add_parser("report", help="a self-contained HTML page: figures, plots, samples to listen to")
    p.add_argument("out", type=location)
    p.add_argument("--out-html", type=location, help="where to write the page (default OUT/report.html)")
    p.add_argument("--samples", type=_positive_int, default=6,  # report.DEFAULT_SAMPLES, without importing it
                   help="samples shown with audio previews")
    p.set_defaults(func=run_report)
    _add_k2c(subparsers)
    _add_curate(subparsers)
    return parser


def _add_k2c(subparsers: argparse._SubParsersAction) -> None:
    from audio_dataset.k2c.cli import add_cli

    add_cli(subparsers)


def _add_curate(subparsers: argparse._SubParsersAction) -> None:
    from audio_dataset.curate.cli import add_cli

    add_cli(subparsers)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"audiodata: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user named cannot be read or written (--plot, --out-html, ...)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"audiodata: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except SourceError as exc:
        print(f"audiodata: source failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("audiodata: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
