"""Webdataset tar shards as a stream of samples, read with one `read` per member.

The standard library's stream mode (which webdataset uses) pulls a member's bytes through 10 KB
reads joined in Python; for the loader's large FLAC members that cost ~10x a single read (measured
in bench/RESULTS.md, clap-train). Shards from any webdataset writer read the same: ustar headers,
pax `path` records and GNU long names are honoured; links, directories and other entries are skipped.
A member over its cap (audio_dataset.schema's, shared with audiodata's readers) or sparse is never
read: it is skipped a bounded chunk at a time and its sample named as refused.
"""
from __future__ import annotations

import re
from typing import BinaryIO, Iterator

from audio_dataset.schema import REFUSED_KEY, SPARSE_MEMBER, SampleRefused, check_member_size, shown

BLOCK = 512
_SKIP_CHUNK = 1 << 20
# A pax or GNU long-name header: names and a few attributes, never near this.
MAX_HEADER_BYTES = 1 << 20
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


def _pax_records(records: bytes) -> dict[bytes, bytes]:
    found = {}
    while records:
        length_text, _, rest = records.partition(b" ")
        try:
            length = int(length_text)
        except ValueError:
            raise TarFormatError("malformed pax header") from None
        if length <= len(length_text):
            raise TarFormatError("malformed pax header")
        record = records[len(length_text) + 1 : length].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        found[key] = value
        records = records[length:]
    return found


def _is_sparse(kind: bytes, pax: dict[bytes, bytes]) -> bool:
    """A GNU sparse member ('S') or a pax one (GNU.sparse.* records): it declares more than it stores."""
    return kind == b"S" or any(key.startswith(b"GNU.sparse.") for key in pax)


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes | SampleRefused]]:
    """(name, bytes) of each regular file, in archive order. A member over its cap (schema's
    member_cap) or sparse is not read: (name, SampleRefused) says why, and reading goes on."""
    long_name: str | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):  # end of archive (or a clean EOF)
            if header and len(header) < BLOCK:
                raise TarFormatError("tar stream ends inside a header")
            return
        if not _checksum_ok(header):
            raise TarFormatError("bad tar header checksum")
        size, kind = _number(header[124:136]), header[156:157]
        if kind in (b"x", b"L"):
            if size > MAX_HEADER_BYTES:
                raise TarFormatError(f"a {size}-byte extended header (the cap is {MAX_HEADER_BYTES})")
            data = _read_exact(stream, size)
            _skip(stream, (-size) % BLOCK)
            if kind == b"x":
                pax = _pax_records(data)
                long_name = pax[b"path"].decode("utf-8", "surrogateescape") if b"path" in pax else long_name
            else:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = long_name or _ustar_name(header)
        if b"GNU.sparse.name" in pax:  # a pax sparse file's real name (its header holds ./GNUSparseFile.N/...)
            name = pax[b"GNU.sparse.name"].decode("utf-8", "surrogateescape")
        long_name, member_pax, pax = None, pax, {}
        refused = _refusal(name, size, kind, member_pax)
        if refused is not None:  # named first: a member declaring a terabyte ends the stream in it
            yield name, refused
        if kind not in _REGULAR or refused is not None:
            _skip(stream, size + (-size) % BLOCK)
            continue
        data = _read_exact(stream, size)
        _skip(stream, (-size) % BLOCK)
        yield name, data


def _refusal(name: str, size: int, kind: bytes, pax: dict[bytes, bytes]) -> SampleRefused | None:
    if _is_sparse(kind, pax):
        return SampleRefused(SPARSE_MEMBER, f"{shown(name)} is a sparse file")
    if kind in _REGULAR:
        try:
            check_member_size(name, size)
        except SampleRefused as exc:
            return exc
    return None


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _skip(stream: BinaryIO, size: int) -> None:
    """Past `size` bytes, a bounded read at a time (a member may declare terabytes)."""
    while size:
        size -= len(_read_exact(stream, min(size, _SKIP_CHUNK)))


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, object]]:
    """Consecutive members sharing a key -> one sample dict {"__key__", "__url__", ext: bytes}.
    Members without an extension and hidden `__*__` entries are skipped. A sample with a member
    that was not read (over its cap, sparse) comes with "__refused__" (a SampleRefused) instead."""
    sample: dict[str, object] | None = None
    refused_key = None
    for name, data in tar_members(stream):
        match = _KEY_AND_EXT.match(name)
        if match is None or name.rsplit("/", 1)[-1].startswith("__"):
            continue
        key, ext = match.groups()
        if key == refused_key:  # the rest of a refused sample
            continue
        if sample is not None and (sample["__key__"] != key or isinstance(data, SampleRefused)):
            yield sample
            sample = None
        if isinstance(data, SampleRefused):  # named at once: the stream may end inside its member
            refused_key = key
            yield {"__key__": key, "__url__": url, REFUSED_KEY: data}
            continue
        sample = sample or {"__key__": key, "__url__": url}
        sample[ext.lower()] = data
    if sample is not None:
        yield sample
