"""Files the clap tools write (checkpoints, results.jsonl, exports, metrics).

Each is made inside a private folder that `tempfile.mkdtemp` creates beside the target (a new,
unguessable name, mode 0700) and renamed onto the target: no name written through can be a link
planted in the output folder. The target itself may be absent or a regular file (a folder for an
export); a symbolic link or anything else there is refused in one line naming it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clap_model.config import UsageError


class UnsafeTarget(OSError):
    """The name to write is a symbolic link or not what the tool writes there: refused, not followed."""


def check_target(path: Path, folder: bool = False) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafeTarget(f"refusing to write {path}: it is a symbolic link")
    if not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        raise UnsafeTarget(f"refusing to write {path}: it is not a {'folder' if folder else 'regular file'}")


def make_folder(path: Path) -> None:
    """The folder the tool writes in (`--out`, its tensorboard/): made if absent, refused if a link,
    and so is a link already in it (a run refused at the start, not after an epoch of training)."""
    check_target(path, folder=True)
    path.mkdir(parents=True, exist_ok=True)
    refuse_links_in(path)


def refuse_links_in(path: Path) -> None:
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_symlink():
                raise UnsafeTarget(f"refusing to write {entry.path}: it is a symbolic link")


@contextmanager
def replacing(path: Path, folder: bool = False) -> Iterator[Path]:
    """A fresh path to write the new `path` at; renamed onto `path` when the block ends without error."""
    check_target(path, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield private / path.name
        check_target(path, folder)
        os.replace(private / path.name, path)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def append_line(path: Path, line: str) -> None:
    """Add one line to a log kept in place (results.jsonl): never through a link or into another file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644)  # O_NONBLOCK: a planted FIFO is refused below, not waited on
    except OSError:
        check_target(path)  # names a link, a FIFO (no reader: ENXIO) or a folder there
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            raise UnsafeTarget(f"refusing to write {path}: it is not a regular file of its own")
        handle.write(line + "\n")


def check_out(out: Path, resume: str | None) -> None:
    """A run writes into a new or empty folder, or continues the one in it with --resume: training
    over another run would replace its latest.pt and first epochs, keep its later ones and append
    to its results."""
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a run folder")
    if any(out.iterdir()):
        refuse_links_in(out)  # a planted link is named as one
        held = "a run (latest.pt)" if (out / "latest.pt").exists() else "files"
        raise UsageError(f"--out {out} already holds {held}; continue it with --resume latest, "
                         "or name a new or empty folder")


def tree_sha256(path: Path, skip_links: bool = False) -> str:
    """sha256 (hex) of a file, or of a folder's files (relative names and bytes, in name order);
    `skip_links` leaves out links inside the folder. The caller checks `path` is a file or folder."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not (skip_links and p.is_symlink())) \
        if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
