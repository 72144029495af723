"""The faiss index kinds `embed --index` builds: each saved, loaded through the guarded loader and
searched; recall@10 against exact search on clustered vectors; the compressed one is compressed."""
from __future__ import annotations

import numpy as np
import pytest
from upath import UPath

from audio_dataset.curate.index import AUTO_IVF, AUTO_PQ, IndexBuilder, load_index, resolve_kind, save_index
from audio_dataset.source import UserError

COUNT, DIM = 3_000, 32


def clustered(count: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 200 centres, as embeddings of a corpus cluster by sound."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 200, count)] + 0.6 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(COUNT, DIM)


@pytest.fixture
def small_lists(monkeypatch):
    """Inverted lists from 1,000 vectors (10,000 in use): the same code, trained in a second."""
    from audio_dataset.curate import index

    monkeypatch.setattr(index, "_MIN_IVF_VECTORS", 1_000)


def _build(kind: str, vectors: np.ndarray):
    builder = IndexBuilder(kind, vectors.shape[1], len(vectors))
    rows = builder.train_rows()
    if len(rows):
        builder.train(vectors[rows])
    for start in range(0, len(vectors), 1_000):  # streamed in as shards are
        builder.add(vectors[start : start + 1_000])
    return builder.finish()


@pytest.mark.parametrize("kind, recall, bytes_per_vector", [
    ("flat", 1.0, DIM * 4 + 1), ("ivf", 0.9, DIM * 4 + 16), ("ivfpq", 0.4, DIM / 8 + 8 + 40), ("hnsw", 0.9, DIM * 4 + 300),
])
def test_each_kind_is_built_loaded_and_searched(vectors, small_lists, tmp_path, kind, recall, bytes_per_vector):
    import faiss

    path = UPath(tmp_path / f"train.{kind}.faiss")
    save_index(_build(kind, vectors), path)
    assert path.stat().st_size / COUNT < bytes_per_vector  # what each kind costs per vector
    index = load_index(path, COUNT, DIM)
    expected = {"flat": faiss.IndexFlatIP, "ivf": faiss.IndexIVFFlat, "ivfpq": faiss.IndexIVFPQ,
                "hnsw": faiss.IndexHNSWFlat}[kind]
    assert type(index) is expected and index.ntotal == COUNT
    queries = clustered(200, DIM, seed=1)
    exact = (queries @ vectors.T).argsort(axis=1)[:, ::-1][:, :10]
    _, found = index.search(queries, 10)
    measured = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert measured >= recall, measured
    _, self_hit = index.search(vectors[:100], 1)
    assert (self_hit[:, 0] == np.arange(100)).mean() >= (0.7 if kind == "ivfpq" else 0.99)


def test_auto_picks_the_kind_by_size():
    assert resolve_kind("auto", AUTO_IVF - 1) == "flat"
    assert resolve_kind("auto", AUTO_IVF) == "ivf" and resolve_kind("auto", AUTO_PQ) == "ivfpq"
    assert resolve_kind("ivfpq", 500) == "flat"  # too few vectors to train lists: searched exactly
    assert resolve_kind("hnsw", 500) == "hnsw"
    with pytest.raises(UserError):
        resolve_kind("none", 10)


def test_training_takes_a_sample_spread_over_the_split():
    builder = IndexBuilder("ivfpq", DIM, 1_000_000)
    rows = builder.train_rows()
    assert len(rows) <= 200_000 and rows[0] == 0 and rows[-1] == 999_999  # bounded, first to last shard
    assert np.all(np.diff(rows) > 0)


def test_an_index_for_other_rows_is_refused(vectors, tmp_path):
    path = UPath(tmp_path / "train.audio.faiss")
    save_index(_build("flat", vectors[:50]), path)
    with pytest.raises(UserError, match="50 vectors of 32 dimensions where the split has 49 of 32"):
        load_index(path, 49, DIM)
    with pytest.raises(UserError, match="where the split has 50 of 64"):
        load_index(path, 50, 64)


def test_ivfpq_reranks_from_the_full_vectors(vectors, small_lists, tmp_path):
    from audio_dataset.curate.index import Reranked, full_vectors

    path = UPath(tmp_path / "train.audio.faiss")
    save_index(_build("ivfpq", vectors), path)
    npy = UPath(tmp_path / "train.audio.npy")
    np.save(npy.path, vectors)
    index = load_index(path, COUNT, DIM, full_vectors(npy, COUNT, DIM))
    assert isinstance(index, Reranked)
    queries = clustered(200, DIM, seed=1)
    exact = (queries @ vectors.T).argsort(axis=1)[:, ::-1][:, :10]
    scores, found = index.search(queries, 10)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    alone = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(index.index.search(queries, 10)[1], exact)])
    assert recall >= 0.85 and recall > alone + 0.2, (recall, alone)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, found, 1), atol=1e-5)  # exact scores
    np.save(npy.path, vectors[:, :16])
    with pytest.raises(UserError, match="where the split has"):
        full_vectors(npy, COUNT, DIM)
