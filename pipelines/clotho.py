"""Clotho v2.1: Freesound clips with five crowdsourced captions each, in its own three splits.

Verified layout (Zenodo record 4783391, and the DCASE baselines and loaders that read it):
- clotho_captions_{development,validation,evaluation}.csv: `file_name,caption_1,...,caption_5`;
- clotho_metadata_{split}.csv: `file_name,keywords,sound_id,sound_link,start_end_samples,
  manufacturer,license` (keywords `;`-separated, sound_id the Freesound id);
- clotho_audio_{split}.7z: the WAV files, named as in `file_name`.
Splits map development -> train, validation -> valid, evaluation -> test; the original name stays in
`original_data["clotho_split"]`. Captions are the five captions; tags are the metadata keywords.

`--input`: a folder holding the CSVs and either the 7z archives or the extracted audio
(`<split>/` or `clotho_audio_<split>/`), or a URL the files are under (default: the Zenodo record,
whose archives are downloaded once into the build's state folder).
`--source-option splits=development,validation` limits the splits.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Iterator

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import Item, ItemError, Source, SourceConfig, SourceError, UserError
from pipelines._archives import ArchiveStore
from pipelines._common import csv_rows, is_url, join_url, read_text

ZENODO_FILES = "https://zenodo.org/records/4783391/files"
SPLITS = {"development": "train", "validation": "valid", "evaluation": "test"}
CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))
LICENSE = "per clip (Freesound CC licence in the metadata); captions: Tampere University licence"


class Clotho(Source):
    name = "clotho"
    fetch_concurrency: ClassVar[int] = 8  # local reads once the archive is in place

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.root = config.input or ZENODO_FILES
        wanted = config.options.get("splits", ",".join(SPLITS))
        self.splits = [name.strip() for name in wanted.split(",") if name.strip()]
        self.client = HttpClient(HttpConfig.for_source(config, max_bytes=64 * 2**30))
        self.store = ArchiveStore(config.state_dir, self.client)

    def check(self) -> None:
        unknown = [name for name in self.splits if name not in SPLITS]
        if unknown or not self.splits:
            raise UserError(f"unknown Clotho split(s) {', '.join(unknown) or '(none)'}; "
                            f"choose from {', '.join(SPLITS)}")
        if not is_url(self.root) and not Path(self.root).expanduser().is_dir():
            raise UserError(f"Clotho input must be a folder or a URL: {self.root}")

    def _file(self, name: str) -> str:
        return join_url(self.root, name) if is_url(self.root) else str(Path(self.root).expanduser() / name)

    def list_items(self) -> Iterator[Item]:
        for split in self.splits:
            captions = csv_rows(read_text(self._file(f"clotho_captions_{split}.csv"), self.client,
                                          f"Clotho {split} captions"))
            if captions and not {"file_name", *CAPTION_COLUMNS} <= set(captions[0]):
                raise SourceError(f"clotho_captions_{split}.csv lacks file_name/caption_1..5 columns")
            metadata = self._metadata(split)
            for row in captions:
                yield self._item(split, row, metadata.get(row["file_name"], {}))

    def _metadata(self, split: str) -> dict[str, dict[str, str]]:
        location = self._file(f"clotho_metadata_{split}.csv")
        if not is_url(location) and not Path(location).is_file():
            return {}  # captions alone make a usable item; metadata only adds tags and licence
        return {row["file_name"]: row for row in csv_rows(read_text(location, self.client, "Clotho metadata"))}

    def _item(self, split: str, row: dict[str, str], meta: dict[str, str]) -> Item:
        keywords = [k.strip() for k in meta.get("keywords", "").split(";") if k.strip()]
        original = {"clotho_split": split, "file_name": row["file_name"]}
        original.update({k: meta[k] for k in ("sound_id", "sound_link", "start_end_samples", "manufacturer")
                         if meta.get(k)})
        return Item(source_id=row["file_name"], locator=f"{split}/{row['file_name']}",
                    text=[row[c] for c in CAPTION_COLUMNS if row.get(c)], tag=keywords,
                    license=meta.get("license", LICENSE), author=meta.get("manufacturer", ""),
                    url=meta.get("sound_link", ""), original_data=original, split=SPLITS[split])

    # -- fetching -------------------------------------------------------------------------------

    def fetch(self, item: Item) -> bytes:
        split, file_name = item.locator.split("/", 1)
        if not is_url(self.root):
            for folder in (split, f"clotho_audio_{split}"):
                path = Path(self.root).expanduser() / folder / file_name
                if path.is_file():
                    return path.read_bytes()
        archive = self._file(f"clotho_audio_{split}.7z")
        member = self.store.members_by_name(archive).get(file_name)
        if member is None:
            raise ItemError("missing_member", f"{file_name} is not in clotho_audio_{split}.7z")
        return self.store.read(archive, member)


SOURCE = Clotho
