"""Loader throughput: samples/s per DataLoader worker on real shards (decode, crop, tokenise, batch).

    python bench/clap_loader.py --train-data 'out/train/{000000..000123}.tar' --workers 4
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import require  # noqa: E402
from clap_model.config import get_preset  # noqa: E402
from clap_model.data import LoaderConfig, ShardDataset, ShardSet, make_loader  # noqa: E402
from clap_model.evaluate import audio_spec  # noqa: E402
from clap_model.params import default_workers  # noqa: E402
from clap_model.text import Tokenize  # noqa: E402


def measure(pattern: str, model: str, workers: int, batches: int, batch_size: int) -> dict[str, float]:
    cfg = get_preset(model)
    if cfg.text.name_or_path is not None:  # the tokenizer's cost is what matters; keep it offline
        cfg = get_preset("tiny")
        cfg = type(cfg)(audio=get_preset(model).audio, text=cfg.text, enable_fusion=get_preset(model).enable_fusion)
    spec = audio_spec(cfg, None, "repeatpad", 60.0)
    loader_cfg = LoaderConfig(batch_size=batch_size, audio=spec, batches_per_worker=-(-batches // max(workers, 1)),
                              shuffle_buffer=64)
    dataset = ShardDataset(ShardSet.from_spec(pattern), loader_cfg, Tokenize(cfg.text))
    # Recycled buffers as clap-train's pinned loader on a GPU uses them (here the consumer copies).
    children_cpu = _children_cpu_seconds()
    iterator = iter(make_loader(dataset, workers, recycle=True))
    first = len(next(iterator)["key"])  # worker start-up is not throughput
    started = time.perf_counter()
    samples = 0
    for _ in range(batches - 1):
        samples += len(next(iterator)["key"])
    elapsed = time.perf_counter() - started
    # Full batches only: a loader that ran short (too few shards) would time less work than it says.
    require(first == batch_size and samples == (batches - 1) * batch_size,
            f"the loader gave {first + samples} samples in {batches} batches of {batch_size}")
    samples_per_s = samples / elapsed if elapsed > 0 else 0.0
    report = {"workers": workers, "batch_size": batch_size, "samples": samples + first, "seconds": elapsed,
              "samples_per_s": samples_per_s, "samples_per_s_per_worker": samples_per_s / max(workers, 1),
              "clip_seconds": spec.clip_samples / spec.sample_rate}
    if workers:
        # What a worker costs, whatever else shares the cores: its CPU time over its whole life
        # (start-up and the first batch included), counted once the workers have exited.
        extra = sum(len(batch["key"]) for batch in iterator)
        worker_cpu = _children_cpu_seconds() - children_cpu
        report["samples_per_worker_cpu_second"] = (samples + first + extra) / worker_cpu
    return report


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--model", default="htsat-tiny-roberta")
    parser.add_argument("--workers", type=int, default=default_workers(), help="default: cores - 1")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = measure(args.train_data, args.model, args.workers, args.batches, args.batch_size)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
