"""Embedding dedup at scale: an IVF index trained on a sample, queries sharded over Ray tasks, range
search at the threshold, pairs reduced per task. The clusters equal the exact all-pairs method's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audio_dataset.curate import dedup
from audio_dataset.curate.dedup import EMBEDDING, Items, Link, _LinkReducer, cluster_rows, embedding_pairs
from audio_dataset.curate.match import PrintPart

THRESHOLD = 0.95
DIM = 32


@pytest.fixture
def small_lists(monkeypatch):
    """Inverted lists from 1,000 vectors (10,000 in use): the same code on a corpus a test can afford."""
    from audio_dataset.curate import index

    monkeypatch.setattr(index, "_MIN_IVF_VECTORS", 1_000)


def corpus(count: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors with planted near-copies: pairs, chains (a ~ b ~ c, a and c further
    apart than the threshold) and 150 identical ones (silence)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, 60, count)] + 0.7 * rng.standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for start in range(0, count - 3, 37):  # a copy, and every third time a copy of the copy
        for step in (1, 2) if start % 3 == 0 else (1,):
            noisy = vectors[start + step - 1] + 0.13 * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
            vectors[start + step] = noisy / np.linalg.norm(noisy)
    vectors[count - 150:] = vectors[count - 150]
    return vectors


def _items(folder: Path, count: int, groups: np.ndarray) -> Items:
    """Items read from one fingerprint-like part per group (the rows `cluster_rows` reads)."""
    keys = [f"k{i}" for i in range(count)]
    table = pa.table({"key": keys, "split": ["train"] * count, "shard": ["000000.tar"] * count,
                      "bytes_sha256": keys, "pcm_sha256": keys, "duration": [1.0] * count, "license": ["CC0"] * count})
    parts, part_groups = [], []
    for group in np.unique(groups):
        first, rows = int(np.argmax(groups == group)), int((groups == group).sum())
        path = folder / f"part{group}.parquet"
        pq.write_table(table.slice(first, rows), path)
        parts.append(PrintPart(str(path), first, rows, 0))
        part_groups.append(int(group))
    return Items(parts, part_groups, ["dataset", "eval"])


def _links(q: np.ndarray, b: np.ndarray, scores: np.ndarray, q_items: np.ndarray, b_items: np.ndarray) -> list[Link]:
    return [Link(int(min(x, y)), int(max(x, y)), EMBEDDING, float(s))
            for x, y, s in zip(q_items[q], b_items[b], scores) if x != y]


def _exact(base: np.ndarray, queries: np.ndarray, same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = queries @ base.T  # the all-pairs matrix: fine on a test's corpus
    q, b = np.nonzero(scores >= THRESHOLD)
    keep = (q != b) if same else np.ones(len(q), bool)
    return q[keep], b[keep], scores[q[keep], b[keep]]


def _partition(rows: list[dict]) -> set[frozenset[str]]:
    clusters: dict[int, set[str]] = {}
    for row in rows:
        clusters.setdefault(row["cluster"], set()).add(row["key"])
    return {frozenset(members) for members in clusters.values()}


def _same_clusters(items: Items, exact: list[Link], found: list[Link]) -> None:
    want, got = cluster_rows(items, exact, "first"), cluster_rows(items, found, "first")
    assert _partition(got) == _partition(want) and len(want) > 300
    best = {row["key"]: row["score"] for row in want}
    for row in got:  # each sample's reported match is its strongest
        assert row["score"] == pytest.approx(best[row["key"]], abs=1e-5)
    assert [row["keep"] for row in got] == [row["keep"] for row in want]


def test_sharded_range_search_finds_the_exact_clusters(small_lists, ray_local, tmp_path):
    vectors = corpus(3_000)
    items = _items(tmp_path, len(vectors), np.zeros(len(vectors), int))
    rows = np.arange(len(vectors))
    q, b, scores = embedding_pairs(vectors, vectors, THRESHOLD, same=True, per_task=700)  # 5 Ray tasks
    assert len(q) <= 2 * len(vectors)  # pairs kept: a forest and each one's strongest, not all 11k
    _same_clusters(items, _links(*_exact(vectors, vectors, True), rows, rows), _links(q, b, scores, rows, rows))


def test_eval_queries_against_the_dataset(small_lists, ray_local, tmp_path):
    base, evalset = corpus(3_000), corpus(400, seed=5)
    leaks = np.arange(0, 3_000, 97)
    evalset[: len(leaks)] = base[leaks]  # planted leaks
    groups = np.r_[np.zeros(len(base), int), np.ones(len(evalset), int)]
    items = _items(tmp_path, len(groups), groups)
    base_items, eval_items = np.arange(len(base)), np.arange(len(base), len(groups))
    q, b, scores = embedding_pairs(base, evalset, THRESHOLD, same=False, per_task=150)
    assert {(int(x), int(y)) for x, y in zip(q, b)} >= set(enumerate(leaks.tolist()))
    exact = _links(*_exact(base, base, True), base_items, base_items) + \
        _links(*_exact(base, evalset, False), eval_items, base_items)
    found = _links(*embedding_pairs(base, base, THRESHOLD, same=True, per_task=1_000), base_items, base_items) + \
        _links(q, b, scores, eval_items, base_items)
    _same_clusters(items, exact, found)


def test_the_reducer_keeps_components_and_each_items_strongest_pair():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 300, 5_000), rng.integers(0, 300, 5_000)
    scores = rng.random(5_000).astype(np.float32)
    reducer = _LinkReducer()
    for start in range(0, 5_000, 900):  # in pieces, as chunks and tasks deliver them
        reducer.offer(a[start : start + 900], b[start : start + 900], scores[start : start + 900])
    ka, kb, ks = reducer.pairs()
    assert len(ka) < 2 * 300
    full = [Link(int(x), int(y), EMBEDDING, float(s)) for x, y, s in zip(a, b, scores)]
    kept = [Link(int(x), int(y), EMBEDDING, float(s)) for x, y, s in zip(ka, kb, ks)]
    # every linked item in the same component, named by its first item, as with all the pairs
    assert dedup._components(kept) == dedup._components(full)
    strongest = {i: max(s for x, y, s in zip(a, b, scores) if i in (x, y)) for i in set(a) | set(b)}
    assert {i: max(s for x, y, s in zip(ka, kb, ks) if i in (x, y)) for i in strongest} == strongest


@pytest.mark.parametrize("change", [lambda t: pa.concat_tables([t, t.slice(0, 3)]),
                                    lambda t: t.slice(0, t.num_rows - 3)])
def test_a_part_changed_after_listing_is_refused_when_its_keys_are_read(tmp_path, change):
    """Embedding dedup places its vectors through each part's keys, numbered from the part's first
    id: a part rewritten since it was listed (more rows, or fewer) put keys on the next part's ids
    (or past every part: a KeyError traceback in cluster_rows), or lost them; it is one line."""
    from audio_dataset.source import UserError

    groups = np.r_[np.zeros(20, int), np.ones(10, int)]
    items = _items(tmp_path, len(groups), groups)
    path = Path(items.parts[0].path)
    pq.write_table(change(pq.read_table(path)), path)
    with pytest.raises(UserError, match="not the fingerprint part it was"):
        dedup._key_map(items)
