"""Where outputs live: a local folder or any fsspec URL (s3://, gs://, ...), through one path type.

Atomicity differs by kind: a local file is written to a temp name and renamed; an object store has
no rename, but a single PUT (or a completed multipart upload) is all-or-nothing, so an object is
uploaded from a finished local temp file and never appears half-written.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO

from upath import UPath

Location = str | os.PathLike


def location(value: Location) -> UPath:
    """A path object for a local path or a URL; `/`-joining works the same for both."""
    return value if isinstance(value, UPath) else UPath(os.fspath(value))


def is_local(path: UPath) -> bool:
    return path.protocol in ("", "file", "local")


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(dest: Location, data: bytes) -> None:
    """Readers see the old content or the new, never a part."""
    path = location(dest)
    if is_local(path):
        local = Path(path.path)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(local)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, local)
        except BaseException:  # a full disk, a signal: leave no temp file behind
            tmp.unlink(missing_ok=True)
            raise
    else:
        path.write_bytes(data)


def atomic_write_json(dest: Location, data: object) -> None:
    atomic_write_bytes(dest, json.dumps(data, indent=2, sort_keys=True).encode("utf-8") + b"\n")


def read_json(src: Location) -> object:
    return json.loads(location(src).read_text(encoding="utf-8"))


class StagedFile:
    """A file written locally and published to `dest` in one step by `commit()`."""

    def __init__(self, dest: Location) -> None:
        self.dest = location(dest)
        if is_local(self.dest):
            final = Path(self.dest.path)
            final.parent.mkdir(parents=True, exist_ok=True)
            for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run
                stale.unlink(missing_ok=True)
            self.local = temp_sibling(final)
        else:
            handle, name = tempfile.mkstemp(prefix="audiodata-", suffix=f"-{self.dest.name}")
            os.close(handle)
            self.local = Path(name)
        self.handle: IO[bytes] = open(self.local, "wb")

    def commit(self) -> None:
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            if is_local(self.dest):
                os.replace(self.local, self.dest.path)
            else:
                self.dest.fs.put_file(str(self.local), self.dest.path)
        finally:  # published, or failed (a full disk): either way the temp file goes
            self.abort()

    def abort(self) -> None:
        try:
            self.handle.close()
        except OSError:  # flushing the rest failed (a full disk): the file is dropped anyway
            pass
        self.local.unlink(missing_ok=True)


def remove_stale_temps(out: UPath) -> None:
    """Temp files (`.NAME.tmp-PID`) that killed or failed writers left under a local `out`.
    Only for the one writer that holds `out` (audio_dataset.lock), once its workers have stopped."""
    if is_local(out) and Path(out.path).is_dir():
        for tmp in Path(out.path).glob("**/.*.tmp-*"):
            tmp.unlink(missing_ok=True)
