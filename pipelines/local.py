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


def _scalar(value: Any) -> str:
    """A cell as text; None and NaN (a parquet table's missing value) are empty, never "nan"."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


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
    try:
        if meta.is_file():
            data = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise UserError(f"bad sidecar JSON {meta}: want an object with 'text', got {type(data).__name__}")
            return data
        text = path.with_suffix(".txt")
        if text.is_file():
            return {"text": [line.strip() for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]}
    except json.JSONDecodeError as exc:
        raise UserError(f"bad sidecar JSON {meta}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"sidecar of {path} is not UTF-8 text: {exc}") from None
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
        listed = 0
        for listed, item in enumerate(self._list_folder() if self.root.is_dir() else self._list_table(), 1):
            yield item
        if not listed:  # an empty dataset is never what was meant: the wrong folder, or a typo
            what = "no audio files" if self.root.is_dir() else "no rows"
            raise UserError(f"{what} in {self.root} (audio: {', '.join(sorted(AUDIO_SUFFIXES))})")

    def _list_folder(self) -> Iterator[Item]:
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        for path in files:
            meta = _sidecar(path)
            rel = path.relative_to(self.root).as_posix()
            yield self._item(rel, self._locator(path), meta)

    def _read_table(self) -> tuple[list[str], list[dict[str, Any]]]:
        """(columns, rows) with plain Python values: every cell must go into the sample JSON."""
        import pandas as pd
        import pyarrow as pa

        suffix = self.root.suffix.lower()
        try:
            if suffix == ".parquet":  # pyarrow's own rows: lists, not numpy arrays; nulls as None
                table = read_parquet(self.root)
                return table.column_names, table.to_pylist()
            with self.root.open("rb") as handle:
                frame = pd.read_csv(handle, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
            return list(frame.columns), frame.to_dict(orient="records")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, pa.ArrowException) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot read {self.root}: {first_line}") from None

    def _list_table(self) -> Iterator[Item]:
        columns, records = self._read_table()
        names = ", ".join(map(str, columns))
        if "path" not in columns:
            raise UserError(f"{self.root} has no 'path' column (columns: {names})")
        if "caption" not in columns and "text" not in columns:
            raise UserError(f"{self.root} has no 'caption' or 'text' column (columns: {names})")
        # A clip on several rows (one row per caption, as AudioCaps ships) is one item with all of them.
        rows: dict[str, tuple[str, dict[str, Any]]] = {}  # source id -> (locator, record)
        for record in records:
            rel = str(record.pop("path"))
            path = location(rel) if "://" in rel or PurePosixPath(rel).is_absolute() else self.root.parent / rel
            record["text"] = _as_list(record.pop("caption", None) or record.pop("text", None))
            record["tag"] = _as_list(record.pop("tags", None) or record.pop("tag", None), ";")
            _, first = rows.setdefault(_scalar(record.pop("id", None)) or rel, (self._locator(path), record))
            for key in ("text", "tag") if first is not record else ():
                first[key] += [value for value in record[key] if value not in first[key]]
        for source_id, (locator, record) in rows.items():
            yield self._item(source_id, locator, record)

    @staticmethod
    def _locator(path: UPath) -> str:
        return str(path.resolve()) if is_local(path) else str(path)

    @staticmethod
    def _item(source_id: str, path: str, meta: dict[str, Any]) -> Item:
        meta = dict(meta)
        text = _as_list(meta.pop("text", None))
        if not text:
            text = [PurePosixPath(source_id).stem.replace("_", " ").replace("-", " ")]
        split = _scalar(meta.pop("split", None)) or None
        return Item(
            source_id=source_id, locator=path, text=text, tag=_as_list(meta.pop("tag", None), ";"),
            license=_scalar(meta.pop("license", None)), author=_scalar(meta.pop("author", None)),
            url=_scalar(meta.pop("url", None)), original_data=meta, split=split,
        )

    def fetch(self, item: Item) -> bytes:
        try:
            return location(item.locator).read_bytes()
        except FileNotFoundError:
            raise ItemError("missing_file", item.locator) from None
        except OSError as exc:
            raise ItemError("read_error", str(exc)) from None


SOURCE = LocalSource
