"""Archives as sources of audio: download once (streamed to disk), list members, read one member.

Sound libraries and corpora ship as archives far larger than memory (a Sonniss GDC bundle is tens
of GB, Clotho's development 7z several GB), so a URL is streamed into `<state_dir>/archives/` and
every later fetch reads from that copy. Ray runs several worker processes, each with several fetch
threads: an flock on a lock file beside the archive makes exactly one of them download (or
extract) while the others wait, across threads and processes alike.

Zip members are read in place. 7z and tar archives are usually solid (one compressed stream), so
reading a member means decompressing what precedes it: they are extracted once, whole, into
`<state_dir>/extracted/`, and members are read from there.

Downloads go through the shared `HttpClient.download` (same retries, rate limits and content
checks as every other request, streamed to disk); other fsspec URLs (s3://, hf://) are copied
with their filesystem's own streaming get.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tarfile
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from audio_dataset.http import HttpClient, public_url
from audio_dataset.source import ItemError, SourceError, UserError
from audio_dataset.storage import location as storage_location, temp_sibling
from pipelines._common import is_url

ARCHIVE_SUFFIXES = (".zip", ".7z", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


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
    """An exclusive flock held by one thread of one process at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
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
        """Member names (POSIX paths inside the archive), files only, in archive order."""
        path = self.local_path(location)
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    infos = archive.infolist()
                if any(info.volume for info in infos):  # members on other disks: .z01, .z02 ...
                    raise SourceError(f"{path.name} is the last part of a split zip: merge the parts "
                                      f"(zip -FF {path.name} --out merged.zip) and read the merged file")
                return [info.filename for info in infos if not info.is_dir()]
            if path.name.lower().endswith(".7z"):
                import py7zr

                with py7zr.SevenZipFile(path) as archive:
                    return [entry.filename for entry in archive.list() if not entry.is_directory]
            if tarfile.is_tarfile(path):
                with tarfile.open(path) as archive:
                    return [member.name for member in archive.getmembers() if member.isfile()]
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader's error means the archive is unusable
            raise SourceError(f"cannot read archive {path.name}: {type(exc).__name__}: {exc}") from None
        raise SourceError(f"{path.name} is not a zip, 7z or tar archive")

    def read(self, location: str, member: str) -> bytes:
        """One member's bytes; ItemError when the archive lacks it."""
        try:
            path = self.local_path(location)
        except UserError as exc:
            raise ItemError("missing_archive", str(exc)) from None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                try:
                    return archive.read(member)
                except KeyError:
                    raise ItemError("missing_member", f"{member} not in {path.name}") from None
                except (zipfile.BadZipFile, OSError) as exc:
                    raise ItemError("bad_archive_member", f"{member}: {exc}") from None
        folder = self._extracted(location, path)
        target = (folder / member).resolve()
        if folder.resolve() not in target.parents or not target.is_file():
            raise ItemError("missing_member", f"{member} not in {path.name}")
        return target.read_bytes()

    def _extracted(self, location: str, path: Path) -> Path:
        key = hashlib.sha1(str(location).encode()).hexdigest()[:12]
        folder = self._dir("extracted") / f"{key}-{archive_stem(path.name)}"
        if folder.is_dir():
            return folder
        with _locked(folder.with_name(folder.name + ".lock")):
            if folder.is_dir():
                return folder
            temp = folder.with_name(f".{folder.name}.{os.getpid()}.part")
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
            try:
                if path.name.lower().endswith(".7z"):
                    import py7zr

                    with py7zr.SevenZipFile(path) as archive:
                        archive.extractall(path=temp)
                else:
                    with tarfile.open(path) as archive:
                        archive.extractall(temp, filter="data")  # no absolute paths, links or devices
                os.replace(temp, folder)
            except Exception as exc:  # noqa: BLE001
                raise ItemError("bad_archive", f"cannot extract {path.name}: {type(exc).__name__}: {exc}") from None
            finally:
                shutil.rmtree(temp, ignore_errors=True)
        return folder
