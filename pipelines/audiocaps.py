"""AudioCaps: human captions of AudioSet segments; audio from YouTube as for AudioSet.

Verified format (github.com/cdjkim/audiocaps, dataset/{train,val,test}.csv, and loaders that read
it): columns `audiocap_id,youtube_id,start_time,caption`; one row per caption (the train split has
one caption per clip, val and test five). Segments are the 10 s AudioSet segments starting at
`start_time`. Captions of the same (youtube_id, start_time) are merged into one item with all of
them in `text`; the source id is the YouTube id, which is the AudioSet id, so AudioSet exclusion
lists apply as they are.

`--input`: omitted = the three CSVs from the AudioCaps repository; a folder holding
train.csv/val.csv/test.csv; or CSV paths/URLs separated by commas. The split comes from the file
name (train -> train, val -> valid, test -> test).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import Item, SourceConfig, SourceError, UserError
from pipelines._common import csv_rows, is_url, read_text
from pipelines._segments import YoutubeSegmentSource

CSV_BASE = "https://raw.githubusercontent.com/cdjkim/audiocaps/master/dataset/"
FILES = {"train": "train.csv", "valid": "val.csv", "test": "test.csv"}
SEGMENT_SECONDS = 10.0
LICENSE = "MIT (captions); audio: the YouTube uploader's terms"
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def split_of(location: str) -> str:
    stem = Path(location.split("?")[0]).stem.lower()
    for split, name in FILES.items():
        if stem.startswith(Path(name).stem):
            return split
    raise UserError(f"cannot tell the AudioCaps split of {location}: name it train.csv, val.csv or test.csv")


class AudioCaps(YoutubeSegmentSource):
    name = "audiocaps"

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.client = HttpClient(HttpConfig.for_source(config))
        self.locations = self._locations(config.input)

    @staticmethod
    def _locations(given: str | None) -> list[str]:
        if not given:
            return [CSV_BASE + name for name in FILES.values()]
        if not is_url(given) and Path(given).expanduser().is_dir():
            folder = Path(given).expanduser()
            found = [str(folder / name) for name in FILES.values() if (folder / name).is_file()]
            if not found:
                raise UserError(f"{folder} holds none of {', '.join(FILES.values())}")
            return found
        return [part.strip() for part in given.split(",") if part.strip()]

    def check(self) -> None:
        for location in self.locations:
            split_of(location)
            if not is_url(location) and not Path(location).expanduser().is_file():
                raise UserError(f"AudioCaps CSV not found: {location}")

    def list_items(self) -> Iterator[Item]:
        for location in self.locations:
            split = split_of(location)
            rows = csv_rows(read_text(location, self.client, "AudioCaps CSV"))
            if rows and not set(COLUMNS) <= set(rows[0]):
                raise SourceError(f"{location} lacks AudioCaps columns {', '.join(COLUMNS)}")
            yield from self._items(rows, split)

    def _items(self, rows: list[dict[str, str]], split: str) -> Iterator[Item]:
        # Group in first-seen order so the listing order is the file's order.
        groups: dict[tuple[str, float], list[dict[str, str]]] = {}
        for row in rows:
            try:
                start = float(row["start_time"])
            except ValueError:
                raise SourceError(f"AudioCaps row {row.get('audiocap_id')} has start_time "
                                  f"{row['start_time']!r}") from None
            groups.setdefault((row["youtube_id"], start), []).append(row)
        seen: set[str] = set()
        for (video_id, start), group in groups.items():
            # A video captioned at two different starts keeps both, the second under a longer id.
            source_id = video_id if video_id not in seen else f"{video_id}_{start:g}"
            seen.add(video_id)
            yield self.segment_item(
                video_id, start, start + SEGMENT_SECONDS, source_id=source_id,
                text=[row["caption"] for row in group if row["caption"]], license=LICENSE, split=split,
                original_data={"audiocap_ids": [row["audiocap_id"] for row in group], "split_file": split})


SOURCE = AudioCaps
