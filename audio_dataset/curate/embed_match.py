"""Embedding matches for `audiodata dedup`: pairs of samples whose CLAP audio embeddings are within a
cosine threshold, found in Ray tasks so that no process holds every vector and the driver none.

- The dataset's vectors (each split's SPLIT.audio.npy, read a chunk at a time) are indexed in
  **index parts** of at most PART_VECTORS rows each: IVF lists of 8-bit codes (`ivfsq`, exact below
  10k vectors: see index.py) trained once, on a sample spread over all of them. One **index task**
  per part adds its rows and writes under WORK the part's index, each row's item and where its
  vector is (split, row), and returns each file's sha256: a query task reads back those bytes or
  refuses (WORK is under OUT, anyone's to write between tasks). With one part, that task trains
  too; with more, a **train task** first hands every index task the same trained, empty index
  (through Ray, never a file).
- **Query tasks**, one per chunk of QUERIES_PER_TASK vectors of the dataset or of an eval set, find
  the chunk's nearest lists once (the parts share them) and read the parts one after another,
  range-searching the chunk in each, `_QUERY_CHUNK` queries at a time, down to SQ_MARGIN below the
  threshold; each candidate pair is scored again from the two full vectors (the index row's read
  back from its .npy) and kept at the threshold, so the scores are exact. Each task returns what
  clustering needs of its pairs (`LinkReducer`: at most two per item), and the driver folds each
  in as it arrives.
A vector's item (its number in dedup's `Items`) is found through its own shard's fingerprint part:
the embed rows name (split, shard, key), and a task reads the keys of the shards its chunk holds (a
key a shard holds twice: its n-th copy in the rows is its n-th in the part).
Memory, flat in the corpus: an index task holds its part (8-bit codes: 512 B a 512-d vector, a
quarter of the vectors) and one chunk; a query task one part at a time, its chunk and the part's
items and places (24 B a vector); the train task its sample (at most MAX_TRAIN vectors) and one chunk; the
driver the list of splits and parts and the reduced pairs.
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from tokenize import TokenError
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from audio_dataset.curate.common import OK
from audio_dataset.curate.embed import embedding_model, split_files
from audio_dataset.curate.index import IndexBuilder, load_index, save_index
from audio_dataset.curate.match import PrintPart, part_columns, peak_rss_mb
from audio_dataset.source import UserError
from audio_dataset.storage import atomic_write_bytes, open_data, trust_output

QUERIES_PER_TASK = 100_000  # vectors a query task searches (and the chunk the index task reads at once)
# Dataset rows an index part holds (whole chunks): ~1.1 GB of 512-d codes, so an index or query task
# stays near 2.2 GB however large the corpus (bench/dedup_scale.py --embeddings; RESULTS.md).
PART_VECTORS = 2_000_000
_QUERY_CHUNK = 512  # queries per range search: one chunk's matches in memory at a time
# How far below the threshold the 8-bit index's scores are taken as candidates: its inner products of
# unit vectors err by ~7e-4 (std; at most 2.5e-3 seen, 8e-3 when trained on only 500 vectors), so
# none at the threshold is lost at 0.02.
SQ_MARGIN = 0.02
_NPY_HEADER_MAX = 10_000  # bytes of .npy header numpy itself will parse
_MAX_DIM = 1 << 16  # an embedding's dimension (CLAP's: 512 or 1024)
_KIND = "ivfsq"  # dedup's index: 8-bit codes, candidates scored again exactly (exact below 10k vectors)
# What writes the index and items under WORK again: dedup removes WORK and rebuilds them every run.
_REMADE_BY = "audiodata dedup"


class LinkReducer:
    """Keeps of a stream of (a, b, score) pairs a subset that loses nothing clustering needs: a
    spanning forest of the pairs (so the same components) plus each item's strongest pair (the
    link `cluster_rows` reports). At most 2 pairs per item, however many pairs match."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.forest: list[tuple[int, int, float]] = []
        self.best: dict[int, tuple[float, int, int]] = {}  # item -> (score, a, b)

    def _root(self, i: int) -> int:
        parent = self.parent
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def offer(self, a: np.ndarray, b: np.ndarray, scores: np.ndarray) -> None:
        for i in np.argsort(-scores, kind="stable"):
            x, y, score = int(a[i]), int(b[i]), float(scores[i])
            rx, ry = self._root(x), self._root(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)
                self.forest.append((x, y, score))
            for item in (x, y):
                if item not in self.best or _rank(score, x, y) > _rank(*self.best[item]):
                    self.best[item] = (score, x, y)

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = {(x, y): score for x, y, score in self.forest}
        found.update({(x, y): score for score, x, y in self.best.values()})
        keys = list(found)
        return (np.array([k[0] for k in keys], np.int64), np.array([k[1] for k in keys], np.int64),
                np.array(list(found.values()), np.float32))


def _rank(score: float, a: int, b: int) -> tuple[float, int, int]:
    """A pair's strength, ties to the lower pair of items: an item's strongest pair is then the same
    whatever order the tasks' pairs arrive in (ray.wait), as is the match `cluster_rows` reports."""
    return score, -min(a, b), -max(a, b)


Rescore = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def nearest_lists(index, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(scores, numbers) of each query's `nprobe` nearest lists of an IVF index (None for another
    kind): what its own search finds first, found once for indexes that share the lists."""
    if not hasattr(index, "nprobe"):
        return None
    return index.quantizer.search(np.ascontiguousarray(queries, dtype=np.float32), index.nprobe)


def range_pairs(index, queries: np.ndarray, threshold: float, rescore: Rescore | None = None,
                lists: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, index row, cosine) of every pair at or above `threshold`, a chunk of queries at a
    time, reduced (`LinkReducer`) as they come. Rows are numbered from 0 on each side. With
    `rescore` (an index of approximate scores), candidates down to SQ_MARGIN below the threshold
    go to it, (query rows, index rows) -> those it keeps with their exact scores, before the cut.
    `lists`: the queries' `nearest_lists` in this index's lists (the same pairs, found sooner)."""
    threshold32 = np.float32(threshold)
    floor = np.float32(threshold - SQ_MARGIN) if rescore else threshold32
    # faiss keeps inner products strictly above the radius: the float32 just below the floor.
    radius = float(np.nextafter(floor, np.float32(-2)))
    reducer = LinkReducer()
    for start in range(0, len(queries), _QUERY_CHUNK):
        chunk = np.ascontiguousarray(queries[start : start + _QUERY_CHUNK], dtype=np.float32)
        if lists is None:
            lims, scores, ids = index.range_search(chunk, radius)
        else:
            near = slice(start, start + len(chunk))
            lims, scores, ids = index.range_search_preassigned(chunk, radius, lists[1][near], lists[0][near])
        rows = np.repeat(np.arange(start, start + len(chunk)), np.diff(lims.astype(np.int64)))
        if rescore is not None:
            rows, ids, scores = rescore(rows, ids)
            keep = scores >= threshold32
            rows, ids, scores = rows[keep], ids[keep], scores[keep]
        reducer.offer(rows, ids, scores)
    return reducer.pairs()


def build_index(vectors: np.ndarray):
    """The index dedup searches for `vectors`: exact below 10k, IVF above (lists trained on a sample
    spread over them; the scores of the pairs found are exact either way)."""
    builder = IndexBuilder("ivf", vectors.shape[1], len(vectors))
    if builder.train_size:
        builder.train(vectors[builder.train_rows()])
    for start in range(0, len(vectors), QUERIES_PER_TASK):
        builder.add(vectors[start : start + QUERIES_PER_TASK])
    return builder.finish()


def embedding_pairs(base: np.ndarray, queries: np.ndarray, threshold: float,
                    same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In memory, for vectors a process can hold: (query row, base row, cosine) of the pairs at or
    above `threshold` (reduced), a row never paired with itself when `same`. The tasks below do the
    same over files."""
    q, b, scores = range_pairs(build_index(base), queries, threshold)
    keep = q != b if same else np.ones(len(q), bool)
    return q[keep], b[keep], scores[keep]


# ------------------------------------------------------------------------------- vectors on disk
@dataclass(frozen=True)
class VectorSplit:
    """One split of an embed output: its rows (split, shard, key, status) and its (count, dim) .npy."""

    group: int  # 0 the dataset, 1.. each eval set
    rows: str
    vectors: str
    count: int
    offset: int  # where the matrix starts in the .npy


def _npy_layout(path: UPath, count: int, dim: int) -> int:
    """Where the float32 (count, dim) matrix starts in the .npy at `path`; a file that is not one
    (another shape, type or order, or shorter) is one line. The header is parsed, never executed."""
    try:
        with open_data(path) as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(handle, max_header_size=_NPY_HEADER_MAX)
            offset = handle.tell()
        size = path.stat().st_size
    except (OSError, ValueError, TokenError) as exc:  # TokenError: numpy's fallback parse of a header
        raise UserError(f"{path}: not the embeddings `audiodata embed` writes ({str(exc)[:120]})") from None
    if shape != (count, dim) or fortran or dtype != np.dtype("<f4") or size < offset + count * dim * 4:
        raise UserError(f"{path}: holds {shape} {dtype} ({size} bytes) where its rows say ({count}, {dim}) float32; "
                        "rerun `audiodata embed`")
    return offset


def read_vectors(split: VectorSplit, dim: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the split's matrix, read alone."""
    with open_data(UPath(split.vectors)) as handle:
        return _read_rows(handle, split, dim, start, stop)


def _read_rows(handle: Any, split: VectorSplit, dim: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the split's matrix from its open file."""
    handle.seek(split.offset + start * dim * 4)
    data = handle.read((stop - start) * dim * 4)
    if len(data) != (stop - start) * dim * 4:
        raise UserError(f"{split.vectors}: shorter than it was when listed; rerun `audiodata embed`")
    return np.frombuffer(data, np.float32).reshape(stop - start, dim)


def vector_splits(embed_dir: UPath, group: int, dim: int) -> list[VectorSplit]:
    splits = []
    for rows in sorted(embed_dir.glob("*.rows.parquet")):
        name = rows.name[: -len(".rows.parquet")]
        vectors = split_files(embed_dir, name)["audio"]
        try:
            with open_data(rows) as handle:
                count = pq.ParquetFile(handle).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{rows}: unreadable ({str(exc)[:120]}); rerun `audiodata embed`") from None
        splits.append(VectorSplit(group, str(rows), str(vectors), count, _npy_layout(vectors, count, dim)))
    return splits


# ------------------------------------------------------------------------------------------- the plan
ShardPart = tuple[int, str, str]  # (group, split, shard name)


@dataclass(frozen=True)
class EmbedPlan:
    root: str  # WORK folder of this matching (the index and its items)
    dim: int
    threshold: float
    splits: tuple[VectorSplit, ...]
    parts: dict[ShardPart, PrintPart]  # each shard's fingerprint part: its keys number its items
    chunks: tuple[tuple[int, int, int], ...]  # (split index, start, stop): what a query task searches
    index_parts: tuple[tuple[int, ...], ...]  # the dataset's chunks (numbers in `chunks`) each part indexes


def _row_slice(split: VectorSplit, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the split's rows table: only the row groups that hold them are read."""
    try:
        with open_data(UPath(split.rows)) as handle:
            reader = pq.ParquetFile(handle)
            if reader.metadata.num_rows != split.count:
                raise UserError(f"{split.rows}: {reader.metadata.num_rows} rows where it had {split.count}; "
                                "rerun `audiodata embed`")
            sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
            firsts = np.cumsum([0, *sizes])
            groups = [g for g in range(len(sizes)) if firsts[g] < stop and firsts[g + 1] > start]
            table = reader.read_row_groups(groups, columns=columns) if groups else None
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise UserError(f"{split.rows}: unreadable ({str(exc)[:120]}); rerun `audiodata embed`") from None
    if table is None or table.num_rows != firsts[groups[-1] + 1] - firsts[groups[0]]:
        raise UserError(f"{split.rows}: unreadable (row groups disagree with its rows); rerun `audiodata embed`")
    # Columns absent or of another type would fail later, as a traceback from inside a task.
    if wrong := [name for name in columns if table.schema.get_field_index(name) < 0
                 or table.schema.field(name).type != pa.string()]:
        raise UserError(f"{split.rows}: unreadable (no string column {', '.join(wrong)}); rerun `audiodata embed`")
    return table.slice(start - firsts[groups[0]], stop - start)


def _items_of(plan: EmbedPlan, split: VectorSplit, start: int, stop: int) -> np.ndarray:
    """Each row's item (-1: its shard or key was not fingerprinted, or it has no embedding). As the
    fingerprint matching numbers every row of a part, a key a shard holds twice is two items: the
    n-th copy of a key in the rows is the n-th in the shard's part, each matched by its own vector."""
    table = _row_slice(split, ["split", "shard", "key", "status"], start, stop)
    names, shards, keys, status = (table.column(c).to_pylist() for c in ("split", "shard", "key", "status"))
    own = UPath(split.rows).name[: -len(".rows.parquet")]
    if any(name != own for name in names):  # its vectors would land on another split's items
        raise UserError(f"{split.rows}: rows of another split than {own}; rerun `audiodata embed`")
    numbered: dict[tuple[str, str], dict[str, list[int]]] = {}
    copies = _copies_before(plan, split, start, (names[0], shards[0])) if names else Counter()
    items = np.full(stop - start, -1, np.int64)
    for i, (name, shard, key, state) in enumerate(zip(names, shards, keys, status)):
        copy = copies[name, shard, key]
        copies[name, shard, key] += 1  # whatever its status: the part has a row for every copy
        if state != OK:
            continue
        where = (name, shard)
        if where not in numbered:
            part = plan.parts.get((split.group, *where))
            keys_of = part_columns(part, ["key"]).column(0).to_pylist() if part else []
            numbered[where] = {}
            for n, k in enumerate(keys_of):
                numbered[where].setdefault(k, []).append(part.first + n)
        found = numbered[where].get(key, [])
        items[i] = found[copy] if copy < len(found) else -1
    return items


def _copies_before(plan: EmbedPlan, split: VectorSplit, start: int, where: tuple[str, str]) -> Counter:
    """(split, shard, key) -> its copies in the rows of shard `where` before `start`: a chunk may start
    inside a shard (its rows are contiguous, at most its part's count of them)."""
    part = plan.parts.get((split.group, *where))
    if part is None or start == 0:
        return Counter()
    table = _row_slice(split, ["split", "shard", "key"], max(0, start - part.rows), start)
    rows = zip(*(table.column(c).to_pylist() for c in ("split", "shard", "key")))
    return Counter(row for row in rows if row[:2] == where)


def _rows(plan: EmbedPlan, index: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, items) of the rows [start, stop) of split `index`; the item is -1 where dedup cannot
    match the row (not fingerprinted, no embedding: a zero or non-finite vector)."""
    split = plan.splits[index]
    items = _items_of(plan, split, start, stop)
    vectors = read_vectors(split, plan.dim, start, stop)
    return vectors, np.where(np.any(vectors != 0, axis=1) & np.all(np.isfinite(vectors), axis=1), items, -1)


def _usable(plan: EmbedPlan, index: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    vectors, items = _rows(plan, index, start, stop)
    return np.ascontiguousarray(vectors[items >= 0]), items[items >= 0]


def _usable_rows(plan: EmbedPlan, chunks: list[tuple[int, int, int]], wanted: np.ndarray) -> np.ndarray:
    """The usable rows numbered `wanted` (sorted) among the usable rows of `chunks`, a chunk at a time."""
    found, seen = [], 0
    for index, start, stop in chunks:
        vectors = _usable(plan, index, start, stop)[0]
        found.append(vectors[wanted[(wanted >= seen) & (wanted < seen + len(vectors))] - seen])
        seen += len(vectors)
    return np.concatenate(found)


def _trained(plan: EmbedPlan) -> IndexBuilder:
    """An empty index for the dataset's usable rows, trained on a sample spread over all of them
    (read a chunk at a time: the sample is drawn before the usable rows are known, so all are read)."""
    chunks = [plan.chunks[n] for part in plan.index_parts for n in part]
    wanted = IndexBuilder(_KIND, plan.dim, sum(stop - start for _, start, stop in chunks)).train_rows()
    sample, usable, seen = [], 0, 0
    for index, start, stop in chunks:
        vectors, found = _rows(plan, index, start, stop)
        mine = wanted[(wanted >= seen) & (wanted < stop - start + seen)] - seen
        sample.append(vectors[mine[found[mine] >= 0]])
        usable += int(np.count_nonzero(found >= 0))
        seen += stop - start
    builder = IndexBuilder(_KIND, plan.dim, usable)  # sized by the usable rows, as every part's lists
    if builder.train_size:
        sample = np.concatenate(sample)
        if len(sample) < builder.index.nlist:  # few usable rows among many: faiss would refuse to train
            sample = _usable_rows(plan, chunks, builder.train_rows())
        builder.train(sample)
    return builder


def train_task(plan: EmbedPlan) -> tuple[np.ndarray, float]:
    """The trained, empty index every part adds to, serialised (handed on through Ray), and peak memory."""
    import faiss

    return faiss.serialize_index(_trained(plan).index), peak_rss_mb()


def _part_file(plan: EmbedPlan, part: int, name: str) -> UPath:
    stem, suffix = name.split(".")
    return UPath(plan.root) / f"{stem}.{part}.{suffix}"


def index_task(plan: EmbedPlan, part: int = 0, trained: np.ndarray | None = None) -> dict[str, Any]:
    """Index part `part` and its rows' items and places, written under the plan's root. `trained`:
    the train task's index (more than one part); without it, this task trains one itself."""
    import faiss

    trust_output(UPath(plan.root).parent)  # in a fresh Ray worker too: its writes refuse planted links
    index = _trained(plan).index if trained is None else faiss.deserialize_index(np.asarray(trained))
    items, places = [], []
    for number in plan.index_parts[part]:
        split, start, stop = plan.chunks[number]
        vectors, found = _rows(plan, split, start, stop)
        index.add(np.ascontiguousarray(vectors[found >= 0]))
        items.append(found[found >= 0])
        rows = start + np.flatnonzero(found >= 0)
        places.append(np.stack([np.full(len(rows), split, np.int64), rows], axis=1))
    items = np.concatenate(items) if items else np.empty(0, np.int64)
    places = np.concatenate(places) if places else np.empty((0, 2), np.int64)
    # Each file's sha256 goes to the query tasks with the part (through Ray, not a file): anything
    # put in its place under WORK since is refused, however well formed.
    sha256 = {"index.faiss": save_index(index, _part_file(plan, part, "index.faiss"))}
    for name, array in (("items.npy", items), ("places.npy", places)):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(_part_file(plan, part, name), buffer.getvalue())
        sha256[name] = hashlib.sha256(buffer.getvalue()).hexdigest()
    kind = "flat" if isinstance(index, faiss.IndexFlat) else _KIND
    return {"vectors": int(len(items)), "kind": kind, "sha256": sha256, "peak_rss_mb": peak_rss_mb()}


def _load_ids(path: UPath, shape: tuple[int, ...], sha256: str | None = None) -> np.ndarray:
    """An int64 array of `shape` the index task wrote (`sha256`: its bytes' digest, as the task
    returned it): a file put there since (anyone may write under OUT) is read no further than that
    array needs, and refused."""
    limit = _NPY_HEADER_MAX + 16 + 8 * int(np.prod(shape))  # magic, header and the numbers
    try:
        with open_data(path) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({str(exc)[:120]}); rerun `{_REMADE_BY}`") from None
    if len(data) > limit:
        raise UserError(f"{path}: unreadable (over {limit} bytes); rerun `{_REMADE_BY}`")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path}: not what the index task wrote (other bytes); rerun `{_REMADE_BY}`")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, TokenError) as exc:
        raise UserError(f"{path}: unreadable ({str(exc)[:120]}); rerun `{_REMADE_BY}`") from None
    if array.dtype != np.int64 or array.shape != shape:
        raise UserError(f"{path}: not what the index task wrote ({array.dtype} {array.shape}); rerun `{_REMADE_BY}`")
    return array


def _load_items(plan: EmbedPlan, part: int, count: int, sha256: str | None = None) -> np.ndarray:
    """The index part's rows' items; an id no dataset item has is refused."""
    path = _part_file(plan, part, "items.npy")
    items = _load_ids(path, (count,), sha256)
    dataset = max((part.first + part.rows for (group, *_), part in plan.parts.items() if not group), default=0)
    if count and not (items.min() >= 0 and items.max() < dataset):
        raise UserError(f"{path}: not the index's items (an id outside the dataset's {dataset}); "
                        f"rerun `{_REMADE_BY}`")
    return items


def _load_places(plan: EmbedPlan, part: int, count: int, sha256: str | None = None) -> np.ndarray:
    """Each index part row's (split, row) in the dataset's splits; a place outside them is refused."""
    path = _part_file(plan, part, "places.npy")
    places = _load_ids(path, (count, 2), sha256)
    splits, rows = places[:, 0], places[:, 1]
    if count and not (splits.min() >= 0 and splits.max() < len(plan.splits)):
        raise UserError(f"{path}: a split outside the plan's; rerun `{_REMADE_BY}`")
    sizes = np.array([split.count if split.group == 0 else 0 for split in plan.splits], np.int64)
    if count and not (rows.min() >= 0 and np.all(rows < sizes[splits])):
        raise UserError(f"{path}: a row outside the dataset's splits; rerun `{_REMADE_BY}`")
    return places


def _vectors_at(plan: EmbedPlan, places: np.ndarray) -> np.ndarray:
    """The vectors at (split, row) `places`, each row read alone (a file opened once, read in order)."""
    out = np.empty((len(places), plan.dim), np.float32)
    for number in np.unique(places[:, 0]):
        split = plan.splits[number]
        mine = np.flatnonzero(places[:, 0] == number)
        with open_data(UPath(split.vectors)) as handle:
            for i in mine[np.argsort(places[mine, 1], kind="stable")]:
                row = int(places[i, 1])
                out[i] = _read_rows(handle, split, plan.dim, row, row + 1)[0]
    return out


def _rescorer(plan: EmbedPlan, vectors: np.ndarray, items: np.ndarray, base_items: np.ndarray,
              places: np.ndarray) -> Rescore:
    """Candidates (query rows, index rows) -> those of two samples, with their exact cosines."""

    def exact(rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        other = items[rows] != base_items[ids]  # a sample found by its own vector: not read back
        rows, ids = rows[other], ids[other]
        return rows, ids, np.einsum("ij,ij->i", vectors[rows], _vectors_at(plan, places[ids]))

    return exact


def query_task(plan: EmbedPlan, task: int,
               built: tuple[dict[str, Any], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Chunk `task` against each index part in turn (`built`: what each part's index task returned,
    its rows and its files' sha256): (query item, dataset item, cosine) reduced, and peak memory.
    The chunk's nearest lists are found once: every part has the train task's lists."""
    split, start, stop = plan.chunks[task]
    vectors, items = _usable(plan, split, start, stop)
    reducer, lists = LinkReducer(), None
    corpus = sum(part["vectors"] for part in built)
    for number, part in enumerate(built):
        index = base_items = places = rescore = None  # the part before let go first: one held at a time
        count, sha256 = part["vectors"], part["sha256"]
        # dedup's own index (rebuilt by every run), not embed's output: a damaged one is dedup's to redo;
        # its lists are the whole corpus's (a part of few rows is mostly centroids): bounded by those
        index = load_index(_part_file(plan, number, "index.faiss"), count, plan.dim, made_by=_REMADE_BY,
                           lists_for=corpus, sha256=sha256["index.faiss"])  # DEFAULT_NPROBE
        if number == 0 and len(built) > 1:
            lists = nearest_lists(index, vectors)
        base_items = _load_items(plan, number, count, sha256["items.npy"])
        places = _load_places(plan, number, count, sha256["places.npy"])
        rescore = _rescorer(plan, vectors, items, base_items, places)
        q, b, scores = range_pairs(index, vectors, plan.threshold, rescore, lists)
        reducer.offer(items[q], base_items[b], scores)
    return (*reducer.pairs(), peak_rss_mb())


def plan_matching(work: UPath, datasets: list[UPath], parts: dict[ShardPart, PrintPart],
                  threshold: float) -> tuple[EmbedPlan | None, list[str]]:
    """The plan over the dataset's embeddings and each eval set's (or None: the dataset has none),
    and the eval sets without embeddings. All must come from one model."""
    if not (datasets[0] / "embed" / ".embed" / "run.json").exists():
        return None, [str(d) for d in datasets]
    model = embedding_model(datasets[0] / "embed")
    dim = model.get("joint_dim")
    if type(dim) is not int or not 0 < dim <= _MAX_DIM:  # run.json is read back: anyone may edit it
        raise UserError(f"{datasets[0] / 'embed'}: its run.json records no usable joint_dim ({str(dim)[:40]}); "
                        "rerun `audiodata embed`")
    splits, missing = [], []
    for group, dataset in enumerate(datasets):
        embed_dir = dataset / "embed"
        if group and not (embed_dir / ".embed" / "run.json").exists():
            missing.append(str(dataset))
            continue
        if group and embedding_model(embed_dir)["digest"] != model["digest"]:
            raise UserError(f"{embed_dir}: embedded with another model than {datasets[0] / 'embed'}; "
                            "embed both with one")
        splits += vector_splits(embed_dir, group, dim)
    chunks = tuple((i, start, min(start + QUERIES_PER_TASK, split.count))
                   for i, split in enumerate(splits) for start in range(0, split.count, QUERIES_PER_TASK))
    return EmbedPlan(str(work), dim, threshold, tuple(splits), parts, chunks, _index_parts(chunks, splits)), missing


def _index_parts(chunks: tuple[tuple[int, int, int], ...], splits: list[VectorSplit]) -> tuple[tuple[int, ...], ...]:
    """The dataset's chunks grouped into parts of at most PART_VECTORS rows (by rows: many small
    splits make many small chunks, not many parts); one part, empty, for a dataset of no rows."""
    index_parts, part, rows = [], [], 0
    for number, (split, start, stop) in enumerate(chunks):
        if splits[split].group:
            continue
        if part and rows + stop - start > PART_VECTORS:
            index_parts.append(tuple(part))
            part, rows = [], 0
        part.append(number)
        rows += stop - start
    return tuple([*index_parts, tuple(part)])


def _task_memory(plan: EmbedPlan) -> int:
    """Bytes a task may hold at once (measured, bench/RESULTS.md: ~1 GB beside the index, a part's codes,
    ids, items and places with a quarter to spare), at most what the largest machine offers, so that
    no task waits for a machine that does not exist."""
    import ray

    rows = max(sum(plan.chunks[n][2] - plan.chunks[n][1] for n in part) for part in plan.index_parts)
    wanted = (1 << 30) + int(rows * (plan.dim + 40) * 1.25)
    offered = [node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")]
    return int(min(wanted, max(offered, default=wanted)))


def match_embeddings(plan: EmbedPlan, on_ray: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(a, b, cosine) with a < b over items, reduced across tasks, and a report. On Ray, the index
    tasks build the parts and one task per chunk queries them; else all run here."""
    root = UPath(plan.root)
    if root.exists():
        root.fs.rm(root.path, recursive=True)  # an interrupted run's index: rebuilt
    several = len(plan.index_parts) > 1
    reducer = LinkReducer()  # the tasks' pairs joined as they come: still at most 2 per item
    query_peak, train_peak = 0.0, 0.0

    def fold(found: tuple[np.ndarray, np.ndarray, np.ndarray, float]) -> None:
        nonlocal query_peak
        q, b, scores, peak = found
        reducer.offer(np.minimum(q, b), np.maximum(q, b), scores)
        query_peak = max(query_peak, peak)

    if on_ray:
        import ray

        plan_ref = ray.put(plan)
        # A fresh worker per task (max_calls=1): each task's memory is its own, and is given back. Each
        # asks Ray for the memory it may need, so a machine runs no more at once than it can hold.
        options = {"num_cpus": 1, "max_retries": 1, "max_calls": 1, "memory": _task_memory(plan)}
        trained, pending = None, []
        try:
            if several:  # the trained index stays a reference: the driver never holds it
                trained, train_peak = ray.remote(num_returns=2, **options)(train_task).remote(plan_ref)
                pending = [train_peak]
                train_peak = ray.get(train_peak)
            pending = [ray.remote(**options)(index_task).remote(plan_ref, part, trained)
                       for part in range(len(plan.index_parts))]
            built = ray.get(pending)
            query, parts = ray.remote(**options)(query_task), tuple(built)
            pending = [query.remote(plan_ref, task, parts) for task in range(len(plan.chunks))]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                fold(ray.get(done[0]))
        finally:
            for ref in pending:  # a task failed (or Ctrl-C): the others stop writing under WORK
                ray.cancel(ref, force=True)
    else:
        trained, train_peak = train_task(plan) if several else (None, 0.0)
        built = [index_task(plan, part, trained) for part in range(len(plan.index_parts))]
        del trained
        for task in range(len(plan.chunks)):
            fold(query_task(plan, task, tuple(built)))
    if root.exists():
        root.fs.rm(root.path, recursive=True)
    report = {"indexed": sum(b["vectors"] for b in built), "index_kind": built[0]["kind"],
              "index_parts": len(built), "rescored_within": SQ_MARGIN, "query_tasks": len(plan.chunks),
              "train_task_peak_rss_mb": train_peak,  # 0: trained in the one index task
              "index_task_peak_rss_mb": max(b["peak_rss_mb"] for b in built), "query_task_peak_rss_mb": query_peak}
    return (*reducer.pairs(), report)


__all__ = ["EmbedPlan", "LinkReducer", "PART_VECTORS", "QUERIES_PER_TASK", "embedding_pairs", "match_embeddings", "plan_matching",
           "range_pairs", "read_vectors", "vector_splits"]
