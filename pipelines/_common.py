"""Helpers the catalogue-driven sources share: read an input that is a path or a URL, parse CSVs,
turn file names into captions. Not a source itself (the leading underscore hides it from
`audiodata sources`).
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from audio_dataset.http import HTTP_OPTION_PREFIX, HttpClient
from audio_dataset.source import ItemError, SourceError, UserError


def check_options(source: str, options: dict[str, str], known: set[str], http: bool = True) -> None:
    """A mistyped `--source-option` is a usage mistake, named with the options the source knows."""
    unknown = sorted(k for k in options if k not in known and not (http and k.startswith(HTTP_OPTION_PREFIX)))
    if unknown:
        listed = sorted(known) + (["http_* (see audio_dataset.http)"] if http else [])
        raise UserError(f"unknown {source} option(s) {', '.join(unknown)}; known: {', '.join(listed) or 'none'}")


def is_url(location: str) -> bool:
    return urlsplit(location).scheme in ("http", "https")


def read_text(location: str, client: HttpClient, what: str) -> str:
    """The text of a local file or a URL; a missing file is the user's mistake, a dead URL the site's."""
    if is_url(location):
        try:
            return client.get_text(location)
        except ItemError as exc:
            raise SourceError(f"could not read the {what} at {location}: {exc}") from None
    path = Path(location).expanduser()
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path.read_text(encoding="utf-8-sig", errors="replace")


def csv_rows(text: str) -> list[dict[str, str]]:
    """Rows of a CSV with a header line, keys and values stripped."""
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    try:
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except csv.Error as exc:  # a field over csv's limit (131,072 characters), a NUL: the table is refused
        raise SourceError(f"unreadable CSV, line {reader.line_num}: {exc}") from None


def csv_lines(text: str, what: str) -> Iterator[list[str]]:
    """Rows of a CSV without a header; csv's errors as one SourceError line naming `what`."""
    reader = csv.reader(io.StringIO(text))
    try:
        yield from reader
    except csv.Error as exc:
        raise SourceError(f"unreadable {what}, line {reader.line_num}: {exc}") from None


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


_SEPARATORS = re.compile(r"[_\-\.]+")
_SPACES = re.compile(r"\s+")
# Take numbers and variation suffixes sound libraries append: "Door Slam 03", "Hit_v2", "Boom (2)".
_NUMBERING = re.compile(r"(?:[\s_\-]*(?:\(\d+\)|v\d+|\d+[a-z]?))+$", re.IGNORECASE)


def caption_from_name(name: str) -> str:
    """A caption from a file or folder name: "CAR_Door_Slam_03.wav" -> "CAR Door Slam"."""
    stem = Path(name).stem if Path(name).suffix.lower() in AUDIO_EXTENSIONS else name
    stem = _NUMBERING.sub("", stem) or stem
    return _SPACES.sub(" ", _SEPARATORS.sub(" ", stem)).strip()


AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".aif", ".aiff", ".m4a", ".opus", ".wv"})


def is_audio_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    # macOS archive debris (__MACOSX/, ._name) is metadata, not audio.
    return Path(base).suffix.lower() in AUDIO_EXTENSIONS and not base.startswith("._") \
        and "__MACOSX/" not in name
