"""`audiodata embed`, `dedup`, `filter` and `search`, registered on the main parser by `add_cli`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from upath import UPath

from audio_dataset.curate.index import INDEX_KINDS  # faiss itself loads only when an index is built
from audio_dataset.stage_cli import add_worker_options, report, run_options
from audio_dataset.source import UserError
from audio_dataset.storage import location
from clap_model.params import add_max_checkpoint_bytes


def add_text_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-model", default=None,
                        help="text encoder hub id or folder, for a checkpoint whose config names one that no "
                             "preset names (a checkpoint's own is not followed)")


def _require_dataset(out: UPath) -> None:
    if not out.is_dir():
        raise UserError(f"{out}: no such folder (a build output)")


def _require_file(flag: str, path: Path | None) -> None:
    """A missing file named on the command line, said before torch, faiss or Ray load (seconds)."""
    if path is not None and not path.exists():
        raise UserError(f"{flag} {path}: not found")


def run_embed_command(args: argparse.Namespace) -> int:
    _require_dataset(args.dataset)
    _require_file("--checkpoint", args.checkpoint)
    from audio_dataset.curate.embed import EmbedOptions, default_out, run_embed

    options = EmbedOptions(checkpoint=args.checkpoint, preset=args.model, batch_size=args.batch_size,
                           index=args.index, windows=args.windows, max_checkpoint_bytes=args.max_checkpoint_bytes,
                           text_model=args.text_model, precision=args.precision)
    report("embed", run_embed(options, run_options(args, args.dataset, args.out or default_out(args.dataset))))
    return 0


def run_search_command(args: argparse.Namespace) -> int:
    _require_dataset(args.dataset)
    if (args.query is None) == (args.audio is None):
        raise UserError("give a text query or --audio FILE (one of them)")
    _require_file("--audio", args.audio)
    _require_file("--checkpoint", args.checkpoint)
    from audio_dataset.curate.embed import default_out
    from audio_dataset.curate.search import Searcher, SearchOptions, hits_json

    searcher = Searcher(args.dataset, args.embeddings or default_out(args.dataset),
                        SearchOptions(k=args.k, splits=tuple(args.split), checkpoint=args.checkpoint,
                                      max_checkpoint_bytes=args.max_checkpoint_bytes,
                                      text_model=args.text_model))
    hits = searcher.text(args.query) if args.query is not None else searcher.audio(args.audio)
    if args.json:
        print(json.dumps(hits_json(hits), indent=2, ensure_ascii=False))
        return 0
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>3}  {hit.score:.4f}  {hit.key}  {hit.caption!r}  {hit.shard}:{hit.member}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="CLAP audio and text embeddings of every sample, and a faiss index")
    p.add_argument("dataset", type=location, help="a build output (folder or fsspec URL)")
    p.add_argument("--checkpoint", required=True, type=Path, help="a CLAP checkpoint (clap-train's, or a release)")
    p.add_argument("--model", help="preset of a checkpoint without a config (a LAION-CLAP release)")
    add_text_model(p)
    add_max_checkpoint_bytes(p)
    p.add_argument("--out", type=location, help="where the embeddings go (default DATASET/embed)")
    p.add_argument("--batch-size", type=int, default=32, help="clips or captions per forward pass")
    p.add_argument("--index", choices=INDEX_KINDS, default="auto",
                   help="faiss index per split: exact (flat, 2 kB a 512-d vector), inverted lists (ivf, same "
                        "size, faster on millions), inverted lists of product-quantised codes (ivfpq, 72 B a "
                        "vector: 10M in 0.7 GB), a graph (hnsw, ~2.3 kB), auto (flat below 100k vectors, ivf "
                        "below 1M, ivfpq above) or none")
    p.add_argument("--windows", choices=("first", "all"), default="first",
                   help="a clip longer than the model's window: embed its first window (as evaluation does), "
                        "or all windows covering it and keep their mean (curation: a 30 s clip judged whole)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast (default on GPUs; on a CPU with AVX512-BF16 or AMX, faster than fp32) or "
                        "fp32 (default on CPUs); bf16 moves an embedding by a cosine of ~1e-3")
    add_worker_options(p)
    p.set_defaults(func=run_embed_command)

    p = subparsers.add_parser("search", help="top-k samples for a text or an audio file (after `embed`)")
    p.add_argument("dataset", type=location, help="a build output that `audiodata embed` has embedded")
    p.add_argument("query", nargs="?", help="text to search for")
    p.add_argument("--audio", type=Path, help="search by an audio file instead")
    p.add_argument("-k", type=int, default=10, help="hits to show")
    p.add_argument("--split", action="append", default=[], help="search this split only (repeatable)")
    p.add_argument("--embeddings", type=location, help="embed's output (default DATASET/embed)")
    p.add_argument("--checkpoint", type=Path, help="the model embed used (required: a dataset's recorded "
                   "checkpoint is never loaded on its own; its sha256 must match the recorded one)")
    add_text_model(p)
    add_max_checkpoint_bytes(p)
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=run_search_command)
    add_dedup_cli(subparsers)
    add_filter_cli(subparsers)


def run_dedup_command(args: argparse.Namespace) -> int:
    from audio_dataset.curate.dedup import DedupOptions, run_dedup

    _require_dataset(args.dataset)
    if args.apply != (args.out is not None):
        raise UserError("--apply needs --out NEW (and --out is only for --apply)")
    options = DedupOptions(against=tuple(args.against), keep=args.keep, embedding_threshold=args.embedding_threshold,
                           use_embeddings=not args.no_embeddings, apply_to=args.out)
    result = run_dedup(args.dataset, options, run_options(args, args.dataset, args.out or args.dataset))
    counts = dict(result.counts)
    samples, clustered = counts.pop("samples"), counts.pop("clustered")
    print(f"dedup: {samples} sample(s) ({', '.join(f'{n} {name}' for name, n in counts.items())}); "
          f"{clustered} in duplicate clusters; clusters {result.clusters}")
    if result.without_embeddings:
        print(f"dedup: no embeddings for {', '.join(result.without_embeddings)} (run `audiodata embed` for "
              "embedding matches)")
    if result.applied is not None:
        report("dedup --apply", result.applied)
    return 0


def add_dedup_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dedup", help="exact, fingerprint and embedding duplicates, and eval-set leaks")
    p.add_argument("dataset", type=location, help="a build output")
    p.add_argument("--against", type=location, action="append", default=[],
                   help="an evaluation set built with audiodata (repeatable): its matches are eval_overlap")
    p.add_argument("--keep", choices=("longest", "license", "first"), default="longest",
                   help="which sample of a cluster stays: the longest, the best licence, the first in order")
    p.add_argument("--embedding-threshold", type=float, default=0.98,
                   help="cosine of CLAP audio embeddings that counts as a duplicate (after `audiodata embed`)")
    p.add_argument("--no-embeddings", action="store_true", help="exact and fingerprint matches only")
    p.add_argument("--apply", action="store_true", help="write new shards without the samples not kept")
    p.add_argument("--out", type=location, help="with --apply: the new dataset's folder")
    add_worker_options(p)
    p.set_defaults(func=run_dedup_command)


def run_filter_command(args: argparse.Namespace) -> int:
    from audio_dataset.curate.filter import FilterOptions, run_filter

    _require_dataset(args.dataset)
    options = FilterOptions(min_similarity=args.min_similarity, top_fraction=args.top_fraction,
                            min_seconds=args.min_seconds, max_seconds=args.max_seconds, min_lufs=args.min_lufs,
                            max_lufs=args.max_lufs, languages=tuple(args.language), dedup=args.dedup,
                            license_classes=args.license_class or (), license_ids=args.license_id or ())
    report("filter", run_filter(args.dataset, options, run_options(args, args.dataset, args.out), args.embeddings))
    return 0


def _licence_classes(text: str) -> tuple[str, ...]:
    from audio_dataset.licenses import parse_classes

    try:
        return parse_classes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _licence_ids(text: str) -> tuple[str, ...]:
    from audio_dataset.licenses import parse_ids

    try:
        return parse_ids(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_filter_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("filter", help="a new dataset of the samples that pass licence, similarity, duration, "
                                             "loudness, language and dedup tests")
    p.add_argument("dataset", type=location, help="a build output")
    p.add_argument("--out", required=True, type=location, help="the new dataset's folder (rerun to resume)")
    p.add_argument("--min-similarity", type=float, help="CLAP audio-text cosine a sample needs (after `embed`)")
    p.add_argument("--top-fraction", type=float, help="keep this fraction of each source, most similar first")
    p.add_argument("--min-seconds", type=float, help="keep samples at least this long (seconds)")
    p.add_argument("--max-seconds", type=float, help="keep samples at most this long (seconds)")
    p.add_argument("--min-lufs", type=float, help="integrated loudness (ITU-R BS.1770-4) at least this")
    p.add_argument("--max-lufs", type=float, help="integrated loudness (ITU-R BS.1770-4) at most this")
    p.add_argument("--language", action="append", default=[],
                   help="caption language to keep, ISO 639-1 (repeatable); texts under 3 words pass")
    p.add_argument("--dedup", action="store_true", help="drop what `audiodata dedup` did not keep")
    p.add_argument("--license-class", type=_licence_classes, metavar="CLASS[,CLASS]",
                   help="keep samples whose licence class is one of these (open, sharealike, noncommercial, "
                        "restricted, unknown): `open,sharealike` is the publishable subset")
    p.add_argument("--license-id", type=_licence_ids, metavar="ID[,ID]",
                   help="keep samples with one of these licence ids too (CC-BY-4.0, CC0-1.0, ...)")
    p.add_argument("--embeddings", type=location, help="embed's output (default DATASET/embed)")
    add_worker_options(p)
    p.set_defaults(func=run_filter_command)
