"""Curation benchmarks: embed throughput, embedding dedup and search at 100k and 1M vectors.

embed: samples/s through `EmbedProcessor.process`, the code each `audiodata embed` worker runs per
shard (decode FLAC, resample, audio and caption embeddings), on real clips (the 10 test clips cut
to 10 s, 48 kHz mono FLAC, repeated), with random weights built from a config (no network here):
`tiny` (our CPU preset) and HTSAT-tiny, the audio encoder of LAION-CLAP's released models, with the
tiny text encoder (the audio side dominates the cost; RoBERTa-base needs a download).

dedup and search: unit vectors of CLAP's 512 dimensions, random, with 1% planted near-copies
(cosine ~0.99); dedup is `embedding_pairs` (IVF above 10k vectors, each vector's 10 neighbours,
threshold 0.98), reporting time and the planted copies found; search is `build_index` (flat: exact;
ivf: nprobe 16) and one query at a time, reporting index build time and ms per query, and for ivf the
share of queries whose exact top hit it returns.

    python bench/curate.py --embed-samples 64 --vectors 100000,1000000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import require  # noqa: E402

ROOT = Path(__file__).parent.parent
DIM = 512


def _samples(count: int, seconds: float = 10.0) -> list[dict]:
    from audio_dataset import audio as audio_lib
    from audio_dataset.schema import safe_key

    clips = sorted((ROOT / "tests" / "data" / "real-audio").glob("*.ogg"))
    made = []
    for path in clips:
        decoded = audio_lib.decode(path.read_bytes())
        mono = audio_lib.resample(audio_lib.set_channels(decoded.samples, 1), decoded.sample_rate, 48_000)
        caption = json.loads(path.with_suffix(".json").read_text())["text"]
        made.append((audio_lib.encode_flac(mono[:, : int(seconds * 48_000)], 48_000), caption))
    return [{"__key__": safe_key("bench", str(i)), "flac": made[i % len(made)][0],
             "json": json.dumps({"text": made[i % len(made)][1], "source": "bench", "duration": seconds}).encode()}
            for i in range(count)]


def bench_embed(count: int, threads: int) -> list[tuple[str, float]]:
    import torch

    from audio_dataset.curate.embed import EmbedOptions, EmbedProcessor
    from audio_dataset.stage_runner import ShardJob
    from clap_model.clap import CLAP
    from clap_model.config import PRESETS, ModelConfig

    torch.set_num_threads(threads)
    samples = _samples(count)
    job = ShardJob("train", "000000.tar", "", "", "")
    results = []
    shapes = {"tiny": PRESETS["tiny"],
              "htsat-tiny audio": ModelConfig(audio=PRESETS["htsat-tiny-roberta"].audio, text=PRESETS["tiny"].text)}
    with_folder = Path("/tmp") / f"bench-curate-{time.time_ns()}"
    with_folder.mkdir()
    for name, cfg in shapes.items():
        torch.manual_seed(0)
        model = CLAP(cfg, pretrained_text=False)
        path = with_folder / f"{name.replace(' ', '_')}.pt"
        torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)
        processor = EmbedProcessor(EmbedOptions(checkpoint=path, batch_size=16), "cpu")
        processor.process(job, samples[:4])  # warm-up
        start = time.perf_counter()
        _, rows = processor.process(job, samples)
        elapsed = time.perf_counter() - start
        embedded = sum(row["status"] == "ok" and row["audio"] is not None for row in rows)
        require(len(rows) == count and embedded == count, f"embed {name}: {embedded} of {count} samples embedded")
        results.append((name, count / elapsed))
    return results


def _vectors(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors; every 100th is a near-copy (cosine ~0.99) of the one before it."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM), dtype=np.float32)
    copies = np.arange(1, count, 100)
    vectors[copies] = vectors[copies - 1] + 0.1 * rng.standard_normal((len(copies), DIM), dtype=np.float32) * \
        np.linalg.norm(vectors[copies - 1], axis=1, keepdims=True) / np.sqrt(DIM) * 1.4
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, copies


def bench_dedup(count: int) -> dict[str, float]:
    from audio_dataset.curate.embed_match import embedding_pairs

    vectors, copies = _vectors(count)
    planted_cos = float(np.mean(np.sum(vectors[copies] * vectors[copies - 1], axis=1)))
    start = time.perf_counter()
    q, b, _ = embedding_pairs(vectors, vectors, threshold=0.98, same=True)
    seconds = time.perf_counter() - start
    found = set(zip(np.minimum(q, b).tolist(), np.maximum(q, b).tolist()))
    recall = np.mean([(int(c - 1), int(c)) in found for c in copies])
    return {"seconds": seconds, "planted_recall": float(recall), "pairs": len(found), "planted_cosine": planted_cos}


def bench_search(count: int, kind: str, queries: int = 200) -> dict[str, float]:
    from audio_dataset.curate.index import build_index

    vectors, _ = _vectors(count, seed=1)
    start = time.perf_counter()
    index = build_index(vectors, kind)
    built = time.perf_counter() - start
    require(index.ntotal == count, f"search: the {kind} index holds {index.ntotal} of {count} vectors")
    rng = np.random.default_rng(2)
    picks = rng.choice(count, queries, replace=False)
    probe = vectors[picks] + 0.02 * rng.standard_normal((queries, DIM), dtype=np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    start = time.perf_counter()
    tops = [index.search(probe[i : i + 1], 10)[1][0, 0] for i in range(queries)]
    per_query = (time.perf_counter() - start) / queries
    require(len(tops) == queries and min(tops) >= 0, f"search: {kind} answered fewer than {queries} queries")
    return {"build_s": built, "ms_per_query": 1000 * per_query,
            "top1_is_source": float(np.mean(np.array(tops) == picks))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vectors", default="100000,1000000")
    parser.add_argument("--skip-embed", action="store_true")
    args = parser.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    if not args.skip_embed:
        for name, rate in bench_embed(args.embed_samples, args.threads):
            print(f"embed {name}: {rate:.1f} samples/s ({args.embed_samples} x 10 s clips, {args.threads} threads, "
                  "CPU)")
    for count in (int(c) for c in args.vectors.split(",")):
        d = bench_dedup(count)
        print(f"dedup {count:,} vectors: {d['seconds']:.1f} s, planted copies found {d['planted_recall']:.3f} "
              f"(cosine {d['planted_cosine']:.3f}), {d['pairs']} pairs", flush=True)
        for kind in ("flat", "ivf"):
            s = bench_search(count, kind)
            print(f"search {count:,} vectors, {kind}: index {s['build_s']:.1f} s, {s['ms_per_query']:.2f} ms/query, "
                  f"top hit is the source {s['top1_is_source']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
