"""webdataset tar shards: atomic writing and plain reading.

Members carry the bare key (`<key>.flac`, `<key>.json`), a fixed mtime and owner, so a shard's
bytes depend only on its samples: a resumed run writes byte-identical shards to a clean run.
Each shard's sha256 is taken as it is written (kept beside it as `.NNNNNN.tar.sha256` until the
run's end) and listed in `SPLIT/SHA256SUMS` (`sha256sum -c` format) with `sizes.json`, so
`verify` catches an edit that still decodes. Every writer of shards (build, k2c) gets this.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from typing import BinaryIO, Iterator

from upath import UPath

from audio_dataset.schema import MAX_RECORD_BYTES, REFUSED_KEY, SIZES_FILE, SPARSE_MEMBER, SampleRefused, \
    check_member_size, check_sizes, member_key, shown
from audio_dataset.storage import Location, StagedFile, atomic_write_bytes, atomic_write_json, is_local, location, \
    read_json
from audio_dataset.source import UserError

__all__ = ["CHECKSUMS_FILE", "REFUSED_KEY", "DamagedShard", "Sample", "ShardWriter", "atomic_write_bytes",
           "atomic_write_json", "file_sha256", "iter_shard", "read_checksums", "read_sizes", "refusal", "shard_paths",
           "write_sizes"]

# A member's payload: bytes, text, or an open binary file (a long FLAC spooled to disk), read from its start.
Sample = dict[str, bytes | str | BinaryIO | SampleRefused]
CHECKSUMS_FILE = "SHA256SUMS"
_CHUNK = 1 << 20


class DamagedShard(ValueError):
    """A shard that cannot be read to its end (cut short, corrupt): the message names the shard."""

    def __init__(self, path: Location, detail: str) -> None:
        super().__init__(f"damaged shard {path}: {detail}")
        self.path = str(path)
        self.detail = detail


class _Hashing:
    """A write-only file that hashes what passes through it, so a shard's sha256 is known when the
    last byte is written rather than read back (tarfile in "w" mode only writes, in order)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.handle.tell()


class ShardWriter:
    """Writes one tar shard; it appears under its final name only when `close()` succeeds."""

    def __init__(self, path: Location) -> None:
        self.path = location(path)
        self._staged = StagedFile(self.path)
        self._hashing = _Hashing(self._staged.handle)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.sha256: str | None = None  # set by close(): of the bytes published

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
        try:
            self._tar.close()
            self._staged.handle.flush()
            self.sha256 = self._hashing.digest.hexdigest()
        except BaseException:  # a full disk: no temp file is left to fill it further
            self._staged.abort()
            raise
        self._staged.commit()
        # After the shard: a shard without its checksum is never marked done (its manifest part
        # comes after close), so a killed run redoes it.
        atomic_write_bytes(_recorded_checksum(self.path), f"{self.sha256}\n".encode("ascii"))

    def abort(self) -> None:
        try:
            self._tar.close()  # writes the end blocks, which fails again on a full disk
        except OSError:
            pass
        finally:
            self._staged.abort()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard(path: Location) -> Iterator[Sample]:
    """Yield samples as dicts {'__key__': key, ext: bytes, ...}, in the order they were written.
    A member that is badly named, sparse or over its cap is not read: its sample comes as
    {'__key__': key, REFUSED_KEY: SampleRefused} (see `refusal`), one per key, and reading goes on.
    A shard that is cut short or corrupt raises DamagedShard naming it (after its readable samples)."""
    current: Sample = {}
    try:
        with location(path).open("rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            end = _length(handle)
            for member in tar:
                raw_key = member.name.partition(".")[0]
                if current and member.isfile() and current["__raw_key__"] != raw_key:
                    yield _finished(current)
                    current = {}
                _check_in_bounds(member, end)
                if not member.isfile():
                    continue
                if not current:
                    current = {"__raw_key__": raw_key, "__key__": shown(raw_key or member.name)}
                if REFUSED_KEY in current:
                    continue
                try:
                    key, ext = _readable_member(member)
                except SampleRefused as exc:
                    current = {"__raw_key__": raw_key, "__key__": current["__key__"], REFUSED_KEY: exc}
                    continue
                data = tar.extractfile(member)
                assert data is not None
                current["__key__"] = key
                current[ext] = data.read()
    except (tarfile.TarError, EOFError) as exc:
        raise DamagedShard(path, str(exc) or type(exc).__name__) from None
    if current:
        yield _finished(current)


def _readable_member(member: tarfile.TarInfo) -> tuple[str, str]:
    """(key, ext) of a member that may be read into memory, else SampleRefused naming why."""
    key, ext = member_key(member.name)
    # tarfile fills a sparse file's holes with zeros: a few MB on disk can read as terabytes.
    if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE \
            or any(name.startswith("GNU.sparse.") for name in member.pax_headers):
        raise SampleRefused(SPARSE_MEMBER, f"{shown(member.name)} is a sparse file")
    check_member_size(member.name, member.size)
    return key, ext


def _length(handle: BinaryIO) -> int | None:
    """The shard's size in bytes, None where the stream cannot tell."""
    try:
        if not handle.seekable():
            return None
        where = handle.tell()
        end = handle.seek(0, io.SEEK_END)
        handle.seek(where)
        return end
    except (OSError, ValueError, AttributeError):
        return None


def _check_in_bounds(member: tarfile.TarInfo, end: int | None) -> None:
    """A member whose bytes would run past the shard's end: the shard was cut short (or the header
    lies). Named now, because tarfile's stream mode would skip a declared terabyte 10 KB at a time."""
    if end is not None and not member.issparse() and member.offset_data + member.size > end:
        raise tarfile.ReadError(f"{shown(member.name)} declares {member.size} bytes, past the shard's end")


def _finished(sample: Sample) -> Sample:
    del sample["__raw_key__"]
    return sample


def refusal(sample: Sample) -> SampleRefused | None:
    """Why `iter_shard` (or a reader's own JSON check) refused this sample, or None."""
    found = sample.get(REFUSED_KEY)
    return found if isinstance(found, SampleRefused) else None


def shard_paths(split_dir: Location) -> list[UPath]:
    folder = location(split_dir)
    if not folder.exists():
        return []
    # A FIFO or device named like a shard (or a link to one) would block or never end a reader: not a shard.
    local = is_local(folder)
    return sorted((p for p in folder.glob("*.tar") if not p.name.startswith(".") and (not local or p.is_file())),
                  key=lambda p: p.name)


def write_sizes(split_dir: Location, counts: dict[str, int]) -> None:
    """`sizes.json`: shard file name -> sample count, the file LAION-CLAP reads for epoch length;
    and `SHA256SUMS` for the same shards, from the checksums their writers recorded."""
    atomic_write_json(location(split_dir) / SIZES_FILE, dict(sorted(counts.items())))
    _write_checksums(location(split_dir), list(counts))


def _recorded_checksum(shard: UPath) -> UPath:
    return shard.with_name(f".{shard.name}.sha256")


def read_sizes(split_dir: Location) -> dict[str, int]:
    """A split's sizes.json: shard name -> sample count, refused in one UserError line otherwise."""
    path = location(split_dir) / SIZES_FILE
    try:
        return check_sizes(read_json(path))
    except SampleRefused as exc:
        raise UserError(f"{path}: unreadable ({exc.detail})") from None


def file_sha256(path: Location) -> str:
    """sha256 of a file, read in chunks (memory stays flat for any shard size)."""
    digest = hashlib.sha256()
    with location(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksums(split_dir: UPath, shards: list[str]) -> None:
    """`SHA256SUMS`: one `<sha256>  <shard>` line per shard, as `sha256sum -c` reads it. Each is the
    checksum recorded when the shard was written, else the one listed before (an earlier run's
    shard), else (a shard from a version that kept none) the file's now."""
    listed = read_checksums(split_dir) or {}
    sums, recorded = {}, []
    for name in shards:
        sidecar = _recorded_checksum(split_dir / name)
        if sidecar.exists():
            sums[name] = sidecar.read_text(encoding="ascii").strip()
            recorded.append(sidecar)
        else:
            sums[name] = listed.get(name) or file_sha256(split_dir / name)
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
    atomic_write_bytes(split_dir / CHECKSUMS_FILE, lines.encode("ascii"))
    for sidecar in recorded:  # listed now; SHA256SUMS is the record from here on
        sidecar.unlink(missing_ok=True)


def read_checksums(split_dir: Location) -> dict[str, str] | None:
    """Shard name -> sha256, or None for an output written before checksums were kept."""
    path = location(split_dir) / CHECKSUMS_FILE
    if not path.exists():
        return None
    with path.open("rb") as handle:  # ~80 bytes a shard: the cap allows 800,000 shards
        raw = handle.read(MAX_RECORD_BYTES + 1)
    try:
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(f"more than {MAX_RECORD_BYTES} bytes")
        text = raw.decode("ascii")
    except ValueError as exc:
        raise UserError(f"{path}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    sums = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if name:
            sums[name] = digest
    return sums
