"""The sample schema shared by every part of audiodata (build, k2c, clap_model).

A sample in a shard is `<key>.flac` + `<key>.json`. The JSON holds the fields LAION-CLAP's training
loader reads unchanged (`text`, `tag`, `original_data`, and the k2c fields) plus our provenance.
This module is the only thing `clap_model` imports from `audio_dataset`, so it stays dependency-free.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import IO, Any

AUDIO_EXT = "flac"
JSON_EXT = "json"
SPLITS = ("train", "valid", "test")
SIZES_FILE = "sizes.json"
SHARD_NAME_FORMAT = "{index:06d}.tar"


def split_order(split: str) -> tuple[int, str]:
    """The usual splits first, in their order, then any other by name."""
    return (SPLITS.index(split) if split in SPLITS else 99, split)


# Caption fields LAION-CLAP's loader can select from (`--text-key` in clap-train).
TEXT_FIELD = "text"
TEXT_AUGMENT_T5_FIELD = "text_augment_t5"
TEXT_AUGMENT_ALL_FIELD = "text_augment_all"

REQUIRED_FIELDS = (
    "text", "tag", "original_data", "source", "source_id", "license", "author", "url",
    "duration", "sample_rate", "channels", "segment",
)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# Longer captions are cut (and counted): a pasted licence text or page dump is not a caption, and
# CLAP's text encoders read well under this many characters anyway.
MAX_CAPTION_CHARS = 1000


@dataclass
class SampleMeta:
    """The JSON half of a sample."""

    text: list[str]
    tag: list[str]
    original_data: dict[str, Any]
    source: str
    source_id: str
    license: str
    author: str
    url: str
    duration: float
    sample_rate: int
    channels: int
    # [start, end] seconds within the source clip; None when the sample is the whole clip.
    segment: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_bytes(self) -> bytes:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return json.dumps(data, ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json_bytes(cls, raw: bytes | str) -> "SampleMeta":
        data = json.loads(raw)
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise ValueError(f"sample JSON lacks fields: {', '.join(missing)}")
        known = {name: data.pop(name) for name in REQUIRED_FIELDS}
        return cls(**known, extra=data)


def validate_meta(data: dict[str, Any]) -> list[str]:
    """Problems with a decoded sample JSON, as readable strings (empty when valid)."""
    problems = [f"missing field {name!r}" for name in REQUIRED_FIELDS if name not in data]
    if problems:
        return problems
    if not isinstance(data["text"], list) or not all(isinstance(t, str) for t in data["text"]):
        problems.append("'text' must be a list of strings")
    elif not data["text"]:
        problems.append("'text' is empty")
    if not isinstance(data["tag"], list):
        problems.append("'tag' must be a list")
    if not isinstance(data["original_data"], dict):
        problems.append("'original_data' must be an object")
    if not isinstance(data["duration"], (int, float)) or data["duration"] <= 0:
        problems.append("'duration' must be a positive number")
    seg = data["segment"]
    if seg is not None and (not isinstance(seg, list) or len(seg) != 2 or seg[0] >= seg[1]):
        problems.append("'segment' must be null or [start, end] with start < end")
    return problems


def clean_captions(captions: list[str]) -> tuple[list[str], int]:
    """Captions as stored: stripped, blank ones left out, each cut to MAX_CAPTION_CHARS.

    Returns them with how many were cut.
    """
    kept = [caption.strip() for caption in captions if caption.strip()]
    truncated = sum(len(caption) > MAX_CAPTION_CHARS for caption in kept)
    return [caption[:MAX_CAPTION_CHARS].rstrip() for caption in kept], truncated


def safe_key(source: str, source_id: str, segment_index: int | None = None) -> str:
    """A webdataset-safe, unique, readable key: no '/', no '..', no dots at all.

    webdataset splits a member name at its first dot, so dots would break samples apart. The
    short hash of the raw id keeps keys unique when two ids sanitise to the same text.
    """
    readable = _UNSAFE.sub("_", source_id).strip("_")[:60] or "item"
    digest = hashlib.sha1(f"{source}\0{source_id}".encode()).hexdigest()[:10]
    key = f"{_UNSAFE.sub('_', source)}-{readable}-{digest}"
    if segment_index is not None:
        key += f"-s{segment_index:04d}"
    return key


def shard_name(index: int) -> str:
    return SHARD_NAME_FORMAT.format(index=index)


# A shard named in sizes.json is a plain file name in that folder: no path, no `..`, no URL or
# `pipe:` command (a colon), no control characters. The name comes from data, so nothing in it may
# lead a reader outside the folder or run a program.
_PLAIN_NAME = re.compile(r"[^/\\:\x00-\x1f\x7f]+")


def bad_shard_name(name: object) -> str | None:
    """Why `name` (a sizes.json key) is not a plain shard file name, or None when it is one."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if name in (".", "..") or not _PLAIN_NAME.fullmatch(name):
        return "not a plain file name in the folder (a path, URL or command)"
    return None


# ---- What a shard member may be. Every reader of shards (audiodata's commands and clap_model's
# loader) holds a member to these before it is read into memory, so a hostile shard costs a
# bounded amount of memory and one named outcome for its sample.
# An audio member: 512 MiB is ~46 min of 48 kHz stereo 16-bit WAV; a FLAC clip is far smaller.
MAX_MEMBER_BYTES = 512 << 20
MAX_JSON_BYTES = 16 << 20
# A dataset's own JSON records: sizes.json of a million shards is ~30 MB.
MAX_RECORD_BYTES = 64 << 20
MAX_JSON_DEPTH = 64  # a sample's JSON nests 3 deep; Python's parser recurses in C per level
MAX_NAME_CHARS = 255
# A sample refused before it is used: its manifest status (or verify's problem) names which.
BAD_MEMBER = "bad_member"  # a member name that is not a plain `KEY.EXT`
MEMBER_TOO_LARGE = "member_too_large"
SPARSE_MEMBER = "sparse_member"  # a GNU/pax sparse file: it declares more bytes than it stores
BAD_JSON = "bad_json"  # no .json, not UTF-8 JSON, nested too deep, or not an object
REFUSED = (BAD_MEMBER, MEMBER_TOO_LARGE, SPARSE_MEMBER, BAD_JSON)
# The sample entry a shard reader puts a SampleRefused in (dunder: never written as a member).
REFUSED_KEY = "__refused__"


class SampleRefused(ValueError):
    """A member or sample that is not read further; `reason` is one of REFUSED."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def shown(name: str) -> str:
    """A member name as it may be printed or recorded: escaped to ASCII and cut short."""
    text = ascii(name)[1:-1]
    return text if len(text) <= 120 else text[:117] + "..."


def member_cap(ext: str) -> int:
    """The most bytes a member with this extension may hold."""
    return MAX_JSON_BYTES if ext.lower() == JSON_EXT else MAX_MEMBER_BYTES


def member_key(name: str) -> tuple[str, str]:
    """(key, ext) of a plain `KEY.EXT` member name (the key ends at the first dot, webdataset's
    rule). Anything else (a path, `..`, a leading dot, control characters) raises BAD_MEMBER."""
    key, _, ext = name.partition(".")
    if not key or not ext or "/" in name or "\\" in name or ".." in name or not name.isprintable() \
            or len(name) > MAX_NAME_CHARS:
        raise SampleRefused(BAD_MEMBER, f"member name {shown(name)!r} is not a plain KEY.EXT")
    return key, ext


def check_member_size(name: str, size: int) -> None:
    """Raises MEMBER_TOO_LARGE for a member declaring more than its extension's cap."""
    cap = member_cap(name.rpartition(".")[2] if "." in name else "")
    if size > cap:
        raise SampleRefused(MEMBER_TOO_LARGE, f"{shown(name)} declares {size} bytes (the cap is {cap})")


# A JSON string literal, and what is left once strings and everything but brackets are gone.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting_ok(raw: bytes) -> bool:
    """Whether the JSON's brackets balance and nest at most MAX_JSON_DEPTH deep: each pass deletes
    the innermost pairs, so valid JSON is empty after as many passes as it is deep. Linear passes
    in C and no recursion (json.loads recurses per level, even into unclosed brackets)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return True
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    return not brackets


def load_json_object(raw: bytes | str, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A sample's JSON member parsed with bounds: at most `limit` bytes, nested at most
    MAX_JSON_DEPTH, and an object. Anything else raises BAD_JSON (never RecursionError)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > limit:
        raise SampleRefused(BAD_JSON, f"too large (the cap is {limit} bytes)")
    if not _nesting_ok(data):
        raise SampleRefused(BAD_JSON, f"brackets unbalanced or nested deeper than {MAX_JSON_DEPTH}")
    try:
        value = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise SampleRefused(BAD_JSON, " ".join(str(exc).split())[:200]) from None
    if not isinstance(value, dict):
        raise SampleRefused(BAD_JSON, f"a JSON {type(value).__name__}, not an object")
    return value


def check_sizes(sizes: dict[str, Any]) -> dict[str, int]:
    """A sizes.json's counts: each a non-negative integer (a trainer multiplies and sums them)."""
    if not all(type(count) is int and count >= 0 for count in sizes.values()):
        raise SampleRefused(BAD_JSON, "a count that is not a non-negative integer")
    return sizes


def read_json_record(handle: IO[bytes]) -> dict[str, Any]:
    """A dataset's own JSON file (sizes.json, run.json, provenance.json, ...) from an open binary
    handle, with load_json_object's bounds: it is data like any member, so it is read only up to
    MAX_RECORD_BYTES and never parsed into a RecursionError."""
    return load_json_object(handle.read(MAX_RECORD_BYTES + 1), MAX_RECORD_BYTES)
