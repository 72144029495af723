"""`audiodata attribution DATASET`: the credit lines every clip whose licence asks for one needs.

Per split, SPLIT.tsv and SPLIT.md (default in DATASET/attribution/): one line per clip (the samples cut
from one source clip share it) with title, author, source URL, licence with its URL, and the changes
the build made ("resampled to 48 kHz mono, trimmed to 10 s, FLAC"), the TASL form CC asks for.
Which licences ask: audio_dataset/licenses.py `needs_attribution` (every CC BY variant, Sampling+).

The changes come from the build options the dataset recorded (provenance.json, else _work/config.json):
untrusted files, so each value is used only when it has the expected type and range. Sample JSON is
read with the schema's bounds; every cell is made inert for TSV (stats `tsv_cell`, as `audiodata failures`) and Markdown.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

from upath import UPath

from audio_dataset.audio import FLAC_MAX_RATE, LONG_CLIP_POLICIES
from audio_dataset.licenses import license_url, needs_attribution, sample_licence
from audio_dataset.provenance import PROVENANCE_FILE
from audio_dataset.schema import JSON_EXT, SampleRefused, load_json_object, split_order
from audio_dataset.shards import DamagedShard, iter_shard, refusal, shard_paths
from audio_dataset.stats import one_line, tsv_cell
from audio_dataset.source import UserError
from audio_dataset.storage import Location, atomic_write_bytes, location, read_json, trust_output

ATTRIBUTION_DIR = "attribution"
COLUMNS = ("title", "author", "url", "license", "license_id", "license_url", "changes", "source", "source_id",
           "samples")
MAX_SETTINGS_BYTES = 4 * 1024 * 1024  # provenance.json / config.json: a few KB in practice
_TITLE_FIELDS = ("title", "name", "file_name")
_MAX_TITLE = 300


@dataclass
class Credit:
    """One clip's credit line."""

    source: str
    source_id: str
    title: str
    author: str
    url: str
    license: str
    license_id: str
    changes: str
    samples: list[str] = field(default_factory=list)

    @property
    def license_url(self) -> str:
        return license_url(self.license_id)

    @property
    def missing(self) -> bool:
        """Neither an author nor a URL: nothing to credit the clip to."""
        return not self.author and not self.url


@dataclass
class AttributionResult:
    credits: dict[str, list[Credit]]  # split -> clips needing credit
    written: list[UPath]
    damaged: dict[str, str]  # SPLIT/NNNNNN.tar -> why (its readable samples still count)

    @property
    def missing(self) -> list[Credit]:
        return [c for credits in self.credits.values() for c in credits if c.missing]


# --------------------------------------------------------------------------- the build's changes
def _bounded_json(path: UPath) -> dict[str, Any]:
    if not path.exists() or path.stat().st_size > MAX_SETTINGS_BYTES:
        return {}
    try:
        value = read_json(path)
    except UserError:  # not a bounded JSON object (storage.read_json): no changes to state
        return {}
    return value if isinstance(value, dict) else {}


def recorded_audio(dataset: UPath) -> dict[str, Any]:
    """The audio options of the last build run recorded in the dataset, else of its _work/config.json."""
    runs = _bounded_json(dataset / PROVENANCE_FILE).get("runs")
    builds = [r for r in runs if isinstance(r, dict) and r.get("stage") == "build"] if isinstance(runs, list) else []
    options = builds[-1].get("options") if builds else None
    audio = options.get("audio") if isinstance(options, dict) else None
    if not isinstance(audio, dict):
        audio = _bounded_json(dataset / "_work" / "config.json").get("audio")
    return audio if isinstance(audio, dict) else {}


def _number(value: Any, low: float, high: float) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    return float(value) if ok else None


def _seconds(value: float) -> str:
    return f"{value:g} s"


def describe_changes(audio: dict[str, Any], cut: bool = True) -> str:
    """`resampled to 48 kHz mono, trimmed to 10 s, FLAC` from recorded audio options (typed, bounded);
    the trim only for a clip that was `cut` (its samples have a segment: a shorter clip stays whole)."""
    parts = []
    rate = _number(audio.get("sample_rate"), 1, FLAC_MAX_RATE)
    channels = {1: "mono", 2: "stereo"}.get(audio.get("channels")) if type(audio.get("channels")) is int else None
    if rate is not None:
        parts.append(f"resampled to {rate / 1000:g} kHz" + (f" {channels}" if channels else ""))
    elif channels:
        parts.append(f"mixed to {channels}")
    policy = audio.get("long_clips") if audio.get("long_clips") in LONG_CLIP_POLICIES else None
    limit = _number(audio.get("max_seconds"), 0, 1e7)
    segment = _number(audio.get("segment_seconds"), 0, 1e7)
    if not cut:
        pass
    elif policy == "truncate" and limit:
        parts.append(f"trimmed to {_seconds(limit)}")
    elif policy == "segment" and (segment or limit):
        parts.append(f"cut into {_seconds(segment or limit)} segments")
    parts.append("FLAC")
    return ", ".join(parts)


# --------------------------------------------------------------------------- gathering
def _text(value: Any, limit: int = 2000) -> str:
    return " ".join(value.split())[:limit] if isinstance(value, str) else ""


def _title(meta: dict[str, Any]) -> str:
    original = meta.get("original_data") if isinstance(meta.get("original_data"), dict) else {}
    found = next((_text(original.get(name), _MAX_TITLE) for name in _TITLE_FIELDS if _text(original.get(name))), "")
    return found or _text(meta.get("source_id"), _MAX_TITLE)


def _splits(dataset: UPath) -> list[str]:
    if not dataset.is_dir():
        return []
    names = [p.name for p in dataset.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
             and p.name != ATTRIBUTION_DIR]
    return sorted((n for n in names if shard_paths(dataset / n)), key=split_order)


def gather(dataset: Location) -> tuple[dict[str, list[Credit]], dict[str, str]]:
    """Per split, the clips whose licence asks for credit, in shard order; and the damaged shards."""
    dataset = location(dataset)
    audio = recorded_audio(dataset)
    credits: dict[str, list[Credit]] = {}
    damaged: dict[str, str] = {}
    for split in _splits(dataset):
        clips: dict[tuple[str, str], Credit] = {}
        for path in shard_paths(dataset / split):
            name = f"{split}/{path.name}"
            try:
                for sample in iter_shard(path):
                    _add(sample, clips, audio, damaged, name)
            except DamagedShard as exc:
                damaged[name] = exc.detail
        credits[split] = list(clips.values())
    return credits, damaged


def _add(sample: dict[str, Any], clips: dict[tuple[str, str], Credit], audio: dict[str, Any],
         damaged: dict[str, str], shard: str) -> None:
    refused = refusal(sample)
    try:
        if refused is not None:
            raise refused
        meta = load_json_object(sample[JSON_EXT])
    except (SampleRefused, KeyError) as exc:
        damaged.setdefault(shard, f"sample {sample.get('__key__')}: {exc}")
        return
    licence_id, _ = sample_licence(meta)
    if not needs_attribution(licence_id):
        return
    clip = (_text(meta.get("source")), _text(meta.get("source_id")))
    if clip not in clips:
        # What the sample says of itself (verify checks it against the FLAC) where the build recorded nothing.
        found = {name: meta.get(name) for name in ("sample_rate", "channels")}
        changes = describe_changes({**found, **audio}, cut=meta.get("segment") is not None)
        clips[clip] = Credit(source=clip[0], source_id=clip[1], title=_title(meta), author=_text(meta.get("author")),
                             url=_text(meta.get("url")), license=_text(meta.get("license")),
                             license_id=licence_id or "", changes=changes)
    clips[clip].samples.append(str(sample["__key__"]))


# --------------------------------------------------------------------------- writing
def to_tsv(credits: list[Credit]) -> str:
    lines = ["\t".join(COLUMNS)]
    for c in credits:
        values = {**vars(c), "license_url": c.license_url, "samples": " ".join(c.samples)}
        lines.append("\t".join(tsv_cell(values[name]) for name in COLUMNS))
    return "\n".join(lines) + "\n"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#!|~&])")


def md_escape(text: str) -> str:
    """Text that Markdown shows as written: its syntax characters escaped, controls made visible."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", one_line(text))


def _md_link(label: str, url: str) -> str:
    """A link only for an http(s) URL (a `javascript:` URL stays text); parentheses percent-encoded."""
    if url and urlsplit(url).scheme.lower() in ("http", "https") and not re.search(r"[\s<>]", url):
        return f"[{md_escape(label)}](<{url.replace('(', '%28').replace(')', '%29')}>)"
    return md_escape(label if not url else f"{label} ({url})")


def to_markdown(split: str, credits: list[Credit]) -> str:
    lines = [f"# Attribution: {md_escape(split)}", "",
             f"{len(credits)} clip(s) whose licence asks for credit. Format: title, author, source, licence, changes.", ""]
    for c in credits:
        author = md_escape(c.author) if c.author else "unknown author"
        source = _md_link(c.url, c.url) if c.url else "no source URL"
        licence = _md_link(c.license_id, c.license_url)
        lines.append(f"- \"{md_escape(c.title)}\" by {author}, {source}, licensed under {licence}; "
                     f"changes: {md_escape(c.changes)}.")
    return "\n".join(lines) + "\n"


def write_attribution(dataset: Location, out: Location | None = None) -> AttributionResult:
    """SPLIT.tsv and SPLIT.md for every split, written atomically into `out` (default DATASET/attribution)."""
    dataset = location(dataset)
    dest = trust_output(out) if out is not None else trust_output(dataset) / ATTRIBUTION_DIR
    credits, damaged = gather(dataset)
    written = []
    for split, clips in credits.items():
        for name, text in ((f"{split}.tsv", to_tsv(clips)), (f"{split}.md", to_markdown(split, clips))):
            atomic_write_bytes(dest / name, text.encode("utf-8"))
            written.append(dest / name)
    return AttributionResult(credits, written, damaged)


def print_missing(result: AttributionResult, file: TextIO | None = None) -> None:
    """One line per clip that needs credit and has neither author nor URL."""
    file = file or sys.stderr
    for split, clips in result.credits.items():
        for c in clips:
            if c.missing:
                print(f"audiodata: {split}: {tsv_cell(c.source)} {tsv_cell(c.source_id)} ({c.license_id}) has no "
                      f"author or URL to credit", file=file)


__all__ = ["ATTRIBUTION_DIR", "AttributionResult", "Credit", "describe_changes", "gather", "md_escape",
           "recorded_audio", "to_markdown", "to_tsv", "write_attribution"]
