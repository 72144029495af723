"""`audiodata dedup`: duplicate clusters within a dataset and leaks into evaluation sets.

Three ways two samples are the same recording, strongest first:
- `exact`: equal sha256 of the decoded PCM (mono, resampled to 16 kHz, 16-bit): two encodings of the
  same audio, even with other bytes; the audio member's own sha256 is recorded beside it.
- `fingerprint`: Wang's landmark hashes (`fingerprint.py`) agree at one time offset: a re-encode,
  resample, gain change, trim or mono/stereo copy, or one clip an excerpt of the other (where it
  lies and how long they overlap are the row's `matched_span`). Matching runs over hash partitions
  (`match.py`, Ray tasks), never every clip's hashes in one process.
- `embedding`: CLAP audio embeddings (from `audiodata embed`) within --embedding-threshold cosine
  (`embed_match.py`: IVF index parts of at most 2M vectors built in Ray tasks, range searches in others).

The driver holds the list of fingerprint parts, the links (two per matched sample at most) and the
rows of the linked samples, never a row per sample: PCM digests are grouped a bucket at a time
(spooled under `_work/exact/` above EXACT_BUCKET_ITEMS samples), the clusters' rows are read from
the parts that hold linked samples, and embedding matching runs in Ray tasks that read the vectors
from the embed outputs (`embed_match.py`).

Matched samples form clusters (connected components). A cluster holding an item of an --against
set is an evaluation leak: all its dataset samples are `eval_overlap`, none is kept. Otherwise one
sample per cluster is kept by --keep (longest, best licence, or first in dataset order; ties go to
the first); a key a shard holds twice is kept once, its later copies `duplicate`. Output:
DATASET/dedup/clusters.parquet (one row per clustered sample); with --apply --out NEW, new shards
without the samples not kept (bytes verbatim, order kept) and a manifest. Fingerprints are cached in
DATASET/fingerprint/ and, for each --against set (never written to: it may be read-only),
DATASET/dedup/against/<its content digest>/; a run is known by its inputs' content, so a moved or
copied dataset resumes, and fingerprints of shards since changed are made again.
"""
from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from audio_dataset.audio import DecodeStream, _Resampler, finite_extremes, set_channels
from audio_dataset.curate import fingerprint as fp
from audio_dataset.curate import embed_match
from audio_dataset.curate import match as matching
from audio_dataset.curate.match import FINGERPRINT_SCHEMA, part_columns
from audio_dataset.curate.common import NO_AUDIO, OK, audio_bytes, sample_meta
from audio_dataset.licenses import classify, permissiveness
from audio_dataset.manifest import write_parquet
from audio_dataset.shards import Sample, file_sha256
from audio_dataset.source import ItemError, UserError
from audio_dataset.stage_runner import DROP, KEPT, READ, RunOptions, RunSummary, ShardJob, Stage, _raise_user_errors, \
    as_json, check_run, dataset_identity, find_jobs, run_stage
from audio_dataset.lock import hold_output
from audio_dataset.raystart import start_ray
from audio_dataset.storage import atomic_write_bytes, atomic_write_json, location, read_json, trust_output

FINGERPRINT_STAGE = "fingerprint"
DEDUP_STAGE = "dedup"
KEEP_RULES = ("longest", "license", "first")
EXACT, FINGERPRINT, EMBEDDING, EVAL_OVERLAP = "exact", "fingerprint", "embedding", "eval_overlap"
DUPLICATE = "duplicate"
_STRENGTH = {EXACT: 3, FINGERPRINT: 2, EMBEDDING: 1}
PCM_RATE = 16_000

CLUSTER_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("cluster", pa.int64()),
    ("kind", pa.string()), ("method", pa.string()), ("score", pa.float64()), ("matched_key", pa.string()),
    ("matched_set", pa.string()), ("keep", pa.bool_()), ("bytes_sha256", pa.string()), ("pcm_sha256", pa.string()),
    # [offset_s, length_s]: where the shorter of the two clips starts in the longer, and how long they
    # overlap (an excerpt: its position and length); null for an embedding match.
    ("matched_span", pa.list_(pa.float64())),
])
APPLY_SCHEMA = pa.schema([
    ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("cluster", pa.int64()), ("matched_key", pa.string()), ("duration", pa.float64()),
])
FINGERPRINT_SETTINGS = {"method": "wang2003-landmarks-anchor+4", "rate": fp.RATE, "n_fft": fp.N_FFT, "hop": fp.HOP,
                        "peaks_per_second": fp.PEAKS_PER_SECOND, "fanout": fp.FANOUT, "partners": fp.PARTNERS,
                        "shifts": list(fp.SHIFTS),
                        "block_seconds": fp.MAX_SECONDS, "block_overlap": fp.BLOCK_OVERLAP, "whole_clip": True,
                        "pcm_hash": f"sha256 of mono {PCM_RATE} Hz int16", "non_finite": NO_AUDIO}
MATCH_SETTINGS = {"min_count": fp.MIN_COUNT, "min_fraction": fp.MIN_FRACTION, "stop_floor": fp.STOP_FLOOR,
                  "stop_fraction": fp.STOP_FRACTION}


# ---------------------------------------------------------------------------- per-sample fingerprints
def pcm_digest(wave: np.ndarray) -> str:
    return hashlib.sha256(_pcm16(wave)).hexdigest()


def _pcm16(wave: np.ndarray) -> bytes:
    return np.clip(np.round(wave * 32767.0), -32768, 32767).astype("<i2").tobytes()


@dataclass
class Analysis:
    landmarks: fp.Fingerprint
    pcm_sha256: str
    duration: float


def analyse(data: bytes) -> Analysis:
    """A clip's landmarks and PCM digest, decoded as a stream: memory is bounded at any length (the
    landmarks cover the whole clip). Raises ItemError for audio that does not decode."""
    stream = DecodeStream(data)
    digest = hashlib.sha256()
    resamplers: dict[int, _Resampler] = {}

    def mono_blocks():  # -> mono blocks at the fingerprint rate; the PCM digest fed on the way
        for block in stream:
            # As build refuses it: the resampler would spread a NaN or inf over every sample, and
            # two such clips would share one PCM digest (an exact copy of each other).
            if block.size:
                finite_extremes(block)
            mono = set_channels(block, 1, stream.channel_names)
            if not resamplers:
                resamplers.update({rate: _Resampler(stream.sample_rate, rate, 1) for rate in (fp.RATE, PCM_RATE)})
            digest.update(_pcm16(resamplers[PCM_RATE](mono)[0]))
            yield resamplers[fp.RATE](mono)[0]
        if resamplers:
            digest.update(_pcm16(resamplers[PCM_RATE].flush()[0]))
            yield resamplers[fp.RATE].flush()[0]

    landmarks = fp.fingerprint_blocks(mono_blocks())
    return Analysis(landmarks, digest.hexdigest(), stream.frames / stream.sample_rate)


class FingerprintProcessor:
    def __init__(self, device: str) -> None:
        del device  # numpy only

    def process(self, job: ShardJob, samples: list[Sample]) -> tuple[list[Sample], list[dict[str, Any]]]:
        rows = []
        for sample in samples:
            meta, data = sample_meta(sample), audio_bytes(sample)
            row = {"split": job.split, "shard": job.name, "key": sample["__key__"], "source": meta.get("source"),
                   "license": meta.get("license"), "duration": meta.get("duration"), "status": NO_AUDIO,
                   "bytes_sha256": hashlib.sha256(data).hexdigest() if data else None, "pcm_sha256": None,
                   "hashes": [], "times": []}
            try:
                found = analyse(data or b"")
            except ItemError:
                rows.append(row)
                continue
            row.update(status=OK, pcm_sha256=found.pcm_sha256, hashes=found.landmarks.hashes,
                       times=found.landmarks.times)
            if not isinstance(meta.get("duration"), (int, float)):
                row["duration"] = found.duration
            rows.append(row)
        return [], rows


def _make_fingerprint(device: str) -> FingerprintProcessor:
    return FingerprintProcessor(device)


def fingerprint_dirs(dataset: UPath, against: list[UPath]) -> list[tuple[UPath, UPath]]:
    """(set, where its fingerprints go) for the dataset and each --against set. An evaluation set's
    go under the dataset, named by its content: it may be read-only, and a moved copy is the same set."""
    cache = dataset / DEDUP_STAGE / "against"
    return [(dataset, dataset / FINGERPRINT_STAGE),
            *((path, cache / dataset_identity(path).removeprefix("sha256:")[:32]) for path in against)]


def fingerprint_dataset(dataset: UPath, run: RunOptions, out: UPath | None = None) -> RunSummary:
    """OUT (default DATASET/fingerprint)/SPLIT/NNNNNN.parquet, resumable per shard like every stage.
    Fingerprints of another version of the dataset (its shards changed) are stale: done again."""
    out = out if out is not None else dataset / FINGERPRINT_STAGE
    record = out / f".{FINGERPRINT_STAGE}" / "run.json"
    if record.exists() and (read_json(record).get("input_digest") != dataset_identity(dataset)
                            or read_json(record).get("settings") != as_json(FINGERPRINT_SETTINGS)):
        for part in out.glob("*/*.parquet"):  # SPLIT/NNNNNN.parquet
            part.unlink()
    stage = Stage(FINGERPRINT_STAGE, FINGERPRINT_SETTINGS, _make_fingerprint, FINGERPRINT_SCHEMA, mode=READ)
    return run_stage(stage, _with(run, dataset, out))


def _with(run: RunOptions, input_dir: UPath, out: UPath) -> RunOptions:
    return replace(run, input=input_dir, out=out)


# ---------------------------------------------------------------------------------------- matching
@dataclass
class Items:
    """The dataset's samples (group 0), then each eval set's (groups 1..), numbered in that order
    through their fingerprint parts. The driver holds the list of parts, never a row per sample:
    `rows` reads the rows of the samples it is asked for (the linked ones), a part at a time."""

    parts: list[matching.PrintPart]
    part_groups: list[int]  # each part's group
    sets: list[str]  # group -> folder
    shards: list[tuple[str, str]] = field(default_factory=list)  # each part's (split, shard name)

    @functools.cached_property
    def _bounds(self) -> np.ndarray:  # each part's first id, then the count
        return np.array([p.first for p in self.parts] + [self.count], np.int64)

    @property
    def count(self) -> int:
        return sum(part.rows for part in self.parts)

    def in_group(self, group: int) -> int:
        return sum(part.rows for part, g in zip(self.parts, self.part_groups) if g == group)

    @property
    def first_other(self) -> int | None:
        """The first eval-set item (eval items follow every dataset item), or None without eval sets."""
        return self.in_group(0) if any(self.part_groups) else None

    def by_shard(self) -> dict[tuple[int, str, str], matching.PrintPart]:
        """Each (group, split, shard name)'s part: how embedding matching finds a vector's item."""
        return {(group, *shard): part for part, group, shard in zip(self.parts, self.part_groups, self.shards)}

    def groups(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.part_groups, np.int64)[np.searchsorted(self._bounds, ids, "right") - 1]

    def rows(self, ids: set[int], names: list[str]) -> dict[int, dict[str, Any]]:
        """The columns `names` of each sample in `ids`, read from the parts that hold them."""
        wanted = np.array(sorted(ids), np.int64)
        found: dict[int, dict[str, Any]] = {}
        for index in np.unique(np.searchsorted(self._bounds, wanted, "right") - 1):
            part = self.parts[index]
            table = part_columns(part, names)
            mine = wanted[(wanted >= part.first) & (wanted < part.first + part.rows)]
            for i, row in zip(mine, table.take(pa.array(mine - part.first)).to_pylist()):
                found[int(i)] = row
        return found


def _load_items(sets: list[tuple[UPath, UPath]]) -> Items:
    """`sets`: (dataset, its fingerprints) for the dataset, then each eval set."""
    parts, part_groups, shards, first = [], [], [], 0
    for group, (dataset, prints_dir) in enumerate(sets):
        for job in find_jobs(dataset, prints_dir, FINGERPRINT_STAGE, READ):
            parts.append(matching.part_of(location(job.part), first))
            part_groups.append(group)
            shards.append((job.split, job.name))
            first += parts[-1].rows
    return Items(parts, part_groups, [str(d) for d, _ in sets], shards)


@dataclass(frozen=True)
class Link:
    a: int
    b: int
    kind: str
    score: float
    offset: int = 0  # a fingerprint match's time offset, in frames (`matched_span`)


# Samples whose PCM digests the driver groups at once; more are spooled to WORK in buckets this size.
EXACT_BUCKET_ITEMS = 250_000
_DIGEST_SCHEMA = pa.schema([("item", pa.int64()), ("digest", pa.string())])


class _DigestSpool:
    """PCM digests split by value into `buckets`; with more than one, written under `folder` in
    chunks (at most EXACT_BUCKET_ITEMS rows held), so each bucket is read back and grouped alone."""

    def __init__(self, folder: UPath, buckets: int) -> None:
        self.folder, self.buckets = folder, buckets
        self.held: list[list[pa.Table]] = [[] for _ in range(buckets)]
        self.rows = self.chunks = 0
        if buckets > 1 and folder.exists():
            folder.fs.rm(folder.path, recursive=True)  # an interrupted run's: redone (seconds)

    def add(self, table: pa.Table) -> None:
        table = table.filter(pc.is_valid(table.column("digest")))
        if self.buckets == 1:
            self.held[0].append(table)
            return
        which = np.array([zlib.crc32(d.encode()) for d in table.column("digest").to_pylist()], np.int64) % self.buckets
        for bucket in np.unique(which):
            self.held[bucket].append(table.filter(pa.array(which == bucket)))
        self.rows += table.num_rows
        if self.rows >= EXACT_BUCKET_ITEMS:
            self._flush()

    def _flush(self) -> None:
        for bucket, tables in enumerate(self.held):
            if tables:
                atomic_write_bytes(self.folder / f"b{bucket:05d}" / f"{self.chunks:06d}.parquet",
                                   matching.table_bytes(pa.concat_tables(tables)))
        self.held, self.rows, self.chunks = [[] for _ in range(self.buckets)], 0, self.chunks + 1

    def each(self) -> Iterator[pa.Table]:
        if self.buckets == 1:
            yield pa.concat_tables(self.held[0]) if self.held[0] else _DIGEST_SCHEMA.empty_table()
            return
        self._flush()
        for bucket in range(self.buckets):
            paths = [self.folder / f"b{bucket:05d}" / f"{chunk:06d}.parquet" for chunk in range(self.chunks)]
            yield matching.read_parts(paths, _DIGEST_SCHEMA)
        if self.folder.exists():  # never made when no sample had a digest
            self.folder.fs.rm(self.folder.path, recursive=True)


def exact_links(items: Items, work: UPath) -> list[Link]:
    """Each sample to the first dataset sample with the same decoded PCM, a bucket of digests at a
    time (`_DigestSpool`): the driver never holds every sample's digest."""
    spool = _DigestSpool(work / "exact", max(1, -(-items.count // EXACT_BUCKET_ITEMS)))
    for part in items.parts:
        digests = part_columns(part, ["pcm_sha256"]).column(0)
        spool.add(pa.table([pa.array(np.arange(part.first, part.first + part.rows)), digests], schema=_DIGEST_SCHEMA))
    first_other = items.first_other
    links = []
    for table in spool.each():
        table = table.sort_by([("digest", "ascending"), ("item", "ascending")])
        ids, digests = table.column("item").to_numpy(), table.column("digest").combine_chunks()
        # where a run of equal digests starts (compared in Arrow: no Python string per sample)
        starts = np.r_[True, pc.not_equal(digests[1:], digests[:-1]).to_numpy(zero_copy_only=False)] \
            if len(ids) else np.zeros(0, bool)
        anchor = ids[np.flatnonzero(starts)][np.cumsum(starts) - 1]  # each run's first (smallest) item
        mine = (ids != anchor) & ((anchor < first_other) if first_other is not None else True)
        links += [Link(int(a), int(b), EXACT, 1.0) for a, b in zip(anchor[mine], ids[mine])]
    return sorted(links, key=lambda link: (link.a, link.b))


def _whole(duration: float | None) -> tuple[float, float] | None:
    return (0.0, float(duration)) if isinstance(duration, (int, float)) else None


def matched_span(offset: int, duration_a: float | None, duration_b: float | None) -> tuple[float, float] | None:
    """[offset_s, length_s] of a fingerprint match whose hashes agree at `offset` frames (a time in
    b is that time in a plus the offset): where the shorter clip starts in the longer one (to a
    frame hop), and how long the two overlap at that alignment."""
    if not isinstance(duration_a, (int, float)) or not isinstance(duration_b, (int, float)):
        return None
    shift = offset * fp.HOP / fp.RATE  # b's start lies at -shift seconds in a
    start, end = max(0.0, -shift), min(float(duration_a), float(duration_b) - shift)
    where = start if duration_a >= duration_b else start + shift
    return round(where, 4), round(max(0.0, end - start), 4)


def link_span(link: Link, duration_a: float | None, duration_b: float | None) -> tuple[float, float] | None:
    """A link's `matched_span`: an exact copy overlaps whole, an embedding match has none."""
    if link.kind == EXACT:
        return _whole(duration_b)
    if link.kind == FINGERPRINT:
        return matched_span(link.offset, duration_a, duration_b)
    return None


def fingerprint_links(items: Items, work: UPath, runner: matching.Runner) -> tuple[list[Link], dict[str, Any]]:
    """Fingerprint matches over hash partitions (`match.py`); and the matching's report."""
    plan = matching.plan_matching(work, items.parts, items.first_other)
    result = matching.run_matching(plan, runner)
    return [Link(m.a, m.b, FINGERPRINT, m.score, m.offset) for m in result.matches], result.report


def embedding_links(items: Items, datasets: list[UPath], threshold: float,
                    work: UPath) -> tuple[list[Link], list[str], dict[str, Any]]:
    """Links from CLAP audio embeddings (`embed_match.py`, Ray tasks over the embed outputs), where the
    dataset and each eval set were embedded by one model; the sets without embeddings named; and
    the matching's report (vectors indexed, tasks, their peak memory)."""
    plan, missing = embed_match.plan_matching(work / "embedding", datasets, items.by_shard(), threshold)
    if plan is None:
        return [], missing, {}
    a, b, scores, report = embed_match.match_embeddings(plan, on_ray=len(plan.chunks) > 1)
    links = [Link(int(x), int(y), EMBEDDING, float(s)) for x, y, s in zip(a, b, scores)]
    return sorted(links, key=lambda link: (link.a, link.b)), missing, report


# --------------------------------------------------------------------------------------- clustering
def _components(links: list[Link]) -> dict[int, int]:
    """Each linked item's component, named by its first item: a union-find over the links alone
    (the pair list is small; items without a link are never touched)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ends = np.array([(link.a, link.b) for link in links], np.int64).reshape(-1, 2)
    nodes, compact = np.unique(ends, return_inverse=True)
    compact = compact.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(compact)), (compact[:, 0], compact[:, 1])), shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    first = np.full(len(nodes), len(nodes))
    np.minimum.at(first, label, np.arange(len(nodes)))  # nodes are sorted: the smallest index names it
    return {int(node): int(nodes[first[lab]]) for node, lab in zip(nodes, label)}


def licence_rank(licence: str | None) -> int:
    """Lower is more permissive: CC0/public domain, CC-BY, BY-SA, BY-ND, BY-NC, BY-NC-SA and Sampling+,
    BY-NC-ND, then restricted and unknown licences (read through audio_dataset/licenses.py's table)."""
    return permissiveness(classify(licence)[0])


def _keeper(members: list[int], row: dict[int, dict[str, Any]], rule: str) -> int:
    """The sample a cluster keeps; `members` are in dataset order, so ties go to the first."""
    if rule == "longest":
        return max(members, key=lambda i: (row[i]["duration"] or 0.0, -i))
    if rule == "license":
        return min(members, key=lambda i: (licence_rank(row[i]["license"]), i))
    return members[0]


_ROW_COLUMNS = ["key", "split", "shard", "bytes_sha256", "pcm_sha256", "duration", "license"]


def cluster_rows(items: Items, links: list[Link], rule: str) -> list[dict[str, Any]]:
    """One row per clustered dataset sample: its cluster, the strongest link and whether it is kept.
    Only the linked samples' rows are read."""
    best: dict[int, Link] = {}  # per item, its strongest link
    for link in links:
        for i in (link.a, link.b):
            current = best.get(i)
            if current is None or (_STRENGTH[link.kind], link.score) > (_STRENGTH[current.kind], current.score):
                best[i] = link
    roots = _components(links)
    members_of: dict[int, list[int]] = {}
    linked = sorted(best)
    for i in linked:
        members_of.setdefault(int(roots[i]), []).append(i)
    row = items.rows(set(linked), _ROW_COLUMNS)
    group = dict(zip(linked, items.groups(np.array(linked, np.int64)).tolist()))
    rows = []
    for cluster, (root, members) in enumerate(sorted(members_of.items())):
        dataset_members = [i for i in members if group[i] == 0]
        leaked = [i for i in members if group[i] != 0]
        keeper = None if leaked else _keeper(dataset_members, row, rule)
        for i in dataset_members:
            link = best[i]
            other = link.b if link.a == i else link.a
            if leaked:
                other = other if group[other] else leaked[0]
            span = link_span(link, row[link.a]["duration"], row[link.b]["duration"])
            rows.append({"key": row[i]["key"], "split": row[i]["split"], "shard": row[i]["shard"],
                         "cluster": cluster, "kind": EVAL_OVERLAP if leaked else link.kind, "method": link.kind,
                         "score": link.score, "matched_key": row[other]["key"],
                         "matched_set": items.sets[group[other]], "keep": i == keeper,
                         "bytes_sha256": row[i]["bytes_sha256"], "pcm_sha256": row[i]["pcm_sha256"],
                         "matched_span": list(span) if span is not None else None})
    return rows


# ------------------------------------------------------------------------------------------ the stage
@dataclass(frozen=True)
class DedupOptions:
    against: tuple[UPath, ...] = ()
    keep: str = "longest"
    # Cosine similarity of CLAP audio embeddings at which two clips count as one (needs `embed`).
    embedding_threshold: float = 0.98
    use_embeddings: bool = True
    apply_to: UPath | None = None  # --apply --out NEW

    def check(self) -> None:
        if self.keep not in KEEP_RULES:
            raise UserError(f"--keep must be one of {', '.join(KEEP_RULES)}")
        if not -1.0 <= self.embedding_threshold <= 1.0:
            raise UserError("--embedding-threshold is a cosine similarity in [-1, 1]")
        for path in self.against:
            if not location(path).is_dir():
                raise UserError(f"--against {path}: no such folder")


@dataclass
class DedupResult:
    clusters: UPath
    rows: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    without_embeddings: list[str] = field(default_factory=list)
    applied: RunSummary | None = None


def find_duplicates(dataset: UPath, options: DedupOptions, run: RunOptions) -> DedupResult:
    options.check()
    owns_ray = start_ray(run.ray_address)  # once for every fingerprint run and the matching (seconds each)
    try:
        return _find_duplicates(dataset, options, run)
    except Exception as exc:
        _raise_user_errors(exc)
        raise
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def _find_duplicates(dataset: UPath, options: DedupOptions, run: RunOptions) -> DedupResult:
    datasets = [dataset, *[location(path) for path in options.against]]
    sets = fingerprint_dirs(dataset, datasets[1:])
    for path, prints_dir in sets:
        fingerprint_dataset(path, run, prints_dir)
    out = dataset / DEDUP_STAGE
    with hold_output(trust_output(out / "_work"), DEDUP_STAGE):
        items = _load_items(sets)
        found_prints, report = _match_prints(items, [dataset_identity(path) for path, _ in sets], out / "_work")
        links = exact_links(items, out / "_work") + found_prints
        missing: list[str] = []
        reports = {"fingerprint_matching": report}
        if options.use_embeddings:
            found, missing, reports["embedding_matching"] = embedding_links(
                items, datasets, options.embedding_threshold, out / "_work")
            links += found
        rows = cluster_rows(items, links, options.keep)
        write_parquet(pa.Table.from_pylist(rows, schema=CLUSTER_SCHEMA), out / "clusters.parquet")
        return _summarise(out, items, rows, options, missing, reports)


def _match_prints(items: Items, identities: list[str], work_root: UPath) -> tuple[list[Link], dict[str, Any]]:
    """Fingerprint links from Ray tasks over hash partitions, in WORK/match-DIGEST (named by the inputs'
    content and the settings, so a rerun after a kill resumes; other matchings there are stale)."""
    name = matching.work_name(identities, {**FINGERPRINT_SETTINGS, **MATCH_SETTINGS,
                                           "partition_hashes": matching.PARTITION_HASHES})
    for stale in work_root.glob("match-*") if work_root.exists() else []:
        if stale.name != name:
            stale.fs.rm(stale.path, recursive=True)
    # The run record: which matching this folder holds, and once done its report (the stop-list).
    record = work_root / f".{DEDUP_STAGE}" / "run.json"
    atomic_write_json(record, {"stage": DEDUP_STAGE, "match": name, "finished": False})
    links, report = fingerprint_links(items, work_root / name, matching.run_on_ray)
    atomic_write_json(record, {"stage": DEDUP_STAGE, "match": name, "finished": True, "report": report})
    return links, report


def _summarise(out: UPath, items: Items, rows: list[dict[str, Any]], options: DedupOptions, missing: list[str],
               reports: dict[str, Any]) -> DedupResult:
    # "kept" means what it means in every stage: the samples that stay (unclustered ones included).
    samples = items.in_group(0)
    counts = {"samples": samples, "kept": samples - sum(not r["keep"] for r in rows),
              DUPLICATE: sum(not r["keep"] and r["kind"] != EVAL_OVERLAP for r in rows),
              EVAL_OVERLAP: sum(r["kind"] == EVAL_OVERLAP for r in rows), "clustered": len(rows)}
    atomic_write_json(out / "summary.json", {"counts": counts, "keep": options.keep, "against": items.sets[1:],
                                             "embedding_threshold": options.embedding_threshold,
                                             "without_embeddings": missing, "fingerprint": FINGERPRINT_SETTINGS,
                                             **reports})
    return DedupResult(out / "clusters.parquet", rows, counts, missing)


Drop = tuple[str, int | None, str | None]  # (duplicate | eval_overlap, cluster, matched key)


def drop_of(drops: dict[str, Drop], job: ShardJob, key: str, seen: set[str]) -> Drop | None:
    """Why the sample `key` of this shard is not kept, or None: what dedup did not keep, and any
    later copy of a key the shard already held (the first copy stays, so the clip is kept once)."""
    if key in seen:
        return DUPLICATE, None, key
    seen.add(key)
    return drops.get(f"{job.split}/{job.name}/{key}")


class DropProcessor:
    """Keeps the samples a table of drops does not name; each sample's row says which and why."""

    def __init__(self, drops: dict[str, Drop], device: str) -> None:
        del device
        self.drops = drops

    def process(self, job: ShardJob, samples: list[Sample]) -> tuple[list[Sample], list[dict[str, Any]]]:
        kept, rows, seen = [], [], set()
        for sample in samples:
            status, cluster, matched = drop_of(self.drops, job, sample["__key__"], seen) or (KEPT, None, None)
            if status == KEPT:
                kept.append(sample)
            duration = sample_meta(sample).get("duration")
            rows.append({"split": job.split, "shard": job.name, "key": sample["__key__"], "status": status,
                         "cluster": cluster, "matched_key": matched,
                         "duration": duration if isinstance(duration, (int, float)) else None})
        return kept, rows


def _make_drop(drops: dict[str, Drop], device: str) -> DropProcessor:
    return DropProcessor(drops, device)


def dropped_samples(rows: list[dict[str, Any]]) -> dict[str, Drop]:
    """SPLIT/SHARD/KEY -> (duplicate | eval_overlap, cluster, matched key) of each sample its cluster
    does not keep (rows of the clusters table). A key a shard holds twice, one copy kept, is kept."""
    kept = {f"{r['split']}/{r['shard']}/{r['key']}" for r in rows if r["keep"]}
    drops = {f"{r['split']}/{r['shard']}/{r['key']}": (EVAL_OVERLAP if r["kind"] == EVAL_OVERLAP else DUPLICATE,
                                                       r["cluster"], r["matched_key"]) for r in rows if not r["keep"]}
    return {where: drop for where, drop in drops.items() if where not in kept}


def drop_detail(row: dict[str, Any]) -> str | None:
    """A dropped sample's row (dedup's or filter's) as the output manifest's `error_detail`."""
    matched = row.get("matched_key")
    if matched is None:
        return None
    cluster = f" (cluster {row['cluster']})" if row.get("cluster") is not None else ""
    if row["status"] == EVAL_OVERLAP:
        return f"matches {matched} of an evaluation set{cluster}"
    return f"duplicate of {matched}{cluster}"


def run_dedup(dataset: UPath, options: DedupOptions, run: RunOptions) -> DedupResult:
    """Find the clusters; with `apply_to`, write the dataset without the samples not kept."""
    if options.apply_to is not None:
        check_run(_with(run, dataset, options.apply_to))
    result = find_duplicates(dataset, options, run)
    if options.apply_to is None:
        return result
    settings = {"clusters": file_sha256(result.clusters), "keep": options.keep}
    drops = dropped_samples(result.rows)
    stage = Stage(DEDUP_STAGE, settings, functools.partial(_make_drop, drops), APPLY_SCHEMA, mode=DROP,
                  detail=drop_detail)
    result.applied = run_stage(stage, _with(run, dataset, options.apply_to))
    return result


__all__ = ["DedupOptions", "DedupResult", "find_duplicates", "fingerprint_dataset", "licence_rank", "run_dedup"]
