"""`audiodata filter`: a new dataset of the samples that pass every given test, in order, audio bytes
verbatim; `filter_manifest.parquet` has one row per input sample: `kept` or the first test it failed.

Tests, cheapest first: the licence (`license`: its class or id is not among --license-class or
--license-id, classified by audio_dataset/licenses.py from the sample's `license`), the dedup result (`duplicate`, `eval_overlap`), duration (`too_short`,
`too_long`), CLAP audio-text similarity from `audiodata embed` (`low_similarity`, or `no_embedding`
for a sample embed could not score) as a threshold or the top fraction per source, the captions'
language (`language`), loudness (`too_quiet`, `too_loud`, `loudness_unmeasurable` under 0.4 s).

Language: py3langid (langid.py's model, shipped in the package) on the sample's captions joined;
a text under MIN_LANGUAGE_WORDS words is too short to judge and passes. Loudness: integrated
loudness of ITU-R BS.1770-4 (pyloudnorm), in LUFS.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
from upath import UPath

from audio_dataset.audio import decode
from audio_dataset.curate.common import OK, audio_bytes, captions, read_columns, sample_meta
from audio_dataset.curate.dedup import DEDUP_STAGE, DUPLICATE, EVAL_OVERLAP, Drop, drop_detail, drop_of, \
    dropped_samples
from audio_dataset.curate.embed import EMBED_STAGE, embedding_model
from audio_dataset.licenses import sample_licence
from audio_dataset.shards import Sample, file_sha256
from audio_dataset.source import ItemError, UserError
from audio_dataset.stage_runner import DROP, KEPT, RunOptions, RunSummary, ShardJob, Stage, check_run, run_stage

FILTER_STAGE = "filter"
MIN_LANGUAGE_WORDS = 3
TOO_SHORT, TOO_LONG, LOW_SIMILARITY, NO_EMBEDDING = "too_short", "too_long", "low_similarity", "no_embedding"
LANGUAGE, TOO_QUIET, TOO_LOUD, UNMEASURABLE = "language", "too_quiet", "too_loud", "loudness_unmeasurable"
LICENSE = "license"

FILTER_SCHEMA = pa.schema([
    ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("source", pa.string()),
    ("status", pa.string()), ("duration", pa.float64()), ("similarity", pa.float64()),
    ("language", pa.string()), ("loudness", pa.float64()), ("matched_key", pa.string()),
    ("license_id", pa.string()), ("license_class", pa.string()),
])


@dataclass(frozen=True)
class FilterOptions:
    min_similarity: float | None = None
    top_fraction: float | None = None  # per source, by similarity
    min_seconds: float | None = None
    max_seconds: float | None = None
    min_lufs: float | None = None
    max_lufs: float | None = None
    languages: tuple[str, ...] = ()
    dedup: bool = False
    # A sample passes when its licence class is one of these or its id one of those (licenses.py).
    license_classes: tuple[str, ...] = ()
    license_ids: tuple[str, ...] = ()

    def check(self) -> None:
        if not any(v is not None for v in (self.min_similarity, self.top_fraction, self.min_seconds, self.max_seconds,
                                           self.min_lufs, self.max_lufs)) and not self.languages and not self.dedup \
                and not self.license_classes and not self.license_ids:
            raise UserError("no test given (see audiodata filter --help)")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise UserError("--top-fraction must be in (0, 1]")
        if None not in (self.min_seconds, self.max_seconds) and self.min_seconds > self.max_seconds:
            raise UserError("--min-seconds is above --max-seconds")
        if None not in (self.min_lufs, self.max_lufs) and self.min_lufs > self.max_lufs:
            raise UserError("--min-lufs is above --max-lufs")

    @property
    def needs_similarity(self) -> bool:
        return self.min_similarity is not None or self.top_fraction is not None


def detect_language(texts: list[str]) -> str | None:
    """ISO 639-1 code of the captions' language, or None for text too short to judge."""
    import py3langid

    text = " ".join(texts)
    if len(text.split()) < MIN_LANGUAGE_WORDS:
        return None
    return py3langid.classify(text)[0]


def integrated_loudness(data: bytes) -> float | None:
    """BS.1770-4 integrated loudness in LUFS (-inf for digital silence), None under one 0.4 s block."""
    import pyloudnorm

    decoded = decode(data)
    if decoded.duration < 0.4:
        return None
    return float(pyloudnorm.Meter(decoded.sample_rate).integrated_loudness(decoded.samples.T.astype(np.float64)))


def source_thresholds(embed_dir: UPath, options: FilterOptions) -> dict[str, float]:
    """Per source, the similarity a sample needs: --min-similarity, raised to the score of the last
    sample inside --top-fraction of that source (ties at that score pass too)."""
    scores: dict[str, list[float]] = {}
    for path in sorted(embed_dir.glob("*.rows.parquet")):
        rows = read_columns(path, ["source", "similarity", "status"])
        for source, score, status in zip(*(rows.column(n).to_pylist() for n in ("source", "similarity", "status"))):
            if status == OK:
                scores.setdefault(source or "", []).append(score)
    floor = options.min_similarity if options.min_similarity is not None else -math.inf
    thresholds = {}
    for source, values in scores.items():
        values.sort(reverse=True)
        top = values[math.ceil(options.top_fraction * len(values)) - 1] if options.top_fraction else -math.inf
        thresholds[source] = max(floor, top)
    return thresholds


class FilterProcessor:
    def __init__(self, options: FilterOptions, embed_dir: UPath | None, thresholds: dict[str, float],
                 drops: dict[str, Drop], device: str) -> None:
        del device
        self.options, self.embed_dir, self.thresholds, self.drops = options, embed_dir, thresholds, drops

    def _similarities(self, job: ShardJob) -> dict[str, float | None]:
        if self.embed_dir is None:
            return {}
        part = self.embed_dir / job.split / f"{PurePosixPath(job.name).stem}.parquet"
        if not part.exists():
            raise UserError(f"{part}: missing; rerun `audiodata embed` on this dataset")
        rows = read_columns(part, ["key", "similarity", "status"])
        return {key: (score if status == OK else None) for key, score, status in
                zip(*(rows.column(n).to_pylist() for n in ("key", "similarity", "status")))}

    def judge(self, job: ShardJob, sample: Sample, similarity: float | None, seen: set[str]) -> dict[str, Any]:
        o = self.options
        meta = sample_meta(sample)
        key, source = sample["__key__"], meta.get("source")
        row = {"split": job.split, "shard": job.name, "key": key, "source": source, "status": KEPT,
               "duration": meta.get("duration"), "similarity": similarity, "language": None, "loudness": None,
               "matched_key": None, "license_id": None, "license_class": None}
        duration = row["duration"] if isinstance(row["duration"], (int, float)) else 0.0
        checks = [
            (lambda: self._license_reason(row, meta)),
            (lambda: self._dedup_reason(row, job, seen)),
            (lambda: TOO_SHORT if o.min_seconds is not None and duration < o.min_seconds else None),
            (lambda: TOO_LONG if o.max_seconds is not None and duration > o.max_seconds else None),
            (lambda: self._similarity_reason(similarity, source)),
            (lambda: self._language_reason(row, meta)),
            (lambda: self._loudness_reason(row, sample)),
        ]
        row["status"] = next((reason for check in checks if (reason := check())), KEPT)
        return row

    def _license_reason(self, row: dict[str, Any], meta: dict[str, Any]) -> str | None:
        o = self.options
        row["license_id"], row["license_class"] = sample_licence(meta)
        if not o.license_classes and not o.license_ids:
            return None
        allowed = row["license_class"] in o.license_classes or row["license_id"] in o.license_ids
        return None if allowed else LICENSE

    def _dedup_reason(self, row: dict[str, Any], job: ShardJob, seen: set[str]) -> str | None:
        if not self.options.dedup:
            return None
        drop = drop_of(self.drops, job, row["key"], seen)
        if drop is None:
            return None
        row["matched_key"] = drop[2]
        return drop[0]

    def _similarity_reason(self, similarity: float | None, source: str | None) -> str | None:
        if not self.options.needs_similarity:
            return None
        if similarity is None:
            return NO_EMBEDDING
        return LOW_SIMILARITY if similarity < self.thresholds.get(source or "", math.inf) else None

    def _language_reason(self, row: dict[str, Any], meta: dict[str, Any]) -> str | None:
        if not self.options.languages:
            return None
        row["language"] = detect_language(captions(meta))
        return LANGUAGE if row["language"] is not None and row["language"] not in self.options.languages else None

    def _loudness_reason(self, row: dict[str, Any], sample: Sample) -> str | None:
        o = self.options
        if o.min_lufs is None and o.max_lufs is None:
            return None
        try:
            loudness = integrated_loudness(audio_bytes(sample) or b"")
        except ItemError:
            return UNMEASURABLE
        if loudness is None:
            return UNMEASURABLE
        row["loudness"] = loudness if math.isfinite(loudness) else None
        if o.min_lufs is not None and loudness < o.min_lufs:
            return TOO_QUIET
        return TOO_LOUD if o.max_lufs is not None and loudness > o.max_lufs else None

    def process(self, job: ShardJob, samples: list[Sample]) -> tuple[list[Sample], list[dict[str, Any]]]:
        similarities, seen = self._similarities(job), set()
        rows = [self.judge(job, sample, similarities.get(sample["__key__"]), seen) for sample in samples]
        return [sample for sample, row in zip(samples, rows) if row["status"] == KEPT], rows


def _make_filter(options: FilterOptions, embed_dir: UPath | None, thresholds: dict[str, float],
                 drops: dict[str, Drop], device: str) -> FilterProcessor:
    return FilterProcessor(options, embed_dir, thresholds, drops, device)


def filter_detail(row: dict[str, Any]) -> str | None:
    """A dropped sample's row as the output manifest's `error_detail`: what was measured."""
    if row["status"] in (DUPLICATE, EVAL_OVERLAP):
        return drop_detail(row)
    if row["status"] == LICENSE:
        return f"licence {row.get('license_id') or 'unmapped'} ({row.get('license_class')})"
    measured = {TOO_SHORT: ("duration", "{:.2f} s"), TOO_LONG: ("duration", "{:.2f} s"),
                LOW_SIMILARITY: ("similarity", "{:.3f}"), LANGUAGE: ("language", "{}"),
                TOO_QUIET: ("loudness", "{:.1f} LUFS"), TOO_LOUD: ("loudness", "{:.1f} LUFS")}.get(row["status"])
    if measured is None or row.get(measured[0]) is None:
        return None
    return f"{measured[0]} {measured[1].format(row[measured[0]])}"


def dedup_drops(dataset: UPath) -> tuple[dict[str, Drop], str]:
    """SPLIT/SHARD/KEY -> why, for the samples `audiodata dedup` did not keep; and the clusters
    table's digest (part of the filter's settings)."""
    path = dataset / DEDUP_STAGE / "clusters.parquet"
    if not path.exists():
        raise UserError(f"--dedup: {path} not found (run `audiodata dedup {dataset}` first)")
    rows = read_columns(path, ["split", "shard", "key", "kind", "keep", "cluster", "matched_key"]).to_pylist()
    return dropped_samples(rows), file_sha256(path)


def run_filter(dataset: UPath, options: FilterOptions, run: RunOptions, embed_dir: UPath | None = None) -> RunSummary:
    options.check()
    check_run(run)
    settings: dict[str, Any] = {"tests": asdict(options)}
    thresholds: dict[str, float] = {}
    if options.needs_similarity:
        embed_dir = embed_dir or dataset / EMBED_STAGE
        settings["model"] = embedding_model(embed_dir)["digest"]
        thresholds = source_thresholds(embed_dir, options)
        settings["thresholds"] = thresholds
    else:
        embed_dir = None
    drops: dict[str, Drop] = {}
    if options.dedup:
        drops, settings["clusters"] = dedup_drops(dataset)
    stage = Stage(FILTER_STAGE, settings, functools.partial(_make_filter, options, embed_dir, thresholds, drops),
                  FILTER_SCHEMA, mode=DROP, detail=filter_detail)
    return run_stage(stage, run)


__all__ = ["FilterOptions", "detect_language", "integrated_loudness", "run_filter", "source_thresholds"]
