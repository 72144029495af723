"""`audiodata build`: list a source, then download, transcode and shard it on Ray (local or a cluster).

The shard is the unit of work. Items are listed once (cached as `_work/index.parquet`), assigned a
split by a stable hash and cut into shards in listing order, so every run plans the same shards.
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
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from upath import UPath

from audio_dataset import manifest
from audio_dataset.audio import AudioConfig, Media, encode, scan
from audio_dataset.lock import hold_output
from audio_dataset.manifest import ManifestRow
from audio_dataset.provenance import RunRecord, definition_checksums, record_run, redact_mapping
from audio_dataset.raystart import start_ray
from audio_dataset.schema import SPLITS, SampleMeta, clean_captions, safe_key, shard_name
from audio_dataset.shards import Sample, ShardWriter, write_sizes
from audio_dataset.storage import Location, atomic_write_json, is_local, location, read_json, remove_stale_temps
from audio_dataset.source import (
    Item, ItemError, Source, SourceConfig, SourceError, UserError, load_source, read_definition,
)

WORK_DIR = "_work"
INDEX_FILE = "index.parquet"
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


@dataclass
class ShardTask:
    split: str
    index: int
    items: list[Item]

    @property
    def name(self) -> str:
        return f"{self.split}/{shard_name(self.index)}"

    @property
    def part_name(self) -> str:
        return f"{self.split}-{self.index:06d}.parquet"

    def to_json(self) -> str:
        return json.dumps({"split": self.split, "index": self.index, "items": [i.to_json() for i in self.items]})

    @classmethod
    def from_json(cls, raw: str) -> "ShardTask":
        data = json.loads(raw)
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


def assign_split(source: str, item: Item, ratios: dict[str, float]) -> str:
    """A stable split from the source id: the same item lands in the same split on every run."""
    if item.split is not None:
        return check_split_name(item.split, f"item {item.source_id!r}")
    digest = hashlib.sha1(f"{source}:{item.source_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    total = sum(ratios.values())
    edge = 0.0
    for split, ratio in ratios.items():
        edge += ratio / total
        if point < edge:
            return split
    return list(ratios)[-1]


def plan_shards(source: str, items: Iterable[Item], ratios: dict[str, float],
                per_shard: int) -> list[ShardTask]:
    by_split: dict[str, list[Item]] = {}
    for item in items:
        by_split.setdefault(assign_split(source, item, ratios), []).append(item)
    tasks = []
    for split in sorted(by_split, key=lambda s: (SPLITS.index(s) if s in SPLITS else 99, s)):
        chunk = by_split[split]
        for start in range(0, len(chunk), per_shard):
            tasks.append(ShardTask(split, start // per_shard, chunk[start:start + per_shard]))
    return tasks


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


def list_with_cache(source: Source, work: UPath, limit: int | None, show: bool = False) -> list[Item]:
    """The complete listing, scraped once and kept as a parquet index for reruns."""
    from tqdm import tqdm

    index = work / INDEX_FILE
    if index.exists():
        items = [Item.from_json(raw) for raw in manifest.read_parquet(index).column("item").to_pylist()]
    else:
        items = []
        seen: set[str] = set()
        # A web listing can take hours at a polite rate: count what it has found so far (shown after
        # a second, so a quick listing, or one that fails at once on a user mistake, prints nothing).
        with tqdm(unit="item", desc="list", total=limit, disable=not show, file=sys.stderr, delay=1.0) as bar:
            for item in source.list_items():
                if item.source_id in seen:  # sources may list an item twice (pages shifting)
                    continue
                seen.add(item.source_id)
                items.append(item)
                bar.update(1)
                if limit is not None and len(items) >= limit:
                    break
        table = pa.table({"source_id": [i.source_id for i in items],
                          "item": [i.to_json() for i in items]})
        manifest.write_parquet(table, index)
    return items[:limit] if limit is not None else items


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
                       error_detail=exc.detail[:500] or None, url=item.url, license=item.license, **extra)


def _media_checks(data: Media) -> dict[str, Any]:
    """Size and sha256 of the source bytes; a local file is hashed as it is read, never loaded whole."""
    if isinstance(data, Path):
        with open(data, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return dict(source_bytes=data.stat().st_size, sha256=digest)
    return dict(source_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


# An item's manifest row and its samples (a failure has none; an ok item's are encoded as read).
Outcome = tuple[ManifestRow, Iterable[Sample]]


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
    keys = [safe_key(source, item.source_id, None if result.whole else number) for number in range(len(result.spans))]

    def samples() -> Iterator[Sample]:  # encoded as the shard writer asks: one FLAC in hand at a time
        for key, segment in zip(keys, result.iter_segments()):
            meta = SampleMeta(
                text=text, tag=item.tag, original_data=item.original_data, source=source,
                source_id=item.source_id, license=item.license, author=item.author, url=item.url,
                duration=round(segment.duration, 6), sample_rate=config.sample_rate,
                channels=config.channels,
                segment=None if result.whole else [round(segment.start, 6), round(segment.end, 6)],
                extra=dict(level, downmix=found.downmix, downmix_cancels=found.downmix_cancels,
                           captions_truncated=truncated),
            )
            yield {"__key__": key, "flac": segment.file, "json": meta.to_json_bytes()}

    row = ManifestRow(
        source=source, source_id=item.source_id, split=split, shard=shard, status=manifest.STATUS_OK,
        sample_keys=keys, n_samples=len(keys), output_duration=result.output_duration,
        url=item.url, license=item.license, captions_truncated=truncated, **level, **checks,
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
        log.warning("unexpected error on %s %s", source.name, item.source_id, exc_info=True)
        unexpected = ItemError(UNEXPECTED_ERROR, f"{type(exc).__name__}: {exc}")
        size = len(data) if isinstance(data, bytes) else None  # a local file may be what went wrong
        return _fail_row(source.name, item, split, shard, unexpected, source_bytes=size), []


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
    fetches = ordered_prefetch(lambda it: _fetch(source, it), task.items, source.fetch_concurrency)
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
    if excluded:  # other exclusions re-plan every shard; absent when none (outputs from before it)
        ids = "\n".join(sorted(excluded)).encode()
        fingerprint["exclusions"] = f"{len(excluded)} ids, sha256 {hashlib.sha256(ids).hexdigest()[:16]}"
    return fingerprint


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
        (folder / WORK_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    if not os.access(folder / WORK_DIR, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable")


def _shard_worker(task_json: str, source: Source, out: str, config: AudioConfig) -> dict[str, Any]:
    """One Ray task: a whole shard. A SourceError comes back as data so the driver can stop cleanly."""
    import ray

    try:
        result = run_shard(ShardTask.from_json(task_json), source, location(out), config)
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
        log.warning("unexpected error on %s %s", source.name, item.source_id, exc_info=True)
        unexpected = ItemError(UNEXPECTED_ERROR, f"{type(exc).__name__}: {exc}")
        row, returned = _fail_row(source.name, item, split, shard, unexpected), []
    return {"row": asdict(row), "samples": returned}


def _worker_deaths() -> tuple[type[BaseException], ...]:
    """Ray's errors for a task whose process died under it (OOM-killed, a crash in native code)."""
    from ray import exceptions

    return (exceptions.WorkerCrashedError, exceptions.OutOfMemoryError, exceptions.NodeDiedError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


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
    queue = iter(tasks)
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
        return None, f"its worker died ({_first_line(exc)})", True
    if "encode_failed" in result:
        return None, result["encode_failed"], False
    return result, None, False


def _run_items_apart(task: ShardTask, source: Source, source_ref: Any, out: UPath, config: AudioConfig,
                     slots: int) -> dict[str, Any]:
    """Redo a shard one item per Ray task (a bounded window, in order) and write it from the driver."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=0)(_item_worker)

    def outcomes() -> Iterator[Outcome]:
        queue = iter(task.items)
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
                died = ItemError(WORKER_DIED, f"the worker processing it died: {_first_line(exc)}")
                yield _fail_row(source.name, item, task.split, task.name, died), []
                continue
            if "source_error" in result:
                raise SourceError(result["source_error"])
            yield ManifestRow(**result["row"]), result["samples"]

    return {**_write_shard(task, out, outcomes()), "node": ray.get_runtime_context().get_node_id()}


def _excluded_rows(source: str, items: list[Item], excluded: set[str], ratios: dict[str, float]) -> list[ManifestRow]:
    error = ItemError(manifest.STATUS_EXCLUDED, "listed in an evaluation-overlap exclusion list")
    return [_fail_row(source, item, assign_split(source, item, ratios), None, error)
            for item in items if item.source_id in excluded]


def build(options: BuildOptions) -> BuildSummary:
    """Run (or resume) a build into `options.out`; raises UserError/SourceError on fatal problems."""
    if options.samples_per_shard < 1:
        raise UserError("--samples-per-shard must be at least 1")
    for split in options.split_ratios:
        check_split_name(split, "--splits")
    out = location(options.out)
    _check_out_is_not_input(out, options.source_config.input)
    # Listing state is scratch space the source reads and writes often: keep it on local disk.
    options.source_config.state_dir = options.source_config.state_dir or _local_state_dir(out)
    source = load_source(options.source, options.source_config)
    source.check()
    excluded = read_exclusions([*definition_exclusions(options.source), *options.exclude_files])
    fingerprint = _fingerprint(options, excluded)
    _prepare_out(out)
    ray_was_up = _ray_is_up()
    with hold_output(out, "build"):
        try:
            return _build_held(options, source, out, excluded, fingerprint)
        except BaseException:  # a full disk, Ctrl-C, a failed source: stop writing, leave no temp files
            if not ray_was_up and _ray_is_up():
                import ray

                ray.shutdown()  # this build's own Ray: its workers stop before their temps are swept
                remove_stale_temps(out)
            raise


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _build_held(options: BuildOptions, source: Source, out: UPath, excluded: set[str],
                fingerprint: dict[str, Any]) -> BuildSummary:
    """The build proper, while this command alone holds `out`."""
    from audio_dataset.stats import print_summary

    work = out / WORK_DIR
    _check_resumable(work, fingerprint)
    run = RunRecord("build", {**fingerprint, "workers": options.workers, "ray_address": options.ray_address,
                              "base_url": options.source_config.base_url,
                              "exclude_files": [str(p) for p in options.exclude_files]},
                    definitions=definition_checksums([options.source]))

    pinned = (work / CONFIG_FILE).exists()
    if not pinned and (work / INDEX_FILE).exists():
        (work / INDEX_FILE).unlink()  # left by a run that never got going, maybe of another --input
    items = list_with_cache(source, work, options.limit, options.progress)
    kept = [item for item in items if item.source_id not in excluded]
    excluded_rows = _excluded_rows(options.source, items, excluded, options.split_ratios)
    tasks = plan_shards(options.source, kept, options.split_ratios, options.samples_per_shard)
    # Only a run whose listing and plan succeeded records its options: a typo (a missing column,
    # a bad split name) must not pin the output folder to the mistaken command.
    if not pinned:
        atomic_write_json(work / CONFIG_FILE, fingerprint)
    manifest.write_table(manifest.rows_to_table(excluded_rows), work / "parts" / "excluded.parquet")
    todo = [t for t in tasks if not (work / "parts" / t.part_name).exists()]
    per_node = _report_progress(_run_tasks(todo, source, out, options, options.workers) if todo else iter(()),
                                len(tasks), len(tasks) - len(todo), options.progress)

    stats = finalize(out, tasks)
    record_run(out, run)
    print_summary(stats, file=sys.stdout, out=out)
    if len(per_node) > 1:
        print("shards per node: " + ", ".join(f"{n[:8]}={c}" for n, c in sorted(per_node.items())))
    return BuildSummary(out, len(tasks), len(tasks) - len(todo), stats, per_node)


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
    """Merge manifest parts, write sizes.json per split, manifest.parquet and stats.json."""
    from audio_dataset.stats import compute_stats

    work = out / WORK_DIR / "parts"
    paths = [work / t.part_name for t in tasks] + [work / "excluded.parquet"]
    table = manifest.concat([p for p in paths if p.exists()])
    sizes: dict[str, dict[str, int]] = {}
    for row in table.select(["shard", "n_samples"]).to_pylist():
        if row["shard"] and row["n_samples"]:
            split, name = row["shard"].split("/")
            sizes.setdefault(split, {}).setdefault(name, 0)
            sizes[split][name] += row["n_samples"]
    for split, counts in sizes.items():
        write_sizes(out / split, counts)
    manifest.write_table(table, out / manifest.MANIFEST_FILE)
    stats = compute_stats(table)
    atomic_write_json(out / "stats.json", stats)
    return stats
