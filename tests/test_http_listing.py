"""Resumable paged listings: an interrupted scrape resumes at the page it stopped on."""
from __future__ import annotations

import json

import pytest

from audio_dataset.listing import PagedListing

PAGES = {n: ([{"id": n * 10 + i} for i in range(3)], n + 1 if n < 5 else None) for n in range(1, 6)}


class Flaky:
    """A page fetcher that fails once on one page, as a network or a crash would."""

    def __init__(self, fail_on: int | None) -> None:
        self.fail_on = fail_on
        self.calls: list[int] = []

    def __call__(self, page: int):
        self.calls.append(page)
        if page == self.fail_on:
            self.fail_on = None
            raise ConnectionError(f"page {page} failed")
        return PAGES[page]


def _all_ids() -> list[int]:
    return [r["id"] for n in sorted(PAGES) for r in PAGES[n][0]]


def test_interrupted_listing_resumes_at_the_failed_page(tmp_path):
    fetch = Flaky(fail_on=4)
    with pytest.raises(ConnectionError):
        list(PagedListing(tmp_path, "demo", {"query": "dog"}).run(1, fetch))
    assert fetch.calls == [1, 2, 3, 4]

    resumed = PagedListing(tmp_path, "demo", {"query": "dog"})  # a new process, same state dir
    assert resumed.pages_done == 3 and resumed.cursor == 4 and not resumed.done
    assert [r["id"] for r in resumed.run(1, fetch)] == _all_ids()
    assert fetch.calls == [1, 2, 3, 4, 4, 5]  # pages 1-3 were not fetched again

    again = PagedListing(tmp_path, "demo", {"query": "dog"})
    assert again.done
    assert [r["id"] for r in again.run(1, Flaky(None))] == _all_ids()


def test_torn_last_line_is_refetched(tmp_path):
    fetch = Flaky(fail_on=None)
    listing = PagedListing(tmp_path, "demo")
    listing.append(*PAGES[1])
    listing.append(*PAGES[2])
    with open(listing.path, "ab") as handle:  # a crash in the middle of writing page 3
        handle.write(json.dumps({"page": 2, "records": PAGES[3][0], "next": 4})[:25].encode())
    resumed = PagedListing(tmp_path, "demo")
    assert resumed.pages_done == 2 and resumed.cursor == 3
    assert [r["id"] for r in resumed.run(1, fetch)] == _all_ids()
    assert fetch.calls == [3, 4, 5]


def test_a_different_query_starts_over(tmp_path):
    PagedListing(tmp_path, "demo", {"query": "dog"}).append(*PAGES[1])
    other = PagedListing(tmp_path, "demo", {"query": "cat"})
    assert other.pages_done == 0 and list(other.records()) == []


def test_without_state_dir_it_lists_in_memory():
    fetch = Flaky(fail_on=None)
    assert [r["id"] for r in PagedListing(None, "demo").run(1, fetch)] == _all_ids()
    assert fetch.calls == [1, 2, 3, 4, 5]


def test_append_after_completion_is_an_error(tmp_path):
    listing = PagedListing(tmp_path, "demo")
    listing.append([{"id": 1}], None)
    with pytest.raises(RuntimeError):
        listing.append([{"id": 2}], None)


def test_pages_are_fetched_only_as_records_are_consumed(tmp_path):
    fetch = Flaky(fail_on=None)
    records = PagedListing(tmp_path, "demo").run(1, fetch)
    assert [next(records)["id"] for _ in range(4)] == [10, 11, 12, 20]
    assert fetch.calls == [1, 2]  # a --limit of 4 costs two pages, not the whole listing
    records.close()
    resumed = PagedListing(tmp_path, "demo")
    assert resumed.pages_done == 2
    assert [r["id"] for r in resumed.run(1, fetch)] == _all_ids()
    assert fetch.calls == [1, 2, 3, 4, 5]
