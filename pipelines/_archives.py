"""Archives as sources of audio: download once (streamed to disk), list members, read one member.

Sound libraries and corpora ship as archives far larger than memory (a Sonniss GDC bundle is tens
of GB, Clotho's development 7z several GB), so a URL is streamed into `<state_dir>/archives/` and
every later fetch reads from that copy. Ray runs several worker processes, each with several fetch
threads: an flock on a lock file beside the archive makes exactly one of them download (or
extract) while the others wait, across threads and processes alike.

Zip members are read in place. 7z and tar archives are usually solid (one compressed stream), so
reading a member means decompressing what precedes it: they are extracted once, whole, into
`<state_dir>/extracted/`, and members are read from there.

Archives are untrusted: a member is read only when its size is within `MAX_MEMBER_BYTES` and its
compression ratio within `MAX_RATIO` (a zip bomb fails its item as `member_too_large` or
`bad_archive_member`, not the worker's memory). Extraction is our own, the same on every Python
(`extractall(filter="data")` is missing before 3.11.4): regular files and folders only (links,
devices and FIFOs are left out), names relative and without `..`, files written 0644 by us, and
the whole within `MAX_RATIO` times the archive, `MAX_MEMBERS` members and the free disk space.

Downloads go through the shared `HttpClient.download` (same retries, rate limits and content
checks as every other request, streamed to disk); other fsspec URLs (s3://, hf://) are copied
with their filesystem's own streaming get.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import tarfile
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from audio_dataset.http import HttpClient, public_url
from audio_dataset.source import ItemError, SourceError, UserError
from audio_dataset.storage import location as storage_location, open_own, temp_sibling
from pipelines._common import is_url

ARCHIVE_SUFFIXES = (".zip", ".7z", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# One member is read into memory whole: larger is not a clip (a 3-hour 48 kHz stereo WAV is 2 GB;
# HTTP downloads of one item stop at 512 MiB by default).
MAX_MEMBER_BYTES = 2**30
# Audio compresses a few times at most (FLAC ~2x, deflated PCM ~1-3x; silence more, and is dropped
# anyway); a member, or an extracted archive, expanding more than this is a bomb.
MAX_RATIO = 100
# Member names held in memory per archive (WavCaps' largest zip has ~260k).
MAX_MEMBERS = 2_000_000
# Disk left free after an extraction.
DISK_MARGIN_BYTES = 2**30
# Below this a member's ratio is not checked: small silent clips compress far, and cost little.
RATIO_FLOOR_BYTES = 32 * 2**20
_COPY_CHUNK = 2**20
# A tar's pax or GNU long-name header (names and attributes, read whole by tarfile) beyond this is not one.
MAX_META_HEADER_BYTES = 1 * 2**20
# Compressed tars whose headers this process has walked: (path, size, mtime).
_CHECKED_TARS: set[tuple[str, int, int]] = set()


def is_archive_name(name: str) -> bool:
    return name.lower().split("?")[0].endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    base = PurePosixPath(name.split("?")[0]).name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock held by one thread of one process at a time (never through a planted link)."""
    with os.fdopen(open_own(path), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_from_fsspec(location: str, dest: Path) -> None:
    """Stream an object-store file to `dest` (complete or absent, like HttpClient.download)."""
    source = storage_location(location)
    temp = temp_sibling(dest)
    try:
        source.fs.get_file(source.path, str(temp))
        os.replace(temp, dest)
    except FileNotFoundError:
        raise UserError(f"archive not found: {location}") from None
    except OSError as exc:
        raise SourceError(f"could not fetch the archive {location}: {exc}") from None
    finally:
        temp.unlink(missing_ok=True)


class ArchiveStore:
    """Archives by location (a local path or a URL), downloaded and extracted at most once.

    Pickled to Ray workers with the source: each process keeps its own index of member names.
    """

    def __init__(self, state_dir: Path | None, client: HttpClient) -> None:
        self.state_dir = Path(state_dir) if state_dir else None
        self.client = client
        self._by_name: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_by_name"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._by_name = state.get("_by_name", {})
        self._lock = threading.Lock()

    def members_by_name(self, location: str) -> dict[str, str]:
        """file name -> member path, read once per process (a URL's archive is downloaded first).

        For corpora that name a clip by its file name wherever the archive keeps it; a missing
        archive fails the item that asked (`missing_archive`), not the run.
        """
        with self._lock:
            if location not in self._by_name:
                try:
                    names = self.members(location)
                except UserError as exc:
                    raise ItemError("missing_archive", str(exc)) from None
                self._by_name[location] = {PurePosixPath(name).name: name for name in names}
            return self._by_name[location]

    def _dir(self, name: str) -> Path:
        if self.state_dir is None:
            raise SourceError("archive sources need a state folder to keep downloads in")
        return self.state_dir / name

    def local_path(self, location: str) -> Path:
        """The archive on disk: the path itself, or the cached download of a URL (http(s), or any
        fsspec URL such as s3:// or hf://)."""
        if "://" not in location:
            path = Path(location).expanduser()
            if not path.is_file():
                raise UserError(f"archive not found: {path}")
            return path
        key = hashlib.sha1(location.encode()).hexdigest()[:12]
        dest = self._dir("archives") / f"{key}-{PurePosixPath(public_url(location)).name}"
        if dest.exists():
            return dest
        with _locked(dest.with_name(dest.name + ".lock")):
            if not dest.exists():  # another worker may have finished it while we waited
                if is_url(location):
                    self.client.download(location, dest, expect="archive")
                else:
                    _copy_from_fsspec(location, dest)
        return dest

    def members(self, location: str) -> list[str]:
        """Member names (POSIX paths inside the archive), regular files only, in archive order."""
        path = self.local_path(location)
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    infos = archive.infolist()
                _check_count(len(infos), path)
                if any(info.volume for info in infos):  # members on other disks: .z01, .z02 ...
                    raise SourceError(f"{path.name} is the last part of a split zip: merge the parts "
                                      f"(zip -FF {path.name} --out merged.zip) and read the merged file")
                return [info.filename for info in infos if not info.is_dir()]
            if path.name.lower().endswith(".7z"):
                import py7zr

                with py7zr.SevenZipFile(path) as archive:
                    entries = archive.list()
                _check_count(len(entries), path)
                return [name for entry in entries if entry.is_file and not entry.is_symlink
                        and (name := safe_member_name(entry.filename)) is not None]
            _check_tar_headers(path)  # before tarfile reads any of it: is_tarfile reads the first header
            if tarfile.is_tarfile(path):
                return [name for member in _tar_members(path) if member.isreg()
                        and (name := safe_member_name(member.name)) is not None]
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader's error means the archive is unusable
            raise SourceError(f"cannot read archive {path.name}: {type(exc).__name__}: {exc}") from None
        raise SourceError(f"{path.name} is not a zip, 7z or tar archive")

    def read(self, location: str, member: str) -> bytes:
        """One member's bytes; ItemError when the archive lacks it or it is too large to hold."""
        try:
            path = self.local_path(location)
        except UserError as exc:
            raise ItemError("missing_archive", str(exc)) from None
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as archive:
                    return read_zip_member(archive, member)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ItemError("bad_archive_member", f"{member}: {exc}") from None
        folder = self._extracted(location, path)
        name = safe_member_name(member)
        target = folder / name if name is not None else None
        if target is None or target.is_symlink() or not target.is_file():
            raise ItemError("missing_member", f"{member} not in {path.name}")
        _check_member(member, target.stat().st_size, None)  # extracted (the disk had room), not read
        with open(target, "rb") as handle:
            return _read_capped(handle, member)

    def _extracted(self, location: str, path: Path) -> Path:
        key = hashlib.sha1(str(location).encode()).hexdigest()[:12]
        folder = self._dir("extracted") / f"{key}-{archive_stem(path.name)}"
        if folder.is_dir():
            return folder
        with _locked(folder.with_name(folder.name + ".lock")):
            if folder.is_dir():
                return folder
            temp = temp_sibling(folder)  # unguessable: a link planted there is never written through
            os.mkdir(temp, 0o755)
            try:
                if path.name.lower().endswith(".7z"):
                    _extract_7z(path, temp)
                else:
                    _extract_tar(path, temp)
                os.replace(temp, folder)
            except ItemError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise ItemError("bad_archive", f"cannot extract {path.name}: {type(exc).__name__}: {exc}") from None
            finally:
                shutil.rmtree(temp, ignore_errors=True)
        return folder


def safe_member_name(name: str) -> str | None:
    """A member's path made plain ("./a//b" -> "a/b"), or None when it is absolute or climbs (`..`)."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _check_count(count: int, path: Path) -> None:
    if count > MAX_MEMBERS:
        raise SourceError(f"{path.name} has over {MAX_MEMBERS:,} members; not read")


def _check_member(name: str, size: int, packed: int | None) -> None:
    """ItemError when a member is too large to hold, or expands like a bomb (`packed`: its
    compressed size, None when unknown)."""
    if size > MAX_MEMBER_BYTES:
        raise ItemError("too_large", f"{name}: {size:,} bytes unpacked, over {MAX_MEMBER_BYTES:,}")
    if packed is not None and size > RATIO_FLOOR_BYTES and size > MAX_RATIO * max(packed, 1):
        raise ItemError("bad_archive_member", f"{name}: expands {size / max(packed, 1):,.0f}x "
                                              f"(over {MAX_RATIO}x: a compression bomb)")


def _read_capped(handle: BinaryIO, name: str) -> bytes:
    """At most MAX_MEMBER_BYTES from `handle`; a stream longer than its header said is too_large."""
    data = handle.read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES:
        raise ItemError("too_large", f"{name}: over {MAX_MEMBER_BYTES:,} bytes unpacked")
    return data


def read_zip_member(archive: zipfile.ZipFile, member: str) -> bytes:
    """One zip member's bytes, within the size and ratio caps (checked before anything is inflated)."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise ItemError("missing_member", f"{member} not in {Path(archive.filename or 'the zip').name}") from None
    _check_member(member, info.file_size, info.compress_size)
    with archive.open(info) as handle:
        return _read_capped(handle, member)


def _open_decompressed(path: Path) -> BinaryIO:
    """The tar stream inside a .tar(.gz|.bz2|.xz), by its magic bytes as tarfile.open decides."""
    import bz2
    import gzip
    import lzma

    with open(path, "rb") as handle:
        head = handle.read(6)
    if head.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if head.startswith(b"BZh"):
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _tar_field_size(field: bytes) -> int:
    """A tar header's size field: octal text, or GNU base-256 when the top bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return 0


def _check_tar_headers(path: Path) -> None:
    """Walk the raw 512-byte headers before tarfile does: tarfile reads a pax or GNU long-name
    header's whole declared size into memory, so a small .tar.gz declaring gigabytes there is a
    memory bomb that no member check sees. Those headers must be under MAX_META_HEADER_BYTES.
    The walk stops where tarfile would (the end, or a header whose checksum is wrong)."""
    info = path.stat()
    key = (str(path), info.st_size, info.st_mtime_ns)
    if key in _CHECKED_TARS:
        return
    with _open_decompressed(path) as stream:
        if isinstance(stream, io.BufferedReader):
            _CHECKED_TARS.add(key)
            return  # uncompressed: tarfile cannot read more than the file holds
        pax_size: int | None = None  # a pax header's `size` record: the next member's real size
        while True:
            header = stream.read(512)
            if len(header) < 512 or header == bytes(512) or not _tar_checksum_ok(header):
                break
            kind, size = header[156:157], _tar_field_size(header[124:136])
            if kind in (b"x", b"g", b"L", b"K"):
                if size > MAX_META_HEADER_BYTES:
                    raise SourceError(f"{path.name} has a {size:,}-byte tar metadata header "
                                      f"(over {MAX_META_HEADER_BYTES:,}); not read")
                data = stream.read(-(-size // 512) * 512)[:size]
                if kind == b"x":
                    pax_size = _pax_size(data)
                continue
            if pax_size is not None:
                size, pax_size = pax_size, None
            left = 0 if kind in (b"1", b"2", b"3", b"4", b"5", b"6") else -(-size // 512) * 512
            while left > 0:  # skipped by reading: compressed streams cannot seek cheaply
                skipped = len(stream.read(min(left, _COPY_CHUNK)))
                if not skipped:
                    break
                left -= skipped
    _CHECKED_TARS.add(key)


def _tar_checksum_ok(header: bytes) -> bool:
    """As tarfile checks it: the header's bytes summed, unsigned or signed, the field as spaces."""
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return False
    rest = header[:148] + header[156:]
    unsigned = sum(rest) + 8 * 32
    return stored in (unsigned, unsigned - 256 * sum(byte > 127 for byte in rest))


def _pax_size(data: bytes) -> int | None:
    """The `size` record of a pax extended header ("NN size=123\\n" records), if any."""
    for record in data.split(b"\n"):
        _, _, field = record.partition(b" ")
        key, _, value = field.partition(b"=")
        if key == b"size" and value.isdigit():
            return int(value)
    return None


def _tar_members(path: Path) -> Iterator[tarfile.TarInfo]:
    """A tar's members as its headers come (streamed: not all kept), at most MAX_MEMBERS."""
    _check_tar_headers(path)
    with tarfile.open(path) as archive:
        for count, member in enumerate(archive, 1):
            _check_count(count, path)
            yield member
            archive.members = []  # tarfile keeps every header it has read; we need one at a time


def _check_total(total: int, path: Path, dest: Path) -> None:
    """An extraction must fit the ratio cap and the disk, checked from the headers before writing."""
    packed = max(path.stat().st_size, 1)
    if total > RATIO_FLOOR_BYTES and total > MAX_RATIO * packed:
        raise ItemError("bad_archive", f"{path.name} would expand {total / packed:,.0f}x "
                                       f"(over {MAX_RATIO}x: a compression bomb); not extracted")
    free = shutil.disk_usage(dest).free
    if total + DISK_MARGIN_BYTES > free:
        raise ItemError("bad_archive", f"{path.name} needs {total:,} bytes to extract, "
                                       f"{free:,} free beside {dest.name}; not extracted")


def _extract_tar(path: Path, dest: Path) -> None:
    """Regular files (and the folders they need) written by us: never a link, device or FIFO, never
    outside `dest`, mode 0644. Sizes come from the headers and bound what each member writes."""
    members = [(member, name) for member in _tar_members(path) if member.isreg()
               and (name := safe_member_name(member.name)) is not None]
    _check_total(sum(member.size for member, _ in members), path, dest)
    with tarfile.open(path) as archive:
        wanted = {member.offset: name for member, name in members}
        for member in archive:
            name = wanted.get(member.offset)
            archive.members = []
            if name is None:
                continue
            source = archive.extractfile(member)
            if source is not None:
                _write_member(dest, name, source, member.size)


def _write_member(dest: Path, name: str, source: BinaryIO, size: int) -> None:
    """`source`'s first `size` bytes at dest/name, in folders we made (so no planted link is followed)."""
    target = dest / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except (FileExistsError, NotADirectoryError):
        return  # a file where its folder would be ("a", then "a/b"): the member is left out
    if target.is_symlink() or target.is_dir():
        return  # a folder of the same name came first: the member is left out
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
        left = size
        while left > 0:
            chunk = source.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ItemError("bad_archive", f"{name} ends before its declared {size:,} bytes")
            out.write(chunk)
            left -= len(chunk)


def _extract_7z(path: Path, dest: Path) -> None:
    """A 7z's regular files with plain names (no links), within the caps, checked from its listing."""
    import py7zr

    with py7zr.SevenZipFile(path) as archive:
        entries = [entry for entry in archive.list() if entry.is_file and not entry.is_symlink
                   and safe_member_name(entry.filename) is not None]
        _check_count(len(entries), path)
        _check_total(sum(entry.uncompressed or 0 for entry in entries), path, dest)
        if entries:
            archive.extract(path=dest, targets=[entry.filename for entry in entries])
