"""Cost of `clap-eval --suite`: clips scored per second, end to end (FLAC decode, resample, crop,
batching, audio embeddings, the class prompts, metrics, results.json).

An ESC-50-shaped build is made here (N clips of 5 s at 48 kHz, 50 classes in 5 folds, the fields
the esc50 source writes: class_labels, class_ids, fold), and a random-weights model saved as a
clap-train checkpoint: `tiny` and HTSAT-tiny (LAION-CLAP's released audio encoder, 10 s window)
with the tiny text tower (no download; 50 prompts are nothing next to the audio). The command runs
in-process on a one-task suite (zero-shot, every clip), fixed crop; the time is the command's whole
run, model loading included. Asserts every clip was scored.

    python bench/eval_suite.py --clips 200 --models tiny htsat-tiny --device cpu --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audio_dataset import audio as audio_lib  # noqa: E402
from audio_dataset.schema import SampleMeta, safe_key, shard_name  # noqa: E402
from audio_dataset.shards import ShardWriter, write_sizes  # noqa: E402
from clap_model.checkpoint import save_atomic  # noqa: E402
from clap_model.clap import CLAP  # noqa: E402
from clap_model.config import ModelConfig, get_preset  # noqa: E402
from clap_model.evaluate import main as clap_eval  # noqa: E402

RATE = 48_000
SUITE = ('[suite]\nname = "bench"\n[[task]]\nname = "esc50"\ndataset = "esc50"\nkind = "zeroshot"\n'
         'templates = ["This is a sound of {}."]\n')


def build(root: Path, clips: int, per_shard: int = 100) -> None:
    """DATA_ROOT/esc50/test: noise-plus-tone clips, 5 s each, 50 classes."""
    folder = root / "esc50" / "test"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}
    writer = None
    for i in range(clips):
        if i % per_shard == 0:
            if writer:
                writer.close()
            name = shard_name(i // per_shard)
            writer, counts[name] = ShardWriter(folder / name), 0
        label = f"class_{i % 50}"
        t = np.arange(5 * RATE) / RATE
        wave = 0.3 * np.sin(2 * np.pi * (100 + 40 * (i % 50)) * t) + 0.05 * rng.standard_normal(len(t))
        meta = SampleMeta(text=[label.replace("_", " ")], tag=[label], original_data={}, source="bench",
                          source_id=str(i), license="CC0", author="bench", url="", duration=5.0,
                          sample_rate=RATE, channels=1,
                          extra={"class_labels": [label], "class_ids": [i % 50], "fold": 1 + i % 5})
        writer.write({"__key__": safe_key("bench", str(i)),
                      "flac": audio_lib.encode_flac(wave[None, :].astype(np.float32), RATE),
                      "json": meta.to_json_bytes()})
        counts[shard_name(i // per_shard)] += 1
    writer.close()
    write_sizes(folder, counts)


def model_config(name: str) -> ModelConfig:
    tiny_text = get_preset("tiny").text
    if name == "tiny":
        return get_preset("tiny")
    if name == "htsat-tiny":
        return replace(get_preset("htsat-tiny-roberta"), text=tiny_text)
    raise SystemExit(f"unknown model {name!r}: tiny or htsat-tiny")


def measure(root: Path, work: Path, name: str, clips: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = model_config(name)
    checkpoint = work / f"{name}.pt"
    save_atomic({"config": cfg.to_dict(), "state_dict": CLAP(cfg, pretrained_text=False).state_dict(),
                 "epoch": 0}, checkpoint)
    (work / "suite.toml").write_text(SUITE)
    out = work / f"out-{name}"
    start = time.perf_counter()
    code = clap_eval(["--suite", str(work / "suite.toml"), "--checkpoint", str(checkpoint),
                      "--data-root", str(root), "--out", str(out), "--batch-size", str(args.batch_size),
                      "--workers", str(args.workers), "--device", args.device])
    seconds = time.perf_counter() - start
    assert code == 0, f"clap-eval exited {code}"
    [task] = json.loads((out / "results.json").read_text())["tasks"]
    assert task["clips"] == clips, f"{task['clips']} of {clips} clips scored"
    return {"model": name, "clips": clips, "seconds": round(seconds, 2), "clips_per_s": round(clips / seconds, 1),
            "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
            "accuracy": task["metrics"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=["tiny", "htsat-tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root, work = Path(tmp) / "data", Path(tmp) / "work"
        work.mkdir()
        build(root, args.clips)
        for name in args.models:
            rows.append(measure(root, work, name, args.clips, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
