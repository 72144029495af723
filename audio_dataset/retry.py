"""`audiodata build --retry-failed [REASONS]`: redo the failed items of a finished build whose
reasons are transient (a server error, a timeout, a worker that died), in place.

An attempt is `_work/retry-N/`: `index.parquet` (the items, as the listing holds them), `plan/`
(their shards, numbered after every shard the output has), `staged/` (its shards and manifest
parts, written as a build writes them, out of the dataset's sight) and `state.json`. A kill while
its shards are written leaves the dataset as it was; the next `--retry-failed` finishes the
attempt. Once every shard is written the state says `committing`: the shards move into their
splits and the manifest, sizes.json, SHA256SUMS and stats.json are rewritten (each file atomically;
every step redoes cleanly after a kill), then provenance.json records the attempt and the state
says `done`. An item retried keeps its one manifest row, now with the retry's outcome.
"""
from __future__ import annotations

import re
import sys
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from audio_dataset import manifest
from audio_dataset.build import (
    CONFIG_FILE, INDEX_FILE, PLAN_DIR, RETRY_COMMITTING, RETRY_DONE, RETRY_PREFIX, RETRY_RUNNING, RETRY_STAGED,
    RETRY_STATE, WORK_DIR, BuildOptions, BuildSummary, ShardTask, _check_resumable, _index_batches,
    _report_progress, _run_tasks, build, finalize, plan_shards, publish_staged, retry_folders, retry_parts,
    retry_state, run_record,
)
from audio_dataset.listing import INDEX_SCHEMA
from audio_dataset.provenance import PROVENANCE_FILE, record_run
from audio_dataset.shards import shard_paths
from audio_dataset.source import Source, UserError
from audio_dataset.storage import atomic_write_json, read_json, trust_output

TRANSIENT = "transient"  # the name, in REASONS, of manifest.TRANSIENT_REASONS
_REASON = re.compile(r"[a-z0-9_]+")
_PART = re.compile(r"(.+)-([0-9]{6})\.parquet")


def parse_reasons(text: str) -> list[str]:
    """`--retry-failed` REASONS: a comma list of failure reasons, `transient` standing for the named set."""
    names: set[str] = set()
    for name in (part.strip() for part in text.split(",")):
        if name == TRANSIENT:
            names |= manifest.TRANSIENT_REASONS
        elif name in manifest.DROP_REASONS or name == manifest.STATUS_EXCLUDED:
            raise UserError(f"--retry-failed: {name} is a choice the build made, not a failure; "
                            "retrying it gives the same")
        elif not _REASON.fullmatch(name):
            raise UserError(f"--retry-failed: {name!r} is not a failure reason (e.g. http_5xx,timeout)")
        else:
            names.add(name)
    return sorted(names)


def retry_failed(options: BuildOptions, reasons: list[str]) -> BuildSummary:
    """Retry the failed items of the finished build in `options.out` whose reason is in `reasons`
    (or finish an attempt a kill interrupted); the same source options as the build, as a resume."""
    return build(options, held=partial(_retry_held, reasons))


def _retry_held(reasons: list[str], options: BuildOptions, source: Source, out: UPath, excluded: set[str],
                fingerprint: dict[str, Any]) -> BuildSummary:
    from audio_dataset.stats import print_summary

    work = out / WORK_DIR
    if not all(p.exists() for p in (work / CONFIG_FILE, work / INDEX_FILE, out / manifest.MANIFEST_FILE)):
        raise UserError(f"{out} holds no finished build to retry; build it first "
                        "(the same command without --retry-failed)")
    _check_resumable(work, fingerprint)
    plan = plan_shards(options.source, work / INDEX_FILE, work / PLAN_DIR, options.split_ratios,
                       options.samples_per_shard, excluded, options.limit)
    if not all((work / "parts" / t.part_name).exists() for t in plan.tasks):
        raise UserError(f"the build in {out} has not finished; rerun it without --retry-failed first")
    folder = _unfinished(work, reasons)
    if folder is None:
        folder = _start(work, out, reasons, plan.tasks, options.limit)
    if folder is None:
        print(f"nothing to retry: no failed item in {out} has a reason among {', '.join(reasons)}")
        stats = read_json(out / "stats.json") if (out / "stats.json").exists() else {}
        return BuildSummary(out, 0, 0, stats if isinstance(stats, dict) else {})
    tasks = _attempt_tasks(options, folder)
    state = retry_state(folder) or {}
    if state.get("phase") == RETRY_RUNNING:
        staged = trust_output(folder / RETRY_STAGED)
        todo = [t for t in tasks if not (staged / WORK_DIR / "parts" / t.part_name).exists()]
        _report_progress(_run_tasks(todo, source, staged, options, options.workers) if todo else iter(()),
                         len(tasks), len(tasks) - len(todo), options.progress)
        state = {**state, "phase": RETRY_COMMITTING}
        atomic_write_json(folder / RETRY_STATE, state)
    publish_staged(folder, out)
    stats = finalize(out, plan.tasks)
    counts = attempt_counts(folder)
    run = run_record(options, fingerprint)
    run.options["retry_failed"] = {"attempt": folder.name, "reasons": state.get("reasons"), **counts}
    if not _recorded(out, folder.name):  # once, even when a kill came between the record and `done`
        record_run(out, run)
    atomic_write_json(folder / RETRY_STATE, {**state, "phase": RETRY_DONE, **counts})
    print_summary(stats, file=sys.stdout, out=options.summary_out or out)
    print(f"retried {counts['retried']} items: {counts['succeeded']} now ok, {counts['still_failed']} still failed")
    return BuildSummary(out, len(tasks), 0, stats)


def _recorded(out: UPath, attempt: str) -> bool:
    """Whether provenance.json already records this attempt."""
    path = out / PROVENANCE_FILE
    data = read_json(path) if path.exists() else None
    runs = data.get("runs") if isinstance(data, dict) else None
    return isinstance(runs, list) and any(
        isinstance(run, dict) and isinstance(run.get("options"), dict)
        and isinstance(run["options"].get("retry_failed"), dict)
        and run["options"]["retry_failed"].get("attempt") == attempt for run in runs)


def _unfinished(work: UPath, reasons: list[str]) -> UPath | None:
    """The attempt a kill interrupted (running or committing), finished before any other."""
    for _, folder in retry_folders(work):
        state = retry_state(folder)
        if state is not None and state["phase"] != RETRY_DONE:
            if state.get("reasons") != reasons:
                print(f"finishing the retry a kill interrupted ({folder.name}, reasons "
                      f"{', '.join(map(str, state.get('reasons') or []))}); rerun for these reasons after it",
                      file=sys.stderr)
            return folder
    return None


def _start(work: UPath, out: UPath, reasons: list[str], tasks: list[ShardTask], limit: int | None) -> UPath | None:
    """A new attempt for the failed items with these reasons (None when there are none): their
    listing rows, in listing order, and the shard number each split's retry shards start at."""
    ids = _failed_ids(out / manifest.MANIFEST_FILE, reasons)
    if not len(ids):
        return None
    folders = retry_folders(work)
    folder = work / f"{RETRY_PREFIX}{(folders[-1][0] if folders else 0) + 1}"
    batches = (batch.filter(pc.is_in(batch.column("source_id"), value_set=ids))
               for batch in _index_batches(work / INDEX_FILE, limit))
    items = manifest.write_batches(batches, INDEX_SCHEMA, folder / INDEX_FILE)
    first = _next_shards(work, out, tasks, [f for _, f in folders])
    atomic_write_json(folder / RETRY_STATE, {"phase": RETRY_RUNNING, "reasons": reasons, "items": items,
                                             "first_shard": first})
    return folder


def _failed_ids(path: UPath, reasons: list[str]) -> pa.Array:
    """The source ids of the manifest's failed rows with one of these reasons, read a batch at a time."""
    wanted = pa.array(reasons, pa.string())
    found = []
    for batch in manifest.iter_batches(path, columns=["source_id", "status", "error"]):
        keep = pc.and_(pc.equal(batch.column("status"), manifest.STATUS_FAILED),
                       pc.is_in(batch.column("error"), value_set=wanted))
        found.append(batch.column("source_id").filter(pc.fill_null(keep, False)))
    return pa.concat_arrays(found) if found else pa.array([], pa.string())


def _next_shards(work: UPath, out: UPath, tasks: list[ShardTask], attempts: list[UPath]) -> dict[str, int]:
    """Per split, the number after every shard it has: planned, on disk, or an earlier attempt's."""
    last: dict[str, int] = {}

    def seen(split: str, index: int) -> None:
        last[split] = max(last.get(split, -1), index)

    for task in tasks:
        seen(task.split, task.index)
    for split in sorted({t.split for t in tasks}):
        for path in shard_paths(out / split):
            if path.stem.isdigit():
                seen(split, int(path.stem))
    for folder in attempts:
        for part in retry_parts(folder):
            match = _PART.fullmatch(part.name)
            if match:
                seen(match.group(1), int(match.group(2)))
    return {split: index + 1 for split, index in last.items()}


def _attempt_tasks(options: BuildOptions, folder: UPath) -> list[ShardTask]:
    """The attempt's shards: its items planned as a build plans them (the same splits), numbered on
    from the shard its state names per split. The same every time, so a rerun skips what was written."""
    state = retry_state(folder) or {}
    first = state.get("first_shard")
    if not isinstance(first, dict) or not all(isinstance(v, int) and v >= 0 for v in first.values()):
        raise UserError(f"{folder / RETRY_STATE} is damaged; remove {folder} and rerun")
    plan = plan_shards(options.source, folder / INDEX_FILE, folder / PLAN_DIR, options.split_ratios,
                       options.samples_per_shard, set())
    if any(t.split not in first for t in plan.tasks):
        raise UserError(f"{folder / RETRY_STATE} names no first shard for a split it retries; "
                        f"remove {folder} and rerun")
    return [ShardTask(t.split, first[t.split] + t.index, rows=t.rows) for t in plan.tasks]


def attempt_counts(folder: UPath) -> dict[str, int]:
    """How an attempt's items came out: retried, succeeded (now ok), dropped by policy, still failed."""
    counts = {"retried": 0, "succeeded": 0, "dropped": 0, "still_failed": 0}
    for part in retry_parts(folder):
        status = manifest.read_table(part).column("status").to_pylist()
        counts["retried"] += len(status)
        counts["succeeded"] += status.count(manifest.STATUS_OK)
        counts["dropped"] += status.count(manifest.STATUS_DROPPED)
        counts["still_failed"] += status.count(manifest.STATUS_FAILED)
    return counts
