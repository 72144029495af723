"""Search at corpus size: each `embed --index` kind at N vectors (default 1M) of 512 dimensions.

Vectors: synthetic with the structure of real embeddings, clustered at two scales: 2,000 families
(unit vectors), each with 25 sounds (the family plus an offset of norm 0.8), each vector a sound plus
noise of norm 0.5, L2-normalised: cosine ~0.87 within a sound, ~0.5 within a family, ~0 across. Queries: 300 more drawn the same way (not in the index: a text or an
audio query is never one of the indexed clips). For each kind: the index built as `embed` builds it
(`IndexBuilder`, trained on a sample spread over the split), saved, loaded back through the guarded
loader (`load_index`, every structural check included; ivfpq re-ranks RERANK x k candidates from
the full vectors, as `search` does from the split's memory-mapped .npy), then one query at a time on ONE core
(faiss.omp_set_num_threads(1)): median and p95 ms per query, recall@10 against the exact top 10
(numpy brute force), bytes per vector (the index file's size / N) and the process's peak RSS.

    python bench/search_scale.py --count 1000000 --kinds flat,ivfpq,hnsw
It asserts what it reports: every query answered with k ids in range, recall computed over all of them.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))

DIM, K, QUERIES, FAMILIES, SOUNDS = 512, 10, 300, 2_000, 25


def _spread(rng: np.random.Generator, count: int, norm: float) -> np.ndarray:
    return rng.standard_normal((count, DIM), np.float32) * (norm / np.sqrt(DIM))


def clustered(count: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((count, DIM), np.float32)
    for start in range(0, count, 100_000):  # a chunk at a time: memory is the result only
        n = min(100_000, count - start)
        chunk = centres[rng.integers(0, len(centres), n)] + _spread(rng, n, 0.5)
        out[start : start + n] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def exact_top(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    best_scores = np.full((len(queries), K), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), K), np.int64)
    for start in range(0, len(vectors), 200_000):
        scores = queries @ vectors[start : start + 200_000].T
        ids = np.arange(start, start + scores.shape[1])
        merged_s = np.concatenate([best_scores, scores], axis=1)
        merged_i = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argsort(-merged_s, axis=1)[:, :K]
        best_scores, best_ids = np.take_along_axis(merged_s, top, 1), np.take_along_axis(merged_i, top, 1)
    return best_ids


def bench_kind(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, folder: Path) -> dict:
    import faiss
    from upath import UPath

    from audio_dataset.curate.index import IndexBuilder, load_index, save_index

    faiss.omp_set_num_threads(2)  # building may use both cores; queries are timed on one
    started = time.perf_counter()
    builder = IndexBuilder(kind, DIM, len(vectors))
    rows = builder.train_rows()
    if len(rows):
        builder.train(vectors[rows])
    for start in range(0, len(vectors), 100_000):
        builder.add(vectors[start : start + 100_000])
    path = UPath(folder / f"{kind}.faiss")
    save_index(builder.finish(), path)
    build = time.perf_counter() - started
    started = time.perf_counter()
    index = load_index(path, len(vectors), DIM, vectors)  # ivfpq: re-ranked from the full vectors
    load = time.perf_counter() - started
    faiss.omp_set_num_threads(1)
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        _, ids = index.search(query[None, :], K)
        times.append(time.perf_counter() - started)
        found.append(ids[0])
    found = np.array(found)
    assert found.shape == (len(queries), K) and ((found >= 0) & (found < len(vectors))).all(), "unanswered queries"
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
    size = path.stat().st_size
    path.unlink()
    if kind == "ivfpq":  # the codes alone, for the record
        codes = index.index
        alone = codes.search(queries, K)[1]
        result_alone = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(alone, truth)]))
        print(f"  ivfpq without re-ranking: recall@10 {result_alone:.3f}", flush=True)
    return {"kind": builder.kind, "build_s": build, "load_s": load, "median_ms": 1e3 * float(np.median(times)),
            "p95_ms": 1e3 * float(np.percentile(times, 95)), "recall@10": recall, "bytes_per_vector": size / len(vectors),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--kinds", default="flat,ivfpq,hnsw")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    families = rng.standard_normal((FAMILIES, DIM)).astype(np.float32)
    families /= np.linalg.norm(families, axis=1, keepdims=True)
    centres = np.repeat(families, SOUNDS, axis=0) + _spread(rng, FAMILIES * SOUNDS, 0.8)
    started = time.perf_counter()
    vectors, queries = clustered(args.count, 1, centres), clustered(QUERIES, 2, centres)
    truth = exact_top(vectors, queries)
    print(f"{args.count} clustered vectors and exact top-{K} of {QUERIES} queries in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds.split(","):
            result = bench_kind(kind, vectors, queries, truth, Path(folder))
            print(f"| {args.count:,} | {result['kind']} | {result['build_s']:.1f} s | {result['load_s']:.1f} s | "
                  f"{result['median_ms']:.2f} ms (p95 {result['p95_ms']:.2f}) | {result['recall@10']:.3f} | "
                  f"{result['bytes_per_vector']:.0f} B | {result['peak_rss_gib']:.1f} GiB |", flush=True)


if __name__ == "__main__":
    main()
