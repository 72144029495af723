"""`local`: a user's own folder of audio (sidecar captions) or a CSV/parquet table.

Folder: every audio file under `--input`, recursively; captions from `NAME.json` (`text`, `tag`,
`license`, `author`, `url`, anything else kept as original_data) or else `NAME.txt` (one caption
per line). Table: columns `path` (relative to the table's folder) and `caption` or `text` (a
string, or a JSON list), optional `tags`/`tag` (`;`-separated or a JSON list), `id`, `license`,
`author`, `url`, `split`. `--input` may be an fsspec URL too (s3://bucket/folder).
"""
from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any, Iterator

from upath import UPath

from audio_dataset.manifest import read_parquet
from audio_dataset.source import Item, ItemError, Source, UserError
from audio_dataset.storage import is_local, location

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".webm", ".mp4",
                  ".aiff", ".aif", ".wma"}
TABLE_SUFFIXES = {".csv", ".tsv", ".parquet"}


def _as_list(value: Any, sep: str | None = None) -> list[str]:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return []
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        return [str(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError:
            pass
    parts = text.split(sep) if sep else [text]
    return [p.strip() for p in parts if p.strip()]


def _sidecar(path: UPath) -> dict[str, Any]:
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            return json.loads(meta.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"bad sidecar JSON {meta}: {exc}") from None
    text = path.with_suffix(".txt")
    if text.is_file():
        return {"text": [line.strip() for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]}
    return {}


class LocalSource(Source):
    name = "local"
    fetch_concurrency = 4

    @property
    def root(self) -> UPath:
        return location(self.config.input or "")

    def check(self) -> None:
        if not self.config.input:
            raise UserError("--source local needs --input DIR_OR_CSV")
        if not self.root.exists():
            raise UserError(f"input not found: {self.root}")
        if self.root.is_file() and self.root.suffix.lower() not in TABLE_SUFFIXES:
            raise UserError(f"--input must be a folder or a .csv/.tsv/.parquet table, not {self.root.name}")

    def list_items(self) -> Iterator[Item]:
        if self.root.is_dir():
            yield from self._list_folder()
        else:
            yield from self._list_table()

    def _list_folder(self) -> Iterator[Item]:
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        for path in files:
            meta = _sidecar(path)
            rel = path.relative_to(self.root).as_posix()
            yield self._item(rel, self._locator(path), meta)

    def _list_table(self) -> Iterator[Item]:
        import pandas as pd

        suffix = self.root.suffix.lower()
        if suffix == ".parquet":
            frame = read_parquet(self.root).to_pandas()
        else:
            with self.root.open("rb") as handle:
                frame = pd.read_csv(handle, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        if "path" not in frame.columns:
            raise UserError(f"{self.root} has no 'path' column (columns: {', '.join(frame.columns)})")
        for record in frame.to_dict(orient="records"):
            rel = str(record.pop("path"))
            path = location(rel) if "://" in rel or PurePosixPath(rel).is_absolute() else self.root.parent / rel
            record["text"] = _as_list(record.pop("caption", None) or record.pop("text", None))
            record["tag"] = _as_list(record.pop("tags", None) or record.pop("tag", None), ";")
            source_id = str(record.pop("id", "") or rel)
            yield self._item(source_id, self._locator(path), record)

    @staticmethod
    def _locator(path: UPath) -> str:
        return str(path.resolve()) if is_local(path) else str(path)

    @staticmethod
    def _item(source_id: str, path: str, meta: dict[str, Any]) -> Item:
        meta = dict(meta)
        text = _as_list(meta.pop("text", None))
        if not text:
            text = [PurePosixPath(source_id).stem.replace("_", " ").replace("-", " ")]
        split = meta.pop("split", None) or None
        return Item(
            source_id=source_id, locator=path, text=text, tag=_as_list(meta.pop("tag", None), ";"),
            license=str(meta.pop("license", "") or ""), author=str(meta.pop("author", "") or ""),
            url=str(meta.pop("url", "") or ""), original_data=meta, split=split,
        )

    def fetch(self, item: Item) -> bytes:
        try:
            return location(item.locator).read_bytes()
        except FileNotFoundError:
            raise ItemError("missing_file", item.locator) from None
        except OSError as exc:
            raise ItemError("read_error", str(exc)) from None


SOURCE = LocalSource
