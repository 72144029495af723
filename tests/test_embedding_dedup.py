"""Embedding dedup at scale: an IVF index built in one Ray task, queries in chunks over others, range
search at the threshold, pairs reduced per task; the vectors read from the embed outputs' files and
placed through each shard's fingerprint part. The clusters equal the exact all-pairs method's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from upath import UPath

from audio_dataset.curate import dedup, embed_match
from audio_dataset.curate.common import OK, npy_bytes_header
from audio_dataset.curate.dedup import EMBEDDING, Items, Link, cluster_rows, embedding_links
from audio_dataset.curate.embed_match import LinkReducer
from audio_dataset.curate.match import PrintPart
from audio_dataset.source import UserError

THRESHOLD = 0.95
DIM = 32
SHARD = 400  # samples per shard (a fingerprint part each)


@pytest.fixture
def small_lists(monkeypatch):
    """Inverted lists from 1,000 vectors (10,000 in use), 700 queries a task: the same code on a
    corpus a test can afford."""
    from audio_dataset.curate import index

    monkeypatch.setattr(index, "_MIN_IVF_VECTORS", 1_000)
    monkeypatch.setattr(embed_match, "QUERIES_PER_TASK", 700)


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


def _write_set(folder: Path, vectors: np.ndarray, first: int, group: int, status: list[str] | None = None,
               keys: list[str] | None = None) -> tuple[list[PrintPart], list[tuple[str, str]]]:
    """A dataset folder as dedup reads it: fingerprint-like parts of SHARD samples each (keys, the
    columns `cluster_rows` reads) and an embed output (rows, the .npy, run.json naming the model)."""
    count = len(vectors)
    keys = keys or [f"g{group}-{i}" for i in range(count)]
    shards = [f"{i // SHARD:06d}.tar" for i in range(count)]
    parts, names = [], []
    (folder / "embed" / ".embed").mkdir(parents=True)
    for start in range(0, count, SHARD):
        rows = min(SHARD, count - start)
        path = folder / f"part{start // SHARD}.parquet"
        pq.write_table(pa.table({"key": keys[start : start + rows], "split": ["train"] * rows,
                                 "shard": shards[start : start + rows], "bytes_sha256": keys[start : start + rows],
                                 "pcm_sha256": keys[start : start + rows], "duration": [1.0] * rows,
                                 "license": ["CC0"] * rows}), path)
        parts.append(PrintPart(str(path), first + start, rows, 0))
        names.append(("train", shards[start]))
    pq.write_table(pa.table({"split": ["train"] * count, "shard": shards, "key": keys,  # row groups that
                             "status": status or [OK] * count}), folder / "embed" / "train.rows.parquet",
                   row_group_size=250)  # a query chunk (700) starts and ends inside
    (folder / "embed" / "train.audio.npy").write_bytes(npy_bytes_header((count, DIM), np.float32)
                                                        + vectors.astype(np.float32).tobytes())
    (folder / "embed" / ".embed" / "run.json").write_text(json.dumps(
        {"settings": {"model": {"digest": "m" * 64, "joint_dim": DIM}}}))
    return parts, names


def _sets(tmp_path: Path, *vector_sets: np.ndarray) -> tuple[Items, list[UPath]]:
    parts, groups, shards, first, folders = [], [], [], 0, []
    for group, vectors in enumerate(vector_sets):
        folder = tmp_path / f"set{group}"
        more, names = _write_set(folder, vectors, first, group)
        parts += more
        groups += [group] * len(more)
        shards += names
        first += len(vectors)
        folders.append(UPath(folder))
    return Items(parts, groups, [str(f) for f in folders], shards), folders


def _exact_links(base: np.ndarray, queries: np.ndarray, first_query: int, same: bool) -> list[Link]:
    scores = queries @ base.T  # the all-pairs matrix: fine on a test's corpus
    q, b = np.nonzero(scores >= THRESHOLD)
    keep = (q != b) if same else np.ones(len(q), bool)
    return [Link(int(min(x + first_query, y)), int(max(x + first_query, y)), EMBEDDING, float(scores[x, y]))
            for x, y in zip(q[keep], b[keep])]


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


@pytest.mark.parametrize("on_ray", [True, False])
def test_tasks_over_the_files_find_the_exact_clusters(small_lists, ray_local, tmp_path, on_ray):
    """On Ray (its workers index exactly: 3,000 vectors are under the IVF floor there) and in this
    process (where small_lists lowers the floor: 8-bit codes, candidates scored again), the same
    clusters as exact all-pairs matching, and the same scores."""
    vectors = corpus(3_000)
    items, folders = _sets(tmp_path, vectors)
    plan, missing = embed_match.plan_matching(UPath(tmp_path / "work"), folders, items.by_shard(), THRESHOLD)
    assert len(plan.chunks) == 5 and missing == []  # 5 query tasks
    a, b, scores, report = embed_match.match_embeddings(plan, on_ray=on_ray)
    assert len(a) <= 2 * len(vectors)  # pairs kept: a forest and each one's strongest, not all 11k
    assert report["indexed"] == 3_000 and not (tmp_path / "work").exists()
    assert report["index_kind"] == ("flat" if on_ray else "ivfsq")
    found = [Link(int(x), int(y), EMBEDDING, float(s)) for x, y, s in zip(a, b, scores)]
    _same_clusters(items, _exact_links(vectors, vectors, 0, True), found)


@pytest.mark.parametrize("on_ray", [True, False])
def test_an_index_in_parts_finds_the_same_clusters(small_lists, monkeypatch, ray_local, tmp_path, on_ray):
    """A corpus larger than PART_VECTORS is indexed in parts, trained once (the train task's index
    handed to each part's task), each part searched by every chunk of the dataset and of an eval set:
    the same clusters and scores as exact all-pairs matching, leaks across parts included."""
    monkeypatch.setattr(embed_match, "PART_VECTORS", 1_400)  # 2 chunks of 700 a part: 3 parts
    base, evalset = corpus(3_000), corpus(400, seed=5)
    evalset[:31] = base[::97]  # planted leaks, in every part
    items, folders = _sets(tmp_path, base, evalset)
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work"), folders, items.by_shard(), THRESHOLD)
    assert plan.index_parts == ((0, 1), (2, 3), (4,)) and len(plan.chunks) == 6
    a, b, scores, report = embed_match.match_embeddings(plan, on_ray=on_ray)
    assert report["index_parts"] == 3 and report["query_tasks"] == 6 and report["indexed"] == 3_000
    assert report["index_kind"] == ("flat" if on_ray else "ivfsq") and not (tmp_path / "work").exists()
    found = [Link(int(x), int(y), EMBEDDING, float(s)) for x, y, s in zip(a, b, scores)]
    both = np.concatenate([base, evalset])
    exact = [link for link in _exact_links(both, both, 0, True) if link.a < 3_000]  # eval to eval: not sought
    assert {(link.a, link.b - 3_000) for link in exact if link.a < 3_000 <= link.b} >= {(97 * i, i) for i in range(31)}
    _same_clusters(items, exact, found)


def test_the_tasks_pairs_give_the_same_matches_in_any_order(small_lists, tmp_path):
    """On Ray the driver folds each query task's pairs in as it arrives (ray.wait): which order that
    is varies from run to run, so each sample's reported match (of equal scores, the first pair)
    must not depend on it. Identical vectors spread over every chunk: ties between tasks."""
    base = corpus(3_000)
    base[5::200] = base[5]
    items, folders = _sets(tmp_path, base)
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work"), folders, items.by_shard(), THRESHOLD)
    built = embed_match.index_task(plan)
    found = [embed_match.query_task(plan, task, (built,)) for task in range(len(plan.chunks))]

    def rows(order: list[int]) -> list[dict]:
        reducer = LinkReducer()
        for task in order:
            q, b, scores, _ = found[task]
            reducer.offer(np.minimum(q, b), np.maximum(q, b), scores)
        links = [Link(int(x), int(y), EMBEDDING, float(s)) for x, y, s in zip(*reducer.pairs())]
        return cluster_rows(items, sorted(links, key=lambda link: (link.a, link.b)), "first")

    forward = rows(list(range(len(found))))
    assert len(forward) > 300 and forward == rows(list(reversed(range(len(found)))))


def test_a_small_part_of_a_large_corpus_loads_with_the_corpus_lists(small_lists, monkeypatch, tmp_path):
    """Every part has the lists trained for the whole corpus (4 sqrt(N): 5,657 of 512-d at 2M, 11.6
    MB), so a part of few rows (a small last split) is a file far larger than its own rows could
    make: the query task still loads it, its size bounded by the corpus's lists. Here 20,000 lists
    (pinned: trained from centroids given, as k-means on millions would make them) for 2,100 rows."""
    import faiss

    from audio_dataset.curate import index

    monkeypatch.setattr(embed_match, "PART_VECTORS", 1_400)
    monkeypatch.setattr(index, "ivf_lists", lambda count: 20_000)
    base = corpus(2_100)
    items, folders = _sets(tmp_path, base)
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work"), folders, items.by_shard(), THRESHOLD)
    assert plan.index_parts == ((0, 1), (2,))
    quantizer = faiss.IndexFlatIP(DIM)
    quantizer.add(corpus(20_000, seed=3))  # the lists: not trained again
    trained = faiss.IndexIVFScalarQuantizer(quantizer, DIM, 20_000, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
    trained.train(base)
    trained = faiss.serialize_index(trained)
    built = tuple(embed_match.index_task(plan, part, trained) for part in range(2))
    assert [part["vectors"] for part in built] == [1_400, 700]
    assert (tmp_path / "work" / "index.1.faiss").stat().st_size > 2_000_000
    a, b, _, _ = embed_match.query_task(plan, 2, built)
    assert set(range(1_950, 2_100)) <= {*a.tolist(), *b.tolist()}  # the 150 identical vectors, found


def test_parts_are_grouped_by_rows_not_by_chunks(monkeypatch):
    """Many small splits make many small chunks (a chunk never crosses a split): the parts still
    hold up to PART_VECTORS rows each, not a fixed number of chunks; eval chunks are never indexed."""
    from audio_dataset.curate.embed_match import VectorSplit, _index_parts

    monkeypatch.setattr(embed_match, "PART_VECTORS", 1_000)
    splits = [VectorSplit(group, "r", "v", 300, 0) for group in (0, 0, 1, 0, 0, 0)]
    chunks = tuple((i, 0, 300) for i in range(6))
    assert _index_parts(chunks, splits) == ((0, 1, 3), (4, 5))
    assert _index_parts((), []) == ((),)  # no rows: one empty part, as one empty index


@pytest.mark.parametrize("plant", ["other_lists", "another_part", "same_bytes"])
def test_a_part_planted_between_the_tasks_is_one_line(small_lists, monkeypatch, tmp_path, plant):
    """Each index task returns its files' sha256 with the part (through Ray): a query task reads back
    those bytes or refuses in one line naming the file. A well-formed index with other lists, or
    another part's files (in range, the same lists: false links with true scores), is refused;
    the same bytes written again are not."""
    import shutil

    from audio_dataset.curate.index import IndexBuilder, save_index

    monkeypatch.setattr(embed_match, "PART_VECTORS", 1_400)
    items, folders = _sets(tmp_path, corpus(3_000))
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work"), folders, items.by_shard(), THRESHOLD)
    trained, _ = embed_match.train_task(plan)
    built = tuple(embed_match.index_task(plan, part, trained) for part in range(3))
    before = embed_match.query_task(plan, 0, built)  # as written: searched
    work = tmp_path / "work"
    if plant == "other_lists":
        other = IndexBuilder("ivfsq", DIM, 3_000)
        other.train(corpus(3_000, seed=11))
        other.add(corpus(built[1]["vectors"], seed=12))
        save_index(other.finish(), work / "index.1.faiss")
        name = "index.1.faiss"
    elif plant == "another_part":  # part 0's items and places as part 1's: both 1,400 rows
        for stem in ("items", "places"):
            shutil.copy(work / f"{stem}.0.npy", work / f"{stem}.1.npy")
        name = "items.1.npy"
    else:
        (work / "index.1.faiss").write_bytes((work / "index.1.faiss").read_bytes())
        after = embed_match.query_task(plan, 0, built)
        assert all(np.array_equal(x, y) for x, y in zip(before, after[:3]))
        return
    with pytest.raises(UserError) as caught:
        embed_match.query_task(plan, 0, built)
    message = str(caught.value)
    assert message.startswith(str(work / name)) and "rerun `audiodata dedup`" in message and "\n" not in message


def test_eval_queries_against_the_dataset(small_lists, ray_local, tmp_path):
    base, evalset = corpus(3_000), corpus(400, seed=5)
    leaks = np.arange(0, 3_000, 97)
    evalset[: len(leaks)] = base[leaks]  # planted leaks
    items, folders = _sets(tmp_path, base, evalset)
    found, missing, _ = embedding_links(items, folders, THRESHOLD, UPath(tmp_path / "work"))
    leaked = {link.b for link in found if link.a < 3_000 <= link.b}  # linked to a dataset item
    assert leaked >= {3_000 + i for i in range(len(leaks))} and missing == []
    exact = _exact_links(base, base, 0, True) + _exact_links(base, evalset, 3_000, False)
    _same_clusters(items, exact, found)


def test_rows_without_an_embedding_or_a_fingerprint_are_not_matched(tmp_path):
    """An embed row whose sample was not fingerprinted (another version of the dataset), or whose
    status is not ok, or whose vector is zero or not finite, matches nothing; the rest do."""
    vectors = corpus(600)
    vectors[[10, 11]] = vectors[9]  # three copies...
    vectors[11] = np.nan  # ...one not finite
    status = [OK] * 600
    status[20], vectors[21] = "no_audio", vectors[20]
    parts, names = _write_set(tmp_path / "set0", vectors, 0, 0, status)
    rows = pq.read_table(tmp_path / "set0" / "embed" / "train.rows.parquet")
    keys = rows.column("key").to_pylist()
    keys[30], vectors[31] = "not-fingerprinted", vectors[30]
    pq.write_table(rows.set_column(2, "key", pa.array(keys)), tmp_path / "set0" / "embed" / "train.rows.parquet")
    (tmp_path / "set0" / "embed" / "train.audio.npy").write_bytes(npy_bytes_header((600, DIM), np.float32)
                                                                  + vectors.tobytes())
    items = Items(parts, [0] * len(parts), [str(tmp_path / "set0")], names)
    found, _, _ = embedding_links(items, [UPath(tmp_path / "set0")], THRESHOLD, UPath(tmp_path / "work"))
    pairs = {(link.a, link.b) for link in found}
    assert (9, 10) in pairs
    assert not {i for pair in pairs for i in pair} & {11, 20, 30}  # nor, so, 21 and 31 with them


def test_each_copy_of_a_key_a_shard_holds_twice_is_matched_by_its_own_vector(small_lists, tmp_path):
    """Fingerprint matching numbers every row of a shard's part: a key a shard holds twice is two
    items, each matched by its own audio. So is it here: the n-th copy of a key in the embed rows is
    the n-th in the part, also where a query chunk (700 rows) starts inside the shard (400-1199)."""
    vectors = corpus(1_200)
    keys = [f"g0-{i}" for i in range(1_200)]
    keys[5] = keys[3]  # a second copy, its audio another clip's (100)
    keys[750] = keys[760] = keys[450]  # three copies, two of them after the chunk's start
    vectors[5], vectors[760] = vectors[100], vectors[1_100]
    parts, names = _write_set(tmp_path / "set0", vectors, 0, 0, keys=keys)
    items = Items(parts, [0] * len(parts), [str(tmp_path / "set0")], names)
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work"), [UPath(tmp_path / "set0")], items.by_shard(),
                                        THRESHOLD)
    assert [chunk[1:] for chunk in plan.chunks] == [(0, 700), (700, 1_200)]
    placed = np.concatenate([embed_match._rows(plan, *chunk)[1] for chunk in plan.chunks])
    np.testing.assert_array_equal(placed, np.arange(1_200))  # every row on its own item
    a, b, _, _ = embed_match.match_embeddings(plan, on_ray=False)
    pairs = set(zip(a.tolist(), b.tolist()))
    assert {(5, 100), (760, 1_100)} <= pairs and not {(3, 100), (450, 1_100)} & pairs


def test_the_reducer_keeps_components_and_each_items_strongest_pair():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 300, 5_000), rng.integers(0, 300, 5_000)
    scores = rng.random(5_000).astype(np.float32)
    reducer = LinkReducer()
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
    """Embedding matching places its vectors through each part's keys, numbered from the part's
    first id: a part rewritten since it was listed (more rows, or fewer) put keys on the next
    part's ids, or lost them; it is one line."""
    items, folders = _sets(tmp_path, corpus(500), corpus(300, seed=1))
    path = Path(items.parts[0].path)
    pq.write_table(change(pq.read_table(path)), path)
    with pytest.raises(UserError, match="not the fingerprint part it was"):
        embedding_links(items, folders, THRESHOLD, UPath(tmp_path / "work"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["embed/train.audio.npy", "embed/train.rows.parquet", "part0.parquet"])
def test_a_fifo_in_place_of_a_file_is_one_line_not_a_hang(tmp_path, name):
    import os

    items, folders = _sets(tmp_path, corpus(500))
    (tmp_path / "set0" / name).unlink()
    os.mkfifo(tmp_path / "set0" / name)
    with pytest.raises(UserError, match="not a regular file"):
        embedding_links(items, folders, THRESHOLD, UPath(tmp_path / "work"))


@pytest.mark.parametrize("damage", ["shape", "short", "pickle", "unclosed"])
def test_an_embeddings_file_that_is_not_one_is_one_line(tmp_path, damage):
    items, folders = _sets(tmp_path, corpus(500))
    npy = tmp_path / "set0" / "embed" / "train.audio.npy"
    data = npy.read_bytes()
    if damage == "shape":
        npy.write_bytes(npy_bytes_header((500, DIM // 2), np.float32) + data[128:])
    elif damage == "short":
        npy.write_bytes(data[:-DIM * 4])
    elif damage == "unclosed":  # numpy's fallback parser (tokenize) fails on it with its own error
        npy.write_bytes(data[:128].replace(b"}", b" ") + data[128:])
    else:  # an object array's header: never unpickled
        npy.write_bytes(npy_bytes_header((500, DIM), np.dtype(object)) + data[128:])
    with pytest.raises(UserError, match="train.audio.npy"):
        embedding_links(items, folders, THRESHOLD, UPath(tmp_path / "work"))


@pytest.mark.parametrize("dim", ["x", None, [DIM], 0, -DIM, 32.5])
def test_a_run_json_without_a_usable_dimension_is_one_line(tmp_path, dim):
    """The embed output's run.json is read back like any file there: its joint_dim places the rows."""
    items, folders = _sets(tmp_path, corpus(500))
    (tmp_path / "set0" / "embed" / ".embed" / "run.json").write_text(json.dumps(
        {"settings": {"model": {"digest": "m" * 64, "joint_dim": dim}}}))
    with pytest.raises(UserError, match="joint_dim"):
        embedding_links(items, folders, THRESHOLD, UPath(tmp_path / "work"))


@pytest.mark.parametrize("change", [
    lambda t: t.set_column(2, "key", pa.array([[k] for k in t.column("key").to_pylist()])),  # unhashable
    lambda t: t.drop(["status"]),
    lambda t: t.set_column(0, "split", pa.array(["test"] * t.num_rows)),  # another split's file
])
def test_a_rows_file_that_is_not_one_is_one_line(tmp_path, change):
    """The rows place each vector on its item: rows of another type, without a column, or naming
    another split than their file's (its vectors would land on that split's items) are one line."""
    items, folders = _sets(tmp_path, corpus(500))
    rows = tmp_path / "set0" / "embed" / "train.rows.parquet"
    pq.write_table(change(pq.read_table(rows)), rows)
    with pytest.raises(UserError, match="train.rows.parquet"):
        embedding_links(items, folders, THRESHOLD, UPath(tmp_path / "work"))


@pytest.mark.parametrize("plant", ["beyond", "negative", "unclosed", "long"])
def test_items_planted_in_work_between_the_tasks_are_one_line(tmp_path, plant):
    """The query tasks read back the items the index task wrote under OUT/dedup/_work: a file put
    there in between (ids no dataset item has, a header numpy cannot parse, a file far larger than
    its items) is one line, never read whole, never an id that crashes the clustering later."""
    items, folders = _sets(tmp_path, corpus(500))
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work"), folders, items.by_shard(), THRESHOLD)
    built = embed_match.index_task(plan)
    path = tmp_path / "work" / "items.0.npy"
    good = np.load(path)
    if plant in ("beyond", "negative"):
        bad = good + 500 if plant == "beyond" else good - 1
        path.write_bytes(npy_bytes_header(bad.shape, np.int64) + bad.tobytes())
    elif plant == "unclosed":
        path.write_bytes(npy_bytes_header(good.shape, np.int64).replace(b"}", b" ") + good.tobytes())
    else:
        path.write_bytes(npy_bytes_header(good.shape, np.int64) + good.tobytes() + bytes(1 << 20))
    with pytest.raises(UserError, match=r"items\.0\.npy"):  # other bytes than the index task wrote
        embed_match.query_task(plan, 0, (built,))
    with pytest.raises(UserError, match=r"items\.0\.npy"):  # and, its digest aside, not items at all
        embed_match._load_items(plan, 0, built["vectors"])


@pytest.mark.parametrize("plant", ["row_beyond", "eval_split", "split_beyond", "shape"])
def test_places_planted_in_work_between_the_tasks_are_one_line(tmp_path, plant):
    """The query tasks read each candidate's vector back from where places.npy says it is: a place
    outside the dataset's splits (a row past a split's end, an eval set's split, a split the plan
    lacks) or a file of another shape is one line, never a read elsewhere."""
    items, folders = _sets(tmp_path, corpus(500), corpus(300, seed=9))
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work"), folders, items.by_shard(), THRESHOLD)
    built = embed_match.index_task(plan)
    path = tmp_path / "work" / "places.0.npy"
    bad = np.load(path)
    if plant == "row_beyond":
        bad[0, 1] = plan.splits[bad[0, 0]].count
    elif plant == "eval_split":
        bad[0, 0] = next(i for i, split in enumerate(plan.splits) if split.group)
    elif plant == "split_beyond":
        bad[0, 0] = len(plan.splits)
    else:
        bad = bad[:, :1].copy()
    np.save(path, bad)
    with pytest.raises(UserError, match=r"places\.0\.npy"):  # other bytes than the index task wrote
        embed_match.query_task(plan, 0, (built,))
    with pytest.raises(UserError, match=r"places\.0\.npy"):  # and, its digest aside, no places in the plan
        embed_match._load_places(plan, 0, built["vectors"])


@pytest.mark.parametrize("damage", ["index.0.faiss:truncated", "index.0.faiss:garbage", "index.0.faiss:missing",
                                    "items.0.npy:truncated", "places.0.npy:truncated"])
def test_dedups_own_index_damaged_between_the_tasks_names_dedup_as_the_remedy(tmp_path, damage):
    """The index and its items under _work/embedding are dedup's own (rebuilt by every run), not
    embed's output: the line names the file and says to rerun dedup, not `audiodata embed`."""
    items, folders = _sets(tmp_path, corpus(500))
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work"), folders, items.by_shard(), THRESHOLD)
    built = embed_match.index_task(plan)
    name, how = damage.split(":")
    path = tmp_path / "work" / name
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:20] if how == "truncated" else b"IxF2" + bytes(200))
    with pytest.raises(UserError) as caught:
        embed_match.query_task(plan, 0, (built,))
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "rerun `audiodata dedup`" in message
    assert "audiodata embed" not in message and "\n" not in message


def test_an_index_over_few_usable_rows_of_many_trains(small_lists, monkeypatch, tmp_path):
    """The training sample is drawn over every row before the usable ones are known: where few
    are (here 1 in 10, and a sample capped at 200 rows, as 200k of 10M rows would be), it held
    fewer vectors than the index has lists, and faiss refused to train (a traceback)."""
    from audio_dataset.curate import index

    monkeypatch.setattr(index, "MAX_TRAIN", 200)
    monkeypatch.setattr(embed_match, "QUERIES_PER_TASK", 20_000)
    usable = corpus(1_500)
    vectors = np.random.default_rng(3).standard_normal((15_000, DIM)).astype(np.float32)
    vectors[::10] = usable
    status = [OK if i % 10 == 0 else "no_audio" for i in range(15_000)]
    parts, names = _write_set(tmp_path / "set0", vectors, 0, 0, status)
    items = Items(parts, [0] * len(parts), [str(tmp_path / "set0")], names)
    found, _, _ = embedding_links(items, [UPath(tmp_path / "set0")], THRESHOLD, UPath(tmp_path / "work"))
    exact = [Link(10 * link.a, 10 * link.b, EMBEDDING, link.score) for link in _exact_links(usable, usable, 0, True)]
    assert _partition(cluster_rows(items, found, "first")) == _partition(cluster_rows(items, exact, "first"))


def test_a_task_in_a_fresh_worker_refuses_a_link_planted_in_work(tmp_path, monkeypatch):
    """A Ray worker starts knowing no output root; the index task names its own (the dedup _work
    folder), so a link planted at _work/embedding after the driver's checks is refused, not written
    through."""
    from audio_dataset import storage

    items, folders = _sets(tmp_path, corpus(500))
    plan, _ = embed_match.plan_matching(UPath(tmp_path / "work" / "embedding"), folders, items.by_shard(), THRESHOLD)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "embedding").symlink_to(outside)
    monkeypatch.setattr(storage, "_ROOTS", set())  # as in a fresh worker process
    with pytest.raises(storage.UnsafeOutput):
        embed_match.index_task(plan)
    assert list(outside.iterdir()) == []
