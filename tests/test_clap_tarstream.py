"""clap_model.tarstream reads any webdataset tar as the standard library does, one read per member."""
from __future__ import annotations

import io
import tarfile

import pytest

from clap_model.tarstream import TarFormatError, tar_members, tar_samples

LONG = "dir/" + "k" * 120  # beyond ustar's 100-byte name field


def _tar(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("somedir"), None)  # an empty regular file without an extension
        info = tarfile.TarInfo("adir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("alink")
        link.type, link.linkname = tarfile.SYMTYPE, "somedir"
        tar.addfile(link)
    return buffer.getvalue()


def _stdlib(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_the_standard_library(fmt):
    members = [("a.flac", bytes(range(256)) * 5), ("a.json", b'{"text": ["x"]}'), ("b.flac", b""),
               ("sub/c.d.json", b"{}")]
    if fmt != tarfile.USTAR_FORMAT:
        members.append((LONG + ".flac", b"long"))
    if fmt == tarfile.PAX_FORMAT:
        members.append(("caf\u00e9.json", b"{}"))  # non-ASCII names go through pax records
    data = _tar(members, fmt)
    assert list(tar_members(io.BytesIO(data))) == _stdlib(data)


def test_samples_group_members_by_key():
    data = _tar([("a.flac", b"1"), ("a.json", b"2"), ("b.flac", b"3"), ("sub/c.d.JSON", b"4"),
                 ("__meta__.json", b"5"), ("noext", b"6")], tarfile.PAX_FORMAT)
    samples = list(tar_samples(io.BytesIO(data), "u"))
    assert all(s["__url__"] == "u" for s in samples)
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("a", ["flac", "json"]), ("b", ["flac"]), ("sub/c", ["d.json"])]
    assert samples[0]["flac"] == b"1" and samples[2]["d.json"] == b"4"


def test_damaged_streams_fail_with_a_named_error_after_the_good_members():
    data = _tar([("a.flac", b"x" * 3000), ("b.flac", b"y" * 3000)], tarfile.USTAR_FORMAT)
    cut = data.index(b"y" * 100) + 1000  # inside b.flac's bytes
    reader = tar_members(io.BytesIO(data[:cut]))
    assert next(reader)[0] == "somedir" and next(reader)[0] == "a.flac"
    with pytest.raises(TarFormatError, match="ends inside a member"):
        next(reader)
    with pytest.raises(TarFormatError, match="checksum"):
        list(tar_members(io.BytesIO(b"<html>" + bytes(2000))))
    assert list(tar_members(io.BytesIO(b""))) == []
