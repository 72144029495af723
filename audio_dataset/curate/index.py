"""faiss indexes over L2-normalised embeddings: inner product is cosine similarity.

- `flat` is exact (every vector scored): 4 B per dimension per vector (2 kB at 512-d).
- `ivf` (IndexIVFFlat, 4 sqrt(N) coarse lists) scores the `nprobe` nearest lists only: faster on
  millions, slightly inexact, the same 2 kB per vector.
- `ivfpq` (IndexIVFPQ: the same lists, each vector's residual product-quantised to dim/8 bytes,
  8 bits per sub-quantiser) holds 64 B of code + 8 B of id per 512-d vector: 10M vectors in ~0.7 GB.
- `hnsw` (IndexHNSWFlat, 32 links per node) is a graph over the full vectors: fastest queries and
  high recall, ~2.3 kB per vector, no training.
- `ivfsq` (IndexIVFScalarQuantizer, 8 bits per dimension: 512 B per 512-d vector, inner products
  within ~2e-3) is dedup's own work index (not an --index choice): dedup scores its candidates again
  from the full vectors, so a quarter of the memory costs it nothing in exactness.
`auto` is flat below AUTO_IVF vectors, ivf below AUTO_PQ, ivfpq above (memory flat per vector).
Training (ivf, ivfpq) uses a sample spread over the whole split, at most MAX_TRAIN vectors.
bench/search_scale.py measures recall@10 against exact search and query time at 1M vectors.

An index file is data, and untrusted: `load_index` refuses a file that is not one of these kinds
with the dimension and count the split's rows say, bounds what faiss's reader may allocate by the
file's own size, and checks every id and graph link before a search can follow it.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import struct
from typing import Any, Callable, Iterator

import numpy as np
from upath import UPath

from audio_dataset.source import UserError
from audio_dataset.storage import StagedFile, is_local, open_data

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw", "none")
AUTO_IVF = 100_000
AUTO_PQ = 1_000_000
# IVF: faiss wants ~39 training vectors per list; fewer lists than this is no faster than flat.
_TRAIN_PER_LIST = 39
_MIN_IVF_VECTORS = 10_000
MAX_TRAIN = 200_000  # 400 MB of 512-d float32 at most, whatever the split's size
DEFAULT_NPROBE = 16
PQ_BITS = 8
PQ_DIMS_PER_CODE = 8  # dim/8 one-byte sub-quantisers: 64 B per 512-d vector
RERANK = 10  # ivfpq: candidates per wanted hit scored again from the full vectors
SQ_RANGE_WIDEN = 0.25  # ivfsq: steps 1.5x the sample's range needs, inner products still within ~1e-3
HNSW_LINKS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
# The file header faiss writes first for each kind we write (index_write.cpp's fourcc).
FOURCC = {"flat": b"IxFI", "ivf": b"IwFl", "ivfpq": b"IwPQ", "hnsw": b"IHNf", "ivfsq": b"IwSq"}
_INVERTED = ("ivf", "ivfpq", "ivfsq")


def index_settings(kind: str) -> dict[str, Any]:
    """What names the index a run builds, for run.json."""
    return {"kind": kind, "auto_ivf": AUTO_IVF, "auto_ivfpq": AUTO_PQ, "lists": "min(4 sqrt(N), N/39)",
            "max_train": MAX_TRAIN, "nprobe": DEFAULT_NPROBE,
            "pq": {"bytes": f"dim/{PQ_DIMS_PER_CODE}", "bits": PQ_BITS},
            "hnsw": {"links": HNSW_LINKS, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}}


def ivf_lists(count: int) -> int:
    """4 sqrt(N) lists (faiss's guidance is 4-16 sqrt(N)), no more than the vectors can train."""
    return max(1, min(int(4 * math.sqrt(count)), count // _TRAIN_PER_LIST))


def resolve_kind(kind: str, count: int) -> str:
    """The kind built for `count` vectors: `auto` by size; an inverted-list kind on a split too small
    to train one is searched exactly (flat)."""
    if kind not in (*INDEX_KINDS[:5], "ivfsq"):
        raise UserError(f"--index must be one of {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        kind = "flat" if count < AUTO_IVF else "ivf" if count < AUTO_PQ else "ivfpq"
    if kind in _INVERTED and count < _MIN_IVF_VECTORS:
        return "flat"
    return kind


class IndexBuilder:
    """Adds vectors as they stream in. An inverted-list index is trained first (`train`, on a sample
    of the split: `train_rows` says which rows); without one it trains on the first vectors it gets."""

    def __init__(self, kind: str, dim: int, count: int) -> None:
        import faiss

        self.kind, self.count = resolve_kind(kind, count), count
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind in _INVERTED:
            lists = ivf_lists(count)
            quantizer = faiss.IndexFlatIP(dim)
            if self.kind == "ivf":
                self.index = faiss.IndexIVFFlat(quantizer, dim, lists, ip)
            elif self.kind == "ivfsq":
                self.index = faiss.IndexIVFScalarQuantizer(quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit, ip)
                # Each dimension's range: the sample's, widened by SQ_RANGE_WIDEN of it on both sides, so a
                # vector beyond the sample is rarely clipped (a clipped value errs by its overshoot).
                self.index.sq.rangestat_arg = SQ_RANGE_WIDEN
            else:
                if dim % PQ_DIMS_PER_CODE:
                    raise UserError(f"--index ivfpq needs a dimension divisible by {PQ_DIMS_PER_CODE}, not {dim}")
                self.index = faiss.IndexIVFPQ(quantizer, dim, lists, dim // PQ_DIMS_PER_CODE, PQ_BITS, ip)
            self.quantizer = quantizer  # the index refers to it: kept alive as long
            self.train_size = min(count, max(lists * _TRAIN_PER_LIST, 256 * _TRAIN_PER_LIST), MAX_TRAIN)
        elif self.kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, ip)
            self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            self.train_size = 0
        else:
            self.index = faiss.IndexFlatIP(dim)
            self.train_size = 0
        self.pending: list[np.ndarray] = []

    def train_rows(self) -> np.ndarray:
        """Row numbers of a training sample spread evenly over the split (shard order may follow
        the sources: the first rows alone would train lists for the first source only)."""
        if not self.train_size:
            return np.empty(0, np.int64)
        return np.unique(np.linspace(0, self.count - 1, self.train_size).astype(np.int64))

    def train(self, sample: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.index.is_trained:
            self.index.add(vectors)
            return
        self.pending.append(vectors)
        if sum(len(v) for v in self.pending) >= self.train_size:
            self._train_on_pending()

    def _train_on_pending(self) -> None:
        buffered = np.concatenate(self.pending) if self.pending else np.empty((0, self.index.d), np.float32)
        self.pending = []
        self.train(buffered[: self.train_size])
        self.index.add(buffered)

    def finish(self):
        if not self.index.is_trained:
            self._train_on_pending()
        _set_search_parameters(self.index)
        return self.index


def _set_search_parameters(index) -> None:
    if hasattr(index, "nprobe"):
        index.nprobe = min(DEFAULT_NPROBE, index.nlist)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = HNSW_EF_SEARCH


def build_index(vectors: np.ndarray, kind: str = "flat"):
    builder = IndexBuilder(kind, vectors.shape[1], len(vectors))
    builder.add(vectors)
    return builder.finish()


def save_index(index, path: UPath) -> str:
    """The index streamed to its file, published whole (serialised first, it would be held twice);
    the file's sha256, for a reader that must get these bytes (`load_index(sha256=...)`)."""
    import faiss

    staged, digest = StagedFile(path), hashlib.sha256()

    def write(data: bytes) -> int:
        digest.update(data)
        return staged.handle.write(data)

    try:
        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    except BaseException:
        staged.abort()
        raise
    staged.commit()
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ loading, untrusted
_HEADER = struct.Struct("<4siq")  # fourcc, d, ntotal: how faiss's write_index_header starts


def max_index_bytes(count: int, dim: int, lists_for: int = 0) -> int:
    """The largest file any kind could be for `count` vectors: full vectors, as many list centroids,
    a graph's links and levels, PQ tables; anything larger is not ours. `lists_for`: the vectors its
    lists were trained for, where more (a dedup index part has the whole corpus's lists)."""
    lists = ivf_lists(lists_for) if lists_for > count else 0  # each a centroid and its list's size
    return count * (8 * dim + 8 * (2 * HNSW_LINKS + 16)) + lists * (4 * dim + 16) + 256 * 4 * dim * 4 + (1 << 20)


@contextlib.contextmanager
def _reader_limits(size: int, table: int) -> Iterator[None]:
    """faiss's reader allocates each vector at the size the file declares before reading it: no
    vector may declare more than the file holds (or, IVF-PQ's table of centroid-codeword products,
    which the reader computes, more than `table` bytes), nor a loop run more times than it has bytes."""
    import faiss

    before = faiss.get_deserialization_vector_byte_limit(), faiss.get_deserialization_loop_limit()
    faiss.set_deserialization_vector_byte_limit(max(size, table) + 64)
    faiss.set_deserialization_loop_limit(size + 64)
    try:
        yield
    finally:
        faiss.set_deserialization_vector_byte_limit(before[0])
        faiss.set_deserialization_loop_limit(before[1])


def _read_at_most(handle: Any, size: int, digest: Any = None) -> Callable[[int], bytes]:
    """`handle.read` that stops at `size` bytes: the bound and faiss's limits hold for the size
    measured, and the file may have grown since (faiss would read, and allocate for, what was added).
    What it reads goes into `digest` too, where given."""
    left = size

    def read(wanted: int) -> bytes:
        nonlocal left
        data = handle.read(min(wanted, left))
        left -= len(data)
        if digest is not None:
            digest.update(data)
        return data

    return read


def load_index(path: UPath, count: int, dim: int, vectors: np.ndarray | None = None,
               made_by: str = "audiodata embed", lists_for: int = 0, sha256: str | None = None):
    """The index of a split of `count` rows of `dim`-d embeddings; UserError for any other file,
    naming the command that writes it again (`made_by`: embed's output, or dedup's own work index).
    `lists_for`: the vectors its lists were trained for, where more than `count` (an index part).
    `sha256`: what `save_index` returned for it, where the writer is known (dedup's own tasks): any
    other bytes are refused.
    With the split's full `vectors` (`full_vectors`), an ivfpq index re-ranks its candidates exactly."""
    import faiss

    def refuse(why: str) -> UserError:
        return UserError(f"{path}: not an index `{made_by}` writes ({why}); rerun `{made_by}`")

    try:
        size = path.stat().st_size
    except OSError as exc:  # removed since it was written (dedup's, between its tasks)
        raise refuse(exc.strerror or type(exc).__name__) from None
    if size > max_index_bytes(count, dim, lists_for):
        raise refuse(f"{size} bytes for {count} vectors of {dim}")
    with open_data(path) as handle:  # streamed to faiss: a 2 GB index is not also held as bytes
        head = handle.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise refuse("truncated")
        fourcc, d, ntotal = _HEADER.unpack(head)
        kinds = {code: kind for kind, code in FOURCC.items()}
        if fourcc not in kinds:
            raise refuse(f"type {fourcc!r}")
        if (d, ntotal) != (dim, count):
            raise refuse(f"{ntotal} vectors of {d} dimensions where the split has {count} of {dim}")
        handle.seek(0)
        try:
            # IVF-PQ's table: lists x sub-quantisers x 256 floats, no more lists than vectors train.
            with _reader_limits(size, (count // _TRAIN_PER_LIST + 1) * (dim // PQ_DIMS_PER_CODE) * (1 << PQ_BITS) * 4):
                digest = hashlib.sha256() if sha256 else None
                index = faiss.read_index(faiss.PyCallbackIOReader(_read_at_most(handle, size, digest)))  # typed already
        except (RuntimeError, MemoryError) as exc:
            raise refuse(f"unreadable: {str(exc).splitlines()[-1][-120:]}") from None
    if digest is not None and digest.hexdigest() != sha256:
        raise refuse("other bytes than were written")
    problem = _check_structure(index, kinds[fourcc], count, dim)
    if problem:
        raise refuse(problem)
    _set_search_parameters(index)
    if vectors is not None and kinds[fourcc] == "ivfpq":
        return Reranked(index, vectors)
    return index


class Reranked:
    """An ivfpq index whose candidates are scored again exactly from the split's full vectors (the
    embed output's SPLIT.audio.npy, memory-mapped: a query reads only its candidates' rows). PQ codes
    rank coarsely (recall@10 ~0.5 alone at 1M, bench/search_scale.py); RERANK times as many
    candidates re-scored give the exact order among them."""

    def __init__(self, index, vectors: np.ndarray) -> None:
        self.index, self.vectors, self.ntotal = index, vectors, index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = min(self.ntotal, max(k * RERANK, k))
        _, ids = self.index.search(queries, wanted)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        found = np.full((len(queries), k), -1, np.int64)
        for row, (query, candidates) in enumerate(zip(queries, ids)):
            candidates = np.unique(candidates[candidates >= 0])  # sorted: the memory map read in order
            exact = np.asarray(self.vectors[candidates], np.float32) @ query
            top = np.argsort(-exact, kind="stable")[:k]
            scores[row, : len(top)], found[row, : len(top)] = exact[top], candidates[top]
        return scores, found


def full_vectors(path: UPath, count: int, dim: int) -> np.ndarray | None:
    """The split's (count, dim) float32 .npy memory-mapped, or None where it is not a local file of
    that shape (the index then ranks by its codes alone). A header naming another shape or type
    is refused: the file is data."""
    if not is_local(path) or not path.exists():
        return None
    try:
        vectors = np.load(path.path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not the embeddings `audiodata embed` writes ({str(exc)[:120]})") from None
    if vectors.shape != (count, dim) or vectors.dtype != np.float32:
        raise UserError(f"{path}: holds {vectors.shape} {vectors.dtype} where the split has ({count}, {dim}) float32")
    return vectors


def _check_structure(index, kind: str, count: int, dim: int) -> str | None:
    """What in a deserialised index would send a search out of bounds, or None."""
    import faiss

    expected = {"flat": faiss.IndexFlatIP, "ivf": faiss.IndexIVFFlat, "ivfpq": faiss.IndexIVFPQ,
                "hnsw": faiss.IndexHNSWFlat, "ivfsq": faiss.IndexIVFScalarQuantizer}[kind]
    if type(index) is not expected:
        return f"a {type(index).__name__}"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT or index.d != dim or index.ntotal != count:
        return "another metric, dimension or count"
    if kind == "flat":
        return None if index.codes.size() == count * dim * 4 else "its vectors do not match its count"
    if kind == "hnsw":
        return _check_hnsw(index, count, dim)
    return _check_ivf(index, kind, count, dim)


def _check_ivf(index, kind: str, count: int, dim: int) -> str | None:
    import faiss

    quantizer = faiss.downcast_index(index.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.d != dim or quantizer.ntotal != index.nlist:
        return "its coarse quantizer does not match its lists"
    if quantizer.metric_type != faiss.METRIC_INNER_PRODUCT or index.nlist < 1:
        return "its coarse quantizer does not match its lists"
    lists = faiss.downcast_InvertedLists(index.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists) or lists.nlist != index.nlist:
        return "its inverted lists are not the kind it declares"
    if kind == "ivf":
        code_size = dim * 4
    elif kind == "ivfsq":
        sq = index.sq
        if sq.qtype != faiss.ScalarQuantizer.QT_8bit or sq.d != dim or sq.code_size != dim or \
                sq.trained.size() != 2 * dim or not index.by_residual:
            return "its scalar quantizer does not match its dimension"
        code_size = dim
    else:
        pq = index.pq
        ksub = 1 << pq.nbits
        if pq.d != dim or pq.M < 1 or dim % pq.M or pq.nbits != PQ_BITS or pq.code_size != pq.M or \
                pq.centroids.size() != pq.M * ksub * (dim // pq.M) or not index.by_residual:
            return "its product quantizer does not match its dimension"
        code_size = pq.code_size
    if index.code_size != code_size or lists.code_size != code_size:
        return "its codes are not the size its vectors need"
    total = 0
    for number in range(index.nlist):
        size = lists.list_size(number)
        total += size
        if total > count:
            return "its lists hold more vectors than it declares"
        if size and not _in_range(faiss.rev_swig_ptr(lists.get_ids(number), size), 0, count):
            return "an id out of range"
    return None if total == count else "its lists hold fewer vectors than it declares"


def _check_hnsw(index, count: int, dim: int) -> str | None:
    import faiss

    storage = faiss.downcast_index(index.storage)
    if not isinstance(storage, faiss.IndexFlat) or storage.d != dim or storage.ntotal != count or \
            storage.codes.size() != count * dim * 4:
        return "its stored vectors do not match its count"
    graph = index.hnsw
    levels = faiss.vector_to_array(graph.levels).astype(np.int64)
    offsets = faiss.vector_to_array(graph.offsets).astype(np.int64)
    neighbours = faiss.vector_to_array(graph.neighbors)
    per_level = faiss.vector_to_array(graph.cum_nneighbor_per_level).astype(np.int64)
    if len(levels) != count or len(offsets) != count + 1 or not len(per_level):
        return "its graph does not match its count"
    top = graph.max_level
    if not 0 <= top < len(per_level) - 1 or np.any(np.diff(per_level) < 0) or per_level[0] != 0:
        return "its links per level are inconsistent"
    if count and not _in_range(levels, 1, top + 2):  # a node's level count: 1 .. max_level + 1
        return "a node level out of range"
    if count and not (0 <= graph.entry_point < count and levels[graph.entry_point] == top + 1):
        return "its entry point is out of range"
    if offsets[0] != 0 or np.any(offsets[1:] - offsets[:-1] != per_level[levels]) or offsets[-1] != len(neighbours):
        return "its link table does not match its levels"
    if not _in_range(neighbours, -1, count):
        return "a link out of range"
    return None


def _in_range(values: np.ndarray, low: int, high: int) -> bool:
    """Every value in [low, high)."""
    return not len(values) or (int(values.min()) >= low and int(values.max()) < high)
