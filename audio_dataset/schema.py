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
from typing import Any

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
