"""Purchased sound libraries ("packs") whose file and folder names are the captions.

LAION-Audio-630K's Free To Use Sounds, Sonniss Game Effects, WeSoundEffects and Paramount Motion
parts were libraries LAION bought; its scripts (download_and_preprocess_*.sh,
preprocess_filename_dataset.py) mirrored the purchased files, fetched them with `wget -r -np` from
an HTTP directory listing, and used each WAV's file name as its caption. None of these sellers has
a public listing API: the audio is only reachable after purchase, as archives or folders.

So `--input` names what you downloaded, comma-separated if several:
- a local folder (searched recursively for audio files and zip/7z/tar archives),
- a local archive, or a URL of one (downloaded once into the build's state folder),
- an HTTP directory listing URL (Apache/nginx autoindex pages, walked like `wget -r -np`),
- a .txt file (path or URL) with one such location per line.
An item is one audio file; its id is its path below the input root (archive members under the
archive's name). Captions: the file name without numbering and separators (LAION's caption), then,
when the enclosing folder adds words, "<file caption>, <folder caption>"; tags are the folder names.
"""
from __future__ import annotations

import html
import re
from pathlib import Path, PurePosixPath
from typing import ClassVar, Iterator
from urllib.parse import unquote, urljoin, urlsplit

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import Item, ItemError, Source, SourceConfig, SourceError, UserError
from pipelines._archives import ArchiveStore, archive_stem, is_archive_name
from pipelines._common import caption_from_name, is_audio_name, is_url, read_text

MEMBER_SEPARATOR = "!/"
_HREF = re.compile(r'<a\s[^>]*href="([^"]+)"', re.IGNORECASE)
MAX_DEPTH = 32


def pack_item(source_id: str, locator: str, license: str, url: str = "") -> Item | None:
    """An item for the audio file at `source_id` (a POSIX path below the input root)."""
    parts = [p for p in PurePosixPath(source_id).parts if p not in ("", "/")]
    caption = caption_from_name(parts[-1])
    if not caption:
        return None
    folders = [archive_stem(p) if is_archive_name(p) else p for p in parts[:-1]]
    tags = []
    for folder in folders:
        tag = caption_from_name(folder)
        if tag and tag not in tags:
            tags.append(tag)
    text = [caption]
    if tags and tags[-1].lower() not in caption.lower():
        text.append(f"{caption}, {tags[-1]}")
    return Item(source_id=source_id, locator=locator, text=text, tag=tags, license=license, url=url,
                original_data={"file_path": source_id, "folders": folders})


class PackSource(Source):
    """Subclasses set `name`, `license` and `title` (used in messages)."""

    license: ClassVar[str]
    title: ClassVar[str]
    fetch_concurrency: ClassVar[int] = 8

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.client = HttpClient(HttpConfig.for_source(config, max_bytes=256 * 2**30))
        self.store = ArchiveStore(config.state_dir, self.client)

    def check(self) -> None:
        if not self.config.input:
            raise UserError(f"{self.name} needs --input: the {self.title} files you bought (a folder, "
                            "archives, a URL list .txt, or an HTTP directory listing URL)")
        for location in self._roots():
            if not is_url(location) and not Path(location).expanduser().exists():
                raise UserError(f"{self.name} input not found: {location}")

    def _roots(self) -> list[str]:
        return [part.strip() for part in (self.config.input or "").split(",") if part.strip()]

    def list_items(self) -> Iterator[Item]:
        for root in self._roots():
            yield from self._walk(root, prefix="", depth=0)

    # -- listing --------------------------------------------------------------------------------

    def _walk(self, location: str, prefix: str, depth: int) -> Iterator[Item]:
        """A location named by the user (an input root or a line of a URL list)."""
        if depth > MAX_DEPTH:
            raise SourceError(f"{location}: URL lists nest deeper than {MAX_DEPTH} levels")
        if is_url(location):
            yield from self._walk_url(location, prefix, depth, named=True)
            return
        path = Path(location).expanduser()
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield from self._file(str(child), _join(prefix, child.relative_to(path).as_posix()), depth)
        elif path.is_file():
            yield from self._file(str(path), _join(prefix, path.name), depth, named=True)
        else:
            raise UserError(f"not found: {path}")

    def _file(self, location: str, source_id: str, depth: int, named: bool = False) -> Iterator[Item]:
        """Items of one file: an audio file, an archive's audio members, or (only when the user
        named it: packs ship readme .txt files) a URL list."""
        name = urlsplit(location).path if is_url(location) else location
        if is_audio_name(name):
            item = pack_item(source_id, location, self.license, location if is_url(location) else "")
            if item:
                yield item
        elif is_archive_name(name):
            try:
                members = self.store.members(location)
            except ItemError as exc:  # the archive could not be downloaded: the listing is incomplete
                raise SourceError(f"cannot list archive {location}: {exc}") from None
            for member in members:
                if is_audio_name(member):
                    item = pack_item(_join(source_id, member), f"{location}{MEMBER_SEPARATOR}{member}",
                                     self.license, location if is_url(location) else "")
                    if item:
                        yield item
        elif named and name.lower().endswith(".txt"):
            for line in read_text(location, self.client, "URL list").splitlines():
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    yield from self._walk(entry, "", depth + 1)

    def _walk_url(self, url: str, prefix: str, depth: int, named: bool = False) -> Iterator[Item]:
        path = urlsplit(url).path
        if _is_leaf(url):
            yield from self._file(url, _join(prefix, PurePosixPath(unquote(path)).name), depth, named)
            return
        try:
            page = self.client.get_text(url)
        except ItemError as exc:
            raise SourceError(f"cannot read the listing {url}: {exc}") from None
        root = url if url.endswith("/") else url + "/"
        for link in directory_links(page, root):
            name = unquote(link[len(root):]).rstrip("/")
            if link.endswith("/"):
                if depth >= MAX_DEPTH:
                    raise SourceError(f"{link}: the listing nests deeper than {MAX_DEPTH} levels")
                yield from self._walk_url(link, _join(prefix, name), depth + 1)
            else:
                yield from self._file(link, _join(prefix, name), depth)

    # -- fetching -------------------------------------------------------------------------------

    def fetch(self, item: Item) -> bytes:
        if MEMBER_SEPARATOR in item.locator:
            archive, member = item.locator.split(MEMBER_SEPARATOR, 1)
            return self.store.read(archive, member)
        if is_url(item.locator):
            return self.client.get_bytes(item.locator, expect="audio")
        path = Path(item.locator)
        if not path.is_file():
            raise ItemError("missing_file", str(path))
        return path.read_bytes()


def directory_links(page: str, root: str) -> list[str]:
    """Absolute links of an autoindex page that lie below `root` (wget -np), in page order."""
    links: list[str] = []
    for href in _HREF.findall(page):
        href = html.unescape(href)
        if href.startswith(("?", "#", "mailto:")):
            continue  # column sorting links and anchors
        link = urljoin(root, href).split("#")[0]
        if link.startswith(root) and link != root and "?" not in link and link not in links:
            links.append(link)
    return links


def _is_leaf(location: str) -> bool:
    name = urlsplit(location).path if is_url(location) else location
    return is_audio_name(name) or is_archive_name(name) or name.lower().endswith(".txt")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name
