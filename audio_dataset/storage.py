"""Where outputs live: a local folder or any fsspec URL (s3://, gs://, ...), through one path type.

Every local file the toolkit writes goes through the helpers here: a new file is created with
O_EXCL | O_NOFOLLOW under an unguessable temp name (`.NAME.tmp-PID-RANDOM`) and renamed onto its
final name, which must be absent or a regular file; a file written in place (the lock, an
append) is opened with O_NOFOLLOW and must be the writer's own regular file; folders below the
user's --out are made one level at a time and none may be a link. What does not pass is refused in
one line naming it (UnsafeOutput), never written through.

Atomicity differs by kind: a local file is written to a temp name and renamed; an object store has
no rename, but a single PUT (or a completed multipart upload) is all-or-nothing, so an object is
uploaded from a finished local temp file and never appears half-written.
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO

from upath import UPath

from audio_dataset.schema import SampleRefused, read_json_record
from audio_dataset.source import UserError

Location = str | os.PathLike


def location(value: Location) -> UPath:
    """A path object for a local path or a URL; `/`-joining works the same for both."""
    return value if isinstance(value, UPath) else UPath(os.fspath(value))


def is_local(path: UPath) -> bool:
    return path.protocol in ("", "file", "local")


class UnsafeOutput(Exception):
    """A name the toolkit writes is a symbolic link, or something it did not make: refused, never
    followed (a link planted in an output folder must not redirect a write outside it)."""


def _refusal(path: object, why: str) -> UnsafeOutput:
    return UnsafeOutput(f"refusing to write {path}: {why}")


# Local output folders the user named (`--out`): their own path may go through links the user made;
# no folder below them may be a link. A worker process registers the `out` its driver hands it.
_ROOTS: set[str] = set()


def trust_output(out: Location) -> UPath:
    """Mark `out` as a user-named output root for this process; returns it as a path object."""
    path = location(out)
    if is_local(path):
        _ROOTS.add(os.path.abspath(path.path))
    return path


def _root_of(path: str) -> str | None:
    """The outermost root holding `path`: a recipe's per-source outputs are checked from the recipe's."""
    roots = [root for root in _ROOTS if path == root or path.startswith(root.rstrip("/") + "/")]
    return min(roots, key=len) if roots else None


def make_dirs(folder: Path) -> None:
    """`mkdir -p` that refuses, naming it, a link or a non-folder at any level below an output root.
    A folder outside every root was named by the user as it is: it is made as given."""
    path = os.path.abspath(folder)
    root = _root_of(path)
    if root is None:
        os.makedirs(path, exist_ok=True)
        return
    os.makedirs(root, exist_ok=True)
    current = root
    for part in Path(path).relative_to(root).parts:
        current = os.path.join(current, part)
        try:
            os.mkdir(current)
        except FileExistsError:
            pass
        mode = os.lstat(current).st_mode
        if stat.S_ISLNK(mode):
            raise _refusal(current, "it is a symbolic link")
        if not stat.S_ISDIR(mode):
            raise _refusal(current, "it is not a folder")


def check_output_tree(out: UPath) -> None:
    """Refuse a local output holding a special file, or a symbolic link that leads out of it,
    anywhere below it: names the toolkit reads back (resume state, parts, sizes.json) are then never
    read or written through a planted link. (A link that stays inside, as an extracted archive may
    hold, is left alone.) Writers check again as they write (open_temp, open_own, make_dirs)."""
    if not is_local(out) or not os.path.isdir(out.path):
        return
    inside = os.path.realpath(out.path).rstrip("/") + "/"
    folders = [out.path]
    while folders:  # scandir's entry types come with the listing: no stat per file
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    if not os.path.realpath(entry.path).startswith(inside):
                        raise _refusal(entry.path, "it is a symbolic link")
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif not entry.is_file(follow_symlinks=False):
                    raise _refusal(entry.path, "it is not a regular file")


def check_target(path: Path) -> None:
    """A final name may be absent or a regular file, which a rename replaces (never writes through)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise _refusal(path, "it is a symbolic link")
    if not stat.S_ISREG(mode):
        raise _refusal(path, "it is not a regular file")


def _what_is_at(path: Path) -> str:
    try:
        return "it is a symbolic link" if os.path.islink(path) else "something is already there"
    except OSError:
        return "something is already there"


def temp_sibling(path: Path) -> Path:
    """A temp name beside `path` that no one can guess ahead (a link planted there would be written through)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")


def create_new(path: Path) -> int:
    """A descriptor of a file made now at `path`: never an existing file, never through a link."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise _refusal(path, _what_is_at(path)) from None


def open_temp(dest: Path) -> tuple[Path, IO[bytes]]:
    """A new temp file beside `dest` (its folders made safely) to write and then `publish`."""
    make_dirs(dest.parent)
    check_target(dest)
    tmp = temp_sibling(dest)
    return tmp, os.fdopen(create_new(tmp), "wb")


def publish(tmp: Path, dest: Location) -> None:
    """Rename a finished temp file onto `dest` (the rename replaces the name, never follows it)."""
    check_target(Path(dest))
    os.replace(tmp, dest)


def open_own(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """A descriptor of `path`, created if absent, for a file written in place (an append, a lock):
    refused if it is a link, not a regular file, another user's, or shared by a hard link."""
    make_dirs(path.parent)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refusal(path, "it is a symbolic link") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a folder; a FIFO or socket with no reader
            raise _refusal(path, "it is not a regular file") from None
        raise
    info = os.fstat(fd)
    why = ("it is not a regular file" if not stat.S_ISREG(info.st_mode)
           else "it belongs to another user" if info.st_uid != os.geteuid()
           else "it has another hard link" if info.st_nlink > 1 else None)
    if why is not None:
        os.close(fd)
        raise _refusal(path, why)
    os.set_blocking(fd, True)  # opened non-blocking only so that a planted FIFO could not hang the open
    return fd


def atomic_write_bytes(dest: Location, data: bytes) -> None:
    """Readers see the old content or the new, never a part."""
    path = location(dest)
    if is_local(path):
        local = Path(path.path)
        tmp, handle = open_temp(local)
        try:
            with handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            publish(tmp, local)
        except BaseException:  # a full disk, a signal: leave no temp file behind
            tmp.unlink(missing_ok=True)
            raise
    else:
        path.write_bytes(data)


def atomic_write_json(dest: Location, data: object) -> None:
    atomic_write_bytes(dest, json.dumps(data, indent=2, sort_keys=True).encode("utf-8") + b"\n")


def open_data(src: Location) -> IO[bytes]:
    """A file to read, opened: it is data (anyone may have put anything there), so a FIFO, socket or
    device in its place is one line, where an open or a read would wait on it forever."""
    path = location(src)
    if not is_local(path):
        return path.open("rb")
    fd = os.open(path.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once, writer or not
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_json(src: Location) -> dict:
    """A JSON object the toolkit wrote (and anyone may have edited): bounded, one UserError line if not."""
    with open_data(src) as handle:
        try:
            return read_json_record(handle)
        except SampleRefused as exc:
            raise UserError(f"{src}: unreadable ({exc.detail})") from None


class StagedFile:
    """A file written locally and published to `dest` in one step by `commit()`."""

    local: Path
    handle: IO[bytes]

    def __init__(self, dest: Location) -> None:
        self.dest = location(dest)
        if is_local(self.dest):
            final = Path(self.dest.path)
            make_dirs(final.parent)
            for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run
                stale.unlink(missing_ok=True)
            self.local, self.handle = open_temp(final)
        else:
            handle, name = tempfile.mkstemp(prefix="audiodata-", suffix=f"-{self.dest.name}")
            self.local = Path(name)
            self.handle = os.fdopen(handle, "wb")

    def commit(self) -> None:
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            if is_local(self.dest):
                publish(self.local, self.dest.path)
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
    """Temp files (`.NAME.tmp-*`) that killed or failed writers left under a local `out`.
    Only for the one writer that holds `out` (audio_dataset.lock), once its workers have stopped.
    Links to folders are not walked into: what lies behind one is not ours to delete."""
    if is_local(out) and Path(out.path).is_dir():
        for folder, dirs, files in os.walk(out.path, followlinks=False):
            for name in fnmatch.filter(files, ".*.tmp-*"):
                Path(folder, name).unlink(missing_ok=True)
            for name in fnmatch.filter(dirs, ".*.tmp-*"):  # a half-extracted archive
                dirs.remove(name)
                if not os.path.islink(os.path.join(folder, name)):
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
