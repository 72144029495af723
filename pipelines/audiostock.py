"""Audiostock sound effects (audiostock.jp, formerly audiostock.net).

Verified:
- LAION released its Audiostock listing as a CSV (laion-audio-630k README): columns `url`,
  `caption1`[, `caption2`...] plus metadata; its `url`s are `https://audiostock.net/audio/<id>/play`;
- LAION's own scrape (preprocess_audiostock.py) is a CSV with title, impression, scene, purpose,
  tags (comma-separated), audio_url, audio_size; captions are the title, tags the site's tags;
- audiostock.net URLs now answer 404, while https://audiostock.jp/audio/<id>/play redirects (302)
  to the MP3 preview on the CDN (a 128 kbps sample, the audio LAION processed).
Inferred (no public description of the page structure was found): without `--input`, the
sound-effect listing pages https://audiostock.jp/se?page=N are scraped for links `/audio/<id>`
whose text is the title; tags are then empty. Use LAION's CSV for the tagged listing.

`--input`: LAION's Audiostock CSV or a scrape in LAION's meta.csv layout (path or URL).
`--base-url` replaces https://audiostock.jp; `--source-option max_pages=N` bounds the page scrape.
"""
from __future__ import annotations

import html
import re
from typing import ClassVar, Iterator

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.listing import PagedListing
from audio_dataset.source import Item, ItemError, Source, SourceConfig, SourceError, UserError
from pipelines._common import csv_rows, read_text

BASE_URL = "https://audiostock.jp"
LICENSE = "Audiostock licence (royalty-free purchase); LAION-Audio-630K terms: research use only"
_ID_IN_URL = re.compile(r"audiostock\.\w+/audio/(\d+)")
_LINK = re.compile(r'<a\b[^>]*href="(?:https?://[^"/]+)?/audio/(\d+)/?"[^>]*>(.*?)</a>', re.IGNORECASE | re.DOTALL)
_TAGS = re.compile(r"<[^>]+>")
# caption1, caption_2...; not caption_t5 (a generated augmentation, not the site's text).
_CAPTION = re.compile(r"caption_?(\d+)")


def _title(raw: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(_TAGS.sub(" ", raw))).strip()


def parse_listing_page(page: str) -> list[dict[str, str]]:
    """{id, title} per audio link on a listing page, first link text per id, in page order."""
    found: dict[str, str] = {}
    for audio_id, text in _LINK.findall(page):
        title = _title(text)
        if title and audio_id not in found:
            found[audio_id] = title
    return [{"id": audio_id, "title": title} for audio_id, title in found.items()]


class Audiostock(Source):
    name = "audiostock"
    fetch_concurrency: ClassVar[int] = 8

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.base = (config.base_url or BASE_URL).rstrip("/")
        self.client = HttpClient(HttpConfig.for_source(config, requests_per_second=4.0))
        self.max_pages = int(config.options.get("max_pages", 10_000))

    def check(self) -> None:
        if self.max_pages < 1:
            raise UserError("max_pages must be at least 1")

    def list_items(self) -> Iterator[Item]:
        if self.config.input:
            yield from self._from_csv(self.config.input)
        else:
            yield from self._from_pages()

    # -- a CSV listing (LAION's release or its scrape) ------------------------------------------

    def _from_csv(self, location: str) -> Iterator[Item]:
        rows = csv_rows(read_text(location, self.client, "Audiostock CSV"))
        for number, row in enumerate(rows, 1):
            row = {k.lower(): v for k, v in row.items()}
            link = row.get("url") or row.get("audio_url") or ""
            match = _ID_IN_URL.search(link)
            if not match:
                raise SourceError(f"Audiostock CSV row {number} has no audiostock /audio/<id> URL: {link!r}")
            numbered = sorted((int(m.group(1)), k) for k in row if (m := _CAPTION.fullmatch(k)) and row[k])
            captions = [row[k] for _, k in numbered]
            title = row.get("title", "")
            text = captions or ([title] if title else [])
            if not text:
                continue
            tags = [t.strip() for t in row.get("tags", "").split(",") if t.strip()]
            original = {k: row[k] for k in ("title", "impression", "scene", "purpose", "audio_size") if row.get(k)}
            yield self._item(match.group(1), text, tags, {**original, "listed_url": link})

    # -- the site's listing pages (inferred structure, see the module doc) -----------------------

    def _from_pages(self) -> Iterator[Item]:
        listing = PagedListing(self.config.state_dir, "audiostock-se", {"base": self.base})

        def fetch_page(page: int) -> tuple[list[dict[str, str]], int | None]:
            try:
                body = self.client.get_text(f"{self.base}/se", params={"page": page})
            except ItemError as exc:
                raise SourceError(f"Audiostock listing page {page}: {exc}") from None
            records = parse_listing_page(body)
            return records, (page + 1 if records and page < self.max_pages else None)

        for record in listing.run(1, fetch_page):
            yield self._item(record["id"], [record["title"]], [], {"title": record["title"]})

    def _item(self, audio_id: str, text: list[str], tags: list[str], original: dict) -> Item:
        play = f"{self.base}/audio/{audio_id}/play"
        return Item(source_id=audio_id, locator=play, text=text, tag=tags, license=LICENSE,
                    author="Audiostock", url=f"{BASE_URL}/audio/{audio_id}",
                    original_data={"audiostock_id": audio_id, **original})

    def fetch(self, item: Item) -> bytes:
        # The play URL redirects to the MP3 on the CDN; the client follows redirects.
        return self.client.get_bytes(item.locator, expect="audio")


SOURCE = Audiostock
