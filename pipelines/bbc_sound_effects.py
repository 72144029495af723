"""`bbc_sound_effects`: the BBC Sound Effects archive (RemArc licence), from its catalogue CSV.

Catalogue: `BBCSoundEffects.csv` with columns `location` (e.g. `07076051.wav`), `description`,
`secs`, `category`, `CDNumber`, `CDName`, `tracknum`; by default
`https://sound-effects.bbcrewind.co.uk/assets/BBCSoundEffects.csv` (it used to live at
`http://bbcsfx.acropolis.org.uk/assets/`), or `--input` a local copy or another URL.
Media: `https://sound-effects-media.bbcrewind.co.uk/wav/<location>` (`download=wav`, the default,
the URL community downloaders use), or `download=zip` for `.../zip/<location>.zip` (the per-item
zip the website's download button gives; the WAV inside is used).
`--base-url ROOT` serves both from one root (`ROOT/assets/BBCSoundEffects.csv`, `ROOT/wav/...`);
`media_url=` moves only the media.

Caption: the catalogue `description` (what LAION's preprocess_bbc.py used, taken there from the
file name); tags: the `category` parts ("Engines: Petrol" -> Engines, Petrol). The source id is
the location without `.wav`. A catalogue row without a usable location still becomes an item, which
fails as `bad_listing_row`, so every row ends in the manifest.
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from audio_dataset.http import HTTP_OPTION_PREFIX, HttpClient, HttpConfig
from audio_dataset.media import sniff_audio
from audio_dataset.source import Item, ItemError, Source, SourceError, UserError
from pipelines._common import csv_rows, is_url, join_url, read_text
from pipelines._archives import read_zip_member

CATALOGUE_URL = "https://sound-effects.bbcrewind.co.uk/assets/BBCSoundEffects.csv"
CATALOGUE_PATH = "assets/BBCSoundEffects.csv"
MEDIA_ROOT = "https://sound-effects-media.bbcrewind.co.uk"
LICENSE = "RemArc Licence (BBC): personal, educational and research use only"
COLUMNS = ("location", "description", "secs", "category", "CDNumber", "CDName", "tracknum")
OPTIONS = {"download", "media_url"}
# BBC locations are 8-digit numbers and a .wav suffix; anything else is not a catalogue entry.
_LOCATION = re.compile(r"^[0-9A-Za-z_-]{1,64}\.wav$", re.IGNORECASE)


def category_tags(category: str) -> list[str]:
    tags: list[str] = []
    for part in category.split(":"):
        part = part.strip()
        if part and part not in tags:
            tags.append(part)
    return tags


class BBCSoundEffectsSource(Source):
    name = "bbc_sound_effects"
    fetch_concurrency = 16

    def __init__(self, config) -> None:
        super().__init__(config)
        unknown = {k for k in config.options if not k.startswith(HTTP_OPTION_PREFIX)} - OPTIONS
        if unknown:
            raise UserError(f"unknown bbc_sound_effects option(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(OPTIONS))} and http_* (see audio_dataset.http)")
        self.download = config.options.get("download", "wav")
        if self.download not in ("wav", "zip"):
            raise UserError(f"bbc_sound_effects download must be wav or zip, not {self.download!r}")
        root = config.base_url.rstrip("/") if config.base_url else None
        self.catalogue = config.input or (join_url(root, CATALOGUE_PATH) if root else CATALOGUE_URL)
        self.media = (config.options.get("media_url") or root or MEDIA_ROOT).rstrip("/")
        self.client = HttpClient(HttpConfig.for_source(config))

    def check(self) -> None:
        if self.config.input and not is_url(self.config.input) and not Path(self.config.input).expanduser().is_file():
            raise UserError(f"BBC Sound Effects catalogue not found: {self.config.input}")

    def list_items(self) -> Iterator[Item]:
        rows = csv_rows(read_text(self.catalogue, self.client, "BBC Sound Effects catalogue"))
        if not rows or "location" not in rows[0] or "description" not in rows[0]:
            raise SourceError(f"{self.catalogue} is not the BBC Sound Effects catalogue "
                              f"(expected a CSV with columns {', '.join(COLUMNS)})")
        for number, row in enumerate(rows, start=2):  # line 1 is the header
            yield self._item(number, row)

    def fetch(self, item: Item) -> bytes:
        if not item.locator:
            raise ItemError("bad_listing_row", item.original_data.get("problem", "no usable location"))
        if not item.text:  # a sample without a caption is no audio-text pair; do not download it
            raise ItemError("no_caption", "the catalogue row has an empty description")
        if self.download == "wav":
            return self.client.get_bytes(item.locator, expect="audio")
        return _wav_from_zip(self.client.get_bytes(item.locator, expect="archive"), item.locator)

    def _item(self, number: int, row: dict[str, str]) -> Item:
        location = row.get("location", "")
        original: dict[str, Any] = {k: row.get(k, "") for k in COLUMNS}
        if not _LOCATION.match(location):
            original["problem"] = f"catalogue line {number}: bad location {location[:80]!r}"
            return Item(source_id=f"line{number}", locator="", text=[], license=LICENSE, original_data=original)
        url = f"{self.media}/{self.download}/{quote(location)}" + (".zip" if self.download == "zip" else "")
        try:
            original["secs"] = float(row["secs"]) if row.get("secs") else None
        except ValueError:
            pass  # keep the catalogue's text; the decoded duration is what counts
        description = row.get("description", "").strip()
        return Item(
            source_id=location[: -len(".wav")],
            locator=url,
            text=[description] if description else [],
            tag=category_tags(row.get("category", "")),
            license=LICENSE,
            author="BBC",
            url=url,
            original_data=original,
        )


def _wav_from_zip(data: bytes, where: str) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if info.is_dir() or info.filename.rsplit("/", 1)[-1].startswith("._"):
                    continue
                with archive.open(info) as member:
                    head = member.read(64)
                if sniff_audio(head):
                    return read_zip_member(archive, info.filename)  # within the size and ratio caps
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise ItemError("bad_archive", f"{where}: {type(exc).__name__}: {exc}") from None
    raise ItemError("archive_without_audio", f"{where} holds no audio file")


SOURCE = BBCSoundEffectsSource
