"""WavCaps: ~400k clips with ChatGPT-refined captions (Mei et al., arXiv 2303.17395).

Layout (the hub dataset cvssp/WavCaps and github.com/XinhaoMei/WavCaps):
- json_files/<Subset>/<name>.json, each an object whose "data" is a list of entries:
  FreeSound/fsd_final.json: id, file_name, href, tags, description, author, duration, download_link,
  caption; BBC_Sound_Effects/bbc_final.json: id, description, category, duration, download_link,
  caption; SoundBible/sb_final.json: id, title, description, author, href, duration, download_link,
  caption; AudioSet_SL/as_final.json: id ("Y<youtube id>.wav"), duration, caption. Every entry also
  has "audio" (a placeholder path).
- json_files/blacklist/blacklist_exclude_*.json: {"AudioSet": [ids], "FreeSound": [ids]}, clips that
  overlap evaluation sets (AudioCaps, Clotho, ESC-50, UrbanSound8K, VGGSound).
- Zip_files/<Subset>/<Subset>.zip: the audio as FLAC, `<id>.flac` (AudioSet_SL: the id's `.wav`
  becomes `.flac`) somewhere inside. The hub splits the large ones into .z01.. parts: merge them
  with `zip -FF <Subset>.zip --out <Subset>_merged.zip` and pass `archives=` the folder holding
  `<Subset>.zip` files (merged ones named so).

`--input`: the folder holding json_files/ (and Zip_files/), or a URL it is under: http(s)
(e.g. https://huggingface.co/datasets/cvssp/WavCaps/resolve/main) or any fsspec URL (s3://,
hf://datasets/cvssp/WavCaps). Options: subsets=FreeSound,BBC_Sound_Effects,SoundBible,AudioSet_SL;
audio=archive (default; the zip, fetched once into the build's state folder when remote) or
audio=url (each entry's download_link: SoundBible and BBC serve theirs openly, a BBC link is a
zip holding the WAV; Freesound's need a logged-in session, AudioSet_SL has none); archives=DIR;
blacklist=all (default: every blacklist file present), none, or file names. Blacklisted clips are
listed as `excluded`, naming the file. The caption is `text`; the raw description stays in
`original_data["description"]` (what `audiodata keywords` and k2c's KeyBERT read).
"""
from __future__ import annotations

import ast
import io
import json
import logging
import zipfile
from pathlib import PurePosixPath
from typing import Any, ClassVar, Iterator

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.manifest import STATUS_EXCLUDED
from audio_dataset.source import Item, ItemError, Source, SourceConfig, SourceError, UserError
from audio_dataset.storage import location
from pipelines._archives import ArchiveStore, read_zip_member
from pipelines._common import check_options, is_audio_name, is_url, join_url

log = logging.getLogger("audiodata.wavcaps")
JSON_FILES = {"FreeSound": "fsd_final.json", "BBC_Sound_Effects": "bbc_final.json",
              "SoundBible": "sb_final.json", "AudioSet_SL": "as_final.json"}
BLACKLISTS = ("blacklist_exclude_all_ac.json", "blacklist_exclude_test_ac.json",
              "blacklist_exclude_ub8k_esc50_vggsound.json")
# Blacklist keys -> subsets.
BLACKLIST_KEYS = {"AudioSet": "AudioSet_SL", "FreeSound": "FreeSound", "BBC": "BBC_Sound_Effects",
                  "SoundBible": "SoundBible", **{name: name for name in JSON_FILES}}
LICENSES = {
    "FreeSound": "per sound Freesound CC licence (see its page); WavCaps: academic use only",
    "BBC_Sound_Effects": "RemArc Licence (personal, educational and research use); WavCaps: academic use only",
    "SoundBible": "per sound SoundBible licence (see its page); WavCaps: academic use only",
    "AudioSet_SL": "YouTube uploader's terms; WavCaps captions: academic use only",
}
OPTIONS = {"subsets", "audio", "archives", "blacklist"}


class WavCaps(Source):
    name = "wavcaps"
    fetch_concurrency: ClassVar[int] = 8  # zip members read locally once the archive is in place

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        check_options(self.name, config.options, OPTIONS)
        options = config.options
        self.root = (config.input or "").rstrip("/")
        self.subsets = [s.strip() for s in options.get("subsets", ",".join(JSON_FILES)).split(",") if s.strip()]
        self.audio = options.get("audio", "archive")
        self.archives = options.get("archives", "").rstrip("/")
        self.blacklist = options.get("blacklist", "all")
        self.client = HttpClient(HttpConfig.for_source(config, max_bytes=256 * 2**30))
        self.store = ArchiveStore(config.state_dir, self.client)

    def check(self) -> None:
        if not self.root:
            raise UserError("--source wavcaps needs --input: the folder or URL holding json_files/")
        unknown = [s for s in self.subsets if s not in JSON_FILES]
        if unknown or not self.subsets:
            raise UserError(f"unknown WavCaps subset(s) {', '.join(unknown) or '(none)'}; "
                            f"choose from {', '.join(JSON_FILES)}")
        if self.audio not in ("archive", "url"):
            raise UserError(f"wavcaps audio must be archive or url, not {self.audio!r}")

    # -- reading the copy -----------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return join_url(self.root, "/".join(parts)) if "://" in self.root else str(location(self.root).joinpath(*parts))

    def _read_json(self, where: str, what: str, required: bool = True) -> Any:
        """A JSON file of the copy; None when it is absent and not `required`."""
        try:
            if is_url(where):
                text = self.client.get_text(where)
            else:
                path = location(where)
                if not path.exists():
                    raise FileNotFoundError(where)
                text = path.read_text(encoding="utf-8-sig")
        except (FileNotFoundError, ItemError) as exc:
            absent = isinstance(exc, FileNotFoundError) or exc.reason == "http_404"
            if absent and not required:
                return None
            if absent:
                raise UserError(f"{what} not found: {where}") from None
            raise SourceError(f"could not read the {what} at {where}: {exc}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{what} at {where} is not JSON: {exc}") from None

    def _entries(self, subset: str) -> list[dict[str, Any]]:
        data = self._read_json(self._path("json_files", subset, JSON_FILES[subset]), f"WavCaps {subset} JSON")
        entries = data.get("data") if isinstance(data, dict) else data  # early releases: a bare list
        if not isinstance(entries, list):
            raise SourceError(f"WavCaps {JSON_FILES[subset]} has no \"data\" list")
        return entries

    def _blacklisted(self) -> dict[str, dict[str, str]]:
        """subset -> {id: blacklist file name}."""
        if self.blacklist == "none":
            return {}
        explicit = self.blacklist != "all"
        names = [n.strip() for n in self.blacklist.split(",") if n.strip()] if explicit else list(BLACKLISTS)
        listed: dict[str, dict[str, str]] = {}
        for name in names:
            data = self._read_json(self._path("json_files", "blacklist", name), f"WavCaps blacklist {name}",
                                   required=explicit)
            if data is None:
                log.warning("wavcaps: blacklist %s not found under %s; its clips are not excluded", name, self.root)
                continue
            for key, ids in (data.items() if isinstance(data, dict) else [(None, None)]):
                subset = BLACKLIST_KEYS.get(key)
                if subset is None or not isinstance(ids, list):
                    raise SourceError(f"WavCaps blacklist {name} is not {{\"AudioSet\": [ids], \"FreeSound\": [ids]}}")
                for clip_id in ids:
                    listed.setdefault(subset, {}).setdefault(str(clip_id), name)
        return listed

    def list_items(self) -> Iterator[Item]:
        self.check()
        blacklisted = self._blacklisted()
        for subset in self.subsets:
            excluded = blacklisted.get(subset, {})
            for entry in self._entries(subset):
                if not isinstance(entry, dict) or "id" not in entry:
                    raise SourceError(f"WavCaps {JSON_FILES[subset]} has an entry without an id")
                yield self._item(subset, entry, excluded.get(str(entry["id"])))

    def _item(self, subset: str, entry: dict[str, Any], blacklist: str | None) -> Item:
        clip_id = str(entry["id"])
        original = {k: v for k, v in entry.items() if k != "audio"}
        original["wavcaps_subset"] = subset
        if blacklist:
            original["wavcaps_blacklist"] = blacklist
        caption = str(entry.get("caption") or "").strip()
        return Item(
            source_id=f"{subset}/{clip_id}", locator="" if blacklist else f"{subset}/{_member_name(clip_id)}",
            text=[caption] if caption else [], tag=_tags(subset, entry), license=LICENSES[subset],
            author=str(entry.get("author") or ""), url=_page_url(subset, entry), original_data=original,
        )

    # -- fetching -------------------------------------------------------------------------------

    def fetch(self, item: Item) -> bytes:
        blacklist = item.original_data.get("wavcaps_blacklist")
        if blacklist:
            raise ItemError(STATUS_EXCLUDED, f"listed in WavCaps {blacklist}")
        if not item.text:
            raise ItemError("no_caption", "the WavCaps entry has no caption")
        subset, member = item.locator.split("/", 1)
        if self.audio == "url":
            return self._download(subset, item)
        archive = join_url(self.archives, f"{subset}.zip") if self.archives else \
            self._path("Zip_files", subset, f"{subset}.zip")
        found = self.store.members_by_name(archive).get(member)
        if found is None:
            raise ItemError("missing_member", f"{member} is not in {PurePosixPath(archive).name}")
        return self.store.read(archive, found)

    def _download(self, subset: str, item: Item) -> bytes:
        link = str(item.original_data.get("download_link") or "")
        if not link:
            raise ItemError("no_download_link", f"WavCaps {subset} entries have no download_link; use audio=archive")
        data = self.client.get_bytes(link, expect="any")
        if data[:4] == b"PK\x03\x04":  # BBC serves each WAV zipped
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = [n for n in archive.namelist() if is_audio_name(n)]
                if not names:
                    raise ItemError("bad_archive_member", f"no audio file in {link}")
                return read_zip_member(archive, names[0])  # within the size and ratio caps
        return data


def _member_name(clip_id: str) -> str:
    """The clip's file in the zips: `<id>.flac` (AudioSet_SL ids end in `.wav`, which it replaces)."""
    return f"{clip_id[:-4] if clip_id.endswith('.wav') else clip_id}.flac"


def _tags(subset: str, entry: dict[str, Any]) -> list[str]:
    if subset == "FreeSound":
        return [str(t) for t in entry.get("tags") or []]
    category = entry.get("category")
    if isinstance(category, list):
        return [str(c) for c in category]
    if isinstance(category, str) and category.strip():
        try:  # BBC writes a Python list literal: "['Nature']"
            value = ast.literal_eval(category)
        except (ValueError, SyntaxError):
            return [category.strip()]
        return [str(c) for c in value] if isinstance(value, (list, tuple)) else [str(value)]
    return []


def _page_url(subset: str, entry: dict[str, Any]) -> str:
    href = str(entry.get("href") or "")
    clip_id = str(entry["id"])
    if subset == "FreeSound":
        return f"https://freesound.org{href}" if href.startswith("/") else href or f"https://freesound.org/s/{clip_id}/"
    if subset == "SoundBible":
        return f"https://soundbible.com/{href}" if href else ""
    if subset == "BBC_Sound_Effects":
        return f"https://sound-effects.bbcrewind.co.uk/search?q={clip_id}"
    video = clip_id[1:-4] if clip_id.startswith("Y") and clip_id.endswith(".wav") else clip_id
    return f"https://www.youtube.com/watch?v={video}"


SOURCE = WavCaps
