"""Flat driver memory: the streamed listing, split assignment, shard plan and finalize give what
the in-memory versions gave, and an interrupted listing resumes where it stopped. No Ray here."""
from __future__ import annotations

import csv
import hashlib
from typing import Iterator

import pyarrow.parquet as pq
import pytest

from audio_dataset import build, listing, manifest
from audio_dataset.build import (
    DEFAULT_SPLIT_RATIOS, PLAN_DIR, WORK_DIR, ShardTask, assign_split, finalize, hashed_splits,
    list_with_cache, plan_shards,
)
from audio_dataset.manifest import ManifestRow
from audio_dataset.shards import ShardWriter, read_sizes
from audio_dataset.source import Item, Source, SourceConfig
from audio_dataset.stats import compute_stats
from audio_dataset.storage import location
from pipelines.local import LocalSource


def _old_assign_split(source: str, source_id: str, ratios: dict[str, float]) -> str:
    """The per-item assignment every existing output was built with (the reference)."""
    digest = hashlib.sha1(f"{source}:{source_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    total = sum(ratios.values())
    edge = 0.0
    for split, ratio in ratios.items():
        edge += ratio / total
        if point < edge:
            return split
    return list(ratios)[-1]


@pytest.mark.parametrize("ratios", [DEFAULT_SPLIT_RATIOS, {"train": 0.7, "test": 0.2, "valid": 0.1},
                                    {"a": 1, "b": 3, "c": 0.02}])
def test_vectorised_split_equals_the_per_item_one(ratios):
    ids = [f"clip_{n:05d}.wav" for n in range(3000)] + ["ünïcode/ß.flac", "", "a b,c"]
    names = list(ratios)
    got = [names[code] for code in hashed_splits("freesound", ids, ratios).tolist()]
    assert got == [_old_assign_split("freesound", i, ratios) for i in ids]
    assert len(set(got)) == len(ratios)  # every hash range is reached


class _Listing(Source):
    """A source listing numbered items, with one id twice (pages shifting); dies after `die_after`."""

    name = "fake"

    def __init__(self, count: int, die_after: int | None = None) -> None:
        super().__init__(SourceConfig())
        self.count, self.die_after, self.listed = count, die_after, 0

    def list_items(self) -> Iterator[Item]:
        for number in range(self.count):
            if self.die_after is not None and self.listed >= self.die_after:
                raise ConnectionError("the listing died")
            self.listed += 1
            yield Item(f"id{number:06d}", f"loc{number}", [f"caption {number}"],
                       split="test" if number % 97 == 0 else None)
            if number == 5:
                yield Item("id000002", "again", ["listed a second time"])

    def fetch(self, item: Item) -> bytes:
        raise NotImplementedError


def _index_items(index) -> list[str]:
    return [raw for batch in manifest.iter_batches(index) for raw in batch.column("item").to_pylist()]


def test_an_interrupted_listing_resumes_with_what_it_committed(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "CHUNK_ITEMS", 100)
    clean = _index_items(list_with_cache(_Listing(1050), location(tmp_path / "clean"), None))
    assert len(clean) == 1050  # the id listed twice kept once, in its first place
    assert Item.from_json(clean[2]).locator == "loc2"

    work = location(tmp_path / "cut")
    with pytest.raises(ConnectionError):
        list_with_cache(_Listing(1050, die_after=730), work, None, fingerprint={"input": "x"})
    committed = sorted((work / "listing").glob("*.parquet"))
    assert len(committed) == 7  # 700 items kept of the 730 listed when it died
    resumed = _Listing(1050)
    assert _index_items(list_with_cache(resumed, work, None, fingerprint={"input": "x"})) == clean
    assert not (work / "listing").exists()

    # Chunks left by a listing of something else are not resumed.
    other = location(tmp_path / "other")
    with pytest.raises(ConnectionError):
        list_with_cache(_Listing(1050, die_after=300), other, None, fingerprint={"input": "x"})
    assert len(_index_items(list_with_cache(_Listing(40), other, None, fingerprint={"input": "y"}))) == 40


def test_a_limit_counts_distinct_items_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "CHUNK_ITEMS", 4)
    items = [Item.from_json(raw) for raw in _index_items(list_with_cache(_Listing(100), location(tmp_path), 9))]
    assert [i.source_id for i in items] == [f"id{n:06d}" for n in range(9)]


def test_the_plan_puts_the_same_items_in_the_same_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "CHUNK_ITEMS", 300)
    monkeypatch.setattr(manifest, "BATCH_ROWS", 128)  # many index batches
    monkeypatch.setattr(build, "PLAN_GROUP_ROWS", 50)  # shards of 37 that straddle row groups
    work = location(tmp_path)
    index = list_with_cache(_Listing(2000), work, None)
    items = [Item.from_json(raw) for raw in _index_items(index)]
    excluded = {"id000010", "id000011", "id001950"}

    plan = plan_shards("fake", index, work / PLAN_DIR, DEFAULT_SPLIT_RATIOS, 37, excluded, limit=1900)
    # The reference: per-item splits, each split's items in listing order, cut every 37.
    kept = [i for i in items[:1900] if i.source_id not in excluded]
    by_split: dict[str, list[str]] = {}
    for item in kept:
        by_split.setdefault(item.split or _old_assign_split("fake", item.source_id, DEFAULT_SPLIT_RATIOS),
                            []).append(item.source_id)
    expected = [(split, n // 37, ids[n:n + 37]) for split in ("train", "valid", "test")
                for ids in [by_split[split]] for n in range(0, len(ids), 37)]
    # Each task carries only where its items are, and finds them there (as a Ray task would).
    got = [(t.split, t.index, [i.source_id for i in ShardTask.from_json(t.to_json()).load_items()])
           for t in plan.tasks]
    assert all(t.items is None and t.rows is not None for t in plan.tasks)
    assert pq.ParquetFile(plan.tasks[0].rows.path).num_row_groups > 10
    assert got == expected
    assert sorted(r.source_id for r in plan.excluded) == ["id000010", "id000011"]  # 1950 is past the limit
    assert all(r.split == assign_split("fake", items[int(r.source_id[2:])], DEFAULT_SPLIT_RATIOS)
               for r in plan.excluded)


def test_finalize_streams_the_same_figures(tmp_path):
    out = location(tmp_path)
    tasks, rows = [], []
    for number in range(5):
        task = ShardTask("valid" if number == 3 else "train", number, [])
        part = [ManifestRow(source="s", source_id=f"{number}-{k}", split=task.split, shard=task.name,
                            status="ok" if k % 3 else "failed", error=None if k % 3 else "missing_file",
                            n_samples=k % 3, source_duration=1.5 * k, output_duration=(k % 3) * 1.0)
                for k in range(7)]
        manifest.write_table(manifest.rows_to_table(part), out / WORK_DIR / "parts" / task.part_name)
        with ShardWriter(out / task.name) as writer:  # the shard finalize lists (and checksums)
            writer.write({"__key__": f"k{number}", "json": "{}"})
        tasks.append(task)
        rows += part
    manifest.write_table(manifest.SCHEMA.empty_table(), out / WORK_DIR / "parts" / "excluded.parquet")
    stats = finalize(out, tasks)
    whole = manifest.rows_to_table(rows)
    assert manifest.read_table(out / manifest.MANIFEST_FILE).equals(whole.cast(manifest.SCHEMA))
    assert stats == compute_stats(whole)
    assert stats["items"] == 35 and stats["samples"] == sum(r.n_samples for r in rows)
    assert stats["by_reason"] == {"missing_file": 15}
    assert stats["per_split"]["valid"]["items"] == 7
    assert stats["hours_in"] == round(sum(r.source_duration for r in rows) / 3600, 4)
    assert read_sizes(out / "train") == {"000000.tar": 6, "000001.tar": 6, "000002.tar": 6, "000004.tar": 6}


def test_a_table_lists_the_same_by_batches_as_item_by_item(tmp_path):
    table = tmp_path / "meta.csv"
    rows = [
        ["path", "caption", "tags", "id", "split", "license", "author", "url", "mood", "text"],
        ["a.wav", "  a dog barks  ", "dog; bark", "", "", "CC0", " Ann ", "http://x/a", "calm", "ignored"],
        ["sub/b.wav", 'quotes " and \\ backslash\nnewline', "", "B", "valid", "", "", "", "", ""],
        ["../up/c.wav", "ünïcode ß", '["x", " y "]', "", "", "", "", "", "odd\ttab", ""],
        ["./d.wav", "", "", "", "", "", "", "", "", "the text column"],
        ["/abs/e.wav", '["one", "two"]', "", "E", "", "", "", "", "", ""],
        ["f.wav", "   ", "", "", "", "", "", "", "", ""],
        ["s3://bucket/g.wav", "remote", "", "", "test", "", "", "", "", ""],
        ["dir//h.wav", "double slash", "", "", "", "", "", "", "", ""],
    ]
    with open(table, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    source = LocalSource(SourceConfig(input=str(table)))
    batches = source.list_batches()
    assert batches is not None
    by_batches = [raw for batch in batches for raw in batch.column("item").to_pylist()]
    assert by_batches == [item.to_json() for item in source.list_items()]


def test_a_table_with_repeated_ids_lists_item_by_item(tmp_path):
    table = tmp_path / "meta.csv"
    table.write_text("path,caption\na.wav,one\nb.wav,two\na.wav,three\n", encoding="utf-8")
    source = LocalSource(SourceConfig(input=str(table)))
    assert source.list_batches() is None
    assert [(i.source_id, i.text) for i in source.list_items()] == [("a.wav", ["one", "three"]),
                                                                    ("b.wav", ["two"])]


def test_an_index_from_before_plans_the_same(tmp_path):
    """Outputs of earlier versions kept (source_id, item) only: their plan is the same."""
    work = location(tmp_path / "new")
    index = list_with_cache(_Listing(300), work, None)
    table = manifest.read_parquet(index)
    old = location(tmp_path / "old")
    manifest.write_parquet(table.select(["source_id", "item"]), old / "index.parquet")

    def planned(folder, path):
        plan = plan_shards("fake", path, folder / PLAN_DIR, DEFAULT_SPLIT_RATIOS, 16, set())
        return [(t.split, t.index, [i.source_id for i in t.load_items()]) for t in plan.tasks]

    assert planned(old, old / "index.parquet") == planned(work, index)
    assert {t[0] for t in planned(work, index)} == {"train", "valid", "test"}
