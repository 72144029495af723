"""Make evaluation-overlap exclusion lists from the evaluation sets' own metadata files.

    python -m pipelines._exclusions esc50 meta/esc50.csv > manifests/exclusions/esc50_freesound_ids.txt
    python -m pipelines._exclusions audiocaps-test test.csv > audiocaps_test_audioset_ids.txt

A list is one source id per line after `#` comment lines saying where the ids came from; the build
drops listed items as `excluded` (`--exclude FILE`, or a definition's `exclusions`). Kinds, with
the column that holds the id (each set's published metadata layout):
- esc50:          ESC-50 meta/esc50.csv, `src_file` (Freesound id)
- urbansound8k:   UrbanSound8K metadata/UrbanSound8K.csv, `fsID` (Freesound id)
- fsd50k:         FSD50K.ground_truth/dev.csv and eval.csv, `fname` (Freesound id)
- clotho:         clotho_metadata_{development,validation,evaluation}.csv, `sound_id` (Freesound id)
- audiocaps-test: AudioCaps dataset/test.csv, `youtube_id` (AudioSet id)
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

KINDS = {
    "esc50": ("src_file", "Freesound ids of ESC-50's recordings"),
    "urbansound8k": ("fsID", "Freesound ids of UrbanSound8K's recordings"),
    "fsd50k": ("fname", "Freesound ids of FSD50K's clips"),
    "clotho": ("sound_id", "Freesound ids of Clotho's clips"),
    "audiocaps-test": ("youtube_id", "AudioSet (YouTube) ids of the AudioCaps test set"),
}


def collect_ids(kind: str, paths: list[Path]) -> list[str]:
    column, _ = KINDS[kind]
    ids: set[str] = set()
    for path in paths:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
            reader = csv.DictReader(handle)
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{path} has no {column!r} column (columns: {reader.fieldnames})")
            ids.update(row[column].strip() for row in reader if row[column] and row[column].strip())
    return sorted(ids, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))


def render(kind: str, paths: list[Path]) -> str:
    ids = collect_ids(kind, paths)
    _, what = KINDS[kind]
    names = ", ".join(p.name for p in paths)
    header = [f"# {what}: {len(ids)} ids.", f"# Made by `python -m pipelines._exclusions {kind}` from {names}."]
    return "\n".join(header + ids) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in KINDS:
        print(f"usage: python -m pipelines._exclusions {{{','.join(KINDS)}}} FILE.csv [FILE.csv...]", file=sys.stderr)
        return 2
    paths = [Path(p) for p in argv[1:]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(render(argv[0], paths))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
