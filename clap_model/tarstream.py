"""Webdataset tar shards as a stream of samples, read with one `read` per member.

The standard library's stream mode (which webdataset uses) pulls a member's bytes through 10 KB
reads joined in Python; for the loader's large FLAC members that cost ~10x a single read (measured
in bench/RESULTS.md, clap-train). Shards from any webdataset writer read the same: ustar headers,
pax `path` records and GNU long names are honoured; links, directories and other entries are skipped.
"""
from __future__ import annotations

import re
from typing import BinaryIO, Iterator

BLOCK = 512
_REGULAR = {b"0", b"\0", b"7"}
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: the key ends at the basename's first dot


class TarFormatError(ValueError):
    """The stream is not a tar file, or it ends inside a member."""


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarFormatError(f"tar stream ends inside a member ({len(data)} of {size} bytes)")
    return data


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes beyond the octal field
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"not a tar header (size field {text!r})") from None


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    try:
        expected = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    return expected == unsigned


def _pax_path(records: bytes) -> str | None:
    path = None
    while records:
        length_text, _, rest = records.partition(b" ")
        try:
            length = int(length_text)
        except ValueError:
            raise TarFormatError("malformed pax header") from None
        record = records[len(length_text) + 1 : length].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        records = records[length:]
    return path


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file, in archive order."""
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):  # end of archive (or a clean EOF)
            if header and len(header) < BLOCK:
                raise TarFormatError("tar stream ends inside a header")
            return
        if not _checksum_ok(header):
            raise TarFormatError("bad tar header checksum")
        size, kind = _number(header[124:136]), header[156:157]
        data = _read_exact(stream, size) if kind in _REGULAR or kind in (b"x", b"L") else None
        if data is None:
            _skip(stream, size + (-size) % BLOCK)
        else:
            _skip(stream, (-size) % BLOCK)
        if kind == b"x":
            long_name = _pax_path(data) or long_name
            continue
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = long_name or _ustar_name(header)
        long_name = None
        if data is not None:
            yield name, data


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _skip(stream: BinaryIO, size: int) -> None:
    if size:
        _read_exact(stream, size)


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, object]]:
    """Consecutive members sharing a key -> one sample dict {"__key__", "__url__", ext: bytes}.
    Members without an extension and hidden `__*__` entries are skipped."""
    sample: dict[str, object] | None = None
    for name, data in tar_members(stream):
        match = _KEY_AND_EXT.match(name)
        if match is None or name.rsplit("/", 1)[-1].startswith("__"):
            continue
        key, ext = match.groups()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[ext.lower()] = data
    if sample is not None:
        yield sample
