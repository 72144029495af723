"""UrbanSound8K: 8,732 labelled urban sound excerpts (up to 4 s) from Freesound, 10 classes, 10 folds.

Verified layout (urbansounddataset.weebly.com/urbansound8k.html; the authors' Zenodo record 1203745,
UrbanSound8K.tar.gz):
- `UrbanSound8K/audio/fold{1..10}/*.wav`, named `{fsID}-{classID}-{occurrenceID}-{sliceID}.wav`;
- `UrbanSound8K/metadata/UrbanSound8K.csv`: `slice_file_name,fsID,start,end,salience,fold,classID,class`
  (`class` e.g. `air_conditioner`, `classID` 0-9, `salience` 1 foreground / 2 background).
An evaluation set with folds (the authors ask for 10-fold cross-validation on them, never a
reshuffle): every clip goes to `test`, its fold and class id kept in the sample (pipelines/_benchmark.py).

`--input`: the tar.gz (path or URL; default the Zenodo record) or the folder it unpacks to.
"""
from __future__ import annotations

from typing import Iterator

from audio_dataset.source import Item, SourceError
from pipelines._benchmark import ALL, DistributionSource, benchmark_fields, int_field, label_text, member_path
from pipelines._common import csv_rows

ARCHIVE_URL = "https://zenodo.org/records/1203745/files/UrbanSound8K.tar.gz"
META = "metadata/UrbanSound8K.csv"
COLUMNS = ("slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class")
LICENSE = "CC BY-NC 3.0"


class UrbanSound8K(DistributionSource):
    name = "us8k"
    default_location = ARCHIVE_URL
    title = "UrbanSound8K archive (UrbanSound8K.tar.gz)"

    def list_items(self) -> Iterator[Item]:
        top = self.distribution.top(META)
        rows = csv_rows(self.distribution.read_text(top + META))
        if rows and not set(COLUMNS) <= set(rows[0]):
            raise SourceError(f"{META} lacks UrbanSound8K columns {', '.join(COLUMNS)}")
        for row in rows:
            yield self._item(top, row)

    @staticmethod
    def _item(top: str, row: dict[str, str]) -> Item:
        label, name, freesound_id = row["class"], row["slice_file_name"], row["fsID"]
        item = Item(source_id=name, locator=member_path(top, "audio", f"fold{row['fold']}", name),
                    text=label_text([label]), tag=[label], license=LICENSE,
                    url=f"https://freesound.org/s/{freesound_id}/" if freesound_id.isdigit() else "",
                    original_data={key: row[key] for key in ("fsID", "start", "end", "salience")},
                    split="test")
        try:
            item.sample_fields = benchmark_fields([label], ALL, int_field(row, "fold"), [int_field(row, "classID")])
        except ValueError as exc:
            item.listing_error = ["bad_metadata", f"{name}: {exc}"]
        return item


SOURCE = UrbanSound8K
