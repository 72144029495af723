"""webdataset tar shards: atomic writing and plain reading.

Members carry the bare key (`<key>.flac`, `<key>.json`), a fixed mtime and owner, so a shard's
bytes depend only on its samples: a resumed run writes byte-identical shards to a clean run.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

from audio_dataset.schema import SIZES_FILE

Sample = dict[str, bytes | str]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8") + b"\n")


class ShardWriter:
    """Writes one tar shard; it appears under its final name only when `close()` succeeds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run
            stale.unlink(missing_ok=True)
        self._tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, sample: Sample) -> None:
        key = str(sample["__key__"])
        if "." in key or "/" in key:
            raise ValueError(f"unsafe shard key {key!r}")
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            payload = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            info.mode = 0o444
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard(path: Path | str) -> Iterator[Sample]:
    """Yield samples as dicts {'__key__': key, ext: bytes, ...}, in the order they were written."""
    current: Sample = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            handle = tar.extractfile(member)
            assert handle is not None
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext] = handle.read()
    if current:
        yield current


def shard_paths(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.glob("*.tar") if not p.name.startswith("."))


def write_sizes(split_dir: Path, counts: dict[str, int]) -> None:
    """`sizes.json`: shard file name -> sample count, the file LAION-CLAP reads for epoch length."""
    atomic_write_json(split_dir / SIZES_FILE, dict(sorted(counts.items())))


def read_sizes(split_dir: Path) -> dict[str, int]:
    return json.loads((split_dir / SIZES_FILE).read_text())
