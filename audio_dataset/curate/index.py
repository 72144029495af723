"""faiss indexes over L2-normalised embeddings: inner product is cosine similarity.

`flat` is exact (every vector scored); `ivf` (IndexIVFFlat, sqrt-sized coarse lists, trained on a
sample of the vectors) scores the `nprobe` nearest lists only: faster on millions, slightly inexact
(bench/RESULTS.md: 314 vs 2.2 ms a query at 1M vectors). `auto` is flat up to AUTO_IVF vectors.
"""
from __future__ import annotations

import math

import numpy as np
from upath import UPath

from audio_dataset.source import UserError
from audio_dataset.storage import atomic_write_bytes

INDEX_KINDS = ("auto", "flat", "ivf", "none")
AUTO_IVF = 100_000
# IVF: faiss wants ~39 training vectors per list; fewer lists than this is no faster than flat.
_TRAIN_PER_LIST = 39
_MIN_IVF_VECTORS = 10_000
DEFAULT_NPROBE = 16


def ivf_lists(count: int) -> int:
    """4 sqrt(N) lists (faiss's guidance is 4-16 sqrt(N)), no more than the vectors can train."""
    return max(1, min(int(4 * math.sqrt(count)), count // _TRAIN_PER_LIST))


class IndexBuilder:
    """Adds vectors as they stream in; an IVF index buffers them until it has its training sample."""

    def __init__(self, kind: str, dim: int, count: int) -> None:
        import faiss

        if kind not in INDEX_KINDS[:3]:
            raise UserError(f"--index must be one of {', '.join(INDEX_KINDS)}")
        wanted = kind == "ivf" or (kind == "auto" and count >= AUTO_IVF)
        self.ivf = wanted and count >= _MIN_IVF_VECTORS  # a small split is searched exactly
        if self.ivf:
            lists = ivf_lists(count)
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
            self.train_size = min(count, lists * _TRAIN_PER_LIST)
        else:
            self.index = faiss.IndexFlatIP(dim)
            self.train_size = 0
        self.pending: list[np.ndarray] = []

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.index.is_trained:
            self.index.add(vectors)
            return
        self.pending.append(vectors)
        if sum(len(v) for v in self.pending) >= self.train_size:
            self._train()

    def _train(self) -> None:
        buffered = np.concatenate(self.pending) if self.pending else np.empty((0, self.index.d), np.float32)
        self.pending = []
        self.index.train(buffered[: self.train_size])
        self.index.add(buffered)

    def finish(self):
        if not self.index.is_trained:
            self._train()
        if self.ivf:
            self.index.nprobe = DEFAULT_NPROBE
        return self.index


def build_index(vectors: np.ndarray, kind: str = "flat"):
    builder = IndexBuilder(kind, vectors.shape[1], len(vectors))
    builder.add(vectors)
    return builder.finish()


def save_index(index, path: UPath) -> None:
    import faiss

    atomic_write_bytes(path, faiss.serialize_index(index).tobytes())


def load_index(path: UPath):
    import faiss

    index = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    if hasattr(index, "nprobe"):
        index.nprobe = DEFAULT_NPROBE
    return index
