"""`local`: a user's own folder of audio (sidecar captions) or a CSV/parquet table.

Folder: every audio file under `--input`, recursively; captions from `NAME.json` (`text`, `tag`,
`license`, `author`, `url`, anything else kept as original_data) or else `NAME.txt` (one caption
per line). Table: columns `path` (relative to the table's folder) and `caption` or `text` (a
string, or a JSON list), optional `tags`/`tag` (`;`-separated or a JSON list), `id`, `license`,
`author`, `url`, `split`. `--input` may be an fsspec URL too (s3://bucket/folder).
"""
from __future__ import annotations

import contextlib
import csv
import io
import errno
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pyarrow as pa
from upath import UPath

from audio_dataset.build import SPLIT_NAME
from audio_dataset.listing import INDEX_SCHEMA, id_digests
from audio_dataset.manifest import iter_batches
from audio_dataset.source import Item, ItemError, Source, UserError
from audio_dataset.storage import is_local, location

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".webm", ".mp4",
                  ".aiff", ".aif", ".wma"}
TABLE_SUFFIXES = {".csv", ".tsv", ".parquet"}
TABLE_CHUNK_ROWS = 50_000  # a table is read this many rows at a time
# Table columns the item's fields come from; any other column is kept in original_data.
_TABLE_FIELDS = {"path", "caption", "text", "tags", "tag", "id", "split", "license", "author", "url"}
# A relative path that os.path.abspath would rewrite (absolute, `.`/`..` parts, `//`, a trailing `/`).
_UNPLAIN_PATH = re.compile(r"^/|(^|/)\.\.?(/|$)|//|/$|^$")
_json_string = json.encoder.encode_basestring  # a str as JSON, as json.dumps(ensure_ascii=False) writes it


# A sidecar nested deeper than this is not metadata (and would overflow recursive JSON code later).
MAX_SIDECAR_DEPTH = 32
# A sidecar larger than this is not one clip's captions: it fails its item unread (it would go into
# every sample's JSON, and whole into memory).
MAX_SIDECAR_BYTES = 1 * 2**20
# A table's rows are checked before pandas reads them: a row (all its fields, quoted newlines
# included) over this many characters, or a header with more columns, is not a table of clips.
MAX_TABLE_ROW_CHARS = 1 * 2**20
MAX_TABLE_COLUMNS = 1000
# A field over 128 Ki characters (csv's default limit) is refused too: a caption is at most
# MAX_CAPTION_CHARS, and no other column is a clip's metadata at that size.
MAX_TABLE_FIELD_CHARS = 131_072
# A parquet column chunk is read whole, whatever the batch size: larger ones are refused unread.
MAX_PARQUET_CHUNK_BYTES = 512 * 2**20
MAX_PARQUET_FOOTER_BYTES = 64 * 2**20


class _RowTooLong(Exception):
    pass


class _RowLines:
    """A text file's lines for csv.reader, none longer than the row budget, and no row's lines
    together longer either (the reader sets `used` back to 0 after each row)."""

    def __init__(self, text: io.TextIOBase) -> None:
        self.text = text
        self.used = 0

    def __iter__(self) -> Iterator[str]:
        while True:
            line = self.text.readline(MAX_TABLE_ROW_CHARS - self.used + 1)
            if not line:
                return
            self.used += len(line)
            if self.used > MAX_TABLE_ROW_CHARS:
                raise _RowTooLong
            yield line


def _holds_bytes(kind: pa.DataType) -> bool:
    """True for a binary type, or a list or struct with one inside (no JSON holds raw bytes)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _holds_bytes(kind.value_type)
    if pa.types.is_struct(kind):
        return any(_holds_bytes(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_map(kind):
        return _holds_bytes(kind.key_type) or _holds_bytes(kind.item_type)
    return False


def _text(value: Any) -> str:
    """A value as text: strings as they are, anything else as JSON (never a Python repr); None is ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _scalar(value: Any) -> str:
    """A cell as text; None and NaN (a parquet table's missing value) are empty, never "nan"."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return _text(value)


def _as_list(value: Any, sep: str | None = None) -> list[str]:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return []
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        values = value.tolist() if hasattr(value, "tolist") else value
        return [text for text in map(_text, values) if text]
    if not isinstance(value, str):
        return [_text(value)]
    text = value.strip()
    if text.startswith("["):
        try:
            return [t for t in map(_text, json.loads(text)) if t]
        except (json.JSONDecodeError, RecursionError):
            pass
    parts = text.split(sep) if sep else [text]
    return [p.strip() for p in parts if p.strip()]


def _depth(value: Any) -> int:
    """How deeply lists and objects nest (iterative: the value may be deep enough to break recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


class _SidecarTooLarge(Exception):
    pass


def _read_sidecar(path: UPath) -> bytes:
    """A sidecar's bytes, never more than MAX_SIDECAR_BYTES of them read."""
    with path.open("rb") as handle:
        data = handle.read(MAX_SIDECAR_BYTES + 1)
    if len(data) > MAX_SIDECAR_BYTES:
        raise _SidecarTooLarge(f"{path.name}: over {MAX_SIDECAR_BYTES:,} bytes")
    return data


def _sidecar(path: UPath) -> tuple[dict[str, Any], list[str] | None]:
    """The captions beside an audio file, and [reason, detail] when they cannot be used.

    A bad sidecar fails its own item (`bad_sidecar`, the parser's message) and the build goes on.
    """
    meta = path.with_suffix(".json")
    try:
        if meta.is_file():
            data = json.loads(_read_sidecar(meta).decode("utf-8"))
            if not isinstance(data, dict):
                return {}, ["bad_sidecar", f"{meta.name}: want an object with 'text', got {type(data).__name__}"]
            if _depth(data) > MAX_SIDECAR_DEPTH:
                return {}, ["bad_sidecar", f"{meta.name}: nested deeper than {MAX_SIDECAR_DEPTH} levels"]
            return data, None
        text = path.with_suffix(".txt")
        if text.is_file():
            return {"text": [line.strip() for line in _read_sidecar(text).decode("utf-8").splitlines()
                             if line.strip()]}, None
    except _SidecarTooLarge as exc:
        return {}, ["bad_sidecar", str(exc)]
    except json.JSONDecodeError as exc:
        return {}, ["bad_sidecar", f"{meta.name}: {exc}"]
    except RecursionError:
        return {}, ["bad_sidecar", f"{meta.name}: nested too deeply to parse"]
    except UnicodeDecodeError as exc:
        return {}, ["bad_sidecar", f"sidecar of {path.name} is not UTF-8 text: {exc}"]
    except OSError as exc:
        return {}, ["bad_sidecar", f"sidecar of {path.name} cannot be read: {exc.strerror or exc}"]
    return {}, None


def _link_problem(path: Path, exc: OSError) -> list[str]:
    """Why an audio name under the folder cannot be opened: a dangling or looping link, or no access."""
    if exc.errno == errno.ELOOP:
        return ["link_loop", f"{path.name}: symbolic links form a loop"]
    if path.is_symlink():
        return ["broken_link", f"{path.name} -> {os.readlink(path)}: {exc.strerror}"]
    return ["read_error", f"{path.name}: {exc.strerror or exc}"]


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _shown_name(path: Path | str) -> str:
    """A file name as text: bytes that are not UTF-8 (Linux allows any) as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _local_audio_files(root: Path) -> list[tuple[Path, list[str] | None]]:
    """Audio files under `root`, following symbolic links, sorted by path: each real file once.

    A folder reached again through a link (a loop, or a second link to it) is not walked twice; an
    audio name that cannot be opened (dangling or looping link, no permission) comes with [reason, detail].
    """
    found: list[tuple[Path, tuple[int, int] | None, list[str] | None]] = []
    walked: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            found.append((folder, None, ["read_error", f"folder {folder.name}: {exc.strerror or exc}"]))
            continue
        if (info.st_dev, info.st_ino) in walked:
            continue
        walked.add((info.st_dev, info.st_ino))
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():  # follows links
                    subfolders.append(path)
                    continue
            except OSError:
                pass
            if path.suffix.lower() not in AUDIO_SUFFIXES:
                continue
            try:
                target = path.stat()
            except OSError as exc:
                found.append((path, None, _link_problem(path, exc)))
                continue
            if stat.S_ISREG(target.st_mode):
                found.append((path, (target.st_dev, target.st_ino), None))
            else:  # a FIFO (opening it blocks), a device (/dev/zero never ends), a socket: never opened
                kind = _file_kind(target.st_mode)
                found.append((path, None, ["not_a_file", f"{_shown_name(path.name)} is {kind}, not a regular file"]))
        # Walked in name order, so a folder reached by two paths is listed under the first.
        stack.extend(reversed(subfolders))
    found.sort(key=lambda entry: entry[0].relative_to(root).as_posix())
    seen: set[tuple[int, int]] = set()
    files = []
    for path, identity, problem in found:
        if identity is not None and identity in seen:
            continue  # the same file again through another link
        if identity is not None:
            seen.add(identity)
        files.append((path, problem))
    return files


class LocalSource(Source):
    name = "local"
    fetch_concurrency = 4
    _table_checked = False  # set once the table passed _check_table

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
        if not listed:
            raise self._nothing_listed()

    def _nothing_listed(self) -> UserError:
        """An empty dataset is never what was meant: the wrong folder, or a typo."""
        what = "no audio files" if self.root.is_dir() else "no rows"
        return UserError(f"{what} in {self.root} (audio: {', '.join(sorted(AUDIO_SUFFIXES))})")

    def _list_folder(self) -> Iterator[Item]:
        if is_local(self.root):
            files = _local_audio_files(Path(self.root.path))
        else:
            files = [(p, None) for p in sorted(self.root.rglob("*"))
                     if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
        for path, problem in files:
            rel = path.relative_to(Path(self.root.path) if is_local(self.root) else self.root).as_posix()
            locator = self._locator(location(path))
            if _shown_name(locator) != locator:  # not UTF-8: no text (id, manifest, JSON) can hold it
                problem = problem or ["bad_file_name", f"{_shown_name(rel)}: the name is not UTF-8"]
                rel, locator = _shown_name(rel), _shown_name(locator)
            meta, bad_sidecar = _sidecar(location(path)) if problem is None else ({}, None)
            item, bad_split = self._checked_item(rel, locator, meta)
            item.listing_error = problem or bad_sidecar or bad_split
            yield item

    def _read_columns(self) -> list[str]:
        """The table's column names (a CSV's header alone), or a one-line UserError."""
        import pyarrow.parquet as pq

        if self.root.suffix.lower() == ".parquet":
            with self._reading(), self.root.open("rb") as handle:
                return pq.ParquetFile(handle).schema_arrow.names
        with self._reading(), self.root.open("rb") as handle:
            return list(self._read_csv(handle, nrows=0).columns)

    def _read_csv(self, handle: Any, **options: Any) -> Any:
        import pandas as pd

        sep = "\t" if self.root.suffix.lower() == ".tsv" else ","
        return pd.read_csv(handle, sep=sep, dtype=str, keep_default_na=False, **options)

    def _chunks(self, columns: list[str] | None = None) -> Iterator[dict[str, list[Any]]]:
        """The table a chunk of rows at a time, as column name -> plain Python values (every cell
        must go into the sample JSON; a parquet table's lists stay lists, its nulls None)."""
        with self._reading():
            if self.root.suffix.lower() == ".parquet":
                for batch in iter_batches(self.root, columns):
                    yield {name: batch.column(name).to_pylist() for name in batch.schema.names}
                return
            with self.root.open("rb") as handle:
                for frame in self._read_csv(handle, chunksize=TABLE_CHUNK_ROWS, usecols=columns):
                    yield {name: frame[name].tolist() for name in frame.columns}

    def _records(self) -> Iterator[dict[str, Any]]:
        for chunk in self._chunks():
            names = list(chunk)
            for values in zip(*chunk.values()):
                yield dict(zip(names, values))

    def _check_table(self) -> None:
        """Refuse, before pandas or pyarrow reads it, a table that would take unbounded memory."""
        if self._table_checked:
            return
        with self._reading():
            if self.root.suffix.lower() == ".parquet":
                self._check_parquet()
            else:
                self._check_csv()
        self._table_checked = True

    def _check_csv(self) -> None:
        """One streamed pass: every row within MAX_TABLE_ROW_CHARS (quoted newlines and all), every
        field within MAX_TABLE_FIELD_CHARS, at most MAX_TABLE_COLUMNS columns."""
        sep = "\t" if self.root.suffix.lower() == ".tsv" else ","
        with self.root.open("rb") as raw:
            lines = _RowLines(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=""))
            reader = csv.reader(lines, delimiter=sep)
            try:
                for row in reader:
                    lines.used = 0
                    if len(row) > MAX_TABLE_COLUMNS:
                        raise UserError(f"{self.root}: line {reader.line_num} has {len(row):,} columns, "
                                        f"over {MAX_TABLE_COLUMNS:,}")
                    if row and max(map(len, row)) > MAX_TABLE_FIELD_CHARS:  # csv's limit is process-wide
                        raise UserError(f"{self.root}: line {reader.line_num} has a field over "
                                        f"{MAX_TABLE_FIELD_CHARS:,} characters")
            except _RowTooLong:
                raise UserError(f"{self.root}: the row at line {reader.line_num + 1} is over "
                                f"{MAX_TABLE_ROW_CHARS:,} characters") from None
            except csv.Error as exc:
                raise UserError(f"{self.root}: line {reader.line_num}: {exc}") from None

    def _check_parquet(self) -> None:
        """The footer, the column count and types, and each column chunk's size, from the metadata."""
        import pyarrow.parquet as pq

        with self.root.open("rb") as handle:
            size = handle.seek(0, io.SEEK_END)
            handle.seek(max(0, size - 8))
            footer = int.from_bytes(handle.read(4), "little")
            if footer > MAX_PARQUET_FOOTER_BYTES:
                raise UserError(f"{self.root}: parquet metadata of {footer:,} bytes, "
                                f"over {MAX_PARQUET_FOOTER_BYTES:,}")
            handle.seek(0)
            table = pq.ParquetFile(handle)
            schema, meta = table.schema_arrow, table.metadata
        if len(schema.names) > MAX_TABLE_COLUMNS:
            raise UserError(f"{self.root} has {len(schema.names):,} columns, over {MAX_TABLE_COLUMNS:,}")
        for field in schema:
            if _holds_bytes(field.type):
                raise UserError(f"{self.root}: column {field.name!r} holds bytes ({field.type}); "
                                "table columns must be text, numbers or lists of them")
        for group in range(meta.num_row_groups):
            row_group = meta.row_group(group)
            for number in range(row_group.num_columns):
                chunk = row_group.column(number)
                if chunk.total_uncompressed_size > MAX_PARQUET_CHUNK_BYTES:
                    raise UserError(f"{self.root}: column {chunk.path_in_schema!r} of row group {group} is "
                                    f"{chunk.total_uncompressed_size:,} bytes, over {MAX_PARQUET_CHUNK_BYTES:,} "
                                    "(write it with smaller row groups)")

    def _table_columns(self) -> list[str]:
        self._check_table()
        columns = self._read_columns()
        names = ", ".join(map(str, columns))
        if "path" not in columns:
            raise UserError(f"{self.root} has no 'path' column (columns: {names})")
        if "caption" not in columns and "text" not in columns:
            raise UserError(f"{self.root} has no 'caption' or 'text' column (columns: {names})")
        return columns

    def _repeated_ids(self, columns: list[str]) -> dict[bytes, int]:
        """Rows per id (by digest) for the ids on more than one row: a first pass over two columns,
        holding 16 bytes per row (sorted in place: no copy of that size)."""
        import numpy as np

        wanted = [c for c in ("id", "path") if c in columns]
        chunks = [id_digests(_scalar(i) or str(p) for i, p in zip(chunk.get("id") or [None] * len(chunk["path"]),
                                                                    chunk["path"]))
                  for chunk in self._chunks(wanted)]
        if not chunks:
            return {}
        digests = np.concatenate(chunks)
        del chunks
        digests.sort()
        repeated = np.unique(digests[1:][digests[1:] == digests[:-1]])
        counts = np.searchsorted(digests, repeated, side="right") - np.searchsorted(digests, repeated, side="left")
        return dict(zip(repeated.tolist(), counts.tolist()))

    def _table_row(self, folder: str | None, record: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """A row as (source id, locator, the rest of its record with `text` and `tag` as lists)."""
        rel = str(record.pop("path"))
        record["text"] = _as_list(record.pop("caption", None) or record.pop("text", None))
        record["tag"] = _as_list(record.pop("tags", None) or record.pop("tag", None), ";")
        return _scalar(record.pop("id", None)) or rel, self._table_locator(folder, rel), record

    def _list_table(self) -> Iterator[Item]:
        # A clip on several rows (one row per caption, as AudioCaps ships) is one item with all of
        # them: it waits, with the items listed after it, until its last row is read.
        repeated = self._repeated_ids(self._table_columns())
        waiting: dict[str, list[Any]] = {}  # source id -> [rows still to come, locator, record]
        folder = self._folder()
        for record in self._records():
            source_id, locator, record = self._table_row(folder, record)
            if source_id in waiting:
                first = waiting[source_id]
                first[0] -= 1
                for key in ("text", "tag"):
                    first[2][key] += [value for value in record[key] if value not in first[2][key]]
            else:
                rows = repeated.get(id_digests([source_id])[0], 1) if repeated else 1
                if rows == 1 and not waiting:
                    yield self._item(source_id, locator, record)
                    continue
                waiting[source_id] = [rows - 1, locator, record]
            while waiting:
                source_id, (left, locator, first) = next(iter(waiting.items()))
                if left > 0:
                    break
                del waiting[source_id]
                yield self._item(source_id, locator, first)
        for source_id, (_, locator, first) in waiting.items():
            yield self._item(source_id, locator, first)

    def list_batches(self) -> Iterator[pa.RecordBatch] | None:
        """A CSV/TSV table whose ids are all distinct, a chunk of rows at a time, without an Item
        per row (a million rows list in seconds); anything else lists item by item."""
        if self.root.is_dir() or self.root.suffix.lower() == ".parquet":
            return None
        columns = self._table_columns()
        if self._repeated_ids(columns):
            return None
        return self._table_batches(columns)

    def _table_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        folder = self._folder()
        extra = sorted(set(columns) - _TABLE_FIELDS)
        listed = 0
        for chunk in self._chunks():
            listed += len(chunk["path"])
            yield self._table_batch(folder, extra, chunk)
        if not listed:
            raise self._nothing_listed()

    def _table_batch(self, folder: str | None, extra: list[str], chunk: dict[str, list[Any]]) -> pa.RecordBatch:
        """A chunk of rows in the index's form, a column at a time: each row's item JSON is exactly
        its Item.to_json() (sorted keys, the same separators), joined from JSON-escaped columns."""
        import pyarrow.compute as pc

        blank = [""] * len(chunk["path"])

        def stripped(name: str) -> list[str]:
            return list(map(str.strip, chunk.get(name, blank)))

        def escaped(values: list[str]) -> pa.Array:
            return pa.array(list(map(_json_string, values)), pa.string())

        rel = chunk["path"]
        words = [c or t for c, t in zip(chunk.get("caption", blank), chunk.get("text", blank))]
        words = list(map(str.strip, words))
        ids = [given or path for given, path in zip(stripped("id"), rel)]
        splits = [name or None for name in stripped("split")]
        tags = [a or b for a, b in zip(chunk.get("tags", blank), chunk.get("tag", blank))]
        original: list[Any] = []
        for number, name in enumerate(extra):
            original += [", "] * bool(number) + [f"{_json_string(name)}: ", escaped(chunk[name])]
        pieces = [
            '{"author": ', escaped(stripped("author")), ', "clip": null, "license": ', escaped(stripped("license")),
            ', "listing_error": null, "locator": ', escaped(self._table_locators(folder, rel)),
            ', "original_data": {', *original, '}, "sample_fields": {}, "source_id": ', escaped(ids),
            ', "split": ', pa.array(["null" if name is None else _json_string(name) for name in splits], pa.string()),
            ', "tag": [', pa.array([", ".join(map(_json_string, _as_list(v, ";"))) if v else "" for v in tags],
                                    pa.string()),
            '], "text": [', escaped(words), '], "url": ', escaped(stripped("url")), "}",
        ]
        items = pc.binary_join_element_wise(*pieces, "")
        unusual = [number for number, text in enumerate(words) if not text or text[0] == "["]
        if unusual:  # a caption list, or no caption: those rows the general way
            jsons = items.to_pylist()
            for number in unusual:
                item = self._item(*self._table_row(folder, {k: v[number] for k, v in chunk.items()}))
                jsons[number] = item.to_json()
            items = pa.array(jsons, pa.string())
        return pa.RecordBatch.from_arrays([pa.array(ids, pa.string()), pa.array(splits, pa.string()), items],
                                          schema=INDEX_SCHEMA)

    def _table_locators(self, folder: str | None, rel: list[str]) -> list[str]:
        """The rows' files; a path already in normal form is joined to the folder without a call per row."""
        if folder is None:
            return [self._table_locator(folder, path) for path in rel]
        import pyarrow.compute as pc

        paths = pa.array(rel, pa.string())
        joined = pc.binary_join_element_wise(folder, paths, "/").to_pylist()
        odd = pc.match_substring_regex(paths, _UNPLAIN_PATH.pattern + "|://").to_numpy(zero_copy_only=False)
        for number in odd.nonzero()[0].tolist():
            joined[number] = self._table_locator(folder, rel[number])
        return joined

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        import pandas as pd

        try:
            yield
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, pa.ArrowException) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot read {self.root}: {first_line}") from None

    def _folder(self) -> str | None:
        """The local folder table paths are relative to (None: the table is on object storage)."""
        return self._locator(self.root.parent) if is_local(self.root) else None

    def _table_locator(self, folder: str | None, rel: str) -> str:
        """A table row's file: relative to the table's folder unless absolute or a URL."""
        if folder is not None and "://" not in rel:
            if not _UNPLAIN_PATH.search(rel):  # already normal: abspath would change nothing
                return f"{folder}/{rel}"
            return os.path.abspath(os.path.join(folder, rel))  # as _locator would, without a UPath per row
        path = location(rel) if "://" in rel or PurePosixPath(rel).is_absolute() else self.root.parent / rel
        return self._locator(path)

    @staticmethod
    def _locator(path: UPath) -> str:
        # A link's own absolute path (not its target): a broken one still names what was listed.
        return os.path.abspath(path.path) if is_local(path) else str(path)

    @classmethod
    def _checked_item(cls, source_id: str, path: str, meta: dict[str, Any]) -> tuple[Item, list[str] | None]:
        """The item, and [reason, detail] when its sidecar's split names no folder we may write: it
        fails alone (`bad_split`, in a hashed split). A table's split column is the table's own
        layout, refused whole by the planner."""
        item = cls._item(source_id, path, meta)
        if item.split is None or SPLIT_NAME.fullmatch(item.split):
            return item, None
        problem = ["bad_split", f"split {item.split[:100]!r} is not a plain name (letters, digits, _ and -)"]
        item.split = None
        return item, problem

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

    def fetch(self, item: Item) -> bytes | Path:
        path = location(item.locator)
        try:
            if is_local(path):  # read in place by the core: a long recording is never loaded whole
                local = Path(path.path)
                # Non-blocking, so a FIFO put there since the listing cannot hang the worker.
                descriptor = os.open(local, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    mode = os.fstat(descriptor).st_mode
                finally:
                    os.close(descriptor)
                if not stat.S_ISREG(mode):
                    raise ItemError("not_a_file",
                                    f"{_shown_name(local.name)} is {_file_kind(mode)}, not a regular file")
                return local
            return path.read_bytes()
        except FileNotFoundError:
            raise ItemError("missing_file", item.locator) from None
        except OSError as exc:
            raise ItemError("read_error", str(exc)) from None


SOURCE = LocalSource
