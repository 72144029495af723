"""AudioSet: Google's segment CSVs + ontology labels; audio from YouTube through yt-dlp, cut to the segment.

Verified formats (research.google.com/audioset/download.html, and code that reads them):
- segment CSVs at http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/
  {balanced_train,unbalanced_train,eval}_segments.csv: three `#` comment lines, the third naming
  the columns `YTID, start_seconds, end_seconds, positive_labels`, then rows like
  `--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"`;
- ontology.json (github.com/audioset/ontology): a list of {id, name, description, ...}.
Captions follow LAION's preprocess_audioset.py: "The sound of A" / "The sounds of A, B and C" from
the label names; the label names are the tags.

`--input` is a CSV path or URL, or one of `balanced_train`, `unbalanced_train`, `eval`.
`--source-option ontology=PATH|URL` overrides the ontology location.
`--base-url` replaces https://www.youtube.com (tests point it at a loopback server).
Splits are AudioSet's own: the eval CSV is `test`, the training CSVs `train`.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import Item, SourceConfig, SourceError, UserError
from pipelines._common import is_url, read_text
from pipelines._segments import YoutubeSegmentSource

CSV_BASE = "http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/"
NAMED_CSVS = {name: f"{CSV_BASE}{name}_segments.csv" for name in ("balanced_train", "unbalanced_train", "eval")}
ONTOLOGY_URL = "https://raw.githubusercontent.com/audioset/ontology/master/ontology.json"
LICENSE = "CC BY 4.0 (labels); audio: the YouTube uploader's terms"


def label_caption(names: list[str]) -> str:
    if len(names) == 1:
        return f"The sound of {names[0]}"
    return "The sounds of " + ", ".join(names[:-1]) + " and " + names[-1]


def parse_segments(text: str) -> Iterator[tuple[str, float, float, list[str]]]:
    """(YTID, start, end, label ids) per data row of an AudioSet segment CSV."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for number, row in enumerate(csv.reader(io.StringIO("\n".join(lines)), skipinitialspace=True), 1):
        if len(row) < 4:
            raise SourceError(f"segment CSV row {number} has {len(row)} columns, expected 4: {row!r}")
        try:
            start, end = float(row[1]), float(row[2])
        except ValueError:
            raise SourceError(f"segment CSV row {number} has non-numeric times: {row!r}") from None
        labels = [label.strip() for label in ",".join(row[3:]).split(",") if label.strip()]
        yield row[0].strip(), start, end, labels


class AudioSet(YoutubeSegmentSource):
    name = "audioset"

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.client = HttpClient(HttpConfig.for_source(config))
        self.csv_location = NAMED_CSVS.get(config.input or "", config.input)
        self.ontology_location = config.options.get("ontology", ONTOLOGY_URL)

    def check(self) -> None:
        if not self.csv_location:
            raise UserError("audioset needs --input: a segment CSV path or URL, or one of "
                            + ", ".join(NAMED_CSVS))
        for location in (self.csv_location, self.ontology_location):
            if not is_url(location) and not Path(location).expanduser().is_file():
                raise UserError(f"not found: {location}")

    def _split(self) -> str:
        return "test" if "eval" in Path(str(self.csv_location)).name else "train"

    def list_items(self) -> Iterator[Item]:
        try:
            ontology = json.loads(read_text(self.ontology_location, self.client, "AudioSet ontology"))
            names = {entry["id"]: entry["name"] for entry in ontology}
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{self.ontology_location} is not an AudioSet ontology: {exc}") from None
        split = self._split()
        text = read_text(str(self.csv_location), self.client, "AudioSet segment CSV")
        for video_id, start, end, labels in parse_segments(text):
            known = [names[label] for label in labels if label in names]
            if not known:
                continue  # no caption can be made; AudioSet rows always carry labels, so a stale ontology
            yield self.segment_item(
                video_id, start, end, source_id=video_id, text=[label_caption(known)], tag=known,
                license=LICENSE, split=split, original_data={"labels": labels, "label_names": known})


SOURCE = AudioSet
