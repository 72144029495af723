"""webdataset tar shards: atomic writing and plain reading.

Members carry the bare key (`<key>.flac`, `<key>.json`), a fixed mtime and owner, so a shard's
bytes depend only on its samples: a resumed run writes byte-identical shards to a clean run.
"""
from __future__ import annotations

import io
import tarfile
from typing import BinaryIO, Iterator

from upath import UPath

from audio_dataset.schema import SIZES_FILE
from audio_dataset.storage import Location, StagedFile, atomic_write_bytes, atomic_write_json, location, read_json

__all__ = ["Sample", "ShardWriter", "atomic_write_bytes", "atomic_write_json", "iter_shard", "read_sizes",
           "shard_paths", "write_sizes"]

# A member's payload: bytes, text, or an open binary file (a long FLAC spooled to disk), read from its start.
Sample = dict[str, bytes | str | BinaryIO]


class ShardWriter:
    """Writes one tar shard; it appears under its final name only when `close()` succeeds."""

    def __init__(self, path: Location) -> None:
        self.path = location(path)
        self._staged = StagedFile(self.path)
        self._tar = tarfile.open(fileobj=self._staged.handle, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, sample: Sample) -> None:
        key = str(sample["__key__"])
        if "." in key or "/" in key:
            raise ValueError(f"unsafe shard key {key!r}")
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            payload = io.BytesIO(data.encode("utf-8") if isinstance(data, str) else data) \
                if isinstance(data, (str, bytes)) else data
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = payload.seek(0, io.SEEK_END)
            payload.seek(0)
            info.mode = 0o444
            info.mtime = 0
            self._tar.addfile(info, payload)
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._staged.commit()

    def abort(self) -> None:
        self._tar.close()
        self._staged.abort()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard(path: Location) -> Iterator[Sample]:
    """Yield samples as dicts {'__key__': key, ext: bytes, ...}, in the order they were written."""
    current: Sample = {}
    with location(path).open("rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
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


def shard_paths(split_dir: Location) -> list[UPath]:
    folder = location(split_dir)
    if not folder.exists():
        return []
    return sorted((p for p in folder.glob("*.tar") if not p.name.startswith(".")), key=lambda p: p.name)


def write_sizes(split_dir: Location, counts: dict[str, int]) -> None:
    """`sizes.json`: shard file name -> sample count, the file LAION-CLAP reads for epoch length."""
    atomic_write_json(location(split_dir) / SIZES_FILE, dict(sorted(counts.items())))


def read_sizes(split_dir: Location) -> dict[str, int]:
    return read_json(location(split_dir) / SIZES_FILE)
