"""VGGSound: ~200k ten-second YouTube clips in 309 classes, audio through yt-dlp as for AudioSet.

Verified format (www.robots.ox.ac.uk/~vgg/data/vggsound/, vggsound.csv): no header, one row per clip,
`youtube_id,start_seconds,label,split` (`---g-f_I2yQ,1,people marching,test`; labels holding commas
are quoted, `"vehicle horn, car horn, honking"`; split `train` or `test`). The clip is
[start_seconds, start_seconds + 10]. A clip listed twice with two labels is one item with both.
train -> train, test -> test; sample fields class_labels, fold null, benchmark_split train/test
(pipelines/_benchmark.py); no class ids (the CSV numbers none).

Many videos have gone from YouTube since 2020, and every VGGSound result has to say how many clips it
had: a video YouTube says is gone (removed, private, terminated: `video_unavailable`, or a 404) fails
as `unavailable`, with yt-dlp's reason in the detail, so the manifest, `audiodata stats` and the card
count them. Other failures (throttling, timeouts) keep their own reasons and are retried by
`build --retry-failed`.

`--input`: the CSV (path or URL; default the VGG site's vggsound.csv). `--base-url` replaces
https://www.youtube.com (tests point it at a loopback server). Options: splits=train,test, timeout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import Item, ItemError, SourceConfig, SourceError, UserError
from pipelines._benchmark import benchmark_fields, label_text
from pipelines._common import check_options, csv_lines, is_url, read_text
from pipelines._segments import YoutubeSegmentSource

CSV_URL = "https://www.robots.ox.ac.uk/~vgg/data/vggsound/vggsound.csv"
SEGMENT_SECONDS = 10.0
SPLITS = {"train": "train", "test": "test"}
OPTIONS = frozenset({"splits", "timeout"})
LICENSE = "CC BY 4.0 (labels); audio: the YouTube uploader's terms"
# yt-dlp reasons (audio_dataset.youtube) that mean the video is gone, not that this try failed.
GONE_REASONS = frozenset({"video_unavailable", "http_404"})
UNAVAILABLE = "unavailable"


def parse_rows(text: str) -> Iterator[tuple[str, int, str, str]]:
    """(youtube_id, start_seconds, label, split) per row; a header row, if any, is skipped."""
    for number, row in enumerate(csv_lines(text, "vggsound.csv"), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 4:
            raise SourceError(f"vggsound.csv row {number} has {len(row)} columns, expected 4: {row[:5]!r}")
        video, start, label, split = (cell.strip() for cell in row)
        if number == 1 and video.lower() in ("youtube_id", "ytid"):
            continue  # a header a user added: youtube_id,start_seconds,label,split
        if not (start.isascii() and start.isdigit()):  # "²".isdigit() too, and int() refuses it
            raise SourceError(f"vggsound.csv row {number} has start_seconds {start!r}")
        yield video, int(start), label, split


class VGGSound(YoutubeSegmentSource):
    name = "vggsound"

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.client = HttpClient(HttpConfig.for_source(config))
        self.csv_location = config.input or CSV_URL
        wanted = config.options.get("splits", ",".join(SPLITS))
        self.splits = [name.strip() for name in wanted.split(",") if name.strip()]

    def check(self) -> None:
        check_options(self.name, self.config.options, set(OPTIONS))
        unknown = [name for name in self.splits if name not in SPLITS]
        if unknown or not self.splits:
            raise UserError(f"unknown VGGSound split(s) {', '.join(unknown) or '(none)'}; choose from train, test")
        if not is_url(self.csv_location) and not Path(self.csv_location).expanduser().is_file():
            raise UserError(f"VGGSound CSV not found: {self.csv_location}")

    def list_items(self) -> Iterator[Item]:
        # Rows of one clip (video, start) merge, in first-seen order so the listing order is the file's.
        clips: dict[tuple[str, int], tuple[list[str], str]] = {}
        for video, start, label, split in parse_rows(read_text(self.csv_location, self.client, "VGGSound CSV")):
            labels, _ = clips.setdefault((video, start), ([], split))
            if label and label not in labels:
                labels.append(label)
        for (video, start), (labels, split) in clips.items():
            if split in SPLITS and split not in self.splits:
                continue
            item = self.segment_item(
                video, float(start), start + SEGMENT_SECONDS, source_id=f"{video}_{start:06d}",
                text=label_text(labels) or [video], tag=labels, license=LICENSE, split=SPLITS.get(split, "train"),
                sample_fields=benchmark_fields(labels, split))
            if not labels or split not in SPLITS:
                item.listing_error = ["bad_metadata", f"{video} at {start} s: label {labels!r}, split {split!r}"]
            yield item

    def fetch(self, item: Item) -> bytes:
        try:
            return super().fetch(item)
        except ItemError as exc:
            if exc.reason in GONE_REASONS:
                raise ItemError(UNAVAILABLE, f"{exc.reason}: {exc.detail}") from None
            raise


SOURCE = VGGSound
