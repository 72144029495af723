"""GTZAN: 1,000 thirty-second music excerpts, 100 in each of ten genres (Tzanetakis and Cook, 2002).

Verified layouts:
- marsyas' genres.tar.gz (marsyas.info/downloads/datasets.html): `genres/<genre>/<genre>.000NN.au`
  (22,050 Hz mono 16-bit Sun AU), with marsyas' own `.mf` lists beside them;
- the copy most people download now (Kaggle "GTZAN Dataset - Music Genre Classification"):
  `Data/genres_original/<genre>/<genre>.000NN.wav`.
Genres: blues classical country disco hiphop jazz metal pop reggae rock. The label is the folder.
`jazz.00054` is damaged in the circulating copy (its WAV cannot be decoded): it fails alone with
the named reason `damaged_file` in the manifest, and every other clip builds. GTZAN has no
official split or folds: every clip goes to `test`, `benchmark_split` "all", `fold` null.

`--input`: genres.tar.gz or a zip of either layout (path or URL; default marsyas' archive), or the
folder holding `genres/` or `genres_original/`.
"""
from __future__ import annotations

import io
import re
from typing import Iterator

import soundfile

from audio_dataset.source import Item, ItemError, UserError
from pipelines._benchmark import ALL, DistributionSource, benchmark_fields, label_text

ARCHIVE_URL = "http://opihi.cs.uvic.ca/sound/genres.tar.gz"
GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
# <folder>/<genre>/<genre>.000NN.<au|wav>, the folder being genres/ or genres_original/
_CLIP = re.compile(r"(?:^|/)(?:genres|genres_original)/(?P<genre>[a-z]+)/(?P=genre)\.(?P<number>\d{5})\.(?:au|wav)$")
# Clips known to be damaged in a circulating copy, and what is wrong with them.
KNOWN_DAMAGED = {"jazz.00054": "known damaged in the circulating GTZAN copy: the file does not decode"}
LICENSE = "unknown: GTZAN's excerpts come from CDs and radio; no licence granted (research use by custom)"


class GTZAN(DistributionSource):
    name = "gtzan"
    default_location = ARCHIVE_URL
    title = "GTZAN genres archive (genres.tar.gz or genres_original/)"

    def list_items(self) -> Iterator[Item]:
        clips = sorted((match["genre"], match["number"], name) for name in self.distribution.names()
                       if (match := _CLIP.search(name)) and match["genre"] in GENRES and "__MACOSX/" not in name)
        if not clips:
            raise UserError(f"{self.distribution.location} holds no genres/<genre>/<genre>.000NN.au "
                            "or genres_original/<genre>/<genre>.000NN.wav files: is it GTZAN?")
        for genre, number, name in clips:
            yield Item(source_id=f"{genre}.{number}", locator=name, text=label_text([genre]), tag=[genre],
                       license=LICENSE, original_data={"file": name.rsplit("/", 1)[-1]}, split="test",
                       sample_fields=benchmark_fields([genre], ALL))

    def fetch(self, item: Item) -> bytes:
        data = self.distribution.read(item.locator)
        problem = KNOWN_DAMAGED.get(item.source_id)
        if problem is not None and not _decodes(data):
            raise ItemError("damaged_file", f"{item.source_id}: {problem}")
        return data


def _decodes(data: bytes) -> bool:
    try:
        soundfile.read(io.BytesIO(data), frames=-1)
    except (RuntimeError, ValueError, EOFError):  # soundfile's errors are RuntimeErrors
        return False
    return True


SOURCE = GTZAN
