"""ESC-50: 2,000 five-second environmental recordings from Freesound, 50 classes, five folds.

Verified layout (github.com/karolpiczak/ESC-50, the archive GitHub serves as ESC-50-master.zip):
- `ESC-50-master/audio/*.wav`: 5 s, 44.1 kHz mono, named `{fold}-{src_file}-{take}-{target}.wav`;
- `ESC-50-master/meta/esc50.csv`: `filename,fold,target,category,esc10,src_file,take`
  (`target` 0-49, `category` e.g. `dog`, `chirping_birds`, `esc10` True/False, `src_file` the
  Freesound id).
ESC-50 is an evaluation set with folds, not splits: every clip goes to `test`, its fold kept in the
sample (`fold`, `class_labels`, `class_ids` = [target], `benchmark_split` "all": pipelines/_benchmark.py).

`--input`: the zip (path or URL; default GitHub's master archive) or the folder it unpacks to.
"""
from __future__ import annotations

from typing import Iterator

from audio_dataset.source import Item, SourceError
from pipelines._benchmark import ALL, DistributionSource, benchmark_fields, int_field, label_text, member_path
from pipelines._common import csv_rows

ARCHIVE_URL = "https://github.com/karolpiczak/ESC-50/archive/refs/heads/master.zip"
META = "meta/esc50.csv"
COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
LICENSE = "CC BY-NC 3.0"


class ESC50(DistributionSource):
    name = "esc50"
    default_location = ARCHIVE_URL
    title = "ESC-50 archive (ESC-50-master.zip)"

    def list_items(self) -> Iterator[Item]:
        top = self.distribution.top(META)
        rows = csv_rows(self.distribution.read_text(top + META))
        if rows and not set(COLUMNS) <= set(rows[0]):
            raise SourceError(f"{META} lacks ESC-50 columns {', '.join(COLUMNS)}")
        for row in rows:
            yield self._item(top, row)

    @staticmethod
    def _item(top: str, row: dict[str, str]) -> Item:
        category, source_file = row["category"], row["src_file"]
        item = Item(source_id=row["filename"], locator=member_path(top, "audio", row["filename"]),
                    text=label_text([category]), tag=[category], license=LICENSE,
                    url=f"https://freesound.org/s/{source_file}/" if source_file.isdigit() else "",
                    original_data={"esc10": row["esc10"].lower() == "true", "src_file": source_file,
                                   "take": row["take"]},
                    split="test")
        try:
            item.sample_fields = benchmark_fields([category], ALL, int_field(row, "fold"),
                                                  [int_field(row, "target")])
        except ValueError as exc:
            item.listing_error = ["bad_metadata", f"{row['filename']}: {exc}"]
        return item


SOURCE = ESC50
