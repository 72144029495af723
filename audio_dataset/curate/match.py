"""Fingerprint matching over hash partitions, so no process holds every clip's hashes.

Three rounds of tasks (Ray tasks, one CPU each; or in this process), each resumable by its marker:
1. map: a few fingerprint parts (the fingerprint stage's per-shard parquet) -> their hash occurrences
   (hash, item, time) split into `partitions` hash ranges, one parquet per (range, map task) under WORK;
2. hash: one hash range, all its occurrences -> the stop-list (hashes in more than
   `fingerprint.stop_threshold(items)` clips) and the candidate votes, summed per (pair, offset) and
   split by pair into as many pair ranges (a pair's votes come from many hash ranges; chance
   collisions make the votes about as many as the occurrences);
3. pair: one pair range, all its votes -> the matches (`fingerprint.best_matches`).
The driver holds the list of parts and the matches (the pair list, small), never the hashes. Each
task's memory is its partition: the plan sizes partitions to about PARTITION_HASHES occurrences, and
the report records each one's size and each task's peak memory. The result equals
`fingerprint.match_all` over the same fingerprints.
"""
from __future__ import annotations

import io
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from audio_dataset.curate import fingerprint as fp
from audio_dataset.curate.common import read_columns
from audio_dataset.source import UserError
from audio_dataset.storage import atomic_write_bytes, atomic_write_json, open_data, read_json, trust_output

# Hash occurrences per partition (16 bytes each, a few copies while sorting: ~0.5 GB a task).
PARTITION_HASHES = 8_000_000
OCCURRENCE_SCHEMA = pa.schema([("hash", pa.uint64()), ("item", pa.uint32()), ("time", pa.int32())])
VOTE_SCHEMA = pa.schema([("pair", pa.uint64()), ("offset", pa.int32()), ("count", pa.int64())])
MATCH_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("count", pa.int64()), ("score", pa.float64()),
                          ("offset", pa.int64())])

# What the fingerprint stage writes per shard (dedup.py), and what the matching reads of it.
FINGERPRINT_SCHEMA = pa.schema([
    ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("source", pa.string()),
    ("license", pa.string()), ("duration", pa.float64()), ("status", pa.string()),
    ("bytes_sha256", pa.string()), ("pcm_sha256", pa.string()),
    ("hashes", pa.list_(pa.uint64())), ("times", pa.list_(pa.int32())),
])


@dataclass(frozen=True)
class PrintPart:
    """One fingerprint parquet (rows of hashes and times) and the id of its first row."""

    path: str
    first: int
    rows: int
    hashes: int


@dataclass(frozen=True)
class MatchPlan:
    work: str  # the folder of this matching's files
    parts: tuple[PrintPart, ...]
    items: int
    first_other: int | None  # the first eval-set item: pairs among eval items are not wanted
    threshold: int  # the stop-list's: a hash in more clips is not matched
    partitions: int
    pair_partitions: int
    map_groups: tuple[tuple[int, ...], ...]  # parts per map task

    @property
    def root(self) -> UPath:
        return UPath(self.work)


@dataclass
class MatchResult:
    matches: list[fp.Match]
    report: dict[str, Any] = field(default_factory=dict)


def part_of(path: UPath, first: int) -> PrintPart:
    """A fingerprint part's rows and hash count from its footer alone."""
    try:
        with open_data(path) as handle:
            meta = pq.ParquetFile(handle).metadata
            column = next(i for i in range(meta.num_columns)
                          if meta.row_group(0).column(i).path_in_schema.startswith("hashes.")) \
                if meta.num_row_groups else None
            hashes = sum(meta.row_group(g).column(column).num_values for g in range(meta.num_row_groups)) \
                if column is not None else 0
            return PrintPart(str(path), first, meta.num_rows, hashes)
    except (OSError, ValueError, StopIteration, pa.ArrowException) as exc:
        raise UserError(f"{path}: unreadable fingerprint part ({str(exc)[:120]}); remove it to fingerprint "
                        "its shard again") from None


def part_columns(part: PrintPart, names: list[str]) -> pa.Table:
    """Some columns of a fingerprint part, as listed: a part edited, retyped or cut since it was
    listed (anyone may write there) is one line naming it, never a traceback or a shifted id."""
    try:
        table = read_columns(UPath(part.path), names)
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise UserError(f"{part.path}: unreadable fingerprint part ({str(exc)[:120]}); rerun, or remove it to "
                        "fingerprint its shard again") from None
    if missing := [name for name in names if name not in table.column_names]:
        raise UserError(f"{part.path}: unreadable fingerprint part (no {', '.join(missing)}); rerun, or remove it "
                        "to fingerprint its shard again")
    wrong = [f"{name} {table.schema.field(name).type}" for name in names
             if table.schema.field(name).type != FINGERPRINT_SCHEMA.field(name).type]
    if table.num_rows != part.rows or wrong:
        raise UserError(f"{part.path}: not the fingerprint part it was ({table.num_rows} rows of {part.rows}"
                        f"{', ' + ', '.join(wrong) if wrong else ''}); rerun, or remove it to fingerprint its "
                        "shard again")
    return table


def plan_matching(work: UPath, parts: list[PrintPart], first_other: int | None,
                  partition_hashes: int = PARTITION_HASHES) -> MatchPlan:
    items = sum(p.rows for p in parts)
    total = sum(p.hashes for p in parts)
    partitions = max(1, -(-total // partition_hashes))
    groups, current, size = [], [], 0
    for index, part in enumerate(parts):
        if current and size + part.hashes > partition_hashes:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(index)
        size += part.hashes
    if current:
        groups.append(tuple(current))
    return MatchPlan(str(work), tuple(parts), items, first_other, fp.stop_threshold(items), partitions,
                     partitions, tuple(groups))


# ---------------------------------------------------------------------------------------------- tasks
def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: kB


def _done(plan: MatchPlan, name: str) -> UPath:
    return plan.root / "done" / f"{name}.json"


def table_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="lz4")
    return buffer.getvalue()


def _read_table(path: UPath, schema: pa.Schema | None = None) -> pa.Table:
    """A parquet file; with `schema`, one of this matching's own files, which anyone may have edited:
    it must have exactly those columns and types."""
    try:
        with open_data(path) as handle:
            table = pq.read_table(pa.BufferReader(handle.read()))
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: unreadable ({str(exc)[:120]}); remove {path.parent} to match again") from None
    if schema is not None and not table.schema.remove_metadata().equals(schema):
        columns = ", ".join(f"{f.name} {f.type}" for f in table.schema)
        raise UserError(f"{path}: not this matching's file (columns {columns}); remove {path.parent} to match again")
    return table


_STATS = {"m": ("hashes", "peak_rss_mb"),
          "h": ("hashes", "votes", "stopped_hashes", "stopped_occurrences", "peak_rss_mb"),
          "r": ("votes", "matches", "peak_rss_mb")}  # what the driver reads of each task's marker


def _bucket(values: np.ndarray, buckets: int) -> np.ndarray:
    """A well-mixed bucket of each value (a hash's top bits are its anchor's frequency: skewed)."""
    mixed = (values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (mixed % np.uint64(buckets)).astype(np.int64)


def _resumed(plan: MatchPlan, name: str) -> dict[str, Any] | None:
    marker = _done(plan, name)
    if not marker.exists():
        return None
    stats = read_json(marker)
    if not all(isinstance(stats.get(key), (int, float)) and not isinstance(stats.get(key), bool)
               for key in _STATS[name[0]]):
        raise UserError(f"{marker}: not a finished task's record; remove {plan.root} to match again")
    return {**stats, "resumed": True}


def map_task(plan: MatchPlan, index: int) -> dict[str, Any]:
    """Map task `index`: its parts' occurrences split by hash range, and its items' hash counts."""
    trust_output(plan.root.parent)  # in a fresh Ray worker too: its writes refuse planted links
    name = f"m{index:06d}"
    if (stats := _resumed(plan, name)) is not None:
        return stats
    hashes, times, items, sizes = [], [], [], []
    for part in (plan.parts[i] for i in plan.map_groups[index]):
        try:
            table = _read_table(UPath(part.path)).select(["hashes", "times"])
        except KeyError:
            raise UserError(f"{part.path}: not a fingerprint part (no hashes/times)") from None
        h, t = (table.column(c).combine_chunks() for c in ("hashes", "times"))
        # Resume state anyone may have left: an earlier version's keys (list<uint32>), signed or
        # text keys would be cast silently below and mixed with these; nulls cannot be matched.
        if h.type != pa.list_(pa.uint64()) or t.type != pa.list_(pa.int32()) \
                or h.values.null_count or t.values.null_count:
            raise UserError(f"{part.path}: not a fingerprint part of this version (hashes {h.type}, times {t.type}"
                            f"{', with nulls' if h.values.null_count or t.values.null_count else ''}); "
                            "remove it to fingerprint its shard again")
        lengths = np.diff(h.offsets.to_numpy())
        if table.num_rows != part.rows or not np.array_equal(lengths, np.diff(t.offsets.to_numpy())):
            raise UserError(f"{part.path}: hashes and times disagree (changed while matching?); rerun, or remove "
                            "it to fingerprint its shard again")
        hashes.append(h.values.to_numpy().astype(np.uint64)), times.append(t.values.to_numpy().astype(np.int32))
        items.append(np.repeat(np.arange(part.first, part.first + part.rows, dtype=np.uint32), lengths))
        sizes.append(lengths.astype(np.int64))
    h, t, it = np.concatenate(hashes), np.concatenate(times), np.concatenate(items)
    bucket = _bucket(h, plan.partitions)
    order = np.argsort(bucket, kind="stable")
    h, t, it, bucket = h[order], t[order], it[order], bucket[order]
    bounds = np.searchsorted(bucket, np.arange(plan.partitions + 1))
    for k in range(plan.partitions):
        lo, hi = bounds[k], bounds[k + 1]
        if hi > lo:
            table = pa.table([pa.array(h[lo:hi]), pa.array(it[lo:hi]), pa.array(t[lo:hi])], schema=OCCURRENCE_SCHEMA)
            atomic_write_bytes(plan.root / "hashes" / f"p{k:05d}" / f"{name}.parquet", table_bytes(table))
    buffer = io.BytesIO()
    np.save(buffer, np.concatenate(sizes), allow_pickle=False)
    atomic_write_bytes(plan.root / "sizes" / f"{name}.npy", buffer.getvalue())
    stats = {"task": name, "parts": len(plan.map_groups[index]), "hashes": int(len(h)), "peak_rss_mb": peak_rss_mb()}
    atomic_write_json(_done(plan, name), stats)
    return stats


def read_parts(paths: list, schema: pa.Schema) -> pa.Table:
    """The parts written so far (a task that had nothing for this range wrote none), as one table."""
    tables = [_read_table(path, schema) for path in paths if path.exists()]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def hash_task(plan: MatchPlan, k: int) -> dict[str, Any]:
    """Hash range `k`: the stop-list and the candidate votes, split by pair range."""
    trust_output(plan.root.parent)  # in a fresh Ray worker too: its writes refuse planted links
    name = f"h{k:05d}"
    if (stats := _resumed(plan, name)) is not None:
        return stats
    folder = plan.root / "hashes" / f"p{k:05d}"
    table = read_parts([folder / f"m{m:06d}.parquet" for m in range(len(plan.map_groups))], OCCURRENCE_SCHEMA)
    occurrences = table.num_rows
    columns = [table.column(c).to_numpy() for c in ("hash", "time", "item")]
    del table
    votes = fp.candidate_votes(*columns, threshold=plan.threshold, first_other=plan.first_other)
    del columns
    bucket = _bucket(votes.pair, plan.pair_partitions)
    for r in range(plan.pair_partitions):
        mine = bucket == r
        if mine.any():
            out = pa.table([pa.array(votes.pair[mine]), pa.array(votes.offset[mine]), pa.array(votes.count[mine])],
                           schema=VOTE_SCHEMA)
            atomic_write_bytes(plan.root / "votes" / f"r{r:05d}" / f"{name}.parquet", table_bytes(out))
    stats = {"task": name, "hashes": int(occurrences), "votes": int(len(votes.pair)),
             "stopped_hashes": votes.stopped_hashes, "stopped_occurrences": votes.stopped_occurrences,
             "peak_rss_mb": peak_rss_mb()}
    atomic_write_json(_done(plan, name), stats)
    return stats


def pair_task(plan: MatchPlan, r: int) -> dict[str, Any]:
    """Pair range `r`: all its votes summed, the best offset per pair, the matches."""
    trust_output(plan.root.parent)  # in a fresh Ray worker too: its writes refuse planted links
    name = f"r{r:05d}"
    if (stats := _resumed(plan, name)) is not None:
        return stats
    folder = plan.root / "votes" / f"r{r:05d}"
    table = read_parts([folder / f"h{k:05d}.parquet" for k in range(plan.partitions)], VOTE_SCHEMA)
    votes = fp.aggregate(table.column("pair").to_numpy(), table.column("offset").to_numpy().astype(np.int64),
                         table.column("count").to_numpy())
    _check_pairs(plan, folder, votes.pair >> np.uint64(32), votes.pair & np.uint64(0xFFFFFFFF))
    matches = fp.best_matches(votes, _sizes(plan))
    out = pa.table({"a": [m.a for m in matches], "b": [m.b for m in matches], "count": [m.count for m in matches],
                    "score": [m.score for m in matches], "offset": [m.offset for m in matches]}, schema=MATCH_SCHEMA)
    atomic_write_bytes(plan.root / "pairs" / f"{name}.parquet", table_bytes(out))
    stats = {"task": name, "votes": int(table.num_rows), "matches": len(matches), "peak_rss_mb": peak_rss_mb()}
    atomic_write_json(_done(plan, name), stats)
    return stats


def _check_pairs(plan: MatchPlan, where: UPath, a: np.ndarray, b: np.ndarray) -> None:
    """Pairs read back from this matching's files name items of the plan, a < b."""
    if len(a) and not (np.all(np.asarray(a) < np.asarray(b)) and np.all(np.asarray(b) < plan.items)
                       and np.all(np.asarray(a) >= 0)):
        raise UserError(f"{where}: pairs of items the plan does not hold; remove {plan.root} to match again")


def _sizes(plan: MatchPlan) -> np.ndarray:
    """Each item's hash count (8 bytes a clip: the one per-clip array a pair task holds)."""
    sizes = []
    for m in range(len(plan.map_groups)):
        path = plan.root / "sizes" / f"m{m:06d}.npy"
        try:
            with open_data(path) as handle:
                found = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{path}: unreadable ({str(exc)[:120]}); remove {plan.root} to match again") from None
        if found.dtype != np.int64 or found.ndim != 1:
            raise UserError(f"{path}: not hash counts ({found.dtype}, {found.ndim}-d); remove {plan.root} "
                            "to match again")
        sizes.append(found)
    found = np.concatenate(sizes) if sizes else np.empty(0, np.int64)
    if len(found) != plan.items:
        raise UserError(f"{plan.root}: item counts disagree with the plan; remove it to match again")
    return found


# ------------------------------------------------------------------------------------------ the driver
Runner = Callable[[Callable[[MatchPlan, int], dict[str, Any]], MatchPlan, int], list[dict[str, Any]]]


def run_inline(task: Callable[[MatchPlan, int], dict[str, Any]], plan: MatchPlan, count: int) -> list[dict[str, Any]]:
    return [task(plan, i) for i in range(count)]


def run_on_ray(task: Callable[[MatchPlan, int], dict[str, Any]], plan: MatchPlan, count: int) -> list[dict[str, Any]]:
    """One Ray task per partition, one CPU each: as many at once as the cluster has CPUs, so memory is
    a partition's per CPU. The plan goes to the object store once."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=1)(task)
    plan_ref = ray.put(plan)
    return ray.get([remote.remote(plan_ref, i) for i in range(count)])


def run_matching(plan: MatchPlan, runner: Runner = run_inline) -> MatchResult:
    """The matches of the plan's fingerprints; a rerun after a kill redoes only unfinished tasks."""
    started = time.monotonic()
    record = plan.root / "match.json"
    if record.exists():  # a finished matching of the same inputs (the work folder is named by them)
        report = read_json(record)
        return MatchResult(_read_matches(plan), {**report, "resumed": True})
    atomic_write_json(plan.root / "plan.json", {**asdict(plan), "parts": len(plan.parts)})
    maps = runner(map_task, plan, len(plan.map_groups))
    hashes = runner(hash_task, plan, plan.partitions)
    pairs = runner(pair_task, plan, plan.pair_partitions)
    matches = _read_matches(plan)
    if sum(s["matches"] for s in pairs) != len(matches):
        raise RuntimeError(f"{plan.root}: pair files disagree with their tasks' counts")
    report = {"items": plan.items, "hashes": sum(s["hashes"] for s in maps), "partitions": plan.partitions,
              "pair_partitions": plan.pair_partitions, "map_tasks": len(plan.map_groups),
              "stop_list": {"rule": f"a hash in more than max({fp.STOP_FLOOR}, {fp.STOP_FRACTION:g} x clips) "
                                    "clips is not matched",
                            "threshold": plan.threshold, "hashes": sum(s["stopped_hashes"] for s in hashes),
                            "occurrences": sum(s["stopped_occurrences"] for s in hashes)},
              "partition_hashes": [s["hashes"] for s in hashes], "votes": sum(s["votes"] for s in hashes),
              "matches": len(matches), "peak_rss_mb": max(s["peak_rss_mb"] for s in maps + hashes + pairs),
              "resumed_tasks": sum(bool(s.get("resumed")) for s in maps + hashes + pairs),
              "seconds": round(time.monotonic() - started, 2)}
    atomic_write_json(record, report)
    _remove_intermediates(plan)
    return MatchResult(matches, report)


def _read_matches(plan: MatchPlan) -> list[fp.Match]:
    matches = []
    for r in range(plan.pair_partitions):
        path = plan.root / "pairs" / f"r{r:05d}.parquet"
        table = _read_table(path, MATCH_SCHEMA)
        _check_pairs(plan, path, table.column("a").to_numpy(), table.column("b").to_numpy())
        matches += [fp.Match(**row) for row in table.to_pylist()]
    return sorted(matches, key=lambda m: (m.a, m.b))


def _remove_intermediates(plan: MatchPlan) -> None:
    """The occurrences and votes (as large as the fingerprints) go once the matches are written."""
    for sub in ("hashes", "votes"):
        folder = plan.root / sub
        if folder.exists():
            folder.fs.rm(folder.path, recursive=True)


def work_name(inputs: list[str], settings: dict[str, Any]) -> str:
    """A matching's folder name: a digest of its inputs' identities and the settings."""
    import hashlib

    text = json.dumps({"inputs": inputs, "settings": settings}, sort_keys=True, default=str)
    return "match-" + hashlib.sha256(text.encode()).hexdigest()[:24]


__all__ = ["FINGERPRINT_SCHEMA", "MatchPlan", "MatchResult", "PrintPart", "part_columns", "part_of", "peak_rss_mb",
           "plan_matching", "read_parts", "run_inline", "run_matching", "run_on_ray", "table_bytes", "work_name"]
