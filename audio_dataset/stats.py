"""Dataset figures from the manifest (and shards, for caption lengths), printed and plotted."""
from __future__ import annotations

import io
import json
import sys
from collections import Counter
from typing import Any, TextIO

import pyarrow as pa

from audio_dataset import manifest
from audio_dataset.schema import SPLITS
from audio_dataset.shards import iter_shard, shard_paths
from audio_dataset.storage import Location, atomic_write_bytes, location

STATS_FILE = "stats.json"
PLOT_FILE = "stats.png"


def _hours(seconds: float | None) -> float:
    return round((seconds or 0.0) / 3600, 4)


def _group_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = Counter(r["status"] for r in rows)
    reasons = Counter(r["error"] for r in rows if r["error"])
    return {
        "items": len(rows),
        "by_status": {s: statuses.get(s, 0) for s in manifest.STATUSES},
        "by_reason": dict(sorted(reasons.items())),
        "samples": sum(r["n_samples"] for r in rows),
        "hours_in": _hours(sum(r["source_duration"] or 0.0 for r in rows)),
        "hours_out": _hours(sum(r["output_duration"] for r in rows)),
    }


def compute_stats(table: pa.Table) -> dict[str, Any]:
    rows = table.to_pylist()
    splits = sorted({r["split"] for r in rows}, key=lambda s: (SPLITS.index(s) if s in SPLITS else 99, s))
    sources = sorted({r["source"] for r in rows})
    return {
        **_group_stats(rows),
        "per_split": {s: _group_stats([r for r in rows if r["split"] == s]) for s in splits},
        "per_source": {s: _group_stats([r for r in rows if r["source"] == s]) for s in sources},
    }


def print_summary(stats: dict[str, Any], file: TextIO = sys.stdout) -> None:
    """The end-of-run table: one line per split plus a total, then failure reasons."""
    header = f"{'split':<8}{'items':>8}{'ok':>8}{'dropped':>9}{'failed':>8}{'excluded':>10}{'samples':>9}{'h in':>9}{'h out':>9}"
    print(header, file=file)
    groups = list(stats["per_split"].items()) + [("total", stats)]
    for name, g in groups:
        s = g["by_status"]
        print(f"{name:<8}{g['items']:>8}{s['ok']:>8}{s['dropped']:>9}{s['failed']:>8}{s['excluded']:>10}"
              f"{g['samples']:>9}{g['hours_in']:>9.3f}{g['hours_out']:>9.3f}", file=file)
    if stats["by_reason"]:
        reasons = ", ".join(f"{k}={v}" for k, v in stats["by_reason"].items())
        print(f"reasons: {reasons}", file=file)


def caption_lengths(out: Location) -> list[int]:
    """Words per first caption, read from the shards' JSON."""
    lengths = []
    for split in SPLITS:
        for path in shard_paths(location(out) / split):
            for sample in iter_shard(path):
                text = json.loads(sample["json"])["text"]
                lengths.append(len(text[0].split()) if text else 0)
    return lengths


def plot_stats(out: Location, table: pa.Table, path: Location) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pylist()
    durations = [r["output_duration"] for r in rows if r["status"] == manifest.STATUS_OK]
    per_source = Counter(r["source"] for r in rows if r["status"] == manifest.STATUS_OK)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(durations, bins=30, color="tab:blue")
    axes[0].set(title="Clip duration", xlabel="seconds", ylabel="items")
    axes[1].hist(caption_lengths(out), bins=20, color="tab:green")
    axes[1].set(title="Caption length", xlabel="words", ylabel="samples")
    axes[2].bar(list(per_source), list(per_source.values()), color="tab:orange")
    axes[2].set(title="Items per source", ylabel="ok items")
    axes[2].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
