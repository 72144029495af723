"""FSD50K: 51,197 Freesound clips with multi-label AudioSet-ontology annotations, 200 classes.

Verified layout (Zenodo record 4060432, and the dataset's README):
- FSD50K.ground_truth.zip -> FSD50K.ground_truth/{dev.csv, eval.csv, vocabulary.csv}: dev.csv
  `fname,labels,mids,split` (labels and mids comma-separated, split `train`/`val`), eval.csv
  `fname,labels,mids`, vocabulary.csv (no header) `index,label,mid`;
- FSD50K.dev_audio.zip + .z01...z05 and FSD50K.eval_audio.zip + .z01: split zips that unpack to
  FSD50K.dev_audio/<fname>.wav and FSD50K.eval_audio/<fname>.wav;
- FSD50K.metadata.zip -> FSD50K.metadata/{dev,eval}_clips_info_FSD50K.json: per clip `license`
  (a Creative Commons URL), `uploader`, `title`, keyed by fname (optional here).
Splits follow the dataset: dev/train -> train, dev/val -> valid, eval -> test. Labels are multi-label:
`text` has one readable phrase per label, `class_ids` are the vocabulary's indices.

Split zips: Python's zipfile cannot read a multi-part (zip64, multi-disk) archive, and naive
concatenation of the parts leaves every member's offset wrong, so the merged zip is required, made
the way the dataset's README says: `zip -s 0 FSD50K.dev_audio.zip --out FSD50K.dev_audio.merged.zip`
(or the unpacked folder). A split zip given as it is is refused with that command, never half-read.

`--input`: a folder holding the Zenodo files (zips or unpacked folders), or a URL they are under
(default the Zenodo record, for the ground truth and metadata). Options: `splits=dev,eval`;
`dev_audio=`, `eval_audio=`, `ground_truth=`, `metadata=` name one part's zip or folder (path or URL).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterator

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import Item, ItemError, Source, SourceConfig, SourceError, UserError
from pipelines._archives import ArchiveStore
from pipelines._benchmark import Distribution, benchmark_fields, label_text
from pipelines._common import check_options, csv_lines, csv_rows, is_url, join_url

ZENODO_FILES = "https://zenodo.org/records/4060432/files"
# The dataset's split -> (its audio part, the build's split per row `split`)
SPLITS = {"dev": {"train": "train", "val": "valid"}, "eval": {"eval": "test"}}
PARTS = ("ground_truth", "metadata", "dev_audio", "eval_audio")
OPTIONS = frozenset({"splits", *PARTS})
LICENSE = "per clip Freesound CC licence (FSD50K metadata clips_info); labels: CC BY 4.0"
log = logging.getLogger(__name__)
MERGE = "zip -s 0 FSD50K.{part}.zip --out FSD50K.{part}.merged.zip"


class FSD50K(Source):
    name = "fsd50k"
    fetch_concurrency: ClassVar[int] = 8

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.root = config.input or ZENODO_FILES
        wanted = config.options.get("splits", ",".join(SPLITS))
        self.splits = [name.strip() for name in wanted.split(",") if name.strip()]
        self.client = HttpClient(HttpConfig.for_source(config, max_bytes=64 * 2**30))
        self.store = ArchiveStore(config.state_dir, self.client)
        self.parts = {part: Distribution(self._location(part), self.store, f"FSD50K {part}") for part in PARTS}

    def _location(self, part: str) -> str:
        """The part's zip or folder: the option, else FSD50K.<part>/ or FSD50K.<part>.zip under --input."""
        given = self.config.options.get(part)
        if given:
            return given
        if is_url(self.root):
            return join_url(self.root, f"FSD50K.{part}.zip")
        folder = Path(self.root).expanduser() / f"FSD50K.{part}"
        return str(folder) if folder.is_dir() else str(folder.with_name(folder.name + ".zip"))

    def check(self) -> None:
        check_options(self.name, self.config.options, set(OPTIONS))
        unknown = [name for name in self.splits if name not in SPLITS]
        if unknown or not self.splits:
            raise UserError(f"unknown FSD50K split(s) {', '.join(unknown) or '(none)'}; choose from dev, eval")
        if not is_url(self.root) and not Path(self.root).expanduser().is_dir():
            raise UserError(f"FSD50K input must be a folder or a URL: {self.root}")
        for part in ["ground_truth", *(f"{split}_audio" for split in self.splits)]:
            self._check_part(part)

    def _check_part(self, part: str) -> None:
        location = self.parts[part].location
        if part.endswith("_audio") and not self.config.options.get(part) and is_url(location):
            raise UserError(f"FSD50K.{part}.zip is published as a split zip (.zip + .z01...), which cannot be "
                            f"read from a URL: download the parts, merge them ({MERGE.format(part=part)}) and "
                            f"give the merged zip or the unpacked folder (--source-option {part}=PATH)")
        if not is_url(location):
            path = Path(location).expanduser()
            if path.suffix == ".zip" and path.with_suffix(".z01").exists():
                raise UserError(f"{path.name} is the last part of a split zip: merge the parts "
                                f"({MERGE.format(part=part)}) and give the merged zip (--source-option "
                                f"{part}=FSD50K.{part}.merged.zip) or the unpacked folder")
        self.parts[part].check()

    # -- listing --------------------------------------------------------------------------------

    def list_items(self) -> Iterator[Item]:
        truth = self.parts["ground_truth"]
        top = truth.top("vocabulary.csv")
        ids = _vocabulary(truth.read_text(top + "vocabulary.csv"))
        for split in self.splits:
            rows = csv_rows(truth.read_text(top + f"{split}.csv"))
            if rows and not {"fname", "labels", "mids"} <= set(rows[0]):
                raise SourceError(f"{split}.csv lacks FSD50K columns fname, labels, mids")
            info = self._clips_info(split)
            audio = self._audio_names(split)
            for row in rows:
                yield self._item(split, row, ids, info.get(row["fname"], {}), audio)

    def _audio_names(self, split: str) -> dict[str, str]:
        """fname (without .wav) -> the file's name in the audio zip or folder."""
        names = self.parts[f"{split}_audio"].names()
        return {PurePosixPath(name).stem: name for name in names
                if name.lower().endswith(".wav") and "__MACOSX/" not in name}

    def _clips_info(self, split: str) -> dict[str, dict[str, Any]]:
        """The per-clip licence and uploader, when the metadata part is there (it only adds them)."""
        metadata = self.parts["metadata"]
        if not self.config.options.get("metadata") and not is_url(metadata.location) \
                and not Path(metadata.location).exists():
            return {}
        name = f"{split}_clips_info_FSD50K.json"
        try:
            data = json.loads(metadata.read_text(metadata.top(name) + name))
        except (ValueError, RecursionError) as exc:  # nested past Python's recursion limit
            raise SourceError(f"{name} is not JSON: {str(exc)[:200]}") from None
        except (ItemError, UserError, SourceError) as exc:  # absent from the URL: the fallback licence
            log.warning("FSD50K metadata not read (%s); clips carry the licence %r", exc, LICENSE)
            return {}
        if not isinstance(data, dict):
            raise SourceError(f"{name} is not an object keyed by fname")
        return {str(k): v for k, v in data.items() if isinstance(v, dict)}

    def _item(self, split: str, row: dict[str, str], ids: dict[str, int], info: dict[str, Any],
              audio: dict[str, str]) -> Item:
        fname = row["fname"]
        labels = [label.strip() for label in row["labels"].split(",") if label.strip()]
        own_split = row.get("split", "eval") if split == "dev" else "eval"
        licence, uploader = info.get("license"), info.get("uploader")
        item = Item(source_id=fname, locator=f"{split}|{audio.get(fname, fname + '.wav')}",
                    text=label_text(labels), tag=labels,
                    license=licence if isinstance(licence, str) and licence else LICENSE,
                    author=uploader if isinstance(uploader, str) else "",
                    url=f"https://freesound.org/s/{fname}/" if fname.isdigit() else "",
                    original_data={"mids": [m.strip() for m in row["mids"].split(",") if m.strip()],
                                   "fsd50k_set": split},
                    split=SPLITS[split].get(own_split))
        known = [ids[label] for label in labels if label in ids]
        item.sample_fields = benchmark_fields(labels, own_split, None, known if len(known) == len(labels) else None)
        if item.split is None:
            item.split = "train"
            item.listing_error = ["bad_metadata", f"{fname}: split {own_split!r} is neither train nor val"]
        elif not labels:
            item.listing_error = ["bad_metadata", f"{fname}: no labels"]
        elif fname not in audio:
            item.listing_error = ["missing_member", f"{fname}.wav is not in FSD50K.{split}_audio"]
        return item

    def fetch(self, item: Item) -> bytes:
        split, _, name = item.locator.partition("|")
        if split not in SPLITS:
            raise ItemError("bad_locator", item.locator)
        return self.parts[f"{split}_audio"].read(name)


def _vocabulary(text: str) -> dict[str, int]:
    """label -> index from vocabulary.csv (`index,label,mid`, no header)."""
    found: dict[str, int] = {}
    for row in csv_lines(text, "vocabulary.csv"):
        if len(row) >= 2 and row[0].strip().isascii() and row[0].strip().isdigit():
            found[row[1].strip()] = int(row[0])
    if not found:
        raise SourceError("vocabulary.csv holds no `index,label,mid` rows")
    return found


SOURCE = FSD50K
