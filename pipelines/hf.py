"""`hf`: any Hugging Face dataset with an audio column and a caption column.

    audiodata build --source hf --input ID_OR_PATH --source-option audio=COL caption=COL split=train

`--input` is one of:
- a hub id (`owner/name`; options config=, revision=): the split's parquet files on the hub, or
  where the repository holds another layout, the hub's own parquet conversion of it
  (refs/convert/parquet);
- a local folder of parquet files (or one .parquet file, or an fsspec URL of one), split by the
  hub's file-naming conventions (`data/train-00000-of-00001.parquet`, `train/0000.parquet`);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (memory-mapped Arrow).

Nothing is downloaded whole, and no row passes through the driver with its audio: the listing reads
only the non-audio columns (parquet column projection, row group by row group), and each shard
worker reads the audio of its own rows, one parquet row group at a time (a range read on the hub).
That is why the source reads the data files itself rather than through an `IterableDataset`: a
stream cannot seek, and every worker would otherwise read the split from its start. The audio
column is taken undecoded, as `datasets.Audio(decode=False)` holds it (`{"bytes", "path"}`, or
plain bytes or a path), and decoded by our audio core; `datasets` never decodes it.

Options: audio= (default `audio`), caption= (default `caption`, else `text`; a string or a list of
strings), split= (default `train`), id= (a column of stable ids; default the row number within
the split), tags= (a list column or a `;`-separated string), config=, revision= (hub ids).
Other scalar columns are kept in `original_data`.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any, ClassVar, Iterator

from audio_dataset.source import Item, ItemError, Source, SourceConfig, SourceError, UserError
from audio_dataset.storage import is_local, location
from pipelines._common import check_options

OPTIONS = {"audio", "caption", "split", "id", "tags", "config", "revision"}
SAVED_MARKERS = ("dataset_dict.json", "state.json")
ROW_GROUPS_CACHED = 4  # per worker process: the row groups its in-flight fetches read from
BATCH_ROWS = 1024


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("--source hf needs the `datasets` package: pip install 'audiodata[hf]'") from None
    return datasets


class HuggingFaceSource(Source):
    name = "hf"
    fetch_concurrency: ClassVar[int] = 8

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        check_options(self.name, config.options, OPTIONS, http=False)
        options = config.options
        self.input = config.input or ""
        self.audio = options.get("audio", "audio")
        self.caption = options.get("caption")
        self.split = options.get("split", "train")
        self.id_column = options.get("id")
        self.tags = options.get("tags")
        self.hub_config = options.get("config")
        self.revision = options.get("revision")
        # Per process: audio values of recently read row groups, and each file's parquet footer.
        self._cache: OrderedDict[tuple[str, int], list[Any]] = OrderedDict()
        self._footers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_cache"], state["_footers"] = OrderedDict(), {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- what the input is ----------------------------------------------------------------------

    def _kind(self) -> str:
        """"saved" (save_to_disk), "parquet" (files here or at a URL) or "hub" (an id)."""
        if "://" in self.input:
            return "parquet"
        if os.path.exists(self.input):
            path = location(self.input)
            return "saved" if path.is_dir() and any((path / m).exists() for m in SAVED_MARKERS) else "parquet"
        return "hub"

    def check(self) -> None:
        if not self.input:
            raise UserError("--source hf needs --input: a hub id, a parquet folder or a save_to_disk folder")
        _datasets()
        kind = self._kind()
        path_like = self.input.startswith((".", "/", "~")) or self.input.count("/") > 1 or \
            self.input.endswith(".parquet")
        if kind == "hub" and path_like:
            raise UserError(f"hf input not found: {self.input}")
        if kind == "hub" and os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise UserError(f"hub dataset {self.input} asked for with HF_DATASETS_OFFLINE=1")

    def _saved(self) -> Any:
        """The split of a save_to_disk folder, memory-mapped (nothing is read until a row is)."""
        loaded = _datasets().load_from_disk(self.input)
        if hasattr(loaded, "keys"):  # a DatasetDict
            if self.split not in loaded:
                raise UserError(f"{self.input} has splits {', '.join(loaded)}; not {self.split!r} (option split=)")
            loaded = loaded[self.split]
        return loaded

    def _data_files(self) -> list[str]:
        """The split's parquet files, in a stable order."""
        datasets = _datasets()
        if self.input.endswith(".parquet"):
            return [self.input]
        try:
            builder = datasets.load_dataset_builder(self.input, name=self.hub_config, revision=self.revision)
        except (FileNotFoundError, ValueError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot read {self.input} as a dataset: {first_line}") from None
        except Exception as exc:  # noqa: BLE001 - hub and network errors have many types
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise SourceError(f"cannot resolve {self.input}: {type(exc).__name__}: {first_line}") from None
        files = (builder.config.data_files or {}).get(self.split)
        if builder.name == "parquet" and files:
            return sorted(str(f) for f in files)
        if self._kind() != "hub":
            found = ", ".join(builder.config.data_files or {}) or "none"
            raise UserError(f"{self.input}: no parquet files for split {self.split!r} (splits found: {found})")
        return self._converted_files()

    def _converted_files(self) -> list[str]:
        """The hub's parquet conversion of a repository stored in another layout."""
        from huggingface_hub import HfFileSystem

        folder = f"datasets/{self.input}@refs%2Fconvert%2Fparquet/{self.hub_config or 'default'}/{self.split}"
        files = sorted(HfFileSystem().glob(f"{folder}/*.parquet"))
        if not files:
            raise SourceError(f"{self.input} has no parquet files for split {self.split!r} (nor a parquet conversion)")
        return [f"hf://{name}" for name in files]

    # -- listing --------------------------------------------------------------------------------

    def list_items(self) -> Iterator[Item]:
        self.check()
        if self._kind() == "saved":
            rows = self._saved_rows()
        else:
            rows = self._parquet_rows()
        for number, (locator, record) in enumerate(rows):
            yield self._item(number, locator, record)

    def _columns(self, names: list[str]) -> list[str]:
        if self.audio not in names:
            raise UserError(f"{self.input} has no audio column {self.audio!r} (columns: {', '.join(names)}); "
                            "pass --source-option audio=COL")
        self.caption = self.caption or ("caption" if "caption" in names else "text")
        for option, column in (("caption", self.caption), ("id", self.id_column), ("tags", self.tags)):
            if column and column not in names:
                raise UserError(f"{self.input} has no {option} column {column!r} (columns: {', '.join(names)})")
        return [n for n in names if n != self.audio]

    def _saved_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        dataset = self._saved()
        table = dataset.data.table.select(self._columns(dataset.column_names))
        number = 0
        for batch in table.to_batches(BATCH_ROWS):
            for record in batch.to_pylist():
                yield f"#{number}", record
                number += 1

    def _parquet_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for path in self._data_files():
            with _parquet(path) as handle:
                columns = self._columns(handle.schema_arrow.names)
                number = 0
                for group in range(handle.metadata.num_row_groups):
                    for record in handle.read_row_group(group, columns=columns).to_pylist():
                        yield f"{path}#{number}", record
                        number += 1

    def _item(self, number: int, locator: str, record: dict[str, Any]) -> Item:
        text = _strings(record.pop(self.caption, None))
        tags = _strings(record.pop(self.tags, None), ";") if self.tags else []
        source_id = str(record.pop(self.id_column)) if self.id_column else f"{self.split}/{number}"
        original = {k: v for k, v in record.items() if _plain(v)}
        original["hf_split"] = self.split
        return Item(source_id=source_id, locator=locator, text=text, tag=tags, original_data=original,
                    license=str(record.get("license") or ""), author=str(record.get("author") or ""),
                    url=str(record.get("url") or ""))

    # -- fetching -------------------------------------------------------------------------------

    def fetch(self, item: Item) -> bytes:
        if not item.text:
            raise ItemError("no_caption", f"empty {self.caption!r} column")
        path, _, row = item.locator.rpartition("#")
        value = self._saved_audio(int(row)) if not path else self._parquet_audio(path, int(row))
        return self._audio_bytes(value)

    def _saved_audio(self, row: int) -> Any:
        with self._lock:
            key = ("", -1)
            if key not in self._cache:  # the memory-mapped table, opened once per process
                self._cache[key] = self._saved().data.table.column(self.audio)
            column = self._cache[key]
        return column[row].as_py()

    def _parquet_audio(self, path: str, row: int) -> Any:
        with self._lock:
            footer = self._footers.get(path)
        if footer is None:
            with _parquet(path) as handle:
                footer = handle.metadata
            with self._lock:
                self._footers[path] = footer
        group, first = _row_group_of(footer, row)
        with self._lock:
            values = self._cache.get((path, group))
            if values is not None:
                self._cache.move_to_end((path, group))
        if values is None:  # read outside the lock: other threads may read other groups meanwhile
            with _parquet(path, footer) as handle:  # a handle per read: file objects are not thread-safe
                values = handle.read_row_group(group, columns=[self.audio]).column(0).to_pylist()
            with self._lock:
                self._cache[(path, group)] = values
                while len(self._cache) > ROW_GROUPS_CACHED:
                    self._cache.popitem(last=False)
        return values[row - first]

    def _audio_bytes(self, value: Any) -> bytes:
        if isinstance(value, dict):  # datasets.Audio(decode=False): {"bytes", "path"}
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return bytes(value)
        if isinstance(value, str) and value:
            path = location(value) if "://" in value or PurePosixPath(value).is_absolute() \
                else location(self.input) / value
            if is_local(path) and not os.path.exists(path.path):
                raise ItemError("missing_file", f"audio path {value} (the dataset stores no bytes for it)")
            return path.read_bytes()
        raise ItemError("no_audio", f"empty {self.audio!r} value")


@contextmanager
def _parquet(path: str, footer: Any = None) -> Iterator[Any]:
    """A parquet file open for reading (remote ones through fsspec: range reads, no download)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = location(path)
    try:
        with (open(target.path, "rb") if is_local(target) else target.fs.open(target.path, "rb")) as raw:
            yield pq.ParquetFile(raw, metadata=footer)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read parquet {path}: {exc}") from None


def _row_group_of(footer: Any, row: int) -> tuple[int, int]:
    """The row group holding a file's row, and that group's first row."""
    first = 0
    for group in range(footer.num_row_groups):
        rows = footer.row_group(group).num_rows
        if row < first + rows:
            return group, first
        first += rows
    raise ItemError("missing_row", f"row {row} is beyond the file's {first} rows")


def _strings(value: Any, sep: str | None = None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    parts = str(value).split(sep) if sep else [str(value)]
    return [p.strip() for p in parts if p.strip()]


def _plain(value: Any) -> bool:
    """Kept in original_data: JSON values only (no bytes, no nested audio or images)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


SOURCE = HuggingFaceSource
