"""The command-line half of the shard-to-shard runner: the options every stage takes and the line
each prints when done (k2c, keywords, caption, embed, dedup, filter)."""
from __future__ import annotations

import argparse

from upath import UPath

from audio_dataset.stage_runner import DEVICES, RunOptions, RunSummary
from audio_dataset.storage import location
from clap_model.flags import add_renamed


def add_run_options(p: argparse.ArgumentParser) -> None:
    """DATASET, --out and the worker options."""
    p.add_argument("dataset", type=location, metavar="DATASET",
                   help="a build output (SPLIT/NNNNNN.tar + sizes.json): a folder or an fsspec URL")
    p.add_argument("--out", required=True, type=location,
                   help="new output folder or fsspec URL (rerun the same command to resume)")
    add_worker_options(p)
    add_renamed(p, {"--input": "the positional DATASET"})


def add_worker_options(p: argparse.ArgumentParser) -> None:
    """The options every stage on the shard-to-shard runner takes."""
    p.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else 1)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: CPUs / workers)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto uses the GPUs when Ray has any")
    p.add_argument("--ray-address", help="join a Ray cluster (default: start local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_options(args: argparse.Namespace, input_dir: UPath, out: UPath) -> RunOptions:
    return RunOptions(input=input_dir, out=out, workers=args.workers, threads=args.threads,
                      device=args.device,
                      ray_address=args.ray_address, progress=not args.no_progress)


def report(name: str, summary: RunSummary) -> None:
    counts = ", ".join(f"{count} {status}" for status, count in summary.statuses.items())
    print(f"{name}: {summary.samples} sample(s) ({counts}) in {summary.shards} shard(s), "
          f"{summary.resumed} already done, {summary.seconds:.1f}s; manifest {summary.manifest}")
