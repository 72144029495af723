"""Epidemic Sound sound effects, through the JSON API behind epidemicsound.com's web app.

Verified (LAION's scraper and preprocess_Epidemic.py, and several independent clients):
- GET /json/search/sfx/?genres=<slug>&page=<n> (also `term`, `sort`, `order`) answers
  {"entities": {"tracks": {"<id>": track}}, "meta": {"hits": [{"trackId": id}, ...], "totalPages": n}};
  `meta.hits` gives the order, `entities.tracks` the records;
- a track has id, title, added, length, bpm, isSfx, hasVocals, energyLevel,
  genres [{slug, displayTag}], metadataTags [str], stems.full.lqMp3Url (the MP3 LAION downloaded);
- GET /json/tags/?sfx_tag=true lists the sound-effect categories as "genres" with a `slug` and
  `numTracks`. A search returns at most 10,000 hits, so LAION (and this source) walk it category by
  category. Inferred: the category's display name is in `displayTag` (as in track genres); the
  slug is used when it is absent.
The web app now asks for a logged-in session for some requests: put the browser's Cookie header
value in $EPIDEMIC_SOUND_COOKIE (sent on API requests only, never logged).

Captions follow LAION's preprocess_Epidemic.py: the title without trailing numbers, and
"the sounds of t1, t2, and t3." from metadataTags; tags are the category, the genres and the
metadataTags. `--source-option genres=slug1,slug2` limits the categories, `term=` adds a search term.
Pages are walked sorted by date ascending, so new uploads land on the last page and an interrupted
listing resumes where it stopped (`audio_dataset.listing`).
"""
from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Iterator

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.listing import PagedListing
from audio_dataset.source import Item, ItemError, Source, SourceConfig, SourceError

BASE_URL = "https://www.epidemicsound.com"
COOKIE_ENV = "EPIDEMIC_SOUND_COOKIE"
LICENSE = "Epidemic Sound licence (subscription); LAION-Audio-630K terms: research use only"
PAGE_ATTEMPTS = 3


def sounds_caption(tags: list[str]) -> str | None:
    """LAION's template: "the sounds of a, b, and c." (one tag: "the sounds of a.")."""
    if not tags:
        return None
    if len(tags) == 1:
        return f"the sounds of {tags[0]}."
    return "the sounds of " + ", ".join(tags[:-1]) + ", and " + tags[-1] + "."


def _unique(values: list[str]) -> list[str]:
    seen: set[str] = set()
    return [v for v in values if v and not (v in seen or seen.add(v))]


def track_item(track: dict[str, Any], category: str) -> Item | None:
    """An Item from one track record, or None when it has no downloadable audio or title."""
    url = ((track.get("stems") or {}).get("full") or {}).get("lqMp3Url")
    title = re.sub(r"\d+$", "", str(track.get("title") or "")).strip()
    if not url or not title or track.get("id") is None:
        return None
    metadata_tags = [str(t) for t in track.get("metadataTags") or []]
    genres = [g.get("slug", "") if isinstance(g, dict) else str(g) for g in track.get("genres") or []]
    text = _unique([title, sounds_caption(metadata_tags) or ""])
    original = {key: track.get(key) for key in ("title", "id", "added", "length", "bpm", "isSfx", "hasVocals",
                                                "energyLevel")}
    original.update({"genres": genres, "url": url, "metadataTags": metadata_tags, "Class_name": category})
    return Item(source_id=str(track["id"]), locator=url, text=text,
                tag=_unique([category, *genres, *metadata_tags]), license=LICENSE, author="Epidemic Sound",
                url=url, original_data=original)


class EpidemicSound(Source):
    name = "epidemic_sound"
    fetch_concurrency: ClassVar[int] = 8

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.base = (config.base_url or BASE_URL).rstrip("/")
        self.client = HttpClient(HttpConfig.for_source(config, requests_per_second=4.0))
        wanted = config.options.get("genres", "")
        self.genres = [g.strip() for g in wanted.split(",") if g.strip()]
        self.term = config.options.get("term", "")

    def _api(self, path: str, params: dict[str, Any]) -> Any:
        cookie = os.environ.get(COOKIE_ENV)
        headers = {"Accept": "application/json", "Referer": f"{self.base}/sound-effects/"}
        if cookie:
            headers["Cookie"] = cookie
        return self.client.get_json(f"{self.base}{path}", params=params, headers=headers,
                                    auth_env=COOKIE_ENV if cookie else None)

    def _api_page(self, path: str, params: dict[str, Any], what: str) -> Any:
        """One listing page; a malformed body is fetched again before the run gives up."""
        for attempt in range(PAGE_ATTEMPTS):
            try:
                return self._api(path, params)
            except ItemError as exc:
                if exc.reason != "bad_json" or attempt == PAGE_ATTEMPTS - 1:
                    raise SourceError(f"Epidemic Sound {what}: {exc}") from None
        raise AssertionError("unreachable")

    def categories(self) -> list[tuple[str, str]]:
        """(slug, display name) of every sound-effect category, or of the ones asked for."""
        data = self._api_page("/json/tags/", {"sfx_tag": "true"}, "category list")
        found = [(g["slug"], g.get("displayTag") or g.get("name") or g["slug"])
                 for g in (data or {}).get("genres", []) if isinstance(g, dict) and g.get("slug")]
        if not found:
            raise SourceError("Epidemic Sound returned no sound-effect categories")
        if self.genres:
            names = dict(found)
            return [(slug, names.get(slug, slug)) for slug in self.genres]
        return found

    def list_items(self) -> Iterator[Item]:
        for slug, display in self.categories():
            for track in self._category_tracks(slug):
                item = track_item(track, display)
                if item is not None:
                    yield item

    def _category_tracks(self, slug: str) -> Iterator[dict[str, Any]]:
        params = {"genres": slug, "sort": "date", "order": "asc"}
        if self.term:
            params["term"] = self.term
        listing = PagedListing(self.config.state_dir, f"epidemic_sound-{slug}",
                               {"base": self.base, **params})

        def fetch_page(page: int) -> tuple[list[dict[str, Any]], int | None]:
            data = self._api_page("/json/search/sfx/", {**params, "page": page}, f"page {page} of {slug}")
            try:
                tracks = data["entities"]["tracks"]
                order = [str(hit["trackId"]) for hit in data["meta"]["hits"]]
                total = int(data["meta"]["totalPages"])
            except (KeyError, TypeError, ValueError) as exc:
                raise SourceError(f"Epidemic Sound page {page} of {slug} is not a search result: {exc!r}") from None
            records = [tracks[t] for t in order if t in tracks]
            return records, (page + 1 if page < total else None)

        yield from listing.run(1, fetch_page)

    def fetch(self, item: Item) -> bytes:
        return self.client.get_bytes(item.locator, expect="audio")


SOURCE = EpidemicSound
