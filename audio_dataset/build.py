"""`audiodata build`: list a source, then download, transcode and shard it on Ray (local or a cluster).

The shard is the unit of work. Items are listed once (streamed to `_work/index.parquet`), assigned a
split by a stable hash and cut into shards in listing order, so every run plans the same shards
(each split's items in `_work/plan/<split>.parquet`; a shard task carries its row range there).
A finished shard leaves its tar and its manifest part; a rerun skips those, so resuming after a
crash or `kill -9` gives the same samples as a clean run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from audio_dataset import manifest
from audio_dataset.audio import AudioConfig, Media, encode, scan
from audio_dataset.licenses import classify
from audio_dataset.listing import INDEX_SCHEMA, IndexWriter
from audio_dataset.lock import hold_output, refuse_foreign
from audio_dataset.manifest import ManifestRow
from audio_dataset.provenance import RunRecord, definition_checksums, record_run, redact_mapping
from audio_dataset.redaction import redact
from audio_dataset.raystart import start_ray
from audio_dataset.schema import REQUIRED_FIELDS, SampleMeta, clean_captions, safe_key, shard_name, split_order
from audio_dataset.shards import Sample, ShardWriter, write_sizes
from audio_dataset.storage import Location, atomic_write_json, is_local, location, make_dirs, publish, read_json, \
    remove_stale_temps, trust_output
from audio_dataset.source import (
    Item, ItemError, Source, SourceConfig, SourceError, UserError, first_line, is_open_web, load_source,
    read_definition,
)

WORK_DIR = "_work"
INDEX_FILE = "index.parquet"
PLAN_DIR = "plan"  # <split>.parquet: that split's items in shard order
PLAN_GROUP_ROWS = 2048
CONFIG_FILE = "config.json"
DEFAULT_SPLIT_RATIOS = {"train": 0.9, "valid": 0.05, "test": 0.05}
log = logging.getLogger("audiodata.build")
# The reason recorded when transcoding an item raised something no check names (a decoder's own
# exception, a bug): the item fails with the exception in error_detail and the build goes on.
UNEXPECTED_ERROR = "unexpected_error"
# The reason for an item whose worker process died under it (out of memory, a crash in native code).
WORKER_DIED = "worker_died"
SHARD_RETRIES = 1
# A split is a folder under --out: a plain name, never a path ("../x") or a hidden/`_work`-like one.
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class BuildOptions:
    source: str
    out: Location  # a folder or an fsspec URL (s3://bucket/prefix)
    source_config: SourceConfig = field(default_factory=SourceConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    samples_per_shard: int = 256
    limit: int | None = None
    workers: int | None = None
    ray_address: str | None = None
    split_ratios: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT_RATIOS))
    exclude_files: list[Location] = field(default_factory=list)
    progress: bool = True
    # The output the end-of-run hint names: a recipe's OUT, where its sources' shards end up.
    summary_out: Location | None = None
    # --ignore-opt-out: an open-web source fetches what robots.txt, X-Robots-Tag or TDM-Rep refuse.
    ignore_opt_out: bool = False


@dataclass(frozen=True)
class RowRange:
    """Where a shard's items are: rows [start, stop) of a plan file (local or on object storage)."""

    path: str
    start: int
    stop: int


@dataclass
class ShardTask:
    """One shard: its items given directly, or (as a build plans them) the rows that hold them."""

    split: str
    index: int
    items: list[Item] | None = None
    rows: RowRange | None = None

    @property
    def name(self) -> str:
        return f"{self.split}/{shard_name(self.index)}"

    @property
    def size(self) -> int:
        """How many items the shard holds (without reading them)."""
        if self.items is not None:
            return len(self.items)
        assert self.rows is not None, "a shard task has items or rows"
        return self.rows.stop - self.rows.start

    @property
    def part_name(self) -> str:
        return f"{self.split}-{self.index:06d}.parquet"

    def load_items(self) -> list[Item]:
        if self.items is not None:
            return self.items
        assert self.rows is not None, "a shard task has items or rows"
        where = self.rows
        return [Item.from_json(raw) for raw in manifest.read_rows(where.path, where.start, where.stop, "item")]

    def to_json(self) -> str:
        data: dict[str, Any] = {"split": self.split, "index": self.index}
        if self.rows is not None:  # a task carries where its items are, not the items
            data["rows"] = asdict(self.rows)
        else:
            data["items"] = [i.to_json() for i in self.load_items()]
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: str) -> "ShardTask":
        data = json.loads(raw)
        if "rows" in data:
            return cls(data["split"], data["index"], rows=RowRange(**data["rows"]))
        return cls(data["split"], data["index"], [Item.from_json(i) for i in data["items"]])


@dataclass
class BuildSummary:
    out: UPath
    shards_total: int
    shards_skipped: int
    stats: dict[str, Any]
    # Ray node id -> shards it wrote in this run (a cluster run spreads over its nodes).
    shards_per_node: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- planning


def check_split_name(name: str, what: str) -> str:
    if not SPLIT_NAME.fullmatch(name):
        raise UserError(f"{what}: split {name!r} is not a plain name (letters, digits, _ and -)")
    return name


def split_points(source: str, ids: Iterable[str]) -> np.ndarray:
    """Each id's stable point in [0, 1): the first 8 bytes of sha1("source:id"), as a fraction."""
    digests = b"".join(hashlib.sha1(f"{source}:{i}".encode()).digest()[:8] for i in ids)
    return np.frombuffer(digests, dtype=">u8").astype(np.float64) / 2**64


def hashed_splits(source: str, ids: Iterable[str], ratios: dict[str, float]) -> np.ndarray:
    """Per id, the position in `ratios` of its split: hash ranges in the order the ratios are given."""
    total = sum(ratios.values())
    edges, edge = [], 0.0
    for ratio in ratios.values():  # summed as before, so every edge is the same float as before
        edge += ratio / total
        edges.append(edge)
    codes = np.searchsorted(np.array(edges), split_points(source, ids), side="right")
    return np.minimum(codes, len(edges) - 1)


def assign_split(source: str, item: Item, ratios: dict[str, float]) -> str:
    """A stable split from the source id: the same item lands in the same split on every run."""
    if item.split is not None:
        return check_split_name(item.split, f"item {item.source_id!r}")
    return list(ratios)[int(hashed_splits(source, [item.source_id], ratios)[0])]


def _batch_splits(source: str, batch: pa.RecordBatch, ratios: dict[str, float]) -> list[str]:
    """The split of every row of an index batch: the source's own where it gives one, else hashed."""
    names = list(ratios)
    hashed = hashed_splits(source, batch.column("source_id").to_pylist(), ratios)
    imposed = batch.column("split").to_pylist()
    return [names[code] if given is None else given for given, code in zip(imposed, hashed.tolist())]


@dataclass
class Plan:
    tasks: list[ShardTask]
    excluded: list[ManifestRow]  # rows for the listed items an exclusion list names


def plan_shards(source: str, index: UPath, plan_dir: UPath, ratios: dict[str, float], per_shard: int,
                excluded: set[str], limit: int | None = None) -> Plan:
    """Cut the index into shards, streaming: each split's items go, in listing order, to
    `plan_dir/<split>.parquet`, and a shard is a row range of it. Same index, same plan."""
    writers: dict[str, manifest.StagedParquet] = {}
    excluded_rows: list[ManifestRow] = []
    checked: set[str] = set()
    ids_out = pa.array(sorted(excluded), pa.string())
    try:
        for batch in _index_batches(index, limit):
            splits = _batch_splits(source, batch, ratios)
            for name in set(splits) - checked:
                check_split_name(name, f"item {batch.column('source_id')[splits.index(name)].as_py()!r}")
                checked.add(name)
            out = pc.is_in(batch.column("source_id"), value_set=ids_out).to_numpy(zero_copy_only=False)
            for row in np.flatnonzero(out).tolist():
                excluded_rows.append(_excluded_row(source, batch.column("item")[row].as_py(), splits[row]))
            names = np.array(splits, dtype=object)
            for name in sorted(set(splits), key=split_order):
                keep = (names == name) & ~out
                if keep.any():
                    if name not in writers:  # small row groups: a task reads the one or two holding its rows
                        writers[name] = manifest.StagedParquet(plan_dir / f"{name}.parquet", INDEX_SCHEMA,
                                                               row_group_rows=max(per_shard, PLAN_GROUP_ROWS))
                    writers[name].write(batch.filter(pa.array(keep)))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    tasks = []
    for name in sorted(writers, key=split_order):
        path, rows = str(writers[name].dest), writers[name].commit()
        tasks.extend(ShardTask(name, start // per_shard, rows=RowRange(path, start, min(start + per_shard, rows)))
                     for start in range(0, rows, per_shard))
    return Plan(tasks, excluded_rows)


def read_exclusions(paths: Iterable[Location]) -> set[str]:
    ids: set[str] = set()
    for path in map(location, paths):
        if not path.is_file():
            raise UserError(f"exclusion list not found: {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                ids.add(line)
    return ids


def definition_exclusions(source: str) -> list[UPath]:
    from importlib import resources

    names = read_definition(source).get("exclusions", [])
    root = resources.files("manifests") / "exclusions"
    return [location(str(root / name)) for name in names]


# --------------------------------------------------------------------------- listing


def list_with_cache(source: Source, work: UPath, limit: int | None, show: bool = False,
                    fingerprint: dict[str, Any] | None = None) -> UPath:
    """The complete listing, scraped once into a parquet index (streamed there in chunks, so an
    interrupted listing resumes) and kept for reruns; returns the index. `fingerprint` names what
    is listed: the chunks of a listing of something else are not resumed."""
    from tqdm import tqdm

    index = work / INDEX_FILE
    if index.exists():
        return index
    writer = IndexWriter(index, fingerprint or {}, limit)
    # A web listing can take hours at a polite rate: count what it has found so far (shown after
    # a second, so a quick listing, or one that fails at once on a user mistake, prints nothing).
    with tqdm(unit="item", desc="list", total=limit, initial=writer.committed, disable=not show,
              file=sys.stderr, delay=1.0) as bar:
        batches = None if writer.full else source.list_batches()
        for batch in batches or ():
            bar.update(batch.num_rows)
            if not writer.add_batch(batch):
                break
        if not writer.full and batches is None:
            for item in source.list_items():  # sources may list an item twice (pages shifting)
                bar.update(1)
                if not writer.add(item):
                    break
    writer.finish()
    return index


def _index_batches(index: UPath, limit: int | None) -> Iterator[pa.RecordBatch]:
    """The index as batches of (source_id, split, item), at most `limit` rows (an older index,
    without the split column, gets it from the items)."""
    left = limit
    for batch in manifest.iter_batches(index):
        if left is not None:
            if left <= 0:
                return
            batch, left = batch.slice(0, left), left - min(left, batch.num_rows)
        if "split" not in batch.schema.names:
            splits = [json.loads(raw).get("split") for raw in batch.column("item").to_pylist()]
            batch = pa.RecordBatch.from_arrays([batch.column("source_id"), pa.array(splits, pa.string()),
                                                batch.column("item")], schema=INDEX_SCHEMA)
        yield batch.select(INDEX_SCHEMA.names)


# --------------------------------------------------------------------------- the shard worker


def ordered_prefetch(fn: Callable[[Item], Any], items: list[Item], workers: int) -> Iterator[tuple[Item, Future]]:
    """Run `fn` over items in a thread pool, a bounded window ahead, yielding in input order."""
    window = max(1, 2 * workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[Item, Future]] = []
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                yield pending.pop(0)
        yield from pending


def _fail_row(source: str, item: Item, split: str, shard: str | None, exc: ItemError, **extra: Any) -> ManifestRow:
    return ManifestRow(source=source, source_id=item.source_id, split=split, shard=shard,
                       status=manifest.status_for_reason(exc.reason), error=exc.reason,
                       error_detail=redact(exc.detail)[:500] or None, url=item.url, license=item.license, **extra)


def _media_checks(data: Media) -> dict[str, Any]:
    """Size and sha256 of the source bytes; a local file is hashed as it is read, never loaded whole."""
    if isinstance(data, Path):
        with open(data, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return dict(source_bytes=data.stat().st_size, sha256=digest)
    return dict(source_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


# An item's manifest row and its samples (a failure has none; an ok item's are encoded as read).
Outcome = tuple[ManifestRow, Iterable[Sample]]


def _sample_fields(item: Item) -> dict[str, Any]:
    """The source's extra sample fields, less any the schema names (they would replace its own)."""
    return {name: value for name, value in item.sample_fields.items() if name not in REQUIRED_FIELDS}


def process_item(source: str, item: Item, data: Media, split: str, shard: str,
                 config: AudioConfig) -> Outcome:
    """Transcode one fetched item into its row and samples (encoded as they are read), or a failure row."""
    checks = _media_checks(data)
    try:
        found = scan(data, config, item.clip)
    except ItemError as exc:
        return _fail_row(source, item, split, shard, exc, **checks), []
    # Kept on dropped rows too: "hours in" counts every clip that decoded, not only those kept.
    checks.update(source_duration=found.duration, source_sample_rate=found.sample_rate,
                  source_channels=found.channels, source_codec=found.codec, downmix=found.downmix,
                  downmix_db=found.downmix_db, downmix_cancels=found.downmix_cancels)
    text, truncated = clean_captions(item.text)
    try:
        if not text:
            raise ItemError("no_caption", "every caption is blank")
        result = encode(found, config)
    except ItemError as exc:
        return _fail_row(source, item, split, shard, exc, **checks), []
    level = dict(gain_db=result.gain_db, clipped_samples=result.clipped_samples)
    licence = dict(zip(("license_id", "license_class"), classify(item.license)))
    keys = [safe_key(source, item.source_id, None if result.whole else number) for number in range(len(result.spans))]

    def samples() -> Iterator[Sample]:  # encoded as the shard writer asks: one FLAC in hand at a time
        for key, segment in zip(keys, result.iter_segments()):
            meta = SampleMeta(
                text=text, tag=item.tag, original_data=item.original_data, source=source,
                source_id=item.source_id, license=item.license, author=item.author, url=item.url,
                duration=round(segment.duration, 6), sample_rate=config.sample_rate,
                channels=config.channels,
                segment=None if result.whole else [round(segment.start, 6), round(segment.end, 6)],
                extra=dict(_sample_fields(item), **level, **licence, downmix=found.downmix,
                           downmix_cancels=found.downmix_cancels, captions_truncated=truncated),
            )
            yield {"__key__": key, "flac": segment.file, "json": meta.to_json_bytes()}

    row = ManifestRow(
        source=source, source_id=item.source_id, split=split, shard=shard, status=manifest.STATUS_OK,
        sample_keys=keys, n_samples=len(keys), output_duration=result.output_duration,
        url=item.url, license=item.license, **licence, captions_truncated=truncated, **level, **checks,
    )
    return row, samples()


def _fetch(source: Source, item: Item) -> Media:
    if item.listing_error is not None:  # the source found the problem while listing (a broken link)
        raise ItemError(*item.listing_error)
    return source.fetch(item)


def _outcome(source: Source, item: Item, fetched: Callable[[], Media], split: str, shard: str,
             config: AudioConfig) -> Outcome:
    """One item's row and samples; whatever happens to it, exactly one row."""
    try:
        data = fetched()
    except ItemError as exc:
        return _fail_row(source.name, item, split, shard, exc), []
    try:
        return process_item(source.name, item, data, split, shard, config)
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a million-item build
        size = len(data) if isinstance(data, bytes) else None  # a local file may be what went wrong
        return _unexpected_row(source, item, split, shard, exc, source_bytes=size), []


def _unexpected_row(source: Source, item: Item, split: str, shard: str, exc: Exception,
                    **extra: Any) -> ManifestRow:
    """An exception no check names fails its item as `unexpected_error`, logged with its traceback."""
    # The traceback, as the message, goes through the one redaction: an exception may quote a token.
    trace = "".join(traceback.format_exception(exc))
    log.warning("unexpected error on %s %s\n%s", source.name, item.source_id, redact(trace))
    unexpected = ItemError(UNEXPECTED_ERROR, f"{type(exc).__name__}: {exc}")
    return _fail_row(source.name, item, split, shard, unexpected, **extra)


def _write_shard(task: ShardTask, out: UPath, outcomes: Iterable[Outcome]) -> dict[str, Any]:
    """Write the shard's samples as they come and then its manifest part; returns counts for progress."""
    rows: list[ManifestRow] = []
    writer = ShardWriter(out / task.name)
    try:
        for row, samples in outcomes:
            for sample in _encoded(row, samples):
                writer.write(sample)
                _release(sample)
            rows.append(row)
    except BaseException:
        writer.abort()
        raise
    if writer.count:
        writer.close()
    else:
        writer.abort()
    manifest.write_table(manifest.rows_to_table(rows), out / WORK_DIR / "parts" / task.part_name)
    ok = sum(r.status == manifest.STATUS_OK for r in rows)
    return {"shard": task.name, "items": len(rows), "ok": ok, "samples": writer.count}


class EncodeFailed(Exception):
    """An item failed while its samples were being written: the shard is redone one item per task."""


def _encoded(row: ManifestRow, samples: Iterable[Sample]) -> Iterator[Sample]:
    """The samples of one item; a failure while encoding them (after its first samples may be in
    the tar) is raised as EncodeFailed, which no item row can absorb in a shard being written."""
    iterator = iter(samples)
    while True:
        try:
            sample = next(iterator, None)
        except Exception as exc:  # noqa: BLE001 - named, and handled by redoing the shard item by item
            raise EncodeFailed(f"{row.source_id}: {type(exc).__name__}: {exc}") from exc
        if sample is None:
            return
        yield sample


def _release(sample: Sample) -> None:
    for value in sample.values():
        if hasattr(value, "close"):
            value.close()  # a spooled FLAC: its temp file goes now, not at garbage collection


def run_shard(task: ShardTask, source: Source, out: UPath, config: AudioConfig) -> dict[str, Any]:
    """Fetch, transcode and write one shard and its manifest part; returns counts for progress."""
    fetches = ordered_prefetch(lambda it: _fetch(source, it), task.load_items(), source.fetch_concurrency)
    return _write_shard(task, out, (_outcome(source, item, future.result, task.split, task.name, config)
                                    for item, future in fetches))


# --------------------------------------------------------------------------- driver


def _input_key(value: str | None) -> str | None:
    """`--input` as it names data: a local path made absolute, so `dir` and `/abs/dir` are one input."""
    if value is None or "://" in value or not os.path.exists(value):
        return value  # a URL, or a name the source resolves (AudioSet's `eval`)
    return os.path.abspath(value)


def _fingerprint(options: BuildOptions, excluded: set[str]) -> dict[str, Any]:
    """The options that decide the output; a resume with other values would mix two datasets."""
    fingerprint = {
        "source": options.source,
        "input": _input_key(options.source_config.input),
        "source_options": redact_mapping(options.source_config.options),
        "audio": asdict(options.audio),
        "samples_per_shard": options.samples_per_shard,
        "limit": options.limit,
        # Pairs, not a mapping: the order decides which hash range goes to which split.
        "split_ratios": [[name, ratio] for name, ratio in options.split_ratios.items()],
    }
    if _opt_outs(options) == "ignored":  # absent when honoured, as in outputs from before the option
        fingerprint["opt_outs"] = "ignored"
    if excluded:  # other exclusions re-plan every shard; absent when none (outputs from before it)
        ids = "\n".join(sorted(excluded)).encode()
        fingerprint["exclusions"] = f"{len(excluded)} ids, sha256 {hashlib.sha256(ids).hexdigest()[:16]}"
    return fingerprint


def _opt_outs(options: BuildOptions) -> str:
    """`honoured`, `ignored` (--ignore-opt-out) or `not checked` (not an open-web source)."""
    if not is_open_web(options.source):
        return "not checked"
    return "ignored" if options.ignore_opt_out else "honoured"


def _check_resumable(work: UPath, fingerprint: dict[str, Any]) -> None:
    path = work / CONFIG_FILE
    if not path.exists():
        return
    previous = read_json(path)
    if isinstance(previous.get("input"), str):  # older outputs kept --input as typed
        previous["input"] = _input_key(previous["input"])
    if isinstance(previous.get("split_ratios"), dict):  # older outputs kept a mapping: order unknown
        fingerprint = {**fingerprint, "split_ratios": dict(fingerprint["split_ratios"])}
    changed = _option_changes(previous, fingerprint)
    if changed:
        raise UserError(f"{work.parent} was built with other options ({'; '.join(changed)}); "
                        "use a new --out, or the same options to resume")


def _check_out_is_not_input(out: UPath, given: str | None) -> None:
    """Shards and sidecar-like JSON written into the folder being read would mix output and input."""
    if given is None or not is_local(out) or "://" in given or not os.path.exists(given):
        return
    if os.path.realpath(given) == os.path.realpath(out.path):
        raise UserError(f"--out {out} is the --input folder; write the output somewhere else")


def _option_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`audio.sample_rate was 48000, now 16000` for each option that differs (nested ones by name)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _option_changes(before, after, f"{prefix}{key}.")
        else:
            changes.append(f"{prefix}{key} was {_shown(before)}, now {_shown(after)}")
    return changes


def _shown(value: Any) -> str:
    if value is None:  # unset (`--limit` not given), or an option older outputs did not record
        return "none"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _prepare_out(out: UPath) -> None:
    """A local --out must be a folder we can write: say so in one line rather than fail mid-run."""
    if not is_local(out):
        return
    folder = Path(out.path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        make_dirs(folder / WORK_DIR)
    except OSError as exc:
        raise UserError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    if not os.access(folder / WORK_DIR, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable")


def _shard_worker(task_json: str, source: Source, out: str, config: AudioConfig) -> dict[str, Any]:
    """One Ray task: a whole shard. A SourceError comes back as data so the driver can stop cleanly."""
    import ray

    try:
        result = run_shard(ShardTask.from_json(task_json), source, trust_output(out), config)
    except SourceError as exc:
        return {"source_error": str(exc)}
    except EncodeFailed as exc:
        return {"encode_failed": str(exc)}
    return {**result, "node": ray.get_runtime_context().get_node_id()}


def _item_worker(item_json: str, split: str, shard: str, source: Source, config: AudioConfig) -> dict[str, Any]:
    """One Ray task: one item of a shard whose worker died; its samples come back as bytes."""
    item = Item.from_json(item_json)
    try:
        row, samples = _outcome(source, item, lambda: _fetch(source, item), split, shard, config)
    except SourceError as exc:
        return {"source_error": str(exc)}
    returned = []
    try:
        for sample in samples:
            returned.append({k: v.read() if hasattr(v, "read") else v for k, v in sample.items()})
            _release(sample)
    except Exception as exc:  # noqa: BLE001 - alone in its task, the item's row can take the failure
        row, returned = _unexpected_row(source, item, split, shard, exc), []
    return {"row": asdict(row), "samples": returned}


def _worker_deaths() -> tuple[type[BaseException], ...]:
    """Ray's errors for a task whose process died under it (OOM-killed, a crash in native code)."""
    from ray import exceptions

    return (exceptions.WorkerCrashedError, exceptions.OutOfMemoryError, exceptions.NodeDiedError)


def _run_tasks(tasks: list[ShardTask], source: Source, out: UPath, options: BuildOptions,
               workers: int | None) -> Iterator[dict]:
    """Shards as Ray tasks, a bounded window in flight, results as they finish.

    Plain tasks rather than a Ray Data pipeline: measured side by side on this workload
    (bench/RESULTS.md), Ray Data's executor left cores idle between tasks for ~17% of the wall time.
    A shard whose worker dies twice does not stop the build: once the other shards are done, its
    items run one per task, so only an item that kills its worker fails (`worker_died`). So does a
    shard with an item that failed mid-write (EncodeFailed): alone, that item fails by itself.
    """
    import ray

    start_ray(options.ray_address, workers or os.cpu_count() or 1)
    slots = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Retries are ours, not Ray's: a task with Ray retries also gets Ray's separate budget for
    # kills by its memory monitor (`task_oom_retries`, unlimited in some versions), so a clip that
    # always runs out of memory could hold the build for ever.
    remote = ray.remote(num_cpus=1, max_retries=0)(_shard_worker)
    source_ref = ray.put(source)
    # Largest shards first (stable): the short ones (each split's last) fill in at the end, rather
    # than a full shard running alone on one core while the others idle.
    queue = iter(sorted(tasks, key=lambda task: -task.size))
    running: dict[Any, tuple[ShardTask, int]] = {}  # ref -> (shard, attempt)

    def submit(task: ShardTask, attempt: int = 0) -> Any:
        ref = remote.remote(task.to_json(), source_ref, str(out), options.audio)
        running[ref] = (task, attempt)
        return ref

    crashed: list[ShardTask] = []
    # One shard in flight per slot: `--workers` caps the concurrency even on a larger Ray instance.
    pending = [submit(task) for task in itertools.islice(queue, slots)]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        task, attempt = running.pop(done[0])
        result, why, passing = _shard_result(done[0])
        if why is not None:
            # A retry redoes a shard whose worker died of something passing (shards are written
            # atomically, so a redo is harmless); another death is the shard's own doing.
            retry = passing and attempt < SHARD_RETRIES
            log.warning("shard %s: %s; %s", task.name, why,
                        "retrying it" if retry else "its items run one by one at the end")
            if retry:
                pending.append(submit(task, attempt + 1))
                continue
            crashed.append(task)
        following = next(queue, None)
        if following is not None:
            pending.append(submit(following))
        if result is not None:
            yield result
    for task in crashed:
        yield _run_items_apart(task, source, source_ref, out, options.audio, slots)


def _shard_result(ref: Any) -> tuple[dict | None, str | None, bool]:
    """A finished shard task: (its result, why it must be redone instead, whether that may pass)."""
    import ray

    try:
        result = ray.get(ref)
    except _worker_deaths() as exc:
        return None, f"its worker died ({first_line(exc, 300)})", True
    if "encode_failed" in result:
        return None, result["encode_failed"], False
    return result, None, False


def _run_items_apart(task: ShardTask, source: Source, source_ref: Any, out: UPath, config: AudioConfig,
                     slots: int) -> dict[str, Any]:
    """Redo a shard one item per Ray task (a bounded window, in order) and write it from the driver."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=0)(_item_worker)

    def outcomes() -> Iterator[Outcome]:
        queue = iter(task.load_items())
        pending = [(item, remote.remote(item.to_json(), task.split, task.name, source_ref, config))
                   for item in itertools.islice(queue, slots)]
        while pending:
            item, ref = pending.pop(0)
            following = next(queue, None)
            if following is not None:
                pending.append((following, remote.remote(following.to_json(), task.split, task.name,
                                                         source_ref, config)))
            try:
                result = ray.get(ref)
            except _worker_deaths() as exc:
                died = ItemError(WORKER_DIED, f"the worker processing it died: {first_line(exc, 300)}")
                yield _fail_row(source.name, item, task.split, task.name, died), []
                continue
            if "source_error" in result:
                raise SourceError(result["source_error"])
            yield ManifestRow(**result["row"]), result["samples"]

    return {**_write_shard(task, out, outcomes()), "node": ray.get_runtime_context().get_node_id()}


def _excluded_row(source: str, item_json: str, split: str) -> ManifestRow:
    error = ItemError(manifest.STATUS_EXCLUDED, "listed in an evaluation-overlap exclusion list")
    return _fail_row(source, Item.from_json(item_json), split, None, error)


# What runs while the output is held: the build proper, or a retry of its failed items (audio_dataset.retry).
HeldRun = Callable[[BuildOptions, Source, UPath, set[str], dict[str, Any]], BuildSummary]


def build(options: BuildOptions, held: HeldRun | None = None) -> BuildSummary:
    """Run (or resume) a build into `options.out`; raises UserError/SourceError on fatal problems.
    `held` replaces the build proper (a retry of a finished build's failed items)."""
    if options.samples_per_shard < 1:
        raise UserError("--samples-per-shard must be at least 1")
    for split in options.split_ratios:
        check_split_name(split, "--splits")
    out = trust_output(options.out)
    created = is_local(out) and not Path(out.path).exists()
    _check_out_is_not_input(out, options.source_config.input)
    if is_local(out):
        refuse_foreign(out)  # before the listing state below is written into it
    # Listing state is scratch space the source reads and writes often: keep it on local disk.
    options.source_config.state_dir = options.source_config.state_dir or _local_state_dir(out)
    options.source_config.honour_opt_outs = _opt_outs(options) == "honoured"
    source = load_source(options.source, options.source_config)
    source.check()
    excluded = read_exclusions([*definition_exclusions(options.source), *options.exclude_files])
    fingerprint = _fingerprint(options, excluded)
    _prepare_out(out)
    ray_was_up = _ray_is_up()
    try:
        with hold_output(out, "build"):
            try:
                return (held or _build_held)(options, source, out, excluded, fingerprint)
            except BaseException:  # a full disk, Ctrl-C, a failed source: stop writing, leave no temp files
                if not ray_was_up and _ray_is_up():
                    import ray

                    ray.shutdown()  # this build's own Ray: its workers stop before their temps are swept
                    remove_stale_temps(out)
                raise
    except UserError:
        if created and not (out / WORK_DIR / CONFIG_FILE).exists():
            shutil.rmtree(out.path, ignore_errors=True)  # a mistake in the command leaves no --out behind
        raise


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _build_held(options: BuildOptions, source: Source, out: UPath, excluded: set[str],
                fingerprint: dict[str, Any]) -> BuildSummary:
    """The build proper, while this command alone holds `out`."""
    from audio_dataset.stats import print_summary

    work = out / WORK_DIR
    _check_resumable(work, fingerprint)
    run = run_record(options, fingerprint)

    pinned = (work / CONFIG_FILE).exists()
    if not pinned and (work / INDEX_FILE).exists():
        (work / INDEX_FILE).unlink()  # left by a run that never got going, maybe of another --input
    index = list_with_cache(source, work, options.limit, options.progress, fingerprint)
    plan = plan_shards(options.source, index, work / PLAN_DIR, options.split_ratios,
                       options.samples_per_shard, excluded, options.limit)
    tasks = plan.tasks
    for folder in published_retries(work):  # a retry killed while it moved its shards in
        publish_staged(folder, out)
    # Only a run whose listing and plan succeeded records its options: a typo (a missing column,
    # a bad split name) must not pin the output folder to the mistaken command.
    if not pinned:
        atomic_write_json(work / CONFIG_FILE, fingerprint)
    manifest.write_table(manifest.rows_to_table(plan.excluded), work / "parts" / "excluded.parquet")
    todo = [t for t in tasks if not (work / "parts" / t.part_name).exists()]
    per_node = _report_progress(_run_tasks(todo, source, out, options, options.workers) if todo else iter(()),
                                len(tasks), len(tasks) - len(todo), options.progress)

    stats = finalize(out, tasks)
    record_run(out, run)
    print_summary(stats, file=sys.stdout, out=options.summary_out or out)
    if len(per_node) > 1:
        print("shards per node: " + ", ".join(f"{n[:8]}={c}" for n, c in sorted(per_node.items())))
    return BuildSummary(out, len(tasks), len(tasks) - len(todo), stats, per_node)


def run_record(options: BuildOptions, fingerprint: dict[str, Any]) -> RunRecord:
    """The provenance record of a build run (or a retry of one) with these options."""
    return RunRecord("build", {**fingerprint, "workers": options.workers, "ray_address": options.ray_address,
                               "base_url": options.source_config.base_url,
                               "exclude_files": [str(p) for p in options.exclude_files],
                               "opt_outs": _opt_outs(options), "contact": options.source_config.contact},
                     definitions=definition_checksums([options.source]))


def _local_state_dir(out: UPath) -> Path:
    if is_local(out):
        return Path(out.path) / WORK_DIR / "source_state"
    digest = hashlib.sha1(str(out).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "audiodata-state" / digest


def _report_progress(results: Iterator[dict], total: int, done: int, show: bool) -> dict[str, int]:
    """Drive the shard results through a progress bar; returns shards per Ray node."""
    from collections import Counter

    from tqdm import tqdm

    per_node: Counter[str] = Counter()
    ok = items = 0
    # Closed on any exit, so a Ctrl-C or source failure message starts on a line of its own.
    with tqdm(total=total, initial=done, unit="shard", desc="build", disable=not show,
              dynamic_ncols=True, file=sys.stderr) as bar:
        for result in results:
            if "source_error" in result:
                raise SourceError(result["source_error"])
            ok += result["ok"]
            items += result["items"]
            per_node[result["node"]] += 1
            bar.update(1)
            bar.set_postfix(items=items, ok=ok)
    return dict(per_node)


def finalize(out: UPath, tasks: list[ShardTask]) -> dict[str, Any]:
    """Merge manifest parts, write sizes.json per split, manifest.parquet and stats.json, streaming:
    one part in memory at a time. The rows of items a retry attempt redid (`--retry-failed`) are its."""
    work = out / WORK_DIR / "parts"
    paths = [work / t.part_name for t in tasks] + [work / "excluded.parquet"]
    sizes: dict[str, dict[str, int]] = {}
    retried = _retried_rows(out / WORK_DIR)

    def parts() -> Iterator[pa.Table]:
        for path in paths:
            if not path.exists():
                continue
            table = _with_retried(manifest.read_table(path), retried)
            wrote = pc.and_(pc.is_valid(table.column("shard")), pc.greater(table.column("n_samples"), 0))
            for row in table.filter(wrote).group_by("shard").aggregate([("n_samples", "sum")]).to_pylist():
                split, name = row["shard"].split("/")
                sizes.setdefault(split, {}).setdefault(name, 0)
                sizes[split][name] += row["n_samples_sum"]
            yield table

    return write_merged(out, parts(), sizes)


def write_merged(out: UPath, tables: Iterable[pa.Table], sizes: dict[str, dict[str, int]]) -> dict[str, Any]:
    """OUT/manifest.parquet from `tables`, streamed, adding the stats up as they pass; then
    sizes.json per split from `sizes` (which reading the tables may fill in) and stats.json."""
    from audio_dataset.stats import StatsCounter

    counter = StatsCounter()

    def counted() -> Iterator[pa.Table]:
        for table in tables:
            counter.add(table)
            yield table

    manifest.write_batches(counted(), manifest.SCHEMA, out / manifest.MANIFEST_FILE)
    for split, counts in sizes.items():
        write_sizes(out / split, counts)
    stats = counter.result()
    atomic_write_json(out / "stats.json", stats)
    return stats


# --------------------------------------------------------------------------- retried items
# `build --retry-failed` (audio_dataset.retry) redoes failed items in attempts, `_work/retry-N/`.
# An attempt writes its shards and manifest parts under its `staged/` folder, as a build writes them
# under OUT, out of the dataset's sight. Once all are written its state says `committing`: its
# shards move into their splits, and from then on its rows replace the build's rows of the same
# items wherever the manifest is written (finalize), so a plain rerun of the build keeps them.
RETRY_PREFIX = "retry-"
RETRY_STATE = "state.json"
RETRY_STAGED = "staged"
RETRY_RUNNING, RETRY_COMMITTING, RETRY_DONE = "running", "committing", "done"
_STAGED_SHARD = re.compile(r"\.?[0-9]{6}\.tar(\.sha256)?")


def retry_folders(work: UPath) -> list[tuple[int, UPath]]:
    """(number, folder) of every retry attempt under `work`, oldest first."""
    if not work.exists():
        return []
    found = [(int(p.name[len(RETRY_PREFIX):]), p) for p in work.iterdir()
             if p.name.startswith(RETRY_PREFIX) and p.name[len(RETRY_PREFIX):].isdigit() and p.is_dir()]
    return sorted(found, key=lambda pair: pair[0])


def retry_state(folder: UPath) -> dict[str, Any] | None:
    """An attempt's state, or None where it has none (killed before it was recorded) or it is not one."""
    path = folder / RETRY_STATE
    state = read_json(path) if path.exists() else None
    phases = (RETRY_RUNNING, RETRY_COMMITTING, RETRY_DONE)
    return state if isinstance(state, dict) and state.get("phase") in phases else None


def published_retries(work: UPath) -> list[UPath]:
    """The attempts whose rows are the dataset's (committing or done), oldest first."""
    return [folder for _, folder in retry_folders(work)
            if (retry_state(folder) or {}).get("phase") in (RETRY_COMMITTING, RETRY_DONE)]


def retry_parts(folder: UPath) -> list[UPath]:
    """An attempt's manifest parts, in shard order."""
    parts = folder / RETRY_STAGED / WORK_DIR / "parts"
    return sorted(parts.glob("*.parquet"), key=lambda p: p.name) if parts.exists() else []


def publish_staged(folder: UPath, out: UPath) -> None:
    """Move an attempt's shards (each after its recorded checksum) into their splits. Each move is
    a rename: a rerun after a kill moves the rest."""
    staged = folder / RETRY_STAGED
    if not staged.exists():
        return
    for split_dir in sorted(staged.iterdir(), key=lambda p: p.name):
        if split_dir.name == WORK_DIR or not split_dir.is_dir():
            continue
        check_split_name(split_dir.name, f"staged retry shards in {folder.name}")
        names = sorted((p.name for p in split_dir.iterdir() if _STAGED_SHARD.fullmatch(p.name)),
                       key=lambda n: (n.lstrip(".")[:6], not n.startswith(".")))  # a checksum before its shard
        for name in names:
            _move(split_dir / name, out / split_dir.name / name)


def _move(src: UPath, dest: UPath) -> None:
    if is_local(dest):
        make_dirs(Path(dest.parent.path))
        publish(Path(src.path), dest.path)
    else:
        dest.fs.mv(src.path, dest.path)


def _retried_rows(work: UPath) -> tuple[pa.Table, dict[str, int]] | None:
    """Every published attempt's rows and, per source id, the position of its latest row."""
    tables = [manifest.read_table(p) for folder in published_retries(work) for p in retry_parts(folder)]
    if not tables:
        return None
    table = pa.concat_tables(tables)
    return table, {sid: n for n, sid in enumerate(table.column("source_id").to_pylist())}


def _with_retried(table: pa.Table, retried: tuple[pa.Table, dict[str, int]] | None) -> pa.Table:
    """A build part with each row a retry redid replaced by the retry's row, in place."""
    if retried is None:
        return table
    rows, latest = retried
    ids = table.column("source_id").to_pylist()
    if not any(sid in latest for sid in ids):
        return table
    order = [len(table) + latest[sid] if sid in latest else n for n, sid in enumerate(ids)]
    return pa.concat_tables([table, rows]).take(pa.array(order, pa.int64()))
