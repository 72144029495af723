"""The one runner for shard-to-shard stages (k2c, keywords, embed, dedup, filter, caption): one Ray
actor per worker holds the models, shards are the unit of work and of resume. A worker has two
shards in flight: one in its model while the next is read and prepared (`ShardProcessor.prepare`:
its audio decoded), so the model does not wait for the CPU's part.

A shard is done when its manifest part exists: the part is written after the shard's tar is
renamed into place, so a killed run redoes at most the shards it was writing. Every member except
`<key>.json` is copied byte for byte; samples keep their order. A stage's `mode` says what it does
to the shards: REWRITE keeps every sample (so `sizes.json` is the input's), DROP keeps a subset in
order (`sizes.json` rewritten; a shard left empty is not written), READ writes no shards, only
one table per shard at OUT/SPLIT/NNNNNN.parquet.

The output of a REWRITE or DROP stage is a dataset every command reads: the input's manifest and
stats.json for a REWRITE stage (the same samples); for a DROP stage a manifest written from the
input's, each item the stage dropped whole marked `dropped` with the reason `STAGE:REASON`, and
stats.json counted from it. A run records its input's folder and content (SHA256SUMS and
sizes.json): a moved or copied dataset resumes, and so does one with a shard repaired in place.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from audio_dataset import manifest as manifest_lib
from audio_dataset.build import write_merged
from audio_dataset.schema import BAD_JSON, JSON_EXT, REFUSED, SIZES_FILE, SampleRefused, load_json_object
from audio_dataset.shards import REFUSED_KEY, Sample, ShardWriter, atomic_write_bytes, atomic_write_json, \
    iter_shard, read_checksums, read_sizes, refusal, shard_paths, write_sizes
from audio_dataset.lock import hold_output
from audio_dataset.manifest import read_parquet
from audio_dataset.card import CARD_FILE
from audio_dataset.report import REPORT_FILE
from audio_dataset.stats import PLOT_FILE, STATS_FILE, one_line
from audio_dataset.provenance import PROVENANCE_FILE, RunRecord, read_runs, record_run
from audio_dataset.raystart import start_ray
from audio_dataset.source import UserError
from audio_dataset.storage import Location, StagedFile, is_local, location, read_json, remove_stale_temps, \
    trust_output

DEVICES = ("auto", "cpu", "cuda")
REWRITE, DROP, READ = "rewrite", "drop", "read"
KEPT = "kept"  # the manifest status of a sample a DROP stage keeps


@dataclass(frozen=True)
class ShardJob:
    split: str
    name: str
    src: str
    dst: str
    part: str
    # The input's sizes.json count: a shard cut at a member boundary reads cleanly but short.
    expected: int | None = None


class ShardProcessor(Protocol):
    """What a stage runs per shard. A processor may also define `prepare(job, samples)`: the shard's
    CPU work before its model (decoding the audio), which a worker runs while its model is busy with
    the shard before; the result is passed on as `process(job, samples, prepared)`."""

    def process(self, job: ShardJob, samples: list[Sample]) -> tuple[list[Sample], list[dict[str, Any]]]:
        """The shard's samples with new JSON, and one manifest row per sample."""


@dataclass(frozen=True)
class Stage:
    name: str
    # Everything that decides the output; recorded in OUT/.<name>/run.json and checked on resume.
    settings: dict[str, Any]
    # Builds the processor inside each worker (models load there, once): device -> processor.
    factory: Callable[[str], ShardProcessor]
    manifest_schema: pa.Schema
    mode: str = REWRITE
    # Runs in the driver once every shard is done (a READ stage's per-split files): (out, jobs).
    finish: Callable[[UPath, list[ShardJob]], None] | None = None
    # A DROP stage's row of a sample it did not keep -> the output manifest's `error_detail`.
    detail: Callable[[dict[str, Any]], str | None] | None = None
    # Settings the workers' device decides (embed's default precision): (device, or None where no shard
    # is left to run; the settings a resume must match, {} on a clean start) -> settings, added to
    # `settings` before they are recorded and compared, so a resume on another kind of machine is seen.
    device_settings: Callable[[str | None, dict[str, Any]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class RunOptions:
    input: Location  # a build output: a folder or an fsspec URL
    out: Location
    workers: int | None = None
    # torch threads per worker; default the cluster's CPUs shared out among the workers.
    threads: int | None = None
    device: str = "auto"
    ray_address: str | None = None
    progress: bool = True


@dataclass
class RunSummary:
    out: UPath
    shards: int
    resumed: int
    samples: int
    seconds: float
    manifest: UPath
    # Samples per manifest `status` (generated, skipped_short, filled...).
    statuses: dict[str, int]


def _work_dir(out: UPath, stage_name: str) -> UPath:
    """Per-stage state: run.json (settings) and parts/ (one manifest part per finished shard)."""
    return out / f".{stage_name}"


def _parts_dir(out: UPath, stage_name: str, mode: str) -> UPath:
    """A READ stage's parts are its output; other stages keep theirs as resume state."""
    return out if mode == READ else _work_dir(out, stage_name) / "parts"


def _identity(path: UPath) -> str:
    return str(path.resolve()) if is_local(path) else str(path).rstrip("/")


def check_run(options: RunOptions) -> None:
    """Fail fast on the run options, before any model is fetched."""
    input_dir, out = location(options.input), location(options.out)
    if not input_dir.is_dir():
        raise UserError(f"{options.input}: no such folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {options.out}: exists and is not a folder")
    if _identity(out) == _identity(input_dir):
        raise UserError("--out must differ from DATASET (its shards are never modified)")
    if options.device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}")
    if (options.workers is not None and options.workers < 1) or (options.threads is not None and options.threads < 1):
        raise UserError("--workers and --threads must be at least 1")
    find_jobs(input_dir, out, "check")


def find_jobs(input_dir: UPath, out: UPath, stage_name: str, mode: str = REWRITE) -> list[ShardJob]:
    """Every shard of every split under `input_dir` (a build output)."""
    splits = sorted(p for p in input_dir.iterdir() if p.is_dir() and (p / SIZES_FILE).is_file())
    parts = _parts_dir(out, stage_name, mode)
    jobs: list[ShardJob] = []
    for split in splits:
        sizes = read_sizes(split)
        jobs += [ShardJob(split.name, shard.name, str(shard), str(out / split.name / shard.name),
                          str(parts / split.name / f"{shard.stem}.parquet"), sizes.get(shard.name))
                 for shard in shard_paths(split)]
    if not jobs:
        raise UserError(f"{input_dir}: no shards (expected SPLIT/NNNNNN.tar with SPLIT/{SIZES_FILE})")
    return jobs


def dataset_identity(folder: UPath) -> str:
    """What names a dataset's shards wherever it lies: a digest of each split's sizes.json and shard
    checksums (SHA256SUMS; for shards written without one, their names and byte sizes: hashing a
    foreign dataset's terabytes at every start would cost more than the run), so a moved or copied
    dataset is the same one."""
    digest = hashlib.sha256()
    for split in sorted(p for p in folder.iterdir() if p.is_dir() and (p / SIZES_FILE).is_file()):
        sums = read_checksums(split)
        read_sizes(split)  # checked (and bounded) before its bytes are hashed
        if sums is None:
            sums = {path.name: f"bytes:{path.stat().st_size}" for path in shard_paths(split)}
        digest.update(json.dumps([split.name, (split / SIZES_FILE).read_bytes().decode("utf-8", "replace"),
                                  sorted(sums.items())]).encode())
    return "sha256:" + digest.hexdigest()


def as_json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists, paths as strings): settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def _check_resumable(out: UPath, stage: Stage, input_dir: UPath, previous: dict[str, Any] | None) -> None:
    """Record the settings; a later run into the same --out must match them (`previous`, the
    `_previous_run`) once a shard is done. The input must be the same: the same folder (a shard
    repaired in place resumes) or the same content elsewhere (a moved or copied dataset resumes)."""
    path = _work_dir(out, stage.name) / "run.json"
    settings = as_json(stage.settings)
    record = {"stage": stage.name, "input": _identity(input_dir), "input_digest": dataset_identity(input_dir),
              "settings": settings}
    if previous is not None:
        before = _recorded_settings(previous)
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if previous.get("input") != record["input"] and previous.get("input_digest") != record["input_digest"]:
            changed.insert(0, "input")
        if changed:
            what = "with other settings" if changed != ["input"] else "of another input dataset"
            raise UserError(f"{out} holds a {stage.name} run {what} ({', '.join(changed)}); "
                            f"use a new --out, or the same settings to resume{_recorded(before, changed)}")
        record = {**previous, "input": record["input"], "input_digest": record["input_digest"]}
    atomic_write_json(path, record)


def _previous_run(out: UPath, stage: Stage) -> dict[str, Any] | None:
    """The run.json a resume must match, or None while no shard is done (the run starts clean)."""
    path = _work_dir(out, stage.name) / "run.json"
    if path.exists() and any(_parts_dir(out, stage.name, stage.mode).rglob("*.parquet")):
        return read_json(path)
    return None


def _recorded_settings(previous: dict[str, Any] | None) -> dict[str, Any]:
    # Anyone may have edited run.json: settings that are not a table match nothing.
    settings = (previous or {}).get("settings")
    return settings if isinstance(settings, dict) else {}


def _recorded(before: dict[str, Any], changed: list[str]) -> str:
    """' (recorded: precision=bf16)': the changed settings' recorded values a resume must give again
    (a default the device decides is not on the command line), where they are short enough to say."""
    # run.json is anyone's to edit: a value is quoted inert, on one line (no newline, escape, bidi)
    shown = [f"{key}={one_line(before[key])}" for key in changed if isinstance(before.get(key), (str, int, float))
             and len(str(before[key])) <= 40]
    return f" (recorded: {', '.join(shown)})" if shown else ""


def read_input_shard(job: ShardJob) -> list[Sample]:
    """The input shard's samples. One that is badly named, over a cap, or without a JSON object is
    kept with its `refusal` (its manifest row names why; it is not processed or written). A
    truncated or corrupt shard is the user's data to repair, so it is one clear line naming the
    shard, not a traceback from inside Ray."""
    try:
        samples = list(iter_shard(job.src))
        if job.expected is not None and len(samples) != job.expected:
            raise ValueError(f"{len(samples)} samples, {SIZES_FILE} says {job.expected}")
    except (tarfile.TarError, EOFError, ValueError) as exc:  # JSON and Unicode errors are ValueErrors
        raise UserError(f"{job.src}: unreadable shard ({str(exc)[:200]}); repair or remove it "
                        "(and its sizes.json entry), then rerun to resume") from None
    for sample in samples:
        if refusal(sample) is None:
            try:
                if JSON_EXT not in sample:
                    raise SampleRefused(BAD_JSON, f"sample {sample['__key__']} has no .{JSON_EXT}")
                load_json_object(sample[JSON_EXT])  # the processors' json.loads is then bounded too
            except SampleRefused as exc:
                sample[REFUSED_KEY] = exc
    return samples


def _refused_row(job: ShardJob, sample: Sample, refused: SampleRefused, schema: pa.Schema) -> dict[str, Any]:
    """The manifest row of a refused sample; fixed-size vectors (embed's) are zeros, as for a sample
    without audio, so a split's matrices keep one row per sample."""
    vectors = {f.name: [0.0] * f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type)}
    return {"split": job.split, "shard": job.name, "key": sample["__key__"], "status": refused.reason, **vectors}


def _check_output(job: ShardJob, samples: list[Sample], new_samples: list[Sample], rows: list[dict[str, Any]],
                  mode: str) -> None:
    if len(rows) != len(samples):
        raise RuntimeError(f"{job.split}/{job.name}: processor gave {len(rows)} rows for {len(samples)} samples")
    if mode == DROP:  # the kept samples are the input's own, untouched, in order
        remaining = iter(samples)
        if not all(any(new is old for old in remaining) for new in new_samples):
            raise RuntimeError(f"{job.split}/{job.name}: processor changed or reordered the samples it kept")
        return
    if mode == READ:
        return
    if [s["__key__"] for s in new_samples] != [s["__key__"] for s in samples]:
        raise RuntimeError(f"{job.split}/{job.name}: processor changed the samples' keys or order")
    for old, new in zip(samples, new_samples):
        for ext, data in old.items():
            if ext not in ("__key__", JSON_EXT) and new.get(ext) is not data:
                raise RuntimeError(f"{job.split}/{job.name}: processor touched {old['__key__']}.{ext}")


@dataclass
class ReadShard:
    """A shard read and prepared, waiting for its processor's model."""

    job: ShardJob
    samples: list[Sample]
    usable: list[Sample]  # the samples not refused, which the processor sees
    prepared: Any = None


def read_shard(processor: ShardProcessor, job: ShardJob) -> ReadShard:
    """Read the input shard and run the processor's `prepare`, if it has one."""
    samples = read_input_shard(job)
    usable = [sample for sample in samples if refusal(sample) is None]
    prepare = getattr(processor, "prepare", None)
    return ReadShard(job, samples, usable, prepare(job, usable) if prepare is not None else None)


def run_shard(processor: ShardProcessor, shard: ReadShard) -> tuple[list[Sample], list[dict[str, Any]]]:
    if hasattr(processor, "prepare"):
        return processor.process(shard.job, shard.usable, shard.prepared)  # type: ignore[call-arg]
    return processor.process(shard.job, shard.usable)


def write_shard(shard: ReadShard, new_samples: list[Sample], usable_rows: list[dict[str, Any]], schema: pa.Schema,
                mode: str = REWRITE) -> int:
    """The output shard (REWRITE, DROP), then the manifest part that marks the shard done."""
    job, samples = shard.job, shard.samples
    _check_output(job, shard.usable, new_samples, usable_rows, mode)
    if mode == REWRITE or (mode == DROP and new_samples):
        with ShardWriter(job.dst) as writer:
            for sample in new_samples:
                writer.write(sample)
    # One row per input sample, in order: a refused one's names why.
    processed = iter(usable_rows)
    rows = [next(processed) if (refused := refusal(sample)) is None else _refused_row(job, sample, refused, schema)
            for sample in samples]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    atomic_write_bytes(job.part, buffer.getvalue())
    return len(new_samples)


def process_shard(processor: ShardProcessor, job: ShardJob, schema: pa.Schema, mode: str = REWRITE) -> int:
    shard = read_shard(processor, job)
    return write_shard(shard, *run_shard(processor, shard), schema, mode)


# Shards a worker holds at once: one with its model while the next is read and prepared.
SHARDS_IN_FLIGHT = 2


class _Worker:
    """The body of one Ray actor. It runs SHARDS_IN_FLIGHT shards at once in Ray's threads: reading,
    `prepare` and writing overlap, while the processor is built and every `process` runs on one
    model thread, one shard at a time. One thread because a second thread's torch calls start a
    second OpenMP team, and with more OpenMP threads than cores libgomp stops spinning: short ops
    then took twice as long on every thread (measured on 2 cores)."""

    def __init__(self, factory: Callable[[str], ShardProcessor], device: str, threads: int,
                 schema: pa.Schema, mode: str = REWRITE, out: str | None = None) -> None:
        self.factory, self.device, self.threads, self.schema, self.mode = factory, device, threads, schema, mode
        self.processor: ShardProcessor | None = None
        self.model_ident: int | None = None  # the model thread's, once it runs
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model", initializer=self._on_model_thread_start)
        if out is not None:  # the driver's --out: no folder below it may be a link (storage.make_dirs)
            trust_output(out)

    def _processor(self) -> ShardProcessor:
        # Built on the first job, not in __init__: Ray passes a method's exception (a UserError
        # for a model that will not load) back to the driver, a constructor's only as text.
        if self.processor is None:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # workers' bars would garble the driver's
            self.processor = self.factory(self.device)
            if "torch" in sys.modules:  # not imported at all for the template
                sys.modules["torch"].set_num_threads(self.threads)
        return self.processor

    def _on_model_thread_start(self) -> None:
        self.model_ident = threading.get_ident()

    def on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if threading.get_ident() == self.model_ident:
            return fn(*args)  # already there: submitting would wait on itself forever
        return self.model_thread.submit(fn, *args).result()

    def run(self, job: ShardJob) -> tuple[ShardJob, int]:
        processor = self.on_model_thread(self._processor)
        shard = read_shard(processor, job)
        result = self.on_model_thread(run_shard, processor, shard)
        return job, write_shard(shard, *result, self.schema, self.mode)


def _cluster_device(device: str) -> tuple[str, int, int]:
    """(the workers' device, GPUs, CPUs) of the Ray cluster for --device; cuda on a cluster without
    a GPU is one line."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    device = _worker_device(device, gpus)
    if device == "cuda" and not gpus:
        raise UserError("--device cuda: the Ray cluster has no GPU")
    return device, gpus, cpus


def _plan_workers(options: RunOptions, jobs: int) -> tuple[str, int, int]:
    """(device, workers, torch threads per worker) from the cluster's resources."""
    device, gpus, cpus = _cluster_device(options.device)
    workers = options.workers or (gpus if device == "cuda" else 1)
    if device == "cuda" and workers > gpus:
        raise UserError(f"--workers {workers}: one worker per GPU and the cluster has {gpus}")
    workers = max(1, min(workers, jobs))
    if workers > cpus:  # each actor holds one CPU: the extra ones never start and their shards wait forever
        raise UserError(f"--workers {workers}: each worker needs a CPU and the Ray cluster has {cpus}")
    return device, workers, options.threads or max(1, cpus // workers)


def _run_jobs(stage: Stage, jobs: list[ShardJob], options: RunOptions) -> Iterator[tuple[ShardJob, int]]:
    import ray
    from ray.util import ActorPool

    device, workers, threads = _plan_workers(options, len(jobs))
    actor_cls = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0, max_restarts=0,
                           max_concurrency=SHARDS_IN_FLIGHT)(_Worker)
    actors = [actor_cls.remote(stage.factory, device, threads, stage.manifest_schema, stage.mode, str(options.out))
              for _ in range(workers)]
    try:  # each actor SHARDS_IN_FLIGHT times in the pool: as many shards in flight on it
        pool = ActorPool(actors * SHARDS_IN_FLIGHT)
        yield from pool.map_unordered(lambda actor, job: actor.run.remote(job), jobs)
    finally:
        for actor in actors:
            ray.kill(actor)


def _raise_user_errors(exc: BaseException) -> None:
    """A UserError raised inside a worker (a model that will not load) reaches the driver wrapped by
    Ray (RayTaskError, ActorDiedError): unwrap it so the user sees one line."""
    seen: list[BaseException] = []
    current: object = exc
    while isinstance(current, BaseException) and current not in seen and len(seen) < 8:
        seen.append(current)
        inner = getattr(current, "cause", None)  # Ray's wrappers keep the original here
        if isinstance(inner, BaseException):
            current = inner
        elif isinstance(current, UserError):
            raise UserError(str(current)) from None
        else:
            current = current.__cause__


def _worker_device(device: str, gpus: int) -> str:
    """The device every worker gets: --device, or with auto a GPU where the Ray cluster has one."""
    return ("cuda" if gpus else "cpu") if device == "auto" else device


def run_stage(stage: Stage, options: RunOptions) -> RunSummary:
    check_run(options)  # before the lock creates --out
    with hold_output(trust_output(options.out), stage.name):
        out = location(options.out)
        jobs = find_jobs(location(options.input), out, stage.name, stage.mode)
        previous = _previous_run(out, stage)  # listed and read once: the resume check compares with it
        if stage.device_settings is None:
            return _run_stage_held(stage, options, jobs, previous)
        # A shard left, or no run recorded (run.json removed: this run starts clean and records what its
        # device runs in, as any clean start), needs the device.
        pending = previous is None or any(not location(job.part).exists() for job in jobs)
        # With auto the device is the cluster's: Ray starts before the settings are compared, and the
        # workers get the device resolved here, so they run with the settings recorded. With no shard
        # left nothing runs on a device (None): Ray is not started for it.
        asks_ray = pending and options.device != "cpu"
        owns_ray = asks_ray and start_ray(options.ray_address)
        try:
            if asks_ray:  # a missing GPU is said before any setting it would decide
                options = replace(options, device=_cluster_device(options.device)[0])
            recorded = _recorded_settings(previous)
            settings = {**stage.settings, **stage.device_settings(options.device if pending else None, recorded)}
            return _run_stage_held(replace(stage, settings=settings), options, jobs, previous)
        finally:
            if owns_ray:
                import ray

                ray.shutdown()


def _run_stage_held(stage: Stage, options: RunOptions, jobs: list[ShardJob],
                    previous: dict[str, Any] | None) -> RunSummary:
    from tqdm import tqdm

    started = time.monotonic()
    input_dir, out = location(options.input), location(options.out)
    provenance = RunRecord(stage.name, {**stage.settings, "input": str(options.input), "workers": options.workers,
                                        "device": options.device, "ray_address": options.ray_address})
    _check_resumable(out, stage, input_dir, previous)
    remove_stale_temps(out)  # a killed run's; this command alone holds `out`
    todo = [job for job in jobs if not location(job.part).exists()]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="shard", desc=stage.name,
               disable=not options.progress, file=sys.stderr, dynamic_ncols=True)
    if todo:
        owns_ray = start_ray(options.ray_address)
        try:
            for job, _count in _run_jobs(stage, todo, options):
                bar.update(1)
        except Exception as exc:
            _raise_user_errors(exc)
            raise
        finally:
            bar.close()
            if owns_ray:
                import ray

                ray.shutdown()
    bar.close()
    table, manifest = _finalize(stage, jobs, input_dir, out)
    statuses = dict(sorted(Counter(table.column("status").to_pylist()).items()))
    summary = RunSummary(out, len(jobs), len(jobs) - len(todo), table.num_rows, time.monotonic() - started,
                         manifest, statuses)
    record = read_json(_work_dir(out, stage.name) / "run.json")
    record["last_run"] = {"shards": summary.shards, "resumed_shards": summary.resumed, "samples": table.num_rows,
                          "statuses": statuses, "seconds": round(summary.seconds, 2), **_versions()}
    atomic_write_json(_work_dir(out, stage.name) / "run.json", record)
    record_run(out, provenance)  # after _finalize copied the input's provenance: the chain stays whole
    return summary


# Views of the input drawn from its shards (`audiodata stats`, `report`, `card` draw them again for the output).
_NOT_COPIED = frozenset({PLOT_FILE, REPORT_FILE, CARD_FILE})


def _copy_dataset_files(input_dir: UPath, out: UPath, skip: frozenset[str] = frozenset()) -> None:
    """The input's top-level files (build's manifest.parquet, stats.json, provenance.json; earlier
    stages' manifests) describe the same samples, so the output stays a complete dataset."""
    for path in sorted(input_dir.iterdir()):
        if path.name == PROVENANCE_FILE:
            _merge_provenance(path, out / PROVENANCE_FILE)
        elif path.is_file() and not path.name.startswith((".", "_")) and path.name not in _NOT_COPIED | skip:
            _copy_file(path, out / path.name)


COPY_CHUNK_BYTES = 1 << 20


def _copy_file(source: UPath, dest: UPath) -> None:
    """Streamed in bounded chunks through a staged file (a received dataset's manifest may be
    gigabytes; memory stays at one chunk), published only once whole."""
    staged = StagedFile(dest)
    try:
        with source.open("rb") as handle:
            shutil.copyfileobj(handle, staged.handle, COPY_CHUNK_BYTES)
    except BaseException:  # a read error, a full disk, a signal: no temp file is left
        staged.abort()
        raise
    staged.commit()


def _merge_provenance(source: UPath, dest: UPath) -> None:
    """The input's run records, then this output's own earlier ones (a rerun must not erase them)."""
    runs = read_runs(source.parent)
    earlier = read_runs(dest.parent)
    atomic_write_json(dest, {"runs": runs + [run for run in earlier if run not in runs]})


def _read_part(job: ShardJob, schema: pa.Schema) -> pa.Table:
    """A finished shard's manifest part: resume state in OUT that anyone may have edited, so it must
    be parquet in the stage's schema with one row per input sample, or one line naming it."""
    redo = "remove it to redo that shard"
    try:
        table = read_parquet(job.part)
        if table.schema.names != schema.names:
            raise ValueError(f"its columns are not the {len(schema.names)} this stage writes")
        table = table.cast(schema)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise UserError(f"{job.part}: not this stage's manifest part ({str(exc)[:200]}); {redo}") from None
    if job.expected is not None and table.num_rows != job.expected:
        raise UserError(f"{job.part}: {table.num_rows} rows, the input's {SIZES_FILE} says {job.expected}; {redo}")
    return table


def _finalize_read(stage: Stage, jobs: list[ShardJob], out: UPath) -> tuple[pa.Table, UPath]:
    """A READ stage's parts are its output; only their statuses are gathered (memory stays flat)."""
    if stage.finish is not None:
        stage.finish(out, jobs)
    statuses = [_read_part(job, stage.manifest_schema).select(["status"]) for job in jobs]
    return pa.concat_tables(statuses), out


def _finalize(stage: Stage, jobs: list[ShardJob], input_dir: UPath, out: UPath) -> tuple[pa.Table, UPath]:
    """sizes.json per split (checked against the input's), the input's dataset files, the merged
    manifest (its schema metadata carries the run's settings)."""
    if stage.mode == READ:
        return _finalize_read(stage, jobs, out)
    tables = [_read_part(job, stage.manifest_schema) for job in jobs]
    by_split: dict[str, dict[str, int]] = {}
    read_by_split: dict[str, dict[str, int]] = {}
    for job, table in zip(jobs, tables):
        statuses = table.column("status").to_pylist()
        # A REWRITE stage writes every sample but the refused ones (named in its manifest).
        kept = statuses.count(KEPT) if stage.mode == DROP else sum(status not in REFUSED for status in statuses)
        by_split.setdefault(job.split, {})[job.name] = kept
        read_by_split.setdefault(job.split, {})[job.name] = len(statuses)
    for split, counts in by_split.items():
        expected = read_sizes(input_dir / split)
        if stage.mode == REWRITE and any(expected.get(name, n) != n for name, n in read_by_split[split].items()):
            raise RuntimeError(f"{split}: sample counts differ from the input's {SIZES_FILE}")
        write_sizes(out / split, {name: count for name, count in counts.items() if count or stage.mode == REWRITE})
    manifest = out / f"{stage.name}_manifest.parquet"
    # The manifest and stats.json are written anew (when the input has a manifest at all): a DROP
    # stage drops samples, and a REWRITE stage leaves out the refused ones.
    _copy_dataset_files(input_dir, out, frozenset({manifest_lib.MANIFEST_FILE, STATS_FILE}))
    if (input_dir / manifest_lib.MANIFEST_FILE).is_file():
        _write_dataset_manifest(stage, tables, input_dir, out)
    table = pa.concat_tables(tables).replace_schema_metadata(
        {"audiodata.stage": stage.name, "audiodata.settings": json.dumps(stage.settings, sort_keys=True)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(manifest, buffer.getvalue())
    return table, manifest


@dataclass(frozen=True)
class _Dropped:
    reason: str  # the manifest's `error`: STAGE:REASON
    detail: str | None
    duration: float


def _dropped_samples(stage: Stage, tables: list[pa.Table]) -> dict[tuple[str, str], _Dropped]:
    """(SPLIT/SHARD, key) -> why, for each sample the stage did not keep (a key a shard holds twice
    and keeps once is kept). Only the dropped rows become Python objects."""
    dropped: dict[tuple[str, str], _Dropped] = {}
    refused = pa.array(REFUSED, pa.string())
    for table in tables:  # one shard's rows
        kept = pc.equal(table["status"], KEPT) if stage.mode == DROP else \
            pc.invert(pc.is_in(table["status"], value_set=refused))
        gone = table.filter(pc.invert(kept))
        twice = set(table.filter(pc.and_(kept, pc.is_in(table["key"], value_set=gone["key"].combine_chunks())))
                    .column("key").to_pylist())
        for row in gone.to_pylist():
            where = (f"{row['split']}/{row['shard']}", row["key"])
            if row["key"] not in twice and where not in dropped:
                duration = row.get("duration")
                dropped[where] = _Dropped(manifest_lib.stage_reason(stage.name, row["status"]),
                                          stage.detail(row) if stage.detail is not None else None,
                                          float(duration) if isinstance(duration, (int, float)) else 0.0)
    return dropped


def _drop_from_row(row: dict[str, Any], dropped: dict[tuple[str, str], _Dropped]) -> dict[str, Any]:
    """An input manifest row as the output holds it: without the samples the stage dropped, and
    `dropped` with the stage's reason when none is left."""
    if row["status"] != manifest_lib.STATUS_OK:
        return row
    gone = [(key, dropped[(row["shard"], key)]) for key in row["sample_keys"] if (row["shard"], key) in dropped]
    if not gone:
        return row
    keys = [key for key in row["sample_keys"] if (row["shard"], key) not in dropped]
    row = {**row, "sample_keys": keys, "n_samples": len(keys)}
    if keys:  # partly dropped: still kept, with its other samples' seconds
        row["output_duration"] = max(0.0, row["output_duration"] - sum(why.duration for _, why in gone))
        return row
    first = gone[0][1]
    details = "; ".join(f"{key}: {why.detail}" if len(gone) > 1 else why.detail
                        for key, why in gone if why.detail)
    return {**row, "status": manifest_lib.STATUS_DROPPED, "error": first.reason, "error_detail": details or None,
            "output_duration": 0.0}


def _write_dataset_manifest(stage: Stage, tables: list[pa.Table], input_dir: UPath, out: UPath) -> None:
    """A stage's output manifest.parquet and stats.json, streamed from the input's manifest."""
    dropped = _dropped_samples(stage, tables)

    def rows() -> Iterator[pa.Table]:
        for table in manifest_lib.iter_tables(input_dir / manifest_lib.MANIFEST_FILE):
            yield pa.Table.from_pylist([_drop_from_row(row, dropped) for row in table.to_pylist()],
                                       schema=manifest_lib.SCHEMA)

    write_merged(out, rows(), {})


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("audiodata", "torch", "transformers", "keybert", "sentence-transformers", "faiss-cpu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"versions": found}


def options_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as JSON-ready settings (paths as strings)."""
    return json.loads(json.dumps(asdict(obj), default=str))


__all__ = ["DROP", "KEPT", "READ", "REWRITE", "RunOptions", "RunSummary", "ShardJob", "Stage", "as_json",
           "dataset_identity", "run_stage", "options_dict"]
