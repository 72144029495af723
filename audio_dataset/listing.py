"""Resumable paged listings: a scrape interrupted on page 300 resumes at page 300.

A source walks its listing through a `PagedListing`: after each page it calls `append(records,
next_cursor)`, which appends one JSON line (the page's raw records and the cursor of the page after
it) to `<state_dir>/<name>.pages.jsonl` and fsyncs it. A page is committed when its line is
complete; a crash mid-write leaves a partial last line that the next run drops, so that page is
fetched again. The first line holds a fingerprint of what was asked (query, page size, API root):
asking for something else starts a new listing instead of mixing two.

Records are kept raw (the API's own dicts) so a source can change how it maps them to `Item`s
without scraping again. Appending a line per page keeps a 3,000-page scrape linear, where
rewriting one state file per page would be quadratic.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
from upath import UPath

from audio_dataset import manifest
from audio_dataset.source import Item
from audio_dataset.storage import atomic_write_json, open_own, read_json

_FORMAT = 1

PageFetcher = Callable[[Any], tuple[list[dict[str, Any]], Any]]


class PagedListing:
    def __init__(self, state_dir: Path | str | None, name: str, fingerprint: dict[str, Any] | None = None) -> None:
        self.name = name
        # Normalised through JSON so it compares equal to the copy read back from disk.
        self.fingerprint = json.loads(json.dumps({"format": _FORMAT, **(fingerprint or {})}, sort_keys=True))
        self.path = Path(state_dir) / f"{name}.pages.jsonl" if state_dir is not None else None
        self._pages: list[tuple[list[dict[str, Any]], Any]] = []  # only when there is no state_dir
        self.pages_done = 0
        self.cursor: Any = None
        self.done = False
        if self.path is not None:
            self._load()

    # -- state ----------------------------------------------------------------------------------

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        good_bytes = 0
        with open(self.path, "rb") as handle:
            header = _parse(handle.readline())
            if header is None or header.get("fingerprint") != self.fingerprint:
                self._reset()
                return
            good_bytes = handle.tell()
            for line in handle:
                page = _parse(line)
                if page is None or not line.endswith(b"\n"):
                    break  # a torn final write: that page was never committed
                self.pages_done += 1
                self.cursor = page["next"]
                self.done = page["next"] is None
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            fd = open_own(self.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, good_bytes)
            finally:
                os.close(fd)

    def _reset(self) -> None:
        assert self.path is not None
        self.path.unlink(missing_ok=True)
        self.pages_done, self.cursor, self.done = 0, None, False

    def _write_line(self, data: dict[str, Any]) -> None:
        assert self.path is not None
        fd = open_own(self.path)  # appended in place: never through a planted link
        with os.fdopen(fd, "ab") as handle:
            if handle.tell() == 0:
                handle.write((json.dumps({"fingerprint": self.fingerprint}, sort_keys=True) + "\n").encode("utf-8"))
            handle.write((json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    # -- API ------------------------------------------------------------------------------------

    def append(self, records: list[dict[str, Any]], next_cursor: Any) -> None:
        """Commit one page: its raw records and the cursor of the next page (None: this was the last)."""
        if self.done:
            raise RuntimeError(f"listing {self.name!r} is already complete")
        if self.path is not None:
            self._write_line({"page": self.pages_done, "records": records, "next": next_cursor})
        else:
            self._pages.append((records, next_cursor))
        self.pages_done += 1
        self.cursor = next_cursor
        self.done = next_cursor is None

    def records(self) -> Iterator[dict[str, Any]]:
        """Every committed record, in page order."""
        if self.path is None:
            for records, _ in self._pages:
                yield from records
            return
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.readline()
            for _ in range(self.pages_done):
                yield from json.loads(handle.readline())["records"]

    def run(self, first_cursor: Any, fetch_page: PageFetcher) -> Iterator[dict[str, Any]]:
        """Every record: the committed pages first, then the missing pages as they are fetched.

        `fetch_page(cursor) -> (records, next_cursor)`. Pages are fetched only as the caller
        consumes records, so a listing cut short (`--limit`) fetches no more than it needs. An
        exception from `fetch_page` leaves the committed pages in place: the next run starts at
        the page that failed.
        """
        cursor = first_cursor if self.pages_done == 0 else self.cursor
        yield from self.records()
        while not self.done:
            records, next_cursor = fetch_page(cursor)
            self.append(records, next_cursor)
            yield from records
            cursor = next_cursor


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- the item index
#
# A build lists its source once into `_work/index.parquet` (columns below, in listing order). The
# listing streams there in chunks: every CHUNK_ITEMS new items are committed as one numbered parquet
# file under `_work/listing/`, so a listing interrupted at 3M items resumes with those 3M kept; when
# the source is exhausted the chunks are joined into the index. The driver holds one chunk of items
# and a 16-byte digest per id (to drop an id listed twice), never an object per item.

INDEX_SCHEMA = pa.schema([
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("split", pa.string()),  # a split the source imposes, else null (hash-assigned)
    pa.field("item", pa.string(), nullable=False),  # Item.to_json()
])
CHUNK_ITEMS = 50_000
_FINGERPRINT_FILE = "fingerprint.json"


def id_digests(ids: Iterable[str]) -> np.ndarray:
    """A 16-byte digest per id: ids compared without keeping them (odds of a collision among 10M
    ids: about 1e-25)."""
    return np.array([hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids], dtype="S16")


class SeenIds:
    """A set of id digests as sorted numpy runs, merged like a binary counter (16 bytes per id)."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def contains(self, digests: np.ndarray) -> np.ndarray:
        found = np.zeros(len(digests), dtype=bool)
        for run in self._runs:
            where = np.minimum(np.searchsorted(run, digests), len(run) - 1)
            found |= run[where] == digests
        return found

    def add(self, digests: np.ndarray) -> None:
        """Add digests none of which is in the set yet (distinct among themselves too)."""
        if not len(digests):
            return
        self._runs.append(np.sort(digests))
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            merged = np.concatenate(self._runs[-2:])
            del self._runs[-2:]
            merged.sort()  # in place: the merge holds two copies at most, never three
            self._runs.append(merged)


def index_table(items: list[Item]) -> pa.Table:
    return pa.table({"source_id": [i.source_id for i in items], "split": [i.split for i in items],
                     "item": [i.to_json() for i in items]}, schema=INDEX_SCHEMA)


class IndexWriter:
    """Streams a listing into the index: chunks committed as they fill, joined at the end.

    `fingerprint` names what is listed: chunks left by a listing of something else are dropped.
    """

    def __init__(self, index: UPath, fingerprint: dict[str, Any], limit: int | None) -> None:
        self.index, self.limit = index, limit
        self.chunks = index.parent / "listing"
        self.seen = SeenIds()
        self.committed = 0
        self._pending: list[Item] = []
        marker = self.chunks / _FINGERPRINT_FILE
        wanted = json.loads(json.dumps(fingerprint, sort_keys=True))
        if marker.exists() and read_json(marker) != wanted:
            self._drop_chunks()
        if not marker.exists():
            atomic_write_json(marker, wanted)
        for path in self._chunk_paths():  # a listing cut short: keep what it committed
            for batch in manifest.iter_batches(path, ["source_id"]):
                self.seen.add(id_digests(batch.column("source_id").to_pylist()))
                self.committed += batch.num_rows

    @property
    def full(self) -> bool:
        return self.limit is not None and self.committed >= self.limit

    def add(self, item: Item) -> bool:
        """Take one listed item; False once the limit is reached."""
        self._pending.append(item)
        room = CHUNK_ITEMS if self.limit is None else min(CHUNK_ITEMS, self.limit - self.committed)
        if len(self._pending) >= room:
            self._flush()
        return not self.full

    def _flush(self) -> None:
        if self._pending:
            self.add_batch(index_table(self._pending))
            self._pending = []

    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> bool:
        """Commit a batch of index rows as one chunk, less the ids already taken (an id listed twice
        keeps its first place) and past the limit; False once the limit is reached."""
        digests = id_digests(batch.column("source_id").to_pylist())
        keep = ~self.seen.contains(digests)
        first = np.zeros(len(digests), dtype=bool)
        first[np.unique(digests, return_index=True)[1]] = True
        keep &= first
        if self.limit is not None:
            keep &= np.cumsum(keep) <= self.limit - self.committed
        if keep.any():
            rows = batch.filter(pa.array(keep))
            manifest.write_batches([rows], INDEX_SCHEMA, self.chunks / f"{len(self._chunk_paths()):06d}.parquet")
            self.seen.add(digests[keep])
            self.committed += rows.num_rows
        return not self.full

    def finish(self) -> int:
        """Commit the last chunk and join every chunk into the index; returns the items listed."""
        self._flush()
        chunks = (batch for path in self._chunk_paths() for batch in manifest.iter_batches(path))
        manifest.write_batches(chunks, INDEX_SCHEMA, self.index)
        self._drop_chunks()
        return self.committed

    def _chunk_paths(self) -> list[UPath]:
        if not self.chunks.exists():
            return []
        return sorted(p for p in self.chunks.iterdir() if p.name.endswith(".parquet"))

    def _drop_chunks(self) -> None:
        if self.chunks.exists():
            self.chunks.fs.rm(self.chunks.path, recursive=True)
