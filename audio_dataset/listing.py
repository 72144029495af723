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

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

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
            with open(self.path, "r+b") as handle:
                handle.truncate(good_bytes)

    def _reset(self) -> None:
        assert self.path is not None
        self.path.unlink(missing_ok=True)
        self.pages_done, self.cursor, self.done = 0, None, False

    def _write_line(self, data: dict[str, Any]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            header = json.dumps({"fingerprint": self.fingerprint}, sort_keys=True) + "\n"
            with open(self.path, "ab") as handle:
                handle.write(header.encode("utf-8"))
        line = json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n"
        with open(self.path, "ab") as handle:
            handle.write(line.encode("utf-8"))
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
