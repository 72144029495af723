"""What a clap-* command line names, resolved and checked without torch: shard lists (brace
patterns, `A::B` datasets, build folders, `::` weights) and checkpoints. A missing shard, an
unreadable sizes.json or a missing checkpoint file is one line before the heavy modules load
(clap_model.data re-exports the shard functions for the loader)."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import braceexpand

from audio_dataset.schema import SIZES_FILE, bad_shard_name, check_sizes, read_json_record
from clap_model.config import UsageError, get_preset

DATASET_SEPARATOR = "::"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


class DataError(UsageError):
    """A user-facing problem with the data arguments (bad pattern, no sizes, ...)."""


# ---- shard lists and sizes -------------------------------------------------------------------


def expand_pattern(pattern: str) -> list[str]:
    """One dataset's brace pattern -> shard URLs. Spaces are part of a URL (`pipe:aws s3 cp ...`)."""
    try:
        urls = list(braceexpand.braceexpand(pattern.strip()))
    except braceexpand.UnbalancedBracesError:
        raise DataError(f"pattern {pattern!r} has unbalanced braces") from None
    if not urls or urls == [""]:
        raise DataError(f"pattern {pattern!r} names no shards")
    for url in urls:
        if _is_local(url) and not Path(_local_path(url)).is_file():
            raise DataError(f"shard not found: {url}")
    return urls


TRAIN_SPLIT = "train"


def split_folders(part: str, train: bool) -> list[Path] | None:
    """The split folders one dataset argument names, or None when it is no local folder (a shard
    pattern or URL). A split folder (it holds sizes.json) names itself; a build's output folder
    (splits below it) names its `train` split for training and every split for evaluation."""
    part = part.strip()
    path = Path(_local_path(part))
    if not _is_local(part) or "{" in part or not path.is_dir():
        return None
    if (path / SIZES_FILE).is_file():
        return [path]
    # `_work/` and hidden folders hold a build's resume state, not splits.
    splits = sorted(sub.parent for sub in path.glob(f"*/{SIZES_FILE}") if not sub.parent.name.startswith(("_", ".")))
    if not splits:
        raise DataError(f"{part} is neither a split folder nor a build's output: no {SIZES_FILE} in it "
                        "or in its subfolders")
    if not train:
        return splits
    if path / TRAIN_SPLIT not in splits:
        raise DataError(f"{part} has no {TRAIN_SPLIT} split (it has {', '.join(s.name for s in splits)}): "
                        "name the split folder to train on")
    return [path / TRAIN_SPLIT]


def folder_shards(folder: Path) -> list[str]:
    """A split folder's shards: those its sizes.json lists (numbers can have gaps), in name order."""
    try:
        with open(folder / SIZES_FILE, "rb") as handle:
            sizes = check_sizes(read_json_record(handle))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {folder / SIZES_FILE}: {exc}") from None
    if not isinstance(sizes, dict) or not sizes:
        raise DataError(f"{folder / SIZES_FILE} lists no shards")
    for name in sizes:
        # A list read from data names files, never a command (`pipe:`), URL or path elsewhere.
        if problem := bad_shard_name(name):
            raise DataError(f"{folder / SIZES_FILE} lists {name!r}: {problem}; refusing to read it")
    # `./name`, not `name`, for the current folder: a path that can never read as `pipe:` or a URL.
    urls = [str(folder / name) if str(folder) != "." else f"./{name}" for name in sorted(sizes)]
    for url in urls:
        if not Path(url).is_file():
            raise DataError(f"shard not found: {url} (listed in {folder / SIZES_FILE})")
    return urls


def expand_datasets(spec: str, train: bool = False) -> list[list[str]]:
    """`A::B` (several datasets) -> one URL list per dataset; a build's folder is one per split."""
    parts = [part for part in spec.split(DATASET_SEPARATOR) if part.strip()]
    if not parts:
        raise DataError(f"data pattern {spec!r} names no shards")
    datasets = []
    for part in parts:
        folders = split_folders(part, train)
        datasets += [expand_pattern(part)] if folders is None else [folder_shards(f) for f in folders]
    return datasets


def parse_weights(spec: str, datasets: int) -> list[float]:
    """`1::3` -> [1.0, 3.0]: one finite, non-negative weight per dataset, not all zero."""
    message = f"--train-data-weights needs {datasets} non-negative numbers separated by '::', not {spec!r}"
    try:
        factors = [float(x) for x in spec.split(DATASET_SEPARATOR)]
    except ValueError:
        raise DataError(message) from None
    if len(factors) != datasets or not all(math.isfinite(f) and f >= 0 for f in factors) or not any(factors):
        raise DataError(message)
    return factors


def _is_local(url: str) -> bool:
    return url.startswith("file://") or "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


# ---- checkpoints ----------------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """`owner/name` that is no file name: what transformers would look up on the Hugging Face hub."""
    return _HUB_ID.fullmatch(name) is not None and not name.lower().endswith(_FILE_SUFFIXES)


def check_checkpoint_named(path: str) -> None:
    """A --checkpoint / --pretrained that is neither here nor a hub id: one line, before torch."""
    if not os.path.exists(path) and not is_hub_id(path):
        raise UsageError(f"checkpoint not found: {path}")


def check_named(model: str | None = None, train_data: str | None = None, data: tuple[str | None, ...] = (),
                checkpoints: tuple[str | None, ...] = ()) -> None:
    """What a clap-* command line names, checked before torch loads (seconds, not a torch import):
    an unknown --model preset, a data pattern naming a missing shard, a missing checkpoint file."""
    if model is not None:
        get_preset(model)
    if train_data:
        expand_datasets(train_data, train=True)
    for pattern in data:
        if pattern:
            expand_datasets(pattern)
    for path in checkpoints:
        if path is not None:
            check_checkpoint_named(path)
