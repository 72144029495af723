"""What leading bytes say a file is: audio containers and archives, by their magic numbers.

Used to keep an HTML error page from being stored as audio, and to tell a cut-short media file
(recognisable but unreadable: `truncated`) from something that never was audio (`not_audio`).
"""
from __future__ import annotations


AUDIO_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"fLaC", "flac"),
    (0, b"OggS", "ogg"),
    (0, b"ID3", "mp3"),
    (0, b"\x1a\x45\xdf\xa3", "webm/matroska"),
    (4, b"ftyp", "mp4"),
    (0, b"#!AMR", "amr"),
    (0, b".snd", "au"),
    (0, b"wvpk", "wavpack"),
    (0, b"MAC ", "ape"),
    (0, b"caff", "caf"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "asf/wma"),
)
ARCHIVE_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (257, b"ustar", "tar"),
)


def _match(data: bytes, signatures: tuple[tuple[int, bytes, str], ...]) -> str | None:
    for offset, magic, name in signatures:
        if data[offset:offset + len(magic)] == magic:
            return name
    return None


def sniff_audio(data: bytes) -> str | None:
    """The container/codec the leading bytes announce, or None when they are not audio."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] in (b"WAVE", b"AVI "):
        return "wav" if data[8:12] == b"WAVE" else None
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    found = _match(data, AUDIO_SIGNATURES)
    if found:
        return found
    # MPEG audio / ADTS AAC frame sync: 11 set bits, and a layer/version that is not "reserved".
    if len(data) >= 2 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0 and (data[1] & 0x18) != 0x08:
        return "mpeg"
    return None


def sniff_archive(data: bytes) -> str | None:
    return _match(data, ARCHIVE_SIGNATURES)
